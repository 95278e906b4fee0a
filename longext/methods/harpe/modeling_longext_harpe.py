"""HARPE: one RoPE base per group of attention heads (Lian et al. 2024, arXiv 2412.07171, Eq. 6).

Head h rotates pair i by m * b_h^(-2i/d). With grouped-query attention the query heads that share a
key/value head share its base, so `config.head_rope_thetas` holds one base per key/value head
(per_kv_group; for multi-head models that is one per head, exactly the paper).

This file is written by `longext export` next to the weights and imports only torch and
transformers: `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` runs it with no
longext installed. longext imports the same file for training and evaluation, so the trained and the
exported model share one attention forward. Nothing here modifies a transformers class or module:
the HARPE models swap their own attention modules and rotary module, per instance.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaAttention, eager_attention_forward, rotate_half
from transformers.models.mistral.modeling_mistral import MistralAttention
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention


# ----------------------------------------------------------------------------------- rotary maths
def harpe_inv_freq(bases: list[float], dim: int, device=None) -> torch.Tensor:
    """[n, dim/2] float32 inverse frequencies b_j^(-2i/d), computed as transformers' default RoPE does."""
    exponent = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim
    base = torch.tensor(bases, dtype=torch.float, device=device)[:, None]
    return 1.0 / (base**exponent)


def harpe_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype):
    """cos, sin of shape [b, n, s, d] in `dtype`, from [n, d/2] inverse frequencies and [b, s] positions.

    Angles are float32; cos/sin are taken on the half and cast before the halves are joined, so the
    float32 intermediates are [b, n, s, d/2] (HARPE at 128k x 32 heads: 1 GiB, not 2 per tensor).
    """
    angles = position_ids[:, None, :, None].float() * inv_freq[None, :, None, :].float()  # [b, n, s, d/2]
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    return torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)


def apply_harpe_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate q [b, h, s, d] and k [b, g, s, d] with one base per key/value head.

    cos/sin are [b, g, s, d] (one set per kv head; query heads g*h/g .. of group j use set j) or the
    stock [b, s, d] (one base for all heads). Broadcast views only: no per-query-head copy of cos/sin.
    """
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    k_out = k * cos + rotate_half(k) * sin
    q = q.unflatten(1, (cos.shape[1], -1))  # [b, g, h/g, s, d]
    cos, sin = cos[:, :, None], sin[:, :, None]
    q_out = (q * cos + rotate_half(q) * sin).flatten(1, 2)  # [b, h, s, d]
    return q_out, k_out


# -------------------------------------------------------------------------------- attention
def _harpe_attention(
    self, hidden_states, position_embeddings, attention_mask, past_key_values, qk_norm: bool, attn_kwargs: dict,
    **kwargs,
):
    """The families' attention forward (transformers 5.23) with `apply_harpe_rotary` in place of the
    stock rotation, which broadcasts one cos/sin over all heads."""
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    query_states = self.q_proj(hidden_states).view(hidden_shape)
    key_states = self.k_proj(hidden_states).view(hidden_shape)
    if qk_norm:  # Qwen3 normalises each head before RoPE
        query_states, key_states = self.q_norm(query_states), self.k_norm(key_states)
    query_states, key_states = query_states.transpose(1, 2), key_states.transpose(1, 2)
    value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

    cos, sin = position_embeddings
    query_states, key_states = apply_harpe_rotary(query_states, key_states, cos, sin)

    if past_key_values is not None:  # keys are cached rotated with their head's base
        key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)

    attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
        self.config._attn_implementation, eager_attention_forward
    )
    attn_output, attn_weights = attention_interface(
        self, query_states, key_states, value_states, attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling, **attn_kwargs, **kwargs,
    )
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    return self.o_proj(attn_output), attn_weights


class HarpeLlamaAttention(LlamaAttention):
    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        return _harpe_attention(
            self, hidden_states, position_embeddings, attention_mask, past_key_values, False, {}, **kwargs
        )


class HarpeMistralAttention(MistralAttention):
    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        window = {"sliding_window": getattr(self.config, "sliding_window", None)}
        return _harpe_attention(
            self, hidden_states, position_embeddings, attention_mask, past_key_values, False, window, **kwargs
        )


class HarpeQwen2Attention(Qwen2Attention):
    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        window = {"sliding_window": self.sliding_window}
        return _harpe_attention(
            self, hidden_states, position_embeddings, attention_mask, past_key_values, False, window, **kwargs
        )


class HarpeQwen3Attention(Qwen3Attention):
    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        window = {"sliding_window": self.sliding_window}
        return _harpe_attention(
            self, hidden_states, position_embeddings, attention_mask, past_key_values, True, window, **kwargs
        )


HARPE_ATTENTION = {
    LlamaAttention: HarpeLlamaAttention,
    MistralAttention: HarpeMistralAttention,
    Qwen2Attention: HarpeQwen2Attention,
    Qwen3Attention: HarpeQwen3Attention,
}


def swap_harpe_attention(decoder: nn.Module) -> None:
    """Replace each layer's `self_attn` of this decoder by the HARPE subclass of its family.

    The new module takes over the old one's children (q/k/v/o projections, possibly already wrapped by
    peft LoRA, and Qwen3's q/k norms), so parameter names, tensors and adapters are unchanged.
    """
    for layer in decoder.layers:
        old = layer.self_attn
        if type(old) in HARPE_ATTENTION.values():
            continue
        cls = HARPE_ATTENTION.get(type(old))
        if cls is None:
            raise TypeError(f"HARPE has no per-head attention for {type(old).__name__}")
        with torch.device("meta"):  # placeholders only: every child is replaced below
            new = cls(old.config, old.layer_idx)
        for name, child in old.named_children():
            setattr(new, name, child)
        new.train(old.training)
        layer.self_attn = new


# ----------------------------------------------------------------------------- exported models
class HarpeRotaryEmbedding(nn.Module):
    """The exported model's rotary module: (cos, sin) of shape [b, n, s, d], one base per kv head.

    The inverse frequencies are recomputed per forward ([n, d/2], negligible) rather than held in a
    buffer, so loading on the meta device needs no re-initialisation hook.
    """

    def __init__(self, config):
        super().__init__()
        self.bases = [float(b) for b in config.head_rope_thetas]
        self.dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        inv_freq = harpe_inv_freq(self.bases, self.dim, device=x.device)
        return harpe_cos_sin(inv_freq, position_ids, x.dtype)


def check_harpe_config(config) -> None:
    """One base per key/value head; per_head is one base per query head, possible only without GQA."""
    bases, kv = list(config.head_rope_thetas or []), config.num_key_value_heads
    if len(bases) != kv:
        raise ValueError(f"head_rope_thetas: expected one base per key/value head ({kv}), got {len(bases)}")
    if config.head_rope_assign not in ("per_kv_group", "per_head"):
        raise ValueError(f"head_rope_assign: expected per_kv_group or per_head, got {config.head_rope_assign!r}")
    if config.head_rope_assign == "per_head" and kv != config.num_attention_heads:
        raise ValueError("head_rope_assign per_head needs as many key/value heads as query heads")
    if any(not b > 0 for b in bases):
        raise ValueError(f"head_rope_thetas: every base must be > 0, got {bases}")


class _HarpeCausalLM:
    """Mixin for the exported CausalLM classes: the family's model, then the HARPE rotary + attention."""

    def _install_harpe(self) -> None:
        check_harpe_config(self.config)
        self.model.rotary_emb = HarpeRotaryEmbedding(self.config)
        swap_harpe_attention(self.model)


# Custom model_type / architecture names: without trust_remote_code, AutoConfig refuses them instead of
# loading the weights with the single stock base.
class HarpeLlamaConfig(LlamaConfig):
    model_type = "longext_harpe_llama"
    head_rope_thetas: list[float] | None = None
    head_rope_assign: str = "per_kv_group"


class HarpeMistralConfig(MistralConfig):
    model_type = "longext_harpe_mistral"
    head_rope_thetas: list[float] | None = None
    head_rope_assign: str = "per_kv_group"


class HarpeQwen2Config(Qwen2Config):
    model_type = "longext_harpe_qwen2"
    head_rope_thetas: list[float] | None = None
    head_rope_assign: str = "per_kv_group"


class HarpeQwen3Config(Qwen3Config):
    model_type = "longext_harpe_qwen3"
    head_rope_thetas: list[float] | None = None
    head_rope_assign: str = "per_kv_group"


class HarpeLlamaForCausalLM(_HarpeCausalLM, LlamaForCausalLM):
    config_class = HarpeLlamaConfig

    def __init__(self, config):
        super().__init__(config)
        self._install_harpe()


class HarpeMistralForCausalLM(_HarpeCausalLM, MistralForCausalLM):
    config_class = HarpeMistralConfig

    def __init__(self, config):
        super().__init__(config)
        self._install_harpe()


class HarpeQwen2ForCausalLM(_HarpeCausalLM, Qwen2ForCausalLM):
    config_class = HarpeQwen2Config

    def __init__(self, config):
        super().__init__(config)
        self._install_harpe()


class HarpeQwen3ForCausalLM(_HarpeCausalLM, Qwen3ForCausalLM):
    config_class = HarpeQwen3Config

    def __init__(self, config):
        super().__init__(config)
        self._install_harpe()


# family model_type -> (config class, CausalLM class): what `longext export` names in auto_map
EXPORT_CLASSES = {
    "llama": (HarpeLlamaConfig, HarpeLlamaForCausalLM),
    "mistral": (HarpeMistralConfig, HarpeMistralForCausalLM),
    "qwen2": (HarpeQwen2Config, HarpeQwen2ForCausalLM),
    "qwen3": (HarpeQwen3Config, HarpeQwen3ForCausalLM),
}
