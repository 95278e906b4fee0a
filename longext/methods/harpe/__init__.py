"""HARPE (Lian et al. 2024, methods.md §5): a RoPE base per attention head, trained once at the target length.

The bases are resolved against the model config once (`head_bases`) and stored in rope.json; training,
evaluation and export read them from there. On the model, two per-instance swaps: the ScaledRotary
(longext/rotary.py) returns one cos/sin set per key/value head, and each layer's attention becomes the
HARPE subclass of its family, which rotates every head with its group's set. The search (`bases.py`) and the
modeling code shared by training, evaluation and the exported model (`modeling_longext_harpe.py`, torch +
transformers only, copied next to exported weights) live beside this file.

GQA: query heads that share a key/value head share its base (`per_kv_group`, methods.md §5.5), so there
are num_key_value_heads bases; `per_head` (one base per query head) is accepted only when there is one
key/value head per query head, where the two are the same and the paper applies unchanged.
"""

from __future__ import annotations

from longext.errors import LongextError
from longext.methods.base import Method, MethodSetup, remote_code_keys
from longext.methods.harpe import bases as harpe_bases


def head_bases(method, config) -> list[float]:
    """One base per key/value head for this model config, from the recipe's `method` (HarpeMethod).

    Raises LongextError naming the recipe field when the set does not fit the model.
    """
    heads, kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    if method.assign == "per_head" and kv != heads:
        raise LongextError(
            f"method.assign: per_head needs one key/value head per query head; this model has {heads} query heads "
            f"over {kv} key/value heads (grouped-query attention), so use per_kv_group"
        )
    spec = method.bases
    match spec.kind:
        case "table":
            try:
                values = harpe_bases.table_bases(spec.table, kv)
            except ValueError as err:
                raise LongextError(f"method.bases.table: {err}; use kind uniform or peak_valley") from None
            if spec.rescale is not None:
                values = harpe_bases.rescaled(values, *spec.rescale)
        case "uniform":
            values = harpe_bases.uniform_bases(spec.b_min, spec.b_max, kv)
        case "peak_valley":
            dim = getattr(config, "head_dim", None) or config.hidden_size // heads
            try:
                search = (spec.b_min, spec.b_max, spec.stride, kv, dim, method.target_len)
                values = list(harpe_bases.peak_valley_bases(*search))
            except ValueError as err:
                raise LongextError(f"method.bases.stride: {err}; lower the stride or widen [b_min, b_max]") from None
        case "explicit":
            if len(spec.values) != kv:
                raise LongextError(
                    f"method.bases.values: expected one base per key/value head ({kv}; the model has {heads} query "
                    f"heads over {kv} key/value heads), got {len(spec.values)}"
                )
            values = list(spec.values)
    return harpe_bases.ordered(values, spec.order)


def harpe_state(recipe, config) -> dict:
    """What rope.json keeps: the resolved bases, so training, eval and export never re-run a search."""
    method = recipe.method
    return {
        "method": "harpe", "bases": head_bases(method, config), "assign": method.assign,
        "strategy": method.bases.kind, "reconstructed": method.bases.kind == "peak_valley",
    }


def apply_harpe(model, bases: list[float]) -> None:
    """Per-head bases on this model instance: the ScaledRotary returns [b, n, s, d] cos/sin and every
    layer's attention rotates each head with its kv group's set. Parameter names are unchanged."""
    from longext.methods.harpe.modeling_longext_harpe import swap_harpe_attention
    from longext.rotary import apply_scaled_rotary

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kv = base.config.num_key_value_heads or base.config.num_attention_heads
    if len(bases) != kv:
        raise LongextError(f"HARPE: {len(bases)} bases for a model with {kv} key/value heads")
    apply_scaled_rotary(model, bases, cos_sin=head_cos_sin)
    swap_harpe_attention(base.get_decoder())


def head_cos_sin(bases: list[float], dim: int, position_ids, dtype):
    """[b, n, s, d] cos/sin of each kv head's base; the [n, d/2] frequencies are recomputed per forward (negligible):
    no buffer for a dtype cast or a device move to round."""
    from longext.methods.harpe.modeling_longext_harpe import harpe_cos_sin, harpe_inv_freq

    return harpe_cos_sin(harpe_inv_freq(bases, dim, device=position_ids.device), position_ids, dtype)


def harpe_setup(recipe, state) -> MethodSetup:
    """Training: the run's bases (rope.json) on the model instance before LoRA is added."""
    bases = state.extra["bases"]
    return MethodSetup(apply=lambda model: apply_harpe(model, bases))


def eval_hook(model, state):
    """Install the run's bases for inference; the window length changes nothing."""
    apply_harpe(model, state.extra["bases"])
    return lambda length: None


def write_harpe_code(folder, family: str, extra: dict) -> dict:
    """Copy the HARPE modeling code into an export folder; returns the config.json keys that select it.

    The model_type and architecture are HARPE's own, so plain transformers without trust_remote_code
    refuses the folder instead of loading it with one base for every head.
    """
    from longext.methods.harpe import modeling_longext_harpe as modeling

    if family not in modeling.EXPORT_CLASSES:
        have = ", ".join(modeling.EXPORT_CLASSES)
        raise LongextError(f"HARPE export: no modeling code for model type {family!r} (have {have})")
    keys = remote_code_keys(folder, modeling, *modeling.EXPORT_CLASSES[family])
    return {**keys, "head_rope_thetas": list(extra["bases"]), "head_rope_assign": extra["assign"]}


def reload_check(config, state) -> str | None:
    """The exported config reloads with the run's bases."""
    if list(config.head_rope_thetas) != list(state.extra["bases"]):
        return (f"export check failed: the written config reloads with head_rope_thetas={config.head_rope_thetas}; "
                f"expected {state.extra['bases']} (nothing was published)")
    return None


# No legacy rope keys in the export: no older consumer can run per-head bases, and a lone rope_theta would mislead.
METHOD = Method(
    kind="harpe", state=harpe_state, setup=harpe_setup, eval_hook=eval_hook, export_code=write_harpe_code,
    reload_check=reload_check, legacy_rope_keys=False,
)
