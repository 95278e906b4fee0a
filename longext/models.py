"""Load the base model with the recipe's RoPE setting, add LoRA (or train every weight), and load any target
for eval/export.

Patch ladder (style.md §4.4): RoPE goes into the config before the weights load; method patches
work on this model instance only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from longext.errors import LongextError
from longext.materials import expand_path
from longext.recipe import LoraSpec, Recipe, load_recipe
from longext.rope import RopeState, apply_rope_config, rope_state

# Families whose attention uses transformers' standard rotary embedding + `apply_rotary_pos_emb`.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


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


def quiet_libraries() -> None:
    """Keep our progress output readable: no per-file progress bars or deprecation chatter from libraries."""
    import warnings

    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")


def load_model_config(path: str, field_name: str = "model.path"):
    """AutoConfig for a local directory or a hub name; one-line errors for the usual failures."""
    from transformers import AutoConfig

    path = expand_path(path)
    local = Path(path)
    if local.exists():
        if not (local / "config.json").is_file():
            raise LongextError(f"{field_name}: {path} has no config.json (expected a transformers model directory)")
    elif os.environ.get("HF_HUB_OFFLINE") == "1" or path.startswith((".", "/", "~")):
        raise LongextError(
            f"{field_name}: no such model directory: {path!r} (for the offline SmolLM2 run `longext models prepare smollm2`)"
        )
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=_own_export(local))
    except (OSError, ValueError) as err:
        raise LongextError(f"{field_name}: cannot load a model config from {path!r}: {str(err).splitlines()[0]}") from None
    if config.model_type not in SUPPORTED_MODEL_TYPES and not _own_export(local):
        raise LongextError(
            f"{field_name}: model type {config.model_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    return config


def _own_export(path: Path) -> bool:
    """A model longext exported with its own modeling code (HARPE): its code is ours, so loading it
    with trust_remote_code is safe; nothing else gets that."""
    import json

    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return str(config.get("model_type", "")).startswith("longext_") and "longext" in config


def attn_implementation(requested: str) -> str:
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(expand_path(path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_model(recipe: Recipe, dtype: torch.dtype = torch.float32) -> tuple[Any, RopeState]:
    """Base model with the recipe's RoPE state in its config (weights loaded once, at the end)."""
    from transformers import AutoModelForCausalLM

    config = load_model_config(recipe.model.path)
    state = rope_state(recipe, config)
    apply_rope_config(config, state)
    model = AutoModelForCausalLM.from_pretrained(
        expand_path(recipe.model.path), config=config, dtype=dtype,
        attn_implementation=attn_implementation(recipe.model.attn_implementation),
    )
    return model, state


def add_lora(model, spec: LoraSpec, gradient_checkpointing: bool = False):
    """peft LoRA on `spec.targets`, plus fully trained `modules_to_save`; returns the PeftModel."""
    from peft import LoraConfig, get_peft_model

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for field_name, wanted in (("lora.targets", spec.targets), ("lora.modules_to_save", spec.modules_to_save)):
        missing = [t for t in wanted if t not in names]
        if missing:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
            raise LongextError(f"{field_name}: no module named {', '.join(missing)} in this model (linear layers: {', '.join(linear)})")
    _training_mode(model, gradient_checkpointing)
    config = LoraConfig(
        r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=spec.targets,
        modules_to_save=spec.modules_to_save or None, task_type="CAUSAL_LM", bias="none",
    )
    return get_peft_model(model, config)


def apply_full_finetune(model, gradient_checkpointing: bool = False) -> None:
    """Every weight trains (train.full_finetune, the papers' setting). No wrapper: parameter names, checkpoints and
    save_pretrained stay the model's own."""
    model.requires_grad_(True)
    _training_mode(model, gradient_checkpointing)


def _training_mode(model, gradient_checkpointing: bool) -> None:
    """Non-reentrant gradient checkpointing if asked, and no KV cache in training forwards."""
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


# ------------------------------------------------------------------------------------- targets
def is_run_dir(path: Path) -> bool:
    return (path / "recipe.yaml").is_file() and (path / "rope.json").is_file()


def load_run_recipe(run_dir: Path) -> Recipe:
    return load_recipe(run_dir / "recipe.yaml")


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
    if is_run_dir(target):
        recipe = load_run_recipe(target)
        if baseline:
            return _load_plain(Path(expand_path(recipe.model.path)), name="base", dtype=dtype, recipe=recipe)
        return _load_run(target, recipe, dtype)
    if baseline:
        raise LongextError(f"--baseline: {str(target)!r} is not a run directory, so it has no base model to compare with")
    return _load_plain(target, name=target.name, dtype=dtype)


def _load_run(run_dir: Path, recipe: Recipe, dtype: torch.dtype) -> Loaded:
    """Base + RoPE state + adapter; a full fine-tune's weights in the base's config with the RoPE state instead.
    The method's inference patches (eval_setup) go onto either the same way."""
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
    config = load_model_config(recipe.model.path)
    apply_rope_config(config, state)
    model = AutoModelForCausalLM.from_pretrained(  # model/config.json is ignored: it may carry training-time patches
        run_dir / "model" if full else expand_path(recipe.model.path), config=config, dtype=dtype,
        attn_implementation=attn_implementation(recipe.model.attn_implementation),
    )
    if not full and (adapter / "adapter_config.json").is_file():
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    from longext.methods import eval_setup

    return Loaded(
        set_length=eval_setup(model, state),
        model=model, tokenizer=load_tokenizer(expand_path(recipe.model.path)), name=recipe.name,
        original_context=state.original_context, target_context=state.target_len, rope=state.parameters, recipe=recipe,
    )


def _load_plain(path: Path, name: str, dtype: torch.dtype, recipe: Recipe | None = None) -> Loaded:
    from transformers import AutoModelForCausalLM

    from longext.rope import original_context

    config = load_model_config(str(path), "TARGET" if recipe is None else "model.path")
    model = AutoModelForCausalLM.from_pretrained(
        path, config=config, dtype=dtype, attn_implementation="sdpa", trust_remote_code=_own_export(path)
    ).eval()
    written = (getattr(config, "longext", None) or {}).get("original_context")  # an export says what L0 was
    L0 = original_context(config, recipe.model.original_context if recipe else written)
    return Loaded(
        model=model, tokenizer=load_tokenizer(str(path)), name=name, original_context=L0,
        target_context=None if recipe else (getattr(config, "longext", None) or {}).get("target_len", config.max_position_embeddings),
        rope=dict(config.rope_parameters or {}),
        recipe=recipe,
    )
