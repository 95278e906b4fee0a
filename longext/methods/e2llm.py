"""E2-LLM (Liu et al. 2024, methods.md §3): one short training run with a random PI scale g and offset t
per sample; at inference PI with g chosen from the window (`eval_rule`).

Training: positions m + t (sinks keep m) come from the data pipeline as integers, g travels with the
batch as `rope_scale` and the ScaledRotary divides the positions by it just before RoPE.
"""

from __future__ import annotations

import torch

from longext.positions import e2llm_eval_scale, e2llm_positions, e2llm_scales
from longext.rotary import apply_scaled_rotary, set_rope_scale


def e2llm_sampler(original: int, seq_len: int, g_max: int, scales: list[float] | None, sinks: int):
    usable = e2llm_scales(original, seq_len, g_max, scales)

    def sample(length: int, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
        positions, g = e2llm_positions(length, original, usable, sinks, gen)
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
