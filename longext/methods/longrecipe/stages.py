"""LongRecipe's stages after extension (methods.md §4.1.6): replay on general short data with contiguous positions
at a lower learning rate, in the same engine, and a merge with the original weights.

Merge. LongRecipe averages every parameter, θ = w·θ_original + (1 - w)·θ_tuned. With LoRA the tuned weight is
W + s·B·A, so the average is W + (1 - w)·s·B·A: the same adapter with B scaled by (1 - w). Fully trained
modules (lora.modules_to_save) are averaged with their original weights directly. The result is still a peft
adapter, so eval and export treat it like any other run; the unmerged adapter stays in adapter-tuned/.
A full fine-tune (train.full_finetune) averages every saved tensor of model/ with the base model's own, and the
unmerged model stays in model-tuned/.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from longext.data import TrainData, build_train_data
from longext.files import expand_path, publish_folder, staging_folder

WEIGHTS = "adapter_model.safetensors"
LORA_UP = ("lora_B", "lora_embedding_B")


def build_replay_data(recipe, tokenizer) -> TrainData:
    """The replay set at replay.seq_len (L0 by default), ordinary contiguous positions."""
    replay = recipe.method.replay
    data = recipe.data.model_copy(update={"train": replay.data, "seq_len": replay.seq_len})
    return build_train_data(recipe.model_copy(update={"data": data}), tokenizer)


def merged_adapter_state(state: dict[str, torch.Tensor], originals: dict[str, torch.Tensor], weight_original: float):
    """Adapter tensors of the merged model (see the module docstring); `originals` maps the saved key of each
    modules_to_save weight to the original weight."""
    keep = 1.0 - weight_original
    out = {}
    for key, value in state.items():
        if any(f".{up}." in key for up in LORA_UP):
            out[key] = (value.float() * keep).to(value.dtype)
        elif key in originals:
            out[key] = (weight_original * originals[key].float() + keep * value.float()).to(value.dtype)
        elif ".lora_" in key:
            out[key] = value  # lora_A / lora_embedding_A: the product scales through B alone
        else:
            raise RuntimeError(f"merge: no rule for adapter tensor {key}")
    return out


def merge_with_original(engine, run_dir: Path, recipe, rank: int) -> None:
    """Rewrite run_dir/adapter as the merge with the original model (weight recipe.method.merge.weight_original);
    the tuned adapter moves to adapter-tuned/. A full fine-tune merges run_dir/model instead
    (merge_full_with_original)."""
    from safetensors.torch import load_file, save_file

    from longext.engine import gathered

    weight_original = recipe.method.merge.weight_original
    if recipe.train.full_finetune:
        return merge_full_with_original(run_dir, expand_path(recipe.model.path), weight_original, rank)
    originals = {
        name.replace(".original_module", ""): p for name, p in engine.module.named_parameters() if ".original_module." in name
    }
    with gathered(engine, originals.values()):
        if rank == 0:
            adapter, tuned = run_dir / "adapter", run_dir / "adapter-tuned"
            state = load_file(adapter / WEIGHTS)
            saved = {k: p.detach().cpu() for k, p in originals.items() if k in state}
            merged = merged_adapter_state(state, saved, weight_original)
            with staging_folder(adapter) as tmp:
                shutil.copytree(adapter, tmp, dirs_exist_ok=True)
                save_file(merged, str(tmp / WEIGHTS), metadata={"format": "pt"})
                publish_folder(tmp, adapter, previous=tuned)  # the tuned adapter stays in adapter-tuned/
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def merge_full_with_original(run_dir: Path, base_dir: str, weight_original: float, rank: int) -> None:
    """Rewrite run_dir/model (every weight trained) as w·θ_original + (1 - w)·θ_tuned, tensor by tensor, computed in
    float32 and saved in the tuned tensor's dtype; the tuned model moves to model-tuned/. Both sides come from
    save_pretrained/from_pretrained of the same architecture, so their tensor names agree."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    if rank == 0:
        original = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).state_dict()
        model, tuned = run_dir / "model", run_dir / "model-tuned"
        with staging_folder(model) as tmp:
            shutil.copytree(model, tmp, dirs_exist_ok=True)
            for file in sorted(model.glob("*.safetensors")):
                merged = {
                    key: (weight_original * original[key] + (1.0 - weight_original) * value.float()).to(value.dtype)
                    for key, value in load_file(file).items()
                }
                save_file(merged, str(tmp / file.name), metadata={"format": "pt"})
            publish_folder(tmp, model, previous=tuned)  # the tuned model stays in model-tuned/
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
