"""The model families longext trains: what differs between them for the methods, LoRA, the memory plan and export,
one record per transformers `model_type` (torch-free, so the schema, `plan` and `--dry-run` stay instant).

    attention       the attention projections LoRA's `targets: auto` picks (Phi-3 fuses q/k/v into qkv_proj)
    experts         the 3-D expert weights of a mixture-of-experts block (LoRA only with lora.experts: true, through
                    peft's target_parameters); the router is never adapted
    layer_types     Gemma 2/3 interleave sliding-window and full-attention layers: only the full-attention layers'
                    RoPE is extended, the sliding-window layers keep theirs (`layer_rope`)
    layer_rope      how a per-layer-type RoPE reaches the model: "stock" (Gemma 3's nested rope_parameters, read by
                    its own rotary module) or "longext" (Gemma 2 has one rotary module: modeling_longext_gemma2.py
                    adds one for the full-attention layers, and an export ships that file)
    norm            the RMSNorm class; fused_norm says whether longext.savers.RMSNormFunction computes exactly what
                    it computes (Llama's weight * x.to(dtype); Gemma's (1 + weight) and OLMo 2's (weight * x).to(dtype)
                    differ)
    sdpa            False when transformers refuses SDPA for the family (Gemma 2's soft-capped attention scores):
                    `auto` then means eager on CPU
    rope_types      the rope_type values the family's config accepts (Phi-3: default and longrope only)

Whether a method applies to a family is the method's to say (its `family_problem` hook, longext.methods.base):
LongGen refuses the families with layer types.

Adding a family: a record below; its HARPE attention and export classes in
longext/methods/harpe/modeling_longext_harpe.py; its LongGen export classes in
longext/methods/longgen/modeling_longext_longgen.py (or a refusal in that method's family_problem); tests/test_families.py
builds a tiny model of it from tests/conftest.tiny_config and compares with stock transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
MOE_EXPERTS = ("experts.gate_up_proj", "experts.down_proj")  # transformers 5: [experts, out, in] parameters


@dataclass(frozen=True)
class Family:
    model_type: str
    label: str
    norm: str
    attention: tuple[str, ...] = QKVO
    experts: tuple[str, ...] = ()
    router: str | None = None
    fused_norm: bool = True
    layer_types: bool = False
    layer_rope: str | None = None  # "stock" | "longext" when layer_types
    sdpa: bool = True
    rope_types: tuple[str, ...] | None = None  # None: every rope_type transformers knows

    @property
    def moe(self) -> bool:
        return bool(self.experts)


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama", "Llama", "LlamaRMSNorm"),
    Family("mistral", "Mistral", "MistralRMSNorm"),
    Family("qwen2", "Qwen2", "Qwen2RMSNorm"),
    Family("qwen3", "Qwen3", "Qwen3RMSNorm"),
    Family("gemma2", "Gemma 2", "Gemma2RMSNorm", fused_norm=False, layer_types=True, layer_rope="longext",
           sdpa=False),
    Family("gemma3_text", "Gemma 3", "Gemma3RMSNorm", fused_norm=False, layer_types=True, layer_rope="stock"),
    Family("phi3", "Phi-3", "Phi3RMSNorm", attention=("qkv_proj", "o_proj"), rope_types=("default", "longrope")),
    Family("olmo2", "OLMo 2", "Olmo2RMSNorm", fused_norm=False),
    Family("mixtral", "Mixtral", "MixtralRMSNorm", experts=MOE_EXPERTS, router="gate"),
    Family("qwen3_moe", "Qwen3-MoE", "Qwen3MoeRMSNorm", experts=MOE_EXPERTS, router="gate"),
)}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
FULL, SLIDING = "full_attention", "sliding_attention"  # transformers' layer type names


EXPORT_PREFIXES = ("longext_harpe_", "longext_longgen_", "longext_")  # model types of longext's exports


def family_of(config) -> Family:
    """The Family of a transformers config (or its config.json as a dict), also of a longext export with its own
    modeling code (longext_harpe_llama -> llama). KeyError for an unsupported type: the caller
    (longext.models.load_model_config) has refused those with a one-line error already."""
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    for prefix in EXPORT_PREFIXES:
        if model_type not in FAMILIES and str(model_type).startswith(prefix):
            model_type = model_type.removeprefix(prefix)
    return FAMILIES[model_type]


def lora_targets(config) -> list[str]:
    """What `lora.targets: auto` means for this model: its attention projections (fused ones included)."""
    return list(family_of(config).attention)


def apply_family_rope(model, parameters: dict) -> None:
    """The RoPE setting per layer type on a Gemma 2 instance (longext's own: modeling_longext_gemma2.py); every other
    family reads its setting from the config it was built with, so this does nothing for them."""
    if family_of(model.config).layer_rope == "longext" and FULL in parameters:
        from longext.families.modeling_longext_gemma2 import install_layer_rope

        install_layer_rope(model, parameters)


def layer_types(config) -> list[str] | None:
    """The per-layer attention type list of a layer-typed family (Gemma 2/3), None for the others."""
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    return list(get("layer_types") or []) if family_of(config).layer_types else None


def full_layer_count(config) -> tuple[int, int]:
    """(full-attention layers, all layers): the layers whose RoPE an extension changes."""
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    types = layer_types(config)
    n = get("num_hidden_layers")
    return (n, n) if types is None else (sum(t == FULL for t in types), n)
