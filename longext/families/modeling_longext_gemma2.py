"""Gemma 2 with one RoPE setting per layer type: its full-attention layers extended, its sliding-window layers as
they were (longext's docs/models.md).

Gemma 3 holds `rope_parameters` per layer type and its rotary module is called once per type; Gemma 2 has one
setting and one cos/sin for every layer. Here, on one model instance, `install_layer_rope` puts a rotary module per
layer type in its place (each a stock Gemma2RotaryEmbedding built on that type's parameters; called without a type,
as Gemma2Model calls it, it answers for the sliding-window layers), and a forward pre-hook on every full-attention
layer asks it for the full-attention cos/sin. Nothing in transformers is modified.

This file is written by `longext export` next to the weights of an extended Gemma 2 and imports only torch and
transformers: `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` runs it with no longext
installed. The exported config keeps the sliding-window layers' setting in `rope_parameters` (what Gemma 2's own
code reads) and both in `layer_rope_parameters`; its model_type is longext's own, so transformers without
trust_remote_code refuses the folder instead of running the full-attention layers unextended. longext imports the
same file for training and evaluation.
"""

from __future__ import annotations

import copy

from torch import nn
from transformers import Gemma2Config, Gemma2ForCausalLM
from transformers.models.gemma2.modeling_gemma2 import Gemma2RotaryEmbedding

FULL, SLIDING = "full_attention", "sliding_attention"


class LayerTypeRotary(nn.Module):
    """cos/sin per layer type; `layer_types` marks it as typed for longext's scaled rotary."""

    def __init__(self, config, parameters: dict):
        super().__init__()
        self.layer_types = sorted(parameters)
        self.rotary = nn.ModuleDict({kind: Gemma2RotaryEmbedding(_with_rope(config, p)) for kind, p in parameters.items()})

    def forward(self, x, position_ids, layer_type=None):
        return self.rotary[layer_type or SLIDING](x, position_ids)


def _with_rope(config, parameters: dict):
    sub = copy.deepcopy(config)
    sub.rope_parameters = dict(parameters)
    return sub


def install_layer_rope(model, parameters: dict) -> None:
    """One RoPE per layer type on this Gemma 2 instance (or its peft wrapper); `parameters` is
    {"sliding_attention": {...}, "full_attention": {...}}. Parameter names are unchanged (the rotary modules hold
    only non-persistent buffers)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder()
    if isinstance(decoder.rotary_emb, LayerTypeRotary) or getattr(decoder, "longext_layer_rope", False):
        return
    decoder.rotary_emb = LayerTypeRotary(decoder.config, parameters).to(next(base.parameters()).device)
    ask_full_layer_rope(decoder)
    decoder.longext_layer_rope = True


def ask_full_layer_rope(decoder: nn.Module) -> None:
    """Each full-attention layer asks the decoder's rotary module for its cos/sin (a forward pre-hook on this
    instance's layers; the module is looked up at call time, so a wrapper installed later is used)."""
    for layer, kind in zip(decoder.layers, decoder.config.layer_types):
        if kind == FULL:
            layer.register_forward_pre_hook(_FullLayerRope(decoder), with_kwargs=True)


class _FullLayerRope:
    def __init__(self, decoder):
        self.decoder = decoder

    def __call__(self, layer, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        kwargs["position_embeddings"] = self.decoder.rotary_emb(hidden, kwargs["position_ids"], FULL)
        return args, kwargs


class LongextGemma2Config(Gemma2Config):
    model_type = "longext_gemma2"
    layer_rope_parameters: dict | None = None


class LongextGemma2ForCausalLM(Gemma2ForCausalLM):
    config_class = LongextGemma2Config

    def __init__(self, config):
        super().__init__(config)
        if not config.layer_rope_parameters:
            raise ValueError("layer_rope_parameters: expected the RoPE setting of each layer type, got none")
        install_layer_rope(self, config.layer_rope_parameters)
