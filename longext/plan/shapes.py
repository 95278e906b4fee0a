"""The inputs of `longext plan` (module docstring of longext/plan/__init__.py): the model's dimensions from its
config (Dims), the training set-up from a resolved recipe (Setup), and the shapes every term is made of (Term,
Estimate), with the per-token quantities the terms share."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

GiB = 2**30
ZERO3_PERSISTENCE = 100_000  # DeepSpeed's stage3_param_persistence_threshold default (elements)


@dataclass(frozen=True)
class Dims:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool = False
    qk_norm: bool = False

    @classmethod
    def from_config(cls, config) -> "Dims":
        get = config.get if isinstance(config, dict) else lambda k, default=None: getattr(config, k, default)
        heads = get("num_attention_heads")
        model_type = get("model_type", "llama")
        return cls(layers=get("num_hidden_layers"), hidden=get("hidden_size"), intermediate=get("intermediate_size"),
                   heads=heads, kv_heads=get("num_key_value_heads") or heads,
                   head_dim=get("head_dim") or get("hidden_size") // heads, vocab=get("vocab_size"),
                   tied=bool(get("tie_word_embeddings", False)),
                   qkv_bias=model_type == "qwen2" or bool(get("attention_bias", False)), qk_norm=model_type == "qwen3")

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear module in one decoder layer."""
        d, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
                "gate_proj": (d, i), "up_proj": (d, i), "down_proj": (i, d)}

    @property
    def layer_params(self) -> int:
        shapes = self.linear_shapes()
        bias = (shapes["q_proj"][1] + 2 * shapes["k_proj"][1]) if self.qkv_bias else 0
        norms = 2 * self.hidden + (2 * self.head_dim if self.qk_norm else 0)
        return sum(a * b for a, b in shapes.values()) + bias + norms

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def params(self) -> int:
        head = 0 if self.tied else self.embed_params
        return self.embed_params + head + self.layers * self.layer_params + self.hidden

    @property
    def partitioned_params(self) -> int:
        """Parameters in tensors of at least ZeRO-3's persistence threshold (1e5 elements), which it partitions."""
        big = [a * b for a, b in self.linear_shapes().values() if a * b >= ZERO3_PERSISTENCE]
        head = 0 if self.tied else self.embed_params
        return self.embed_params + head + self.layers * sum(big)

    @property
    def matmul_params(self) -> int:
        """Weights every token multiplies with (all linear layers and the output head; not the embedding lookup)."""
        return self.layers * sum(a * b for a, b in self.linear_shapes().values()) + self.embed_params


def lora_params(dims: Dims, targets, r: int, modules_to_save=()) -> int:
    """Trainable parameters peft creates: r * (in + out) per targeted linear per layer, plus a full copy of every
    module whose name ends with an entry of modules_to_save (peft's suffix match: `norm` is every RMSNorm)."""
    shapes = dims.linear_shapes()
    count = dims.layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets if t in shapes)
    return count + sum(n for name, n in _module_params(dims) if any(name.endswith(m) for m in modules_to_save))


def _module_params(dims: Dims) -> list[tuple[str, int]]:
    """(module name, parameter count) of every leaf module of a Llama-family causal LM."""
    out = [("model.embed_tokens", dims.embed_params), ("lm_head", dims.embed_params), ("model.norm", dims.hidden)]
    per_layer = [(f"self_attn.{k}", a * b) for k, (a, b) in dims.linear_shapes().items() if k[0] in "qkvo"]
    per_layer += [(f"mlp.{k}", a * b) for k, (a, b) in dims.linear_shapes().items() if k[0] not in "qkvo"]
    per_layer += [("input_layernorm", dims.hidden), ("post_attention_layernorm", dims.hidden)]
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
        modules_to_save=tuple(lora.modules_to_save), document_mask=recipe.data.document_mask is True,
    )


def resolve_auto(dims: Dims, s: Setup) -> Setup:
    """tiled_loss / tiled_mlp / fused_norm `auto` decided by the training code's rule (longext.sp) for this setup."""
    from longext.savers import auto_savers

    rules = auto_savers(s.micro_batch * s.seq_len // s.sequence_parallel, s.sequence_parallel, dims.vocab)
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

    @property
    def fits(self) -> bool | None:
        return None if self.budget is None else self.total <= self.budget

    def to_json(self) -> dict:
        return {"total_bytes": self.total, "budget_bytes": self.budget, "fits": self.fits,
                "terms": [asdict(t) for t in self.terms], "setup": asdict(self.setup), "params": self.params,
                "trainable_params": self.trainable, "flops_per_step": self.flops_per_step,
                "flops_terms": self.flops_terms, "notes": self.notes}


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
