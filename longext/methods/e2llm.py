"""E2-LLM (Liu et al. 2024, methods.md §3): one short training run with a random PI scale g and offset t
per sample; at inference PI with g chosen from the window (`eval_rule`).

Training: positions m + t (sinks keep m) come from the data pipeline as integers, g travels with the
batch as `rope_scale` and the ScaledRotary divides the positions by it just before RoPE. The scale set G is
resolved once (rope.json's `scales`); eval and export pick g from the window with `eval_rule`.
"""

from __future__ import annotations

import dataclasses

import torch

from longext.errors import LongextError
from longext.methods.base import Method, MethodSetup
from longext.positions import e2llm_eval_scale, e2llm_scale, e2llm_scales, e2llm_shifted
from longext.rope import full_parameters, with_full_parameters
from longext.rotary import apply_scaled_rotary, set_rope_scale


def e2llm_sampler(original: int, seq_len: int, g_max: int, scales: list[float] | None, sinks: int):
    """Positions and per-sample scale for training at `seq_len` with G = {1..g_max} or `scales`."""
    return scale_set_sampler(original, e2llm_scales(original, seq_len, g_max, scales), sinks)


def scale_set_sampler(original: int, usable: list[float], sinks: int):
    """One scale g per row; with the document mask, every document piece gets its own offset t and sinks (the
    pieces attend only to themselves, so each is a sample of its own at the row's scale)."""
    def sample(pieces: list[int], gen: torch.Generator) -> tuple[torch.Tensor, dict]:
        g = e2llm_scale(usable, gen)
        positions = torch.cat([e2llm_shifted(n, original, g, sinks, gen) for n in pieces])
        return positions, {"rope_scale": torch.tensor(g, dtype=torch.float32)}

    return sample


def before_forward(model, batch: dict) -> None:
    set_rope_scale(model, batch["rope_scale"])


def eval_hook(model, original: int, rule: str):
    """Install the scaled rotary for inference; returns set_length(L) that picks g for window L."""
    apply_scaled_rotary(model)

    def set_length(length: int) -> None:
        set_rope_scale(model, e2llm_eval_scale(length, original, rule))

    return set_length


# ------------------------------------------------------------------------------------------ hooks
def resolve_g_max(recipe, config, original: int):
    method = recipe.method
    if method.g_max != "auto":
        return recipe
    return recipe.model_copy(update={"method": method.model_copy(update={"g_max": method.resolved_g_max(original)})})


def e2llm_state(recipe, config) -> dict:
    m = recipe.method
    scales = e2llm_scales(recipe.model.original_context, recipe.seq_len, m.g_max, m.scales)
    return {"method": "e2llm", "scales": scales, "eval_rule": m.eval_rule, "sink_tokens": m.sink_tokens}


def e2llm_setup(recipe, state) -> MethodSetup:
    extra = state.extra
    return MethodSetup(
        positions=scale_set_sampler(state.original_context, extra["scales"], extra["sink_tokens"]),
        apply=apply_scaled_rotary, before_forward=before_forward, per_step=recipe.method.sample_scope == "step",
    )


def e2llm_eval_hook(model, state):
    return eval_hook(model, state.original_context, state.extra["eval_rule"])


def serving_state(state, length: int | None):
    """The standard PI setting for the window `length` (g from the run's eval_rule): a plain transformers config."""
    if length is None:
        raise LongextError(
            f"--length: an E2-LLM run serves any window up to about {state.target_len}; name the one to export, "
            f"e.g. --length {state.target_len}"
        )
    g = e2llm_eval_scale(length, state.original_context, state.extra["eval_rule"])
    theta = full_parameters(state.parameters)["rope_theta"]
    params = {"rope_type": "linear", "factor": g, "rope_theta": theta}
    if g == 1.0:
        params = {"rope_type": "default", "rope_theta": theta}
    # Gemma 2/3: the full-attention layers are interpolated, the sliding-window layers keep their setting
    params = with_full_parameters(state.parameters, params)
    return dataclasses.replace(
        state, kind="linear", parameters=params, factor=g, target_len=length,
        max_position_embeddings=max(length, state.original_context), extra={**state.extra, "served_length": length},
    )


METHOD = Method(
    kind="e2llm", resolve=resolve_g_max, state=e2llm_state, setup=e2llm_setup, eval_hook=e2llm_eval_hook,
    serving_state=serving_state,
)
