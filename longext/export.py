"""`longext export RUN --out DIR`: merge the run's LoRA adapter into the base weights (a full fine-tune has
nothing to merge: its trained weights are written as they are) and write a model directory that plain
transformers (and older consumers) load with the trained RoPE setting.

    OUT/config.json                 base config + rope_parameters (transformers 5) + rope_theta /
                                    rope_scaling (transformers 4.x, vLLM, DeepSpeed) +
                                    max_position_embeddings + an informative `longext` block
    OUT/model*.safetensors          merged weights in --dtype
    OUT/generation_config.json      when the base model has one
    OUT/tokenizer files             the base model's tokenizer, unchanged

Everything is written to `.OUT.tmp-*` beside OUT, reloaded there with plain
`AutoModelForCausalLM.from_pretrained` and compared on fixed probe tokens; only then is it renamed to
OUT (design.md §2 item 5: the RoPE state is an artifact, and export proves it). The probes, the bounds and the
reload check are in longext/export_check.py.
"""

from __future__ import annotations

import gc
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from longext import __version__
from longext.errors import LongextError
from longext.export_check import (
    FP32_RTOL, Probe, build_probes, check_diff, max_abs_diff, probe_logits, result_bound, verify_export,
)
from longext.files import check_writable, expand_path, publish_folder, staging_folder
from longext.families import SLIDING, family_of
from longext.methods import trained_method
from longext.methods.base import remote_code_keys
from longext.models import load_model_config, quiet_libraries, reference_attention
from longext.rope import RopeState, is_layered, legacy_rope_keys, rotary_dim, stated_for
from longext.rundir import is_run_dir, load_run_recipe
from longext.targets import check_target_files, load_target

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ALLOWED_DTYPES = ("auto", "float32", "bfloat16")  # float16 only via auto, when the base model is float16
RUN_FOLDERS = ("adapter", "model", "checkpoints")  # OUT may not live inside these (and --force would delete them)


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    max_abs_diff: float  # max |Δlogit|, reloaded OUT vs unmerged in-tool model, over all probes
    bound: float  # what max_abs_diff had to stay below
    merge_diff: float  # merged (float32) vs unmerged in-tool model
    artifact_diff: float  # reloaded OUT vs the merged model at the saved dtype (bound FP32_RTOL * scale)
    dtype: str  # dtype of the saved weights
    logit_scale: float  # max |logit| of the in-tool model on the probes
    probes: tuple[str, ...]  # what was compared, e.g. "2x128 tokens at positions 0-63, 192-255"
    rope_parameters: dict
    max_position_embeddings: int
    replaced: bool  # an existing OUT was replaced (--force)




@dataclass
class Merged:
    """The merged model ready to save, and the logits everything is compared with."""

    model: Any  # PreTrainedModel at the save dtype; None once written
    dtype: str
    probes: list[Probe]
    reference: list[torch.Tensor]  # unmerged in-tool model
    saved: list[torch.Tensor]  # merged model at the save dtype, computed in float32
    merge_diff: float
    scale: float
    base: str
    longext: dict


def run_export(run: Path, out: Path, force: bool = False, dtype: str = "auto", length: int | None = None) -> ExportResult:
    """Merge, write to a temp dir beside OUT, reload with plain transformers, compare logits, publish.

    `length`: the window to serve, for methods whose inference setting depends on it (E2-LLM: PI with
    the factor g its rule picks for that window); the exported config is then a standard one."""
    run, out = Path(run), Path(out)
    check_export_args(run, out, force, dtype)
    trained = RopeState.from_json(json.loads((run / "rope.json").read_text()))
    state = trained_method(trained).serving_state(trained, length)  # E2-LLM: PI for the window asked for
    base_config = load_model_config(expand_path(load_run_recipe(run).model.path))
    state = stated_for(state, family_of(base_config), rotary_dim(base_config))  # Phi-3: PI as longrope
    quiet_libraries()
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # save_pretrained imports deepspeed, which warns without it
    merged = merge_run(run, state, dtype)
    with staging_folder(out) as tmp:
        write_export(merged, tmp, state)
        merged.model = None  # one model in memory at a time
        gc.collect()
        diff, artifact_diff = verify_export(tmp, state, merged)
        replaced = _publish(tmp, out, force)
    return ExportResult(
        out_dir=out, max_abs_diff=diff, bound=result_bound(merged.dtype, merged.scale), merge_diff=merged.merge_diff,
        artifact_diff=artifact_diff, dtype=merged.dtype, logit_scale=merged.scale,
        probes=tuple(p.describe() for p in merged.probes), rope_parameters=dict(state.parameters),
        max_position_embeddings=state.max_position_embeddings, replaced=replaced,
    )


def check_export_args(run: Path, out: Path, force: bool, dtype: str) -> None:
    """Every refusal that needs no weights, before anything is loaded or written."""
    if dtype not in ALLOWED_DTYPES:
        raise LongextError(f"--dtype: got {dtype!r} (allowed: {', '.join(ALLOWED_DTYPES)})")
    if not run.is_dir():
        raise LongextError(f"RUN: no such directory: {str(run)!r}")
    if not is_run_dir(run):
        raise LongextError(f"RUN: {run} is not a run directory (no recipe.yaml/rope.json)")
    check_trained(run)
    check_target_files(run)  # the base model's folder and the adapter (or model/) weights, before any load
    r, o = run.resolve(), out.resolve()
    if r.is_relative_to(o):
        raise LongextError(f"--out: {out} is the run directory or contains it; choose another directory")
    for folder in RUN_FOLDERS:
        if o.is_relative_to(r / folder):
            raise LongextError(f"--out: {out} is inside the run's {folder}/ folder; choose another directory")
    if out.exists() and not out.is_dir():
        raise LongextError(f"--out: {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise LongextError(f"--out: {out} exists; pass --force to replace it")
    check_writable(out, "--out")


def check_trained(run: Path) -> None:
    """The run's trained weights are there: model/ for a full fine-tune, a readable adapter/ otherwise."""
    if load_run_recipe(run).train.full_finetune:
        if not (run / "model" / "config.json").is_file():
            raise LongextError(f"RUN: {run} has no trained weights yet; finish or resume training first")
        return
    adapter_config = run / "adapter" / "adapter_config.json"
    if not adapter_config.is_file():
        raise LongextError(f"RUN: {run} has no adapter yet; finish or resume training first")
    try:
        json.loads(adapter_config.read_text())
    except ValueError as err:
        raise LongextError(f"RUN: {adapter_config} is not valid JSON ({err}); resume training to rewrite it") from None


def merge_run(run: Path, state: RopeState, dtype: str) -> Merged:
    """In-tool model (base + RoPE + adapter, float32) → reference logits → merged, checked, cast to the save dtype.
    A full fine-tune's in-tool model is already the model to write: no merge, merge_diff 0."""
    loaded = load_target(run, dtype=torch.float32)
    loaded.set_length(state.target_len)  # E2-LLM: the PI scale for the served window
    recipe, in_tool = loaded.recipe, loaded.model
    full = recipe.train.full_finetune
    base = expand_path(recipe.model.path)
    save_dtype = resolve_dtype(dtype, base)
    if not trained_method(state).own_attention:  # LongGen's registered function already sends full layers to SDPA
        kernel = reference_attention(in_tool.config)  # as the reloaded side (eager for Gemma 2)
        (in_tool if full else in_tool.get_base_model()).set_attn_implementation(kernel)
    probes = build_probes(in_tool.config.vocab_size, state, sum(p.numel() for p in in_tool.parameters()))
    reference = probe_logits(in_tool, probes)
    scale = max(float(r.abs().max()) for r in reference)
    model, saved, merge_diff = in_tool, reference, 0.0
    if not full:
        try:
            model = in_tool.merge_and_unload(safe_merge=True)
        except ValueError as err:  # peft's safe_merge: NaN in a merged weight
            raise LongextError(f"RUN: the adapter in {run / 'adapter'} is broken: {str(err).splitlines()[0]}") from None
        saved = probe_logits(model, probes)
        merge_diff = max_abs_diff(saved, reference)
        check_diff("merge check failed: merged and unmerged model", merge_diff, FP32_RTOL * max(1.0, scale),
               "nothing was written")
    round_weights(model, DTYPES[save_dtype])
    check_finite(model, run)
    if save_dtype != "float32":
        saved = probe_logits(model, probes)
    model.to(DTYPES[save_dtype])
    info = {
        "version": __version__, "run": recipe.name, "method": recipe.method.kind, "rope_kind": state.kind,
        "original_context": state.original_context, "target_len": state.target_len,
    }
    return Merged(model, save_dtype, probes, reference, saved, merge_diff, scale, base, info)


def resolve_dtype(dtype: str, base_path: str) -> str:
    """`auto` = the saved dtype (config.dtype / torch_dtype) of the base model at `base_path` (expanded), float32
    when unknown."""
    if dtype != "auto":
        return dtype
    config = load_model_config(base_path)
    saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(saved).removeprefix("torch.") if saved is not None else "float32"
    return name if name in DTYPES else "float32"


@torch.no_grad()
def round_weights(model, dtype: torch.dtype) -> None:
    """Round the parameters to `dtype` in place, storage kept float32: the saved model, computed as
    the reloaded one will be (model.to() would also round the rotary buffers, which are not saved)."""
    if dtype == torch.float32:
        return
    for p in model.parameters():
        p.copy_(p.to(dtype).float())


def check_finite(model, run: Path) -> None:
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise LongextError(
                f"RUN: merged weight {name} of {run} contains NaN/inf (a broken adapter, or too large for the "
                f"save dtype; try --dtype float32); nothing was written"
            )




# ------------------------------------------------------------------------------------- writing
def write_export(merged: Merged, folder: Path, state: RopeState) -> None:
    """Weights, tokenizer and generation config through transformers, then the RoPE keys in config.json."""
    from transformers import AutoTokenizer

    merged.model.save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(merged.base).save_pretrained(folder)
    path = folder / "config.json"
    config = json.loads(path.read_text())
    family = family_of(config)
    config.update(export_config_keys(state, config))
    config["dtype"] = merged.dtype
    config["longext"] = merged.longext
    method = trained_method(state)
    if method.export_code:  # HARPE, LongGen: their modeling code next to the weights, wired through auto_map
        config.update(method.export_code(folder, family.model_type, state.extra))
    elif family.layer_rope == "longext":  # Gemma 2: the code that gives each layer type its RoPE
        from longext.families import modeling_longext_gemma2 as modeling

        config.update(remote_code_keys(folder, modeling, modeling.LongextGemma2Config, modeling.LongextGemma2ForCausalLM))
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def export_config_keys(state: RopeState, config: dict) -> dict:
    """Both key styles: `rope_parameters` for transformers 5, `rope_theta` + `rope_scaling` for the rest (Gemma 3:
    nested per layer type, plus `rope_local_base_freq`). max_position_embeddings stays L0 for dynamic (raising it
    switches the scaling off, design.md §4). A method may leave the legacy keys out (HARPE: no older consumer can
    run per-head bases). Gemma 2 (one setting in its own config) gets the sliding-window layers' setting in
    `rope_parameters`, both in `layer_rope_parameters` (read by modeling_longext_gemma2.py) and no legacy keys."""
    params = dict(state.parameters)
    keys = {"rope_parameters": params, "max_position_embeddings": state.max_position_embeddings}
    if "original_max_position_embeddings" in config:  # Phi-3 reads this one over rope_parameters' own
        keys["original_max_position_embeddings"] = state.original_context
    if is_layered(params) and family_of(config).layer_rope == "longext":
        return {**keys, "rope_parameters": dict(params[SLIDING]), "layer_rope_parameters": params}
    if not trained_method(state).legacy_rope_keys:
        return keys
    return {**keys, **legacy_rope_keys(params)}




def _publish(tmp: Path, out: Path, force: bool) -> bool:
    """Rename the verified temp dir to OUT (an old OUT is deleted once the new one is in place); returns whether a
    non-empty OUT was replaced."""
    replaced = out.is_dir() and any(out.iterdir())
    if replaced and not force:  # created while we were working
        raise LongextError(f"--out: {out} exists; pass --force to replace it")
    publish_folder(tmp, out)
    return replaced
