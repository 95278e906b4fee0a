"""What a method is to the rest of longext: a `Method`, a record of hooks with plain defaults, and what its training
hook hands the loop (`MethodSetup`). A method module fills in only the hooks it needs; `standard` fills in none.

Where each hook is called:

    resolve        longext.resolve.resolve   the method's own `auto` values, before the RoPE state is computed
    state          longext.resolve.resolve   what rope.json keeps for inference (RopeState.extra), computed once
    parallel_*     longext.sp                the method's limits under sequence parallelism
    setup          longext.train             position sampler, model patches, per-batch inputs, extra stages
    eval_hook      longext.targets           a loaded run's inference patches; returns set_length(L)
    serving_state  longext.export            the RoPE state written for the window the export serves
    export_code    longext.export            modeling code copied next to the weights (+ the config keys that select it)
    reload_check   longext.export            the reloaded config still carries the method's state
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from longext.data import PositionSampler, contiguous_positions
from longext.errors import LongextError


def _no_patch(model) -> None:
    return None


def _no_hook(model, batch: dict) -> None:
    return None


@dataclass(frozen=True)
class ExtraStage:
    """Training steps after the main stage in the same engine, with their own data, contiguous positions and a
    constant learning rate (LongRecipe's replay)."""

    name: str
    steps: int
    lr: float
    build_data: Callable  # (recipe, tokenizer) -> TrainData


@dataclass(frozen=True)
class MethodSetup:
    """What the training loop takes from the method (longext.train)."""

    positions: PositionSampler = contiguous_positions
    apply: Callable = field(default=_no_patch)  # model -> None, before LoRA; changes this instance only
    before_forward: Callable = field(default=_no_hook)  # (model, batch) -> None, e.g. per-sample RoPE scale
    per_step: bool = False  # draw positions once per optimizer step instead of once per sample
    build_data: Callable | None = None  # (recipe, tokenizer) -> TrainData, for methods that select their text
    stage_name: str = "train"  # name of the main stage in status.json
    extra_stage: ExtraStage | None = None
    finish: Callable | None = None  # (engine, run_dir, rank) -> None after the adapter is saved, e.g. a merge
    finish_name: str = "merge"  # its name in status.json


# ------------------------------------------------------------------------------------- defaults
def keep_recipe(recipe, config, original: int):
    return recipe


def no_state(recipe, config) -> dict:
    return {}


def plain_setup(recipe, state) -> MethodSetup:
    return MethodSetup()


def no_eval_hook(model, state) -> Callable[[int], None]:
    return lambda length: None


def trained_window(state, length: int | None):
    """The trained RoPE state: the run serves one window, the one it was trained for."""
    if length is not None and length != state.target_len:
        raise LongextError(
            f"--length: this run serves one window ({state.target_len}); --length applies to E2-LLM runs (got {length})"
        )
    return state


def training_length(recipe) -> list[tuple[str, int]]:
    return [("data.seq_len", recipe.data.seq_len)]


def no_problems(recipe, sp: int) -> list[str]:
    return []


def nothing_to_check(config, state) -> str | None:
    return None


@dataclass(frozen=True)
class Method:
    """One method's hooks (module docstring). `config` is the model's transformers config, `state` a
    longext.rope.RopeState, `original` L0."""

    kind: str  # the recipe's method.kind, and rope.json's extra["method"] (nothing for standard)
    resolve: Callable[[Any, Any, int], Any] = keep_recipe  # (recipe, config, original) -> recipe
    state: Callable[[Any, Any], dict] = no_state  # (resolved recipe, config) -> rope.json extra
    training_lengths: Callable[[Any], list[tuple[str, int]]] = training_length  # (recipe) -> [(field, tokens)]
    parallel_problems: Callable[[Any, int], list[str]] = no_problems  # (recipe, sequence_parallel) -> lines
    setup: Callable[[Any, Any], MethodSetup] = plain_setup  # (resolved recipe, state) -> MethodSetup
    eval_hook: Callable[[Any, Any], Callable[[int], None]] = no_eval_hook  # (model, state) -> set_length
    serving_state: Callable[[Any, int | None], Any] = trained_window  # (state, --length) -> state to export
    export_code: Callable[[Path, str, dict], dict] | None = None  # (folder, model_type, extra) -> config keys
    reload_check: Callable[[Any, Any], str | None] = nothing_to_check  # (reloaded config, state) -> problem
    legacy_rope_keys: bool = True  # export writes rope_theta / rope_scaling for older consumers too
    own_attention: bool = False  # the loaded run routes attention itself; export keeps it (LongGen)


def remote_code_keys(folder, modeling, config_cls, model_cls) -> dict:
    """Copy a method's self-contained modeling file into an export folder; returns the config.json keys that
    select its classes with trust_remote_code (model_type, architectures, auto_map)."""
    name = Path(modeling.__file__).name
    shutil.copyfile(modeling.__file__, Path(folder) / name)
    module = name.removesuffix(".py")
    return {
        "model_type": config_cls.model_type,
        "architectures": [model_cls.__name__],
        "auto_map": {
            "AutoConfig": f"{module}.{config_cls.__name__}",
            "AutoModelForCausalLM": f"{module}.{model_cls.__name__}",
        },
    }
