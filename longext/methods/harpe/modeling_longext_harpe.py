"""HARPE: one RoPE base per group of attention heads (Lian et al. 2024, arXiv 2412.07171, Eq. 6).

Head h rotates pair i by m * b_h^(-2i/d). With grouped-query attention the query heads that share a
key/value head share its base, so `config.head_rope_thetas` holds one base per key/value head
(per_kv_group; for multi-head models that is one per head, exactly the paper).

This file is written by `longext export` next to the weights and imports only torch and
transformers: `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` runs it with no
longext installed. longext imports the same file for training and evaluation, so the trained and the
exported model share one attention forward. Nothing here modifies a transformers class or module:
the HARPE models swap their own attention modules and rotary module, per instance.

Families (longext's docs/models.md): each has a HARPE attention subclass that computes q, k, v as the family does (Phi-3's
fused qkv_proj, the q/k norms of Qwen3, Gemma 3 and OLMo 2, Gemma 2's soft-capped scores) and rotates them per
head. Gemma 2/3 get the bases on their full-attention layers only; the sliding-window layers keep their own RoPE.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from transformers import (
    Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM,
    MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM, Olmo2Config, Olmo2ForCausalLM, Phi3Config,
    Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.gemma2.modeling_gemma2 import Gemma2Attention
from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward as gemma_eager_attention
from transformers.models.gemma3.modeling_gemma3 import Gemma3Attention
from transformers.models.llama.modeling_llama import LlamaAttention, eager_attention_forward, rotate_half
from transformers.models.mistral.modeling_mistral import MistralAttention
from transformers.models.mixtral.modeling_mixtral import MixtralAttention
from transformers.models.olmo2.modeling_olmo2 import Olmo2Attention
from transformers.models.phi3.modeling_phi3 import Phi3Attention
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeAttention

FULL = "full_attention"  # Gemma 2/3: HARPE's bases replace the RoPE of the full-attention layers only


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
    rot = cos.shape[-1]
    if rot < q.shape[-1]:  # partial rotary (Phi-3 style): the first `rot` dimensions rotate, the rest pass through
        q_rot, k_rot = apply_harpe_rotary(q[..., :rot], k[..., :rot], cos, sin)
        return torch.cat((q_rot, q[..., rot:]), dim=-1), torch.cat((k_rot, k[..., rot:]), dim=-1)
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    k_out = k * cos + rotate_half(k) * sin
    q = q.unflatten(1, (cos.shape[1], -1))  # [b, g, h/g, s, d]
    cos, sin = cos[:, :, None], sin[:, :, None]
    q_out = (q * cos + rotate_half(q) * sin).flatten(1, 2)  # [b, h, s, d]
    return q_out, k_out


# -------------------------------------------------------------------------------- attention
def _harpe_attention(self, hidden_states, position_embeddings, attention_mask, past_key_values, attn_kwargs: dict,
                     **kwargs):
    """The families' attention forward (transformers 5.23) with `apply_harpe_rotary` in place of the stock rotation,
    which broadcasts one cos/sin over all heads. `self._harpe_qkv` gives q, k, v as the family computes them before
    RoPE ([b, heads, s, d]); `attn_kwargs` are the family's own arguments of the attention function."""
    input_shape = hidden_states.shape[:-1]
    query_states, key_states, value_states = self._harpe_qkv(hidden_states)

    cos, sin = position_embeddings
    query_states, key_states = apply_harpe_rotary(query_states, key_states, cos, sin)

    if past_key_values is not None:  # keys are cached rotated with their head's base
        key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)

    attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
        self.config._attn_implementation, self.harpe_eager
    )
    attn_output, attn_weights = attention_interface(
        self, query_states, key_states, value_states, attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling, **attn_kwargs, **kwargs,
    )
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    return self.o_proj(attn_output), attn_weights


def _split_qkv(self, hidden_states, head_norm: bool = False, full_norm: bool = False):
    """q, k, v from separate projections; q/k normalised per head (Qwen3, Gemma 3) or over the whole projection
    (OLMo 2) as the family does."""
    shape = (*hidden_states.shape[:-1], -1, self.head_dim)
    q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
    if full_norm:
        q, k = self.q_norm(q), self.k_norm(k)
    q, k, v = q.view(shape), k.view(shape), v.view(shape)
    if head_norm:
        q, k = self.q_norm(q), self.k_norm(k)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def _fused_qkv(self, hidden_states):
    """q, k, v from Phi-3's fused qkv_proj, split as Phi3Attention splits it."""
    shape = (*hidden_states.shape[:-1], -1, self.head_dim)
    qkv = self.qkv_proj(hidden_states)
    q_end = self.config.num_attention_heads * self.head_dim
    k_end = q_end + self.num_key_value_heads * self.head_dim
    parts = qkv[..., :q_end], qkv[..., q_end:k_end], qkv[..., k_end:]
    return tuple(t.view(shape).transpose(1, 2) for t in parts)


class _HarpeAttention:
    """Mixin: the HARPE forward over the family's attention module (its projections, norms and arguments)."""

    harpe_eager = staticmethod(eager_attention_forward)  # the family's eager kernel (Gemma's soft-caps the scores)

    def _harpe_qkv(self, hidden_states):
        return _split_qkv(self, hidden_states)

    def _harpe_kwargs(self) -> dict:
        return {}

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        return _harpe_attention(self, hidden_states, position_embeddings, attention_mask, past_key_values,
                                self._harpe_kwargs(), **kwargs)


class HarpeLlamaAttention(_HarpeAttention, LlamaAttention):
    pass


class HarpeMistralAttention(_HarpeAttention, MistralAttention):
    def _harpe_kwargs(self):
        return {"sliding_window": getattr(self.config, "sliding_window", None)}


class HarpeMixtralAttention(_HarpeAttention, MixtralAttention):
    def _harpe_kwargs(self):
        return {"sliding_window": getattr(self.config, "sliding_window", None)}


class HarpeQwen2Attention(_HarpeAttention, Qwen2Attention):
    def _harpe_kwargs(self):
        return {"sliding_window": self.sliding_window}


class HarpeQwen3Attention(_HarpeAttention, Qwen3Attention):
    def _harpe_qkv(self, hidden_states):
        return _split_qkv(self, hidden_states, head_norm=True)

    def _harpe_kwargs(self):
        return {"sliding_window": self.sliding_window}


class HarpeQwen3MoeAttention(_HarpeAttention, Qwen3MoeAttention):
    def _harpe_qkv(self, hidden_states):
        return _split_qkv(self, hidden_states, head_norm=True)

    def _harpe_kwargs(self):
        return {"sliding_window": self.sliding_window}


class HarpeOlmo2Attention(_HarpeAttention, Olmo2Attention):
    def _harpe_qkv(self, hidden_states):
        return _split_qkv(self, hidden_states, full_norm=True)


class HarpePhi3Attention(_HarpeAttention, Phi3Attention):
    def _harpe_qkv(self, hidden_states):
        return _fused_qkv(self, hidden_states)

    def _harpe_kwargs(self):
        return {"sliding_window": getattr(self.config, "sliding_window", None)}


class HarpeGemma2Attention(_HarpeAttention, Gemma2Attention):
    harpe_eager = staticmethod(gemma_eager_attention)

    def _harpe_kwargs(self):
        return {"sliding_window": self.sliding_window, "softcap": self.attn_logit_softcapping}


class HarpeGemma3Attention(_HarpeAttention, Gemma3Attention):
    harpe_eager = staticmethod(gemma_eager_attention)

    def _harpe_qkv(self, hidden_states):
        return _split_qkv(self, hidden_states, head_norm=True)

    def _harpe_kwargs(self):
        return {"sliding_window": self.sliding_window}


HARPE_ATTENTION = {
    LlamaAttention: HarpeLlamaAttention,
    MistralAttention: HarpeMistralAttention,
    MixtralAttention: HarpeMixtralAttention,
    Qwen2Attention: HarpeQwen2Attention,
    Qwen3Attention: HarpeQwen3Attention,
    Qwen3MoeAttention: HarpeQwen3MoeAttention,
    Olmo2Attention: HarpeOlmo2Attention,
    Phi3Attention: HarpePhi3Attention,
    Gemma2Attention: HarpeGemma2Attention,
    Gemma3Attention: HarpeGemma3Attention,
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
def rotary_dim(config) -> int:
    """Dimensions of a head RoPE rotates: head_dim x partial_rotary_factor (of the full-attention layers)."""
    params = config.rope_parameters or {}
    params = params.get(FULL) or params
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(head_dim * params.get("partial_rotary_factor", 1.0))


class HarpeRotaryEmbedding(nn.Module):
    """The exported model's rotary module: (cos, sin) of shape [b, n, s, d], one base per kv head.

    The inverse frequencies are recomputed per forward ([n, d/2], negligible) rather than held in a
    buffer, so loading on the meta device needs no re-initialisation hook.
    """

    def __init__(self, config):
        super().__init__()
        self.bases = [float(b) for b in config.head_rope_thetas]
        self.dim = rotary_dim(config)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        inv_freq = harpe_inv_freq(self.bases, self.dim, device=x.device)
        return harpe_cos_sin(inv_freq, position_ids, x.dtype)


class HarpeLayerTypeRotary(nn.Module):
    """Gemma 2/3: the per-head bases for the full-attention layers, the model's own rotary module for the
    sliding-window layers (Gemma 3's takes the layer type; Gemma 2's, called without one, answers for them)."""

    def __init__(self, stock: nn.Module, harpe: HarpeRotaryEmbedding):
        super().__init__()
        self.stock, self.harpe = stock, harpe
        self.stock_takes_type = hasattr(stock, "layer_types")

    def forward(self, x, position_ids, layer_type=None):
        if layer_type == FULL:
            return self.harpe(x, position_ids)
        return self.stock(x, position_ids, layer_type) if self.stock_takes_type else self.stock(x, position_ids)


def ask_full_layer_rope(decoder: nn.Module) -> None:
    """Gemma 2 computes one cos/sin for all layers: each full-attention layer asks the rotary module for its own
    (a forward pre-hook on this instance's layers)."""
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
    """Mixin for the exported CausalLM classes: the family's model, then the HARPE rotary + attention (Gemma 2/3:
    on the full-attention layers; the sliding-window layers keep their own RoPE)."""

    harpe_layer_typed = False  # Gemma 2/3

    def __init__(self, config):
        super().__init__(config)
        check_harpe_config(self.config)
        harpe = HarpeRotaryEmbedding(self.config)
        if self.harpe_layer_typed:
            stock = self.model.rotary_emb
            self.model.rotary_emb = HarpeLayerTypeRotary(stock, harpe)
            if not hasattr(stock, "layer_types"):
                ask_full_layer_rope(self.model)
        else:
            self.model.rotary_emb = harpe
        swap_harpe_attention(self.model)


def _same_checkpoint_layout(model_type: str, family: str) -> None:
    """transformers saves some families in the hub's layout (Mixtral's and Qwen3-MoE's experts one tensor per
    expert) and converts them when it loads its own model types; our model_type gets the family's conversions too."""
    try:
        from transformers.conversion_mapping import (
            get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping,
        )
    except ImportError:  # a transformers without conversions saves what it loads
        return
    mapping = get_checkpoint_conversion_mapping(family)
    if mapping is not None:
        register_checkpoint_conversion_mapping(model_type, mapping, overwrite=True)


def _export_pair(name: str, model_type: str, config_cls, model_cls, layer_typed: bool = False):
    """The exported config and CausalLM classes of one family. Their model_type / architecture names are HARPE's
    own: without trust_remote_code, AutoConfig refuses them instead of loading the weights with the single stock
    base."""
    config = type(f"Harpe{name}Config", (config_cls,), {
        "__module__": __name__, "model_type": f"longext_harpe_{model_type}",
        "__annotations__": {"head_rope_thetas": "list[float] | None", "head_rope_assign": "str"},
        "head_rope_thetas": None, "head_rope_assign": "per_kv_group",
    })
    model = type(f"Harpe{name}ForCausalLM", (_HarpeCausalLM, model_cls),
                 {"__module__": __name__, "config_class": config, "harpe_layer_typed": layer_typed})
    _same_checkpoint_layout(config.model_type, model_type)
    return config, model


HarpeLlamaConfig, HarpeLlamaForCausalLM = _export_pair("Llama", "llama", LlamaConfig, LlamaForCausalLM)
HarpeMistralConfig, HarpeMistralForCausalLM = _export_pair("Mistral", "mistral", MistralConfig, MistralForCausalLM)
HarpeQwen2Config, HarpeQwen2ForCausalLM = _export_pair("Qwen2", "qwen2", Qwen2Config, Qwen2ForCausalLM)
HarpeQwen3Config, HarpeQwen3ForCausalLM = _export_pair("Qwen3", "qwen3", Qwen3Config, Qwen3ForCausalLM)
HarpeGemma2Config, HarpeGemma2ForCausalLM = _export_pair("Gemma2", "gemma2", Gemma2Config, Gemma2ForCausalLM, True)
HarpeGemma3Config, HarpeGemma3ForCausalLM = _export_pair("Gemma3", "gemma3_text", Gemma3TextConfig, Gemma3ForCausalLM,
                                                        True)
HarpePhi3Config, HarpePhi3ForCausalLM = _export_pair("Phi3", "phi3", Phi3Config, Phi3ForCausalLM)
HarpeOlmo2Config, HarpeOlmo2ForCausalLM = _export_pair("Olmo2", "olmo2", Olmo2Config, Olmo2ForCausalLM)
HarpeMixtralConfig, HarpeMixtralForCausalLM = _export_pair("Mixtral", "mixtral", MixtralConfig, MixtralForCausalLM)
HarpeQwen3MoeConfig, HarpeQwen3MoeForCausalLM = _export_pair("Qwen3Moe", "qwen3_moe", Qwen3MoeConfig, Qwen3MoeForCausalLM)

# family model_type -> (config class, CausalLM class): what `longext export` names in auto_map
EXPORT_CLASSES = {
    "llama": (HarpeLlamaConfig, HarpeLlamaForCausalLM),
    "mistral": (HarpeMistralConfig, HarpeMistralForCausalLM),
    "qwen2": (HarpeQwen2Config, HarpeQwen2ForCausalLM),
    "qwen3": (HarpeQwen3Config, HarpeQwen3ForCausalLM),
    "gemma2": (HarpeGemma2Config, HarpeGemma2ForCausalLM),
    "gemma3_text": (HarpeGemma3Config, HarpeGemma3ForCausalLM),
    "phi3": (HarpePhi3Config, HarpePhi3ForCausalLM),
    "olmo2": (HarpeOlmo2Config, HarpeOlmo2ForCausalLM),
    "mixtral": (HarpeMixtralConfig, HarpeMixtralForCausalLM),
    "qwen3_moe": (HarpeQwen3MoeConfig, HarpeQwen3MoeForCausalLM),
}
