"""What a method hands the training loop (MethodSetup) and the helpers the method modules share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from longext.data import PositionSampler, contiguous_positions


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
    positions: PositionSampler = contiguous_positions
    apply: Callable = field(default=_no_patch)  # model -> None, before LoRA; changes this instance only
    before_forward: Callable = field(default=_no_hook)  # (model, batch) -> None, e.g. per-sample RoPE scale
    per_step: bool = False  # draw positions once per optimizer step instead of once per sample
    build_data: Callable | None = None  # (recipe, tokenizer) -> TrainData, for methods that select their text
    stage_name: str = "train"  # name of the main stage in status.json
    extra_stage: ExtraStage | None = None
    finish: Callable | None = None  # (engine, run_dir, rank) -> None after the adapter is saved, e.g. a merge
    finish_name: str = "merge"  # its name in status.json


def remote_code_keys(folder, modeling, config_cls, model_cls) -> dict:
    """Copy a method's self-contained modeling file into an export folder; returns the config.json keys that
    select its classes with trust_remote_code (model_type, architectures, auto_map)."""
    import shutil
    from pathlib import Path

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
