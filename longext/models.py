"""Load the base model with the recipe's RoPE setting and add LoRA (or train every weight). Loading a trained run
or any model for eval/export is longext.targets.

Patch ladder (style.md §4.4): RoPE goes into the config before the weights load; method patches
work on this model instance only.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from longext.errors import LongextError
from longext.families import SUPPORTED_MODEL_TYPES, apply_family_rope, family_of, lora_targets
from longext.recipe import LoraSpec
from longext.rope import apply_rope_config



def quiet_libraries() -> None:
    """Keep our progress output readable: no per-file progress bars or deprecation chatter from libraries."""
    import os
    import sys
    import warnings

    import transformers

    # datasets is imported only by the sources that need it (a save_to_disk folder, a hub stream): importing it here
    # cost every start ~1 s (pandas, pyarrow); it reads this variable when it is imported
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    else:
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")


def load_model_config(path: str, field_name: str = "model.path"):
    """AutoConfig for a local directory (a recipe's path expanded once by its caller: resolve, targets) or a hub
    name; one-line errors for the usual failures."""
    from transformers import AutoConfig

    path = str(path)
    local = Path(path)
    if local.exists():
        if not (local / "config.json").is_file():
            raise LongextError(f"{field_name}: {path} has no config.json (expected a transformers model directory)")
    else:
        from longext.hub import hub_problem

        problem = hub_problem(path, field_name)  # a hub name: cached, or downloadable now; a missing folder
        if problem:
            raise LongextError(problem)
    own = is_own_export(local)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=own)
    except (OSError, ValueError) as err:
        raise LongextError(f"{field_name}: cannot load a model config from {path!r}: {str(err).splitlines()[0]}") from None
    if config.model_type not in SUPPORTED_MODEL_TYPES and not own:
        raise LongextError(
            f"{field_name}: model type {config.model_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    return config


def is_own_export(path: Path) -> bool:
    """A model longext exported with its own modeling code (HARPE): its code is ours, so loading it
    with trust_remote_code is safe; nothing else gets that."""
    import json

    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return str(config.get("model_type", "")).startswith("longext_") and "longext" in config


def attn_implementation(requested: str, config=None) -> str:
    """The kernel for model.attn_implementation: auto = flash_attention_2 on CUDA when flash-attn is installed, else
    sdpa; eager for families transformers runs without SDPA (Gemma 2's soft-capped attention scores)."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa" if config is None or family_of(config).sdpa else "eager"


def reference_attention(config) -> str:
    """The kernel a plain reload and its reference run with: sdpa, or eager where the family has no SDPA path."""
    return "sdpa" if family_of(config).sdpa else "eager"


def check_attention(requested: str, config) -> None:
    """A one-line refusal of a kernel the family cannot run (before any weights load)."""
    if requested == "sdpa" and not family_of(config).sdpa:
        raise LongextError(f"model.attn_implementation: {family_of(config).label} cannot run sdpa (transformers has "
                           f"no SDPA path for its soft-capped attention scores); use auto, eager or flash_attention_2")


def load_tokenizer(path: str, field_name: str = "model.path"):
    """The model's tokenizer, pad = EOS when it has none. Its files were checked (longext.modeldir); what the
    tokenizer library still refuses is one line naming the folder."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as err:  # the tokenizers library raises plain Exception for a file it cannot parse
        raise LongextError(f"{field_name}: cannot load the tokenizer of {path}: {str(err).strip().splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_model(resolved, dtype: torch.dtype = torch.float32):
    """The base model of a resolved recipe (longext.resolve.Resolved) with its RoPE state in the config it was
    resolved against (weights loaded once, at the end)."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(resolved.model_config)  # the resolved config stays as config.json says
    apply_rope_config(config, resolved.rope)
    model = AutoModelForCausalLM.from_pretrained(
        resolved.model_dir, config=config, dtype=dtype,
        attn_implementation=attn_implementation(resolved.recipe.model.attn_implementation, config),
    )
    apply_family_rope(model, resolved.rope.parameters)  # Gemma 2: the full-attention layers' own RoPE
    return model


def add_lora(model, spec: LoraSpec, gradient_checkpointing: bool = False):
    """peft LoRA on `spec.targets` (auto: the family's attention projections) and, with `spec.experts`, on the
    experts' 3-D weights (peft target_parameters; the router is never adapted), plus fully trained
    `modules_to_save`; returns the PeftModel."""
    from peft import LoraConfig, get_peft_model

    targets = lora_targets(model.config) if spec.targets == "auto" else list(spec.targets)
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for field_name, wanted in (("lora.targets", targets), ("lora.modules_to_save", spec.modules_to_save)):
        missing = [t for t in wanted if t not in names]
        if missing:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
            raise LongextError(f"{field_name}: no module named {', '.join(missing)} in this model (linear layers: {', '.join(linear)})")
    _training_mode(model, gradient_checkpointing)
    config = LoraConfig(
        r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets,
        target_parameters=expert_targets(model) if spec.experts else None,
        modules_to_save=spec.modules_to_save or None, task_type="CAUSAL_LM", bias="none",
    )
    return get_peft_model(model, config)


def expert_targets(model) -> list[str]:
    """peft target_parameters for LoRA on every expert: the 3-D expert weights (gate_up_proj, down_proj) named
    as peft matches them, a suffix of the parameter name. A dense model has none: one-line error."""
    family = family_of(model.config)
    names = [n for n, _ in model.named_parameters()]
    found = [p for p in family.experts if any(n.endswith("." + p) for n in names)]
    if not found:
        raise LongextError(f"lora.experts: {family.label} has no experts (a dense model); set lora.experts: false")
    return found


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
