"""Load what `eval`, `export` and `analyze` work on: a run directory (base + RoPE state + adapter, or a full
fine-tune's model/, with the method's inference patches), its base model, or any model directory."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from longext.errors import LongextError, Problems
from longext.files import expand_path
from longext.families import apply_family_rope
from longext.models import attn_implementation, is_own_export, load_model_config, load_tokenizer, reference_attention
from longext.recipe import Recipe
from longext.rope import RopeState, apply_rope_config
from longext.rundir import is_run_dir, load_run_recipe


@dataclass
class Loaded:
    """A model ready for evaluation, with what the report needs to know about it."""

    model: Any  # PreTrainedModel or PeftModel, eval mode
    tokenizer: Any
    name: str
    original_context: int
    target_context: int | None
    rope: dict
    set_length: Callable[[int], None] = field(default=lambda length: None)
    recipe: Recipe | None = None


def eval_dtype() -> torch.dtype:
    """bf16 on GPUs that support it (a 7B model at 128k does not fit otherwise), fp32 on CPU."""
    return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32


def load_target(target: Path, *, baseline: bool = False, dtype: torch.dtype | None = None) -> Loaded:
    """A run directory (base + RoPE + adapter, or a full fine-tune's model/), its base model (`baseline=True`), or
    any model directory. The model is on the GPU when there is one."""
    loaded = _load_target(Path(target), baseline, dtype or eval_dtype())
    if torch.cuda.is_available():
        loaded.model.to("cuda")
    return loaded


def _load_target(target: Path, baseline: bool, dtype: torch.dtype) -> Loaded:
    if not target.is_dir():
        raise LongextError(f"TARGET: no such directory: {str(target)!r}")
    check_target_files(target, baseline)
    if is_run_dir(target):
        recipe = load_run_recipe(target)
        if baseline:
            return _load_plain(Path(expand_path(recipe.model.path)), name="base", dtype=dtype, recipe=recipe)
        return _load_run(target, recipe, dtype)
    if baseline:
        raise LongextError(f"--baseline: {str(target)!r} is not a run directory, so it has no base model to compare with")
    return _load_plain(target, name=target.name, dtype=dtype)


def check_target_files(target: Path, baseline: bool = False, field: str = "TARGET") -> None:
    """Every file loading `target` reads, checked before any is loaded (longext.modeldir): a plain model folder, or
    a run's base model (model.path) with its adapter/ or a full fine-tune's model/ weights. All problems at once."""
    from longext.modeldir import adapter_problems, model_problems

    if not is_run_dir(target):
        problems = model_problems(target, field)
    else:
        recipe = load_run_recipe(target)
        base = Path(expand_path(recipe.model.path))
        field_base = f"model.path (the base model of {target}/recipe.yaml)"  # a hub name is checked by its download
        problems = model_problems(base, field_base) if base.is_dir() else []
        if not baseline and recipe.train.full_finetune and (target / "model").is_dir():
            problems += model_problems(target / "model", field, tokenizer=False)
        elif not baseline and (target / "adapter" / "adapter_config.json").is_file():
            problems += adapter_problems(target / "adapter", field)
    if problems:
        raise Problems(problems)


def _load_run(run_dir: Path, recipe: Recipe, dtype: torch.dtype) -> Loaded:
    """Base + RoPE state + adapter; a full fine-tune's weights in the base's config with the RoPE state instead.
    The method's inference patches (its eval_hook) go onto either the same way."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    state = RopeState.from_json(json.loads((run_dir / "rope.json").read_text()))
    full = recipe.train.full_finetune
    adapter = run_dir / "adapter"
    if full and not (run_dir / "model" / "config.json").is_file():
        raise LongextError(
            f"TARGET: {run_dir} has no trained weights yet (train it, or resume with `longext train --resume`)"
        )
    if not full and not (adapter / "adapter_config.json").is_file() and not (adapter / "model.safetensors").is_file():
        raise LongextError(f"TARGET: {run_dir} has no finished adapter yet (train it, or resume with `longext train --resume`)")
    base = expand_path(recipe.model.path)
    config = load_model_config(base)
    apply_rope_config(config, state)
    model = AutoModelForCausalLM.from_pretrained(  # model/config.json is ignored: it may carry training-time patches
        run_dir / "model" if full else base, config=config, dtype=dtype,
        attn_implementation=attn_implementation(recipe.model.attn_implementation, config),
    )
    apply_family_rope(model, state.parameters)  # Gemma 2: the full-attention layers' own RoPE
    if not full and (adapter / "adapter_config.json").is_file():
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    from longext.methods import trained_method

    return Loaded(
        set_length=trained_method(state).eval_hook(model, state),
        model=model, tokenizer=load_tokenizer(base), name=recipe.name,
        original_context=state.original_context, target_context=state.target_len, rope=state.parameters, recipe=recipe,
    )


def _load_plain(path: Path, name: str, dtype: torch.dtype, recipe: Recipe | None = None) -> Loaded:
    from transformers import AutoModelForCausalLM

    from longext.rope import original_context

    config = load_model_config(str(path), "TARGET" if recipe is None else "model.path")
    model = AutoModelForCausalLM.from_pretrained(
        path, config=config, dtype=dtype, attn_implementation=reference_attention(config),
        trust_remote_code=is_own_export(path),
    ).eval()
    written = (getattr(config, "longext", None) or {}).get("original_context")  # an export says what L0 was
    L0 = original_context(config, recipe.model.original_context if recipe else written)
    return Loaded(
        model=model, tokenizer=load_tokenizer(str(path)), name=name, original_context=L0,
        target_context=None if recipe else (getattr(config, "longext", None) or {}).get("target_len", config.max_position_embeddings),
        rope=dict(config.rope_parameters or {}),
        recipe=recipe,
    )
