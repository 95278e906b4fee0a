"""Standard RoPE settings, expressed as transformers 5 `rope_parameters` before the model is built.

One function, `rope_state`, turns a recipe's `rope` section into the config change; the result is
also the artifact written to `rope.json` in the run directory and into the exported config (both as
`rope_parameters` and as the legacy `rope_scaling` / `rope_theta` keys older consumers read).

Families with sliding-window and full-attention layers (Gemma 2/3, longext.families) extend the full-attention
layers only: their state's parameters are nested per layer type, as Gemma 3's config holds them,
{"sliding_attention": <unchanged>, "full_attention": <the recipe's setting>}; `full_parameters` reads the extended
part of either form.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from longext.errors import LongextError
from longext.families import FULL, SLIDING, family_of
from longext.recipe import DynamicRope, Llama3Rope, LinearRope, LongRope, NoRope, NtkRope, Recipe, YarnRope

CARRIED_KEYS = ("partial_rotary_factor",)  # kept from the model's rope_parameters in every new setting


@dataclass(frozen=True)
class RopeState:
    """What the trained model needs at inference to see positions as it did in training."""

    kind: str  # the recipe's rope.kind
    parameters: dict[str, Any]  # transformers 5 rope_parameters
    max_position_embeddings: int  # value to write into the config
    original_context: int  # L0
    target_len: int  # L
    factor: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)  # method-specific state (later methods)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "RopeState":
        return cls(**data)


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rotary_dim(config) -> int:
    """Dimensions of a head that RoPE rotates: head_dim x partial_rotary_factor (Phi-3 and others may rotate part)."""
    factor = full_parameters(getattr(config, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0)
    return int(head_dim(config) * factor)


def is_layered(parameters: dict) -> bool:
    """rope_parameters nested per layer type (Gemma 3's form, and longext's for Gemma 2)."""
    return FULL in parameters or SLIDING in parameters


def full_parameters(parameters: dict) -> dict:
    """The part of rope_parameters the extension changes: the full-attention layers' when nested, else all of it."""
    return (parameters.get(FULL) or {}) if is_layered(parameters) else parameters


def original_context(config, override: int | None = None) -> int:
    """L0: the recipe's value, else the rope's original window, else max_position_embeddings."""
    if override:
        return override
    params = full_parameters(getattr(config, "rope_parameters", None) or {})
    return int(params.get("original_max_position_embeddings") or config.max_position_embeddings)


def ntk_theta(theta: float, factor: float, dim: int) -> float:
    """Static NTK-aware base b' = b * s^(d/(d-2)) (bloc97; YaRN paper §3.1)."""
    return theta * factor ** (dim / (dim - 2))


def config_theta(config) -> float:
    """The model's RoPE base: rope_parameters.rope_theta (transformers 5), else a top-level rope_theta, else 1e4.
    `config` is a transformers config or its config.json as a dict."""
    get = config.get if isinstance(config, dict) else (lambda key, default=None: getattr(config, key, default))
    params = full_parameters(get("rope_parameters") or {})
    return float(params.get("rope_theta", get("rope_theta", 10000.0)))


def rope_state(recipe: Recipe, config) -> RopeState:
    """The RoPE setting the recipe asks for, for this model config. Raises LongextError on conflicts."""
    family = family_of(config)
    spec = recipe.rope
    model_params = dict(getattr(config, "rope_parameters", None) or {"rope_type": "default"})
    base = dict(full_parameters(model_params)) if is_layered(model_params) else model_params
    theta = float(spec.theta) if spec.theta else config_theta(config)
    L0 = original_context(config, recipe.model.original_context)
    target = recipe.method.target_len
    if target < L0:  # every method extends the window; a factor of target/L0 < 1 would shrink it (issue 15)
        source = "model.original_context" if recipe.model.original_context else "the model's config.json"
        raise LongextError(f"method.target_len: {target} is below the model's own window L0 {L0} (from {source}); "
                           f"set a target_len of at least {L0}")
    factor = _factor(getattr(spec, "factor", None), target, L0)
    if not isinstance(spec, NoRope) and base.get("rope_type", "default") != "default":
        raise LongextError(
            f"rope.kind: the model already uses rope_type {base['rope_type']!r}; stacking another scaling on it "
            f"is not supported (got rope.kind {spec.kind!r}; allowed here: none)"
        )
    params, max_positions = _parameters(spec, base, theta, factor, L0, target, config)
    allowed = family.rope_types
    if allowed and params["rope_type"] not in allowed:
        raise LongextError(
            f"rope.kind: {spec.kind} is not available for {family.label}: its config accepts rope_type "
            f"{' and '.join(allowed)} only (got {spec.kind!r}); use kind longrope (long_factor auto = YaRN's per-pair "
            f"divisors, a number = PI), ntk or none"
        )
    carried = {k: base[k] for k in CARRIED_KEYS if k in base}
    params = {**carried, **params}
    if family.layer_types:  # Gemma 2/3: the sliding-window layers keep their own setting
        sliding = model_params.get(SLIDING) if is_layered(model_params) else model_params
        params = {SLIDING: dict(sliding), FULL: params}
    return RopeState(kind=spec.kind, parameters=params, max_position_embeddings=max_positions, original_context=L0,
                     target_len=target, factor=factor)


def _parameters(spec, base: dict, theta: float, factor: float, L0: int, target: int, config) -> tuple[dict, int]:
    """(rope_parameters of one layer type, max_position_embeddings) for the recipe's rope section."""
    match spec:
        case NoRope():
            return {**base, "rope_theta": theta}, max(target, config.max_position_embeddings)
        case LinearRope():
            params = {"rope_type": "linear", "factor": factor, "rope_theta": theta}
        case NtkRope():
            params = {"rope_type": "default", "rope_theta": ntk_theta(theta, factor, rotary_dim(config))}
        case DynamicRope():
            # transformers measures growth against max_position_embeddings: keep it at L0, or the
            # scaling never switches on (design.md §4).
            return {"rope_type": "dynamic", "factor": factor, "rope_theta": theta}, L0
        case YarnRope():
            params = {
                "rope_type": "yarn", "factor": factor, "rope_theta": theta, "original_max_position_embeddings": L0,
                "beta_fast": spec.beta_fast, "beta_slow": spec.beta_slow,
            }
            if spec.attention_factor is not None:
                params["attention_factor"] = spec.attention_factor
        case Llama3Rope():
            params = {
                "rope_type": "llama3", "factor": factor, "rope_theta": theta, "original_max_position_embeddings": L0,
                "low_freq_factor": spec.low_freq_factor, "high_freq_factor": spec.high_freq_factor,
            }
        case LongRope():
            params = longrope_parameters(spec, theta, factor, L0, rotary_dim(config))
        case _:  # later methods register their own kinds
            raise LongextError(f"rope.kind: {spec.kind!r} is not a standard RoPE setting")
    return params, max(target, L0)


def longrope_parameters(spec, theta: float, factor: float, L0: int, dim: int) -> dict:
    """transformers' `longrope` setting: per-pair divisors within L0 (short) and past it (long)."""
    pairs = dim // 2
    long = yarn_divisors(theta, factor, L0, dim) if spec.long_factor == "auto" else spec.long_factor
    lists = {}
    for name, value in (("short_factor", spec.short_factor), ("long_factor", long)):
        values = [float(value)] * pairs if isinstance(value, (int, float)) else [float(v) for v in value]
        if len(values) != pairs:
            raise LongextError(f"rope.{name}: expected {pairs} numbers (one per rotary pair: this model rotates "
                               f"{dim} dimensions of each head), got {len(values)}")
        lists[name] = values
    params = {"rope_type": "longrope", "rope_theta": theta, "factor": factor,
              "original_max_position_embeddings": L0, **lists}
    if spec.attention_factor is not None:
        params["attention_factor"] = spec.attention_factor
    return params


def yarn_divisors(theta: float, factor: float, L0: int, dim: int, beta_fast: float = 32.0, beta_slow: float = 1.0):
    """YaRN's frequencies as per-pair divisors of the base frequencies (its NTK-by-parts ramp, as transformers
    computes it): pairs with more than beta_fast rotations inside L0 keep theirs (1), pairs with fewer than
    beta_slow are divided by s, the ones between blend linearly."""

    def correction_dim(rotations: float) -> float:
        return dim * math.log(L0 / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    out = []
    for j in range(dim // 2):
        keep = 1 - min(max((j - low) / (high - low), 0.0), 1.0)  # transformers' extrapolation factor
        out.append(1.0 / ((1 - keep) / factor + keep))
    return out


def _factor(value, target: int, L0: int) -> float:
    if value is None:
        return 1.0
    if value == "auto":
        return max(1.0, target / L0)
    return float(value)


def apply_rope_config(config, state: RopeState) -> None:
    """Write the RoPE state into a config before the model is built (the rotary module reads it once). Gemma 2's
    config takes one flat setting: it gets the sliding-window layers' (the model's own), and
    longext.families.apply_family_rope gives the full-attention layers theirs once the model exists."""
    params = state.parameters
    if is_layered(params) and family_of(config).layer_rope == "longext":
        params = params[SLIDING]
    config.rope_parameters = copy.deepcopy(params)
    config.max_position_embeddings = state.max_position_embeddings
    if hasattr(config, "original_max_position_embeddings"):  # Phi-3: read over rope_parameters' own value
        config.original_max_position_embeddings = state.original_context
    if hasattr(config, "head_dim") and config.head_dim is None:
        # Mixtral's config holds head_dim None, which transformers' yarn / longrope / llama3 functions multiply
        # (getattr with a default): state the size the attention uses anyway
        config.head_dim = head_dim(config)


def legacy_rope_keys(parameters: dict) -> dict:
    """transformers 4.x / vLLM / DeepSpeed view of the same setting: `rope_theta` + `rope_scaling`. Nested per layer
    type (Gemma 3): `rope_theta` and `rope_scaling` are the full-attention layers', `rope_local_base_freq` the
    sliding-window layers' base, as Gemma 3's older configs write them."""
    if is_layered(parameters):
        keys = legacy_rope_keys(parameters[FULL])
        return {**keys, "rope_local_base_freq": parameters[SLIDING].get("rope_theta")}
    scaling = {k: v for k, v in parameters.items() if k != "rope_theta"}
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "default":
        legacy_scaling = None
    else:
        legacy_scaling = {**scaling, "type": rope_type}
    return {"rope_theta": parameters.get("rope_theta"), "rope_scaling": legacy_scaling}


def with_full_parameters(parameters: dict, full: dict) -> dict:
    """`parameters` with the extended part replaced by `full` (the full-attention layers' when nested per layer
    type); the keys carried from the model (partial_rotary_factor) stay."""
    carried = {k: v for k, v in full_parameters(parameters).items() if k in CARRIED_KEYS}
    if is_layered(parameters):
        return {**parameters, FULL: {**carried, **full}}
    return {**carried, **full}


def stated_for(state: RopeState, family, dim: int) -> RopeState:
    """The state as the family's config can hold it: position interpolation (`linear`, what an E2-LLM export
    serves) becomes the equivalent `longrope` (the factor g on every pair, attention factor 1) for families whose
    config accepts no `linear` (Phi-3)."""
    import dataclasses

    full = full_parameters(state.parameters)
    if not family.rope_types or full.get("rope_type") in family.rope_types or full.get("rope_type") != "linear":
        return state
    g = full["factor"]
    longrope = {"rope_type": "longrope", "rope_theta": full["rope_theta"], "factor": g, "attention_factor": 1.0,
                "original_max_position_embeddings": state.original_context,
                "short_factor": [g] * (dim // 2), "long_factor": [g] * (dim // 2)}
    return dataclasses.replace(state, parameters=with_full_parameters(state.parameters, longrope))


def yarn_mscale(factor: float) -> float:
    """YaRN's default cos/sin multiplier 0.1 ln(s) + 1 (YaRN paper §3.4)."""
    return 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
