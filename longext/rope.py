"""Standard RoPE settings, expressed as transformers 5 `rope_parameters` before the model is built.

One function, `rope_state`, turns a recipe's `rope` section into the config change; the result is
also the artifact written to `rope.json` in the run directory and into the exported config (both as
`rope_parameters` and as the legacy `rope_scaling` / `rope_theta` keys older consumers read).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from longext.errors import LongextError
from longext.recipe import DynamicRope, Llama3Rope, LinearRope, NoRope, NtkRope, Recipe, YarnRope


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


def original_context(config, override: int | None = None) -> int:
    """L0: the recipe's value, else the rope's original window, else max_position_embeddings."""
    if override:
        return override
    params = getattr(config, "rope_parameters", None) or {}
    return int(params.get("original_max_position_embeddings") or config.max_position_embeddings)


def ntk_theta(theta: float, factor: float, dim: int) -> float:
    """Static NTK-aware base b' = b * s^(d/(d-2)) (bloc97; YaRN paper §3.1)."""
    return theta * factor ** (dim / (dim - 2))


def config_theta(config) -> float:
    """The model's RoPE base: rope_parameters.rope_theta (transformers 5), else a top-level rope_theta, else 1e4.
    `config` is a transformers config or its config.json as a dict."""
    get = config.get if isinstance(config, dict) else (lambda key, default=None: getattr(config, key, default))
    params = get("rope_parameters") or {}
    return float(params.get("rope_theta", get("rope_theta", 10000.0)))


def rope_state(recipe: Recipe, config) -> RopeState:
    """The RoPE setting the recipe asks for, for this model config. Raises LongextError on conflicts."""
    spec = recipe.rope
    base = dict(getattr(config, "rope_parameters", None) or {"rope_type": "default"})
    base_theta = config_theta(config)
    theta = float(spec.theta) if spec.theta else base_theta
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
    state = dict(kind=spec.kind, original_context=L0, target_len=target, factor=factor)
    match spec:
        case NoRope():
            params = {**base, "rope_theta": theta}
            return RopeState(parameters=params, max_position_embeddings=max(target, config.max_position_embeddings), **state)
        case LinearRope():
            params = {"rope_type": "linear", "factor": factor, "rope_theta": theta}
        case NtkRope():
            params = {"rope_type": "default", "rope_theta": ntk_theta(theta, factor, head_dim(config))}
        case DynamicRope():
            # transformers measures growth against max_position_embeddings: keep it at L0, or the
            # scaling never switches on (design.md §4).
            params = {"rope_type": "dynamic", "factor": factor, "rope_theta": theta}
            return RopeState(parameters=params, max_position_embeddings=L0, **state)
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
        case _:  # later methods register their own kinds
            raise LongextError(f"rope.kind: {spec.kind!r} is not a standard RoPE setting")
    return RopeState(parameters=params, max_position_embeddings=max(target, L0), **state)


def _factor(value, target: int, L0: int) -> float:
    if value is None:
        return 1.0
    if value == "auto":
        return max(1.0, target / L0)
    return float(value)


def apply_rope_config(config, state: RopeState) -> None:
    """Write the RoPE state into a config before the model is built (the rotary module reads it once)."""
    config.rope_parameters = dict(state.parameters)
    config.max_position_embeddings = state.max_position_embeddings


def legacy_rope_keys(parameters: dict) -> dict:
    """transformers 4.x / vLLM / DeepSpeed view of the same setting: `rope_theta` + `rope_scaling`."""
    scaling = {k: v for k, v in parameters.items() if k != "rope_theta"}
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "default":
        legacy_scaling = None
    else:
        legacy_scaling = {**scaling, "type": rope_type}
    return {"rope_theta": parameters.get("rope_theta"), "rope_scaling": legacy_scaling}


def yarn_mscale(factor: float) -> float:
    """YaRN's default cos/sin multiplier 0.1 ln(s) + 1 (YaRN paper §3.4)."""
    return 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
