"""The inputs of `longext plan` (module docstring of longext/plan/__init__.py): the model's dimensions from its
config (Dims), the training set-up from a resolved recipe (Setup), and the shapes every term is made of (Term,
Estimate), with the per-token quantities the terms share."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

GiB = 2**30
ZERO3_PERSISTENCE = 100_000  # DeepSpeed's stage3_param_persistence_threshold default (elements)


@dataclass(frozen=True)
class Dims:
    """A model's dimensions as the plan needs them (from its config.json: `from_config`). Dense Llama-like models
    need only the first fields; the others describe the families of longext.families."""

    layers: int
    hidden: int
    intermediate: int  # the dense MLP's (Qwen3-MoE: of its dense layers; Mixtral: unused, every layer is MoE)
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool = False
    qk_norm: bool = False  # q/k RMSNorm per head (Qwen3, Qwen3-MoE, Gemma 3)
    qk_norm_full: bool = False  # q/k RMSNorm over the whole projection (OLMo 2)
    fused_qkv: bool = False  # Phi-3: one qkv_proj
    fused_gate_up: bool = False  # Phi-3: one gate_up_proj
    norm_layout: str = "pre"  # pre (Llama), sandwich (Gemma: pre and post norms around both blocks), post (OLMo 2)
    experts: int = 0  # mixture of experts: experts per MoE layer (0 = dense)
    active_experts: int = 0  # experts each token is routed to (top-k)
    expert_intermediate: int = 0
    moe_layers: int = 0  # layers with an MoE block (the others have the dense MLP)
    sliding_layers: int = 0  # layers with sliding-window attention
    sliding_window: int | None = None
    attn_softcap: float | None = None  # Gemma 2: tanh soft-capping of the attention scores
    final_softcap: float | None = None  # Gemma 2: of the logits
    fusable_norm: bool = True  # longext's fused RMSNorm computes this family's norm (not Gemma's, OLMo 2's)
    label: str = ""  # the family's name (longext.families)

    @classmethod
    def from_config(cls, config) -> "Dims":
        from longext.families import FAMILIES, family_of

        get = config.get if isinstance(config, dict) else lambda k, default=None: getattr(config, k, default)
        heads = get("num_attention_heads")
        family = family_of(config) if get("model_type") else FAMILIES["llama"]
        model_type = family.model_type
        layers = get("num_hidden_layers")
        experts = get("num_local_experts") or get("num_experts") or 0
        moe_layers = _moe_layers(get, layers) if experts else 0
        types = get("layer_types") or []
        window = get("sliding_window") if (get("use_sliding_window", True) is not False) else None
        sliding = sum(t == "sliding_attention" for t in types) if types else (layers if window else 0)
        return cls(layers=layers, hidden=get("hidden_size"), intermediate=get("intermediate_size"),
                   heads=heads, kv_heads=get("num_key_value_heads") or heads,
                   head_dim=get("head_dim") or get("hidden_size") // heads, vocab=get("vocab_size"),
                   tied=bool(get("tie_word_embeddings", False)),
                   qkv_bias=model_type == "qwen2" or bool(get("attention_bias", False)),
                   qk_norm=model_type in ("qwen3", "qwen3_moe", "gemma3_text"), qk_norm_full=model_type == "olmo2",
                   fused_qkv=model_type == "phi3", fused_gate_up=model_type == "phi3",
                   norm_layout={"gemma2": "sandwich", "gemma3_text": "sandwich", "olmo2": "post"}.get(model_type, "pre"),
                   experts=experts, active_experts=get("num_experts_per_tok") or 0 if experts else 0,
                   expert_intermediate=(get("moe_intermediate_size") or get("intermediate_size")) if experts else 0,
                   moe_layers=moe_layers, sliding_layers=sliding if window else 0, sliding_window=window if sliding else None,
                   attn_softcap=get("attn_logit_softcapping"), final_softcap=get("final_logit_softcapping"),
                   fusable_norm=family.fused_norm, label=family.label)

    @property
    def moe(self) -> bool:
        return self.experts > 0

    @property
    def dense_layers(self) -> int:
        return self.layers - self.moe_layers

    def attention_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each attention projection of one layer (Phi-3: one fused qkv_proj)."""
        d, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        if self.fused_qkv:
            return {"qkv_proj": (d, q + 2 * kv), "o_proj": (q, d)}
        return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d)}

    def mlp_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear of the dense MLP (Phi-3: one fused gate_up_proj)."""
        d, i = self.hidden, self.intermediate
        if self.fused_gate_up:
            return {"gate_up_proj": (d, 2 * i), "down_proj": (i, d)}
        return {"gate_proj": (d, i), "up_proj": (d, i), "down_proj": (i, d)}

    def expert_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of one expert's weights (transformers 5 holds each as one [experts, out, in] tensor)."""
        d, i = self.hidden, self.expert_intermediate
        return {"experts.gate_up_proj": (d, 2 * i), "experts.down_proj": (i, d)} if self.moe else {}

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear module LoRA can target in a layer: attention, and the dense MLP where there is one."""
        return {**self.attention_shapes(), **(self.mlp_shapes() if self.dense_layers else {})}

    @property
    def attention_params(self) -> int:
        """One layer's attention: projections, q/k/v biases, q/k norms."""
        shapes = self.attention_shapes()
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        bias = (q + 2 * kv) if self.qkv_bias else 0
        norms = 2 * self.head_dim if self.qk_norm else (q + kv) if self.qk_norm_full else 0
        return sum(a * b for a, b in shapes.values()) + bias + norms

    @property
    def mlp_params(self) -> int:
        return sum(a * b for a, b in self.mlp_shapes().values())

    @property
    def router_params(self) -> int:
        return self.hidden * self.experts

    @property
    def expert_params(self) -> int:
        """One expert's weights."""
        return sum(a * b for a, b in self.expert_shapes().values())

    @property
    def norm_params(self) -> int:
        return (4 if self.norm_layout == "sandwich" else 2) * self.hidden

    @property
    def body_params(self) -> int:
        """All decoder layers."""
        moe = self.router_params + self.experts * self.expert_params
        return (self.layers * (self.attention_params + self.norm_params) + self.dense_layers * self.mlp_params
                + self.moe_layers * moe)

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def params(self) -> int:
        head = 0 if self.tied else self.embed_params
        return self.embed_params + head + self.body_params + self.hidden

    @property
    def partitioned_params(self) -> int:
        """Parameters in tensors of at least ZeRO-3's persistence threshold (1e5 elements), which it partitions."""
        attn = sum(a * b for a, b in self.attention_shapes().values() if a * b >= ZERO3_PERSISTENCE)
        mlp = sum(a * b for a, b in self.mlp_shapes().values() if a * b >= ZERO3_PERSISTENCE)
        experts = sum(self.experts * a * b for a, b in self.expert_shapes().values()
                      if self.experts * a * b >= ZERO3_PERSISTENCE)
        router = self.router_params if self.router_params >= ZERO3_PERSISTENCE else 0
        head = 0 if self.tied else self.embed_params
        return (self.embed_params + head + self.layers * attn + self.dense_layers * mlp
                + self.moe_layers * (experts + router))

    @property
    def matmul_params(self) -> int:
        """Weights every token multiplies with (all linear layers, the router and its top-k experts, the output head;
        not the embedding lookup): the active parameters of a mixture of experts."""
        attn = sum(a * b for a, b in self.attention_shapes().values())
        moe = self.router_params + self.active_experts * self.expert_params
        return self.layers * attn + self.dense_layers * self.mlp_params + self.moe_layers * moe + self.embed_params

    def describe(self) -> str:
        """The shapes that set this model apart, in words (for `longext plan`)."""
        parts = [f"{self.label or 'model'}: {self.layers} layers, hidden {self.hidden}, {self.heads} heads / "
                 f"{self.kv_heads} kv heads x {self.head_dim}"]
        if self.moe:
            dense = f", {self.dense_layers} dense" if self.dense_layers else ""
            parts.append(f"{self.experts} experts (top {self.active_experts}, intermediate {self.expert_intermediate}) "
                         f"in {self.moe_layers} layers{dense}")
        if self.fused_qkv or self.fused_gate_up:
            parts.append("fused qkv_proj and gate_up_proj")
        if self.sliding_layers:
            parts.append(f"{self.sliding_layers} sliding-window layers (window {self.sliding_window})")
        if self.attn_softcap or self.final_softcap:
            caps = [f"{n} {v:g}" for n, v in (("scores", self.attn_softcap), ("logits", self.final_softcap)) if v]
            parts.append(f"soft-capped {', '.join(caps)}")
        return "; ".join(parts)

    def breakdown(self) -> list[tuple[str, int]]:
        """(part, parameters) of the whole model, for `longext plan`."""
        parts = [("embeddings", self.embed_params), ("output head", 0 if self.tied else self.embed_params),
                 ("attention", self.layers * self.attention_params)]
        if self.dense_layers:
            parts.append(("MLP", self.dense_layers * self.mlp_params))
        if self.moe:
            parts += [("experts", self.moe_layers * self.experts * self.expert_params),
                      ("router", self.moe_layers * self.router_params)]
        parts.append(("norms", self.layers * self.norm_params + self.hidden))
        return parts


def _moe_layers(get, layers: int) -> int:
    """Layers with an MoE block: all (Mixtral), or those Qwen3-MoE's decoder_sparse_step / mlp_only_layers leave."""
    step, dense = get("decoder_sparse_step") or 1, set(get("mlp_only_layers") or [])
    return sum(1 for i in range(layers) if i not in dense and (i + 1) % step == 0)


def lora_params(dims: Dims, targets, r: int, modules_to_save=(), experts: bool = False) -> int:
    """Trainable parameters peft creates: r * (in + out) per targeted linear per layer (MLP targets only in dense
    layers), with `experts` r * experts * (in + out) per expert weight per MoE layer (peft's ParamWrapper), plus a
    full copy of every module whose name ends with an entry of modules_to_save (peft's suffix match: `norm` is every
    RMSNorm)."""
    attn, mlp = dims.attention_shapes(), dims.mlp_shapes()
    count = dims.layers * sum(r * sum(attn[t]) for t in targets if t in attn)
    count += dims.dense_layers * sum(r * sum(mlp[t]) for t in targets if t in mlp)
    if experts:
        count += dims.moe_layers * sum(r * dims.experts * (a + b) for a, b in dims.expert_shapes().values())
    return count + sum(n for name, n in _module_params(dims) if any(name.endswith(m) for m in modules_to_save))


def _module_params(dims: Dims) -> list[tuple[str, int]]:
    """(module name, parameter count) of every leaf module of a causal LM of the family (norms named as Llama's)."""
    out = [("model.embed_tokens", dims.embed_params), ("lm_head", dims.embed_params), ("model.norm", dims.hidden)]
    per_layer = [(f"self_attn.{k}", a * b) for k, (a, b) in dims.attention_shapes().items()]
    per_layer += [(f"mlp.{k}", a * b) for k, (a, b) in dims.linear_shapes().items() if k not in dims.attention_shapes()]
    norms = ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"]
    per_layer += [(name, dims.hidden) for name in norms[: dims.norm_params // dims.hidden]]
    if dims.qk_norm:
        per_layer += [("self_attn.q_norm", dims.head_dim), ("self_attn.k_norm", dims.head_dim)]
    return out + [(f"model.layers.{i}.{name}", n) for i in range(dims.layers) for name, n in per_layer]


@dataclass(frozen=True)
class Setup:
    """Everything the estimate depends on besides the model dims (resolved: no `auto`)."""

    seq_len: int
    micro_batch: int = 1
    grad_accum: int = 1
    gpus: int = 1
    device: str = "cuda"  # cuda | cpu
    precision: str = "bf16"  # bf16 | fp32
    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    gradient_checkpointing: bool = False
    checkpoint_offload: bool = False
    sequence_parallel: int = 1
    tiled_loss: bool | str = False  # or "auto" (resolve_auto)
    tiled_mlp: bool | str = False
    fused_norm: bool | str = False
    attn: str = "sdpa"  # sdpa | flash_attention_2 | eager
    document_mask: bool = False  # packed documents masked: sdpa/eager hold a [b, 1, L, L] mask (data.document_mask)
    allocator: str = "glibc"  # CPU only: glibc (default malloc, keeps freed blocks) | live (RSS follows live tensors)
    lora_r: int | None = 8  # None = full fine-tuning
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    modules_to_save: tuple[str, ...] = ()
    lora_experts: bool = False  # LoRA on every expert's weights too (lora.experts)

    @property
    def full(self) -> bool:
        return self.lora_r is None


def setup_from_recipe(recipe, gpus: int = 1, device: str = "cuda", full: bool = False) -> Setup:
    """The Setup of a resolved recipe (longext.plan.resolve). precision auto means bf16 on GPUs; on CPU it is what
    `train` would pick on this machine."""
    t, lora = recipe.train, recipe.lora
    precision = t.precision
    if precision == "auto":
        from longext.engine import resolve_precision

        precision = "bf16" if device == "cuda" else resolve_precision("auto")
    attn = recipe.model.attn_implementation
    return Setup(
        seq_len=recipe.data.seq_len, micro_batch=t.micro_batch_size, grad_accum=t.grad_accum, gpus=gpus, device=device,
        precision=precision, zero_stage=t.zero_stage, offload_optimizer=t.offload_optimizer,
        offload_params=t.offload_params, gradient_checkpointing=t.gradient_checkpointing,
        checkpoint_offload=t.checkpoint_offload, sequence_parallel=t.sequence_parallel,
        tiled_loss="auto" if t.tiled_loss == "auto" else bool(t.tiled_loss),
        tiled_mlp="auto" if t.tiled_mlp == "auto" else bool(t.tiled_mlp),
        fused_norm="auto" if t.fused_norm == "auto" else bool(t.fused_norm), attn="sdpa" if attn == "auto" else attn,
        lora_r=None if full or t.full_finetune else lora.r, lora_targets=tuple(lora.targets),
        modules_to_save=tuple(lora.modules_to_save), lora_experts=lora.experts,
        document_mask=recipe.data.document_mask is True,
    )


def resolve_auto(dims: Dims, s: Setup) -> Setup:
    """tiled_loss / tiled_mlp / fused_norm `auto` decided by the training code's rule (longext.sp) for this setup."""
    from longext.savers import auto_savers

    rules = auto_savers(s.micro_batch * s.seq_len // s.sequence_parallel, s.sequence_parallel, dims.vocab)
    rules["fused_norm"] = rules["fused_norm"] and dims.fusable_norm
    return replace(s, **{k: v for k, v in rules.items() if getattr(s, k) == "auto"})


@dataclass
class Term:
    name: str
    bytes: int
    formula: str
    parts: list["Term"] = field(default_factory=list)  # sub-terms that sum to bytes (one layer's backward)


@dataclass
class Estimate:
    terms: list[Term]
    total: int
    budget: int | None
    setup: Setup
    flops_per_step: float
    flops_terms: dict
    params: int
    trainable: int
    notes: list[str] = field(default_factory=list)
    active: int = 0  # parameters a token multiplies with (all but the idle experts and the embedding lookup)
    breakdown: list[tuple[str, int]] = field(default_factory=list)  # (part, parameters): attention, experts, ...
    model: str = ""  # the model's shapes in words (experts, fused projections, sliding windows, soft-capping)

    @property
    def fits(self) -> bool | None:
        return None if self.budget is None else self.total <= self.budget

    def to_json(self) -> dict:
        return {"total_bytes": self.total, "budget_bytes": self.budget, "fits": self.fits,
                "terms": [asdict(t) for t in self.terms], "setup": asdict(self.setup), "params": self.params,
                "trainable_params": self.trainable, "flops_per_step": self.flops_per_step,
                "flops_terms": self.flops_terms, "notes": self.notes, "active_params": self.active,
                "breakdown": dict(self.breakdown), "model": self.model}


def element_bytes(s: Setup) -> int:
    """Weight and activation bytes per element: bf16 or fp32."""
    return 2 if s.precision == "bf16" else 4


def device_tokens(s: Setup) -> int:
    """T: tokens per device (Ulysses splits each sample's sequence over sequence_parallel devices)."""
    return s.micro_batch * s.seq_len // s.sequence_parallel


def kernel_kv_heads(dims: Dims, s: Setup) -> int:
    """Key/value heads the attention kernel holds per local token: G, or sp when Ulysses repeats the kv heads
    (sp > G: each rank gets one kv head over sp x T tokens)."""
    return max(dims.kv_heads, s.sequence_parallel)


def mlp_tile_count(dims: Dims, s: Setup) -> int:
    """TiledMLP's shard count (longext.sp: about hidden_size tokens of each sample's local sequence per shard; a
    shard holds those tokens of every sample of the micro-batch); 1 = the MLP runs untiled."""
    from longext.savers import mlp_tiles

    return mlp_tiles(s.seq_len // s.sequence_parallel, dims.hidden) if s.tiled_mlp else 1
