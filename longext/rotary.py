"""The longext rotary module: the model's own rotary embedding, fed positions divided by a scale, or
per-head bases in its place.

`apply_scaled_rotary(model)` swaps it in on this model instance only (the decoder's `rotary_emb`
attribute); nothing in transformers is modified. With no scale set it calls the stock module with the
stock positions, so every standard RoPE type (default, linear, dynamic, yarn, llama3) is reproduced
exactly. With a scale g it feeds `position_ids / g` — fractions, never rounded — which is E2-LLM's
`(m + t)/g` (and PI with factor g at inference). The stock module casts positions to float32 itself.

With per-head bases (HARPE, `apply_scaled_rotary(model, bases=..., cos_sin=...)`) it returns cos/sin of shape
[b, n, s, d], one set per key/value head, instead of the stock [b, s, d]; the attention modules must
then be the HARPE ones (`longext.methods.harpe.modeling_longext_harpe.swap_harpe_attention`), which rotate
each head with its group's set.

Gemma 2/3 (sliding-window and full-attention layers, longext.families): the rotary module is asked once per layer
type; the scale and the per-head bases apply to the full-attention layers' cos/sin only, the sliding-window layers
get the stock ones.
"""

from __future__ import annotations

import torch
from torch import nn

from longext.errors import LongextError
from longext.families import FULL, SLIDING, apply_family_rope, family_of
from longext.rope import rotary_dim


class ScaledRotary(nn.Module):
    """Wraps a transformers rotary embedding; `scale` is None, a float, or a [b] tensor (one per sample).
    `head_bases` (HARPE: one base per key/value head) replaces the inner module's single base: `head_cos_sin(bases,
    dim, position_ids, dtype)`, given by the method with its bases, returns the [b, n, s, d] cos/sin."""

    def __init__(self, inner: nn.Module, dim: int):
        super().__init__()
        self.inner = inner
        self.dim = dim  # rotated dimensions per head
        self.layer_typed = hasattr(inner, "layer_types")  # Gemma 3's rotary, longext's for Gemma 2
        self.scale: float | torch.Tensor | None = None
        self.head_bases: list[float] | None = None
        self.head_cos_sin = None

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, *args, **kwargs):
        layer_type = args[0] if args else kwargs.get("layer_type")
        if self.layer_typed and layer_type != FULL:  # a sliding-window layer: its RoPE stays as it is
            return self.inner(x, position_ids, *args, **kwargs)
        scale = self.scale
        if scale is not None:
            if isinstance(scale, torch.Tensor) and scale.dim() > 0:
                scale = scale.to(position_ids.device, torch.float32).reshape(-1, 1)  # [b, 1] over [b, s]
                if position_ids.shape[0] == 1 < scale.shape[0]:  # flash's flattened micro-batch: b rows in [1, b*s]
                    scale = scale.repeat_interleave(position_ids.shape[1] // scale.shape[0]).reshape(1, -1)
            position_ids = position_ids.to(torch.float32) / scale
        if self.head_bases is not None:
            with torch.no_grad():
                return self.head_cos_sin(self.head_bases, self.dim, position_ids, x.dtype)  # [b, n, s, d]
        return self.inner(x, position_ids, *args, **kwargs)


def _rotary_owner(model) -> nn.Module:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else base
    if not isinstance(getattr(decoder, "rotary_emb", None), nn.Module):
        raise LongextError(f"model: {type(base).__name__} has no model-level rotary embedding to scale")
    return decoder


def apply_scaled_rotary(model, bases: list[float] | None = None, cos_sin=None) -> ScaledRotary:
    """Install (once) and return the ScaledRotary of this model; `bases` sets per-head bases and `cos_sin` the
    function that turns them into cos/sin (HARPE).
    Parameter names do not change: the rotary module holds only non-persistent buffers."""
    owner = _rotary_owner(model)
    if not isinstance(owner.rotary_emb, ScaledRotary):
        if family_of(owner.config).layer_rope == "longext":  # Gemma 2: a rotary per layer type first (as loaded)
            params = owner.config.rope_parameters
            apply_family_rope(model, params if FULL in params else {SLIDING: params, FULL: params})
        owner.rotary_emb = ScaledRotary(owner.rotary_emb, rotary_dim(owner.config))
    if bases is not None:
        owner.rotary_emb.head_bases = [float(b) for b in bases]
        owner.rotary_emb.head_cos_sin = cos_sin
    return owner.rotary_emb


def set_rope_scale(model, scale: float | torch.Tensor | None) -> None:
    """Scale the positions the next forward passes feed to RoPE (after apply_scaled_rotary)."""
    rotary = _rotary_owner(model).rotary_emb
    if not isinstance(rotary, ScaledRotary):
        raise RuntimeError("set_rope_scale needs apply_scaled_rotary(model) first")
    rotary.scale = scale
