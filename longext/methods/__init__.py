"""What each method adds to a standard run: position sampler (data), instance patches (model),
and per-batch inputs consumed before the forward pass. `standard` adds nothing.

Methods plug in here (one module each); the training loop never tests the method's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from longext.data import PositionSampler, contiguous_positions


def _no_patch(model) -> None:
    return None


def _no_hook(model, batch: dict) -> None:
    return None


@dataclass(frozen=True)
class MethodPlan:
    positions: PositionSampler = contiguous_positions
    apply: Callable = field(default=_no_patch)  # model -> None, before LoRA; changes this instance only
    before_forward: Callable = field(default=_no_hook)  # (model, batch) -> None, e.g. per-sample RoPE scale


def plan_method(recipe, model_config) -> MethodPlan:
    """The MethodPlan for `recipe.method.kind`."""
    match recipe.method.kind:
        case "standard":
            return MethodPlan()
    raise NotImplementedError(recipe.method.kind)  # the schema admits only implemented kinds
