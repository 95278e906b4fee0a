"""LongGen (Ge et al. 2024, methods.md §6): a hybrid of full-attention and static sparse-attention layers,
fine-tuned directly at the target length.

The recipe's `method` block is resolved against the model config once (`longgen_spec`: the auto layout
becomes explicit layer indices, out-of-range indices are refused) and stored in rope.json; training,
evaluation and export read the spec from there, so the three always use the same layout. Everything that
touches the model lives in `modeling_longext_longgen.py` beside this file, the self-contained one that
export copies next to the weights.
"""

from __future__ import annotations

from longext.errors import LongextError
from longext.methods.base import Method, MethodSetup, remote_code_keys


def _modeling():
    from longext.methods.longgen import modeling_longext_longgen  # torch + transformers: only when used

    return modeling_longext_longgen


def full_layers(method, num_layers: int) -> list[int]:
    """The full-attention layer indices for a model with `num_layers` decoder layers (sorted).

    Raises LongextError naming the recipe field when an explicit index is out of range.
    """
    layout = method.layout
    if layout.full_layers == "auto":
        return sorted(_modeling().full_layer_indices(num_layers, layout.full_fraction, layout.placement))
    bad = [i for i in layout.full_layers if not 0 <= i < num_layers]
    if bad:
        raise LongextError(
            f"method.layout.full_layers: layer {', '.join(map(str, bad))} is out of range for this model's "
            f"{num_layers} layers (allowed 0..{num_layers - 1}; got {list(layout.full_layers)})"
        )
    return sorted(layout.full_layers)


def longgen_spec(method, config):
    """The LongGenSpec of a recipe's `method` (LongGenMethod) for this model config."""
    sparse = method.sparse
    return _modeling().LongGenSpec(
        full_layers=full_layers(method, config.num_hidden_layers), sparse_type=sparse.type,
        sink_tokens=sparse.sink_tokens, window=sparse.window, block_size=sparse.block_size,
        local_blocks=sparse.local_blocks, vert_stride=sparse.vert_stride, homo_head=sparse.homo_head,
        kernel=method.kernel,
    )


def longgen_state(recipe, config) -> dict:
    """What rope.json keeps: the resolved spec (explicit layers), so training, eval and export never re-resolve it."""
    spec = longgen_spec(recipe.method, config)
    return {"method": "longgen", "longgen": spec.to_dict(), "num_layers": config.num_hidden_layers}


def longgen_setup(recipe, state) -> MethodSetup:
    """Training: the run's hybrid layout (rope.json) on the model instance before LoRA is added."""
    import torch

    if recipe.method.kernel == "flex" and not torch.cuda.is_available():
        raise LongextError(
            "method.kernel: flex trains on CUDA only (FlexAttention has no backward on CPU in this torch); "
            "use auto or block here (got 'flex')"
        )
    spec = state.extra["longgen"]
    return MethodSetup(apply=lambda model: apply_longgen_dict(model, spec))


def apply_longgen_dict(model, spec: dict) -> None:
    """apply_longgen with a spec stored as a plain dict (rope.json extra, config.longgen)."""
    modeling = _modeling()
    modeling.apply_longgen(model, modeling.LongGenSpec.from_dict(spec))


def eval_hook(model, state):
    """Install the run's layout for inference; the window length changes nothing."""
    apply_longgen_dict(model, state.extra["longgen"])
    return lambda length: None


def write_longgen_code(folder, family: str, extra: dict) -> dict:
    """Copy the LongGen modeling code into an export folder; returns the config.json keys that select it.

    model_type and architecture are LongGen's own, so plain transformers without trust_remote_code refuses
    the folder instead of loading it as an all-full-attention model (which it was not trained as).
    """
    modeling = _modeling()
    if family != "llama":
        raise LongextError(f"LongGen export: no modeling code for model type {family!r} (have llama)")
    keys = remote_code_keys(folder, modeling, modeling.LongGenLlamaConfig, modeling.LongGenLlamaForCausalLM)
    return {**keys, "longgen": dict(extra["longgen"])}


def reload_check(config, state) -> str | None:
    """The exported config reloads with the run's layout."""
    if dict(getattr(config, "longgen", None) or {}) != state.extra["longgen"]:
        return (f"export check failed: the written config reloads with longgen={getattr(config, 'longgen', None)}; "
                f"expected {state.extra['longgen']} (nothing was published)")
    return None


def parallel_problems(recipe, sp: int) -> list[str]:
    """block_sparse shifted per head cannot be split over the heads of sequence-parallel ranks."""
    sparse = recipe.method.sparse
    if sparse.type == "block_sparse" and not sparse.homo_head:
        return [f"method.sparse.homo_head: false (a pattern shifted per head) cannot run under "
                f"train.sequence_parallel {sp}: each rank holds heads/{sp} of the heads and would shift them as "
                f"heads 0..; use homo_head true or sequence_parallel 1"]
    return []


# The loaded run sends its full layers to SDPA through its own registered attention function (own_attention).
METHOD = Method(
    kind="longgen", state=longgen_state, parallel_problems=parallel_problems, setup=longgen_setup,
    eval_hook=eval_hook, export_code=write_longgen_code, reload_check=reload_check, own_attention=True,
)
