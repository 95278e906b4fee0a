"""`longext plan`: per-device memory and step FLOPs of a recipe, from the model's config.json alone.

Every term is a formula in the model's dimensions (docs/scaling.md writes them out):

  d = hidden_size, i = intermediate_size, H / G = attention / key-value heads, h = head_dim, V = vocab_size,
  n = layers, T = tokens per device = micro_batch * seq_len / sequence_parallel, a = activation bytes (2 bf16,
  4 fp32), w = weight bytes, D = devices (ZeRO partitions over all of them).

- weights: params * w; ZeRO-3 keeps params * w / D plus the gathered weights DeepSpeed keeps live (up to its
  stage3_max_live_parameters, 1e9 by default: all of a model below that size) and the small unpartitioned
  tensors; with offload_params only the gathered ones stay on the device.
- trainable state (LoRA, or every weight): gradients, fp32 master copy and AdamW's two moments, as DeepSpeed
  keeps them (bf16: 2 + 4 + 4 + 8 = 18 bytes per trainable param besides the weight, the figure of DeepSpeed's
  own `estimate_zero2_model_states_mem_needs`; fp32: 4 gradient + 4 master copy at ZeRO >= 1 + 8 AdamW); ZeRO-1
  partitions master + moments + fp32 gradients over D, ZeRO-2 also the 16-bit gradients; offload_optimizer
  moves all of it, gradient partitions included, to CPU memory.
- gradient bucket: ZeRO 1-3 allocate `reduce_bucket_size` (5e8) elements for gradient reduction, however few the
  trainable gradients are (contiguous_gradients, DeepSpeed's default; tested). On a GPU the caching allocator
  holds all of it; in CPU RAM only the written part (the gradients) is resident.
- activations kept for backward, per layer and token, in bytes (sdpa / flash kernels, LoRA on the recipe's targets):
      4d + 4d                 the two RMSNorm inputs (the norm upcasts to fp32 and keeps that); with fused_norm
                              (longext.sp.RMSNormFunction) each keeps its input as is and one fp32 scale: a*d + 4
      a(q + 2 G'h) + a q + 4H rotated q, k, v, the attention output and its log-sum-exp (q = H h; G' = max(G, sp):
                              Ulysses repeats the kv heads when sp > G)
      3a*i                    MLP: gate (for SiLU), SiLU(gate) and up (for the product)
      a*d per LoRA input      q/k/v share the norm output, gate/up share one, down its own (o's input is the
                              kept attention output, except with eager attention or Ulysses, whose all-to-all
                              makes a copy); under ZeRO-3 every linear's input (its linear autograd function saves
                              it even for frozen weights)
      a*r per LoRA module     the A projection's output
  with gradient checkpointing only the layer input (a*d) is kept per layer, and one layer is recomputed in
  backward; eager attention adds the softmax output H*T*L*(4 or 4 + a) per layer (O(L^2)); TiledMLP keeps the
  MLP input (a*d) instead of 3a*i and the MLP's LoRA tensors. Sequence parallelism divides T.
- loss: transformers' cross-entropy holds three fp32 [T, V] tensors at its peak (logits, log-softmax, their
  gradient): 12*T*V bytes; the tiled loss holds one tile of at most longext.sp.LOGITS_PER_TILE logits, plus the
  final hidden states and their gradient (2a*T*d).
- one layer's backward: the largest of three moments (backward_moments), each a list of named parts: the
  attention kernel's backward (the recomputed attention block's saved tensors, the gradients of the residual
  stream and of the attention output, dq/dk/dv, and on a GPU the flash kernel's fp32 dq accumulator and, under
  GQA, dk/dv at every query head), the MLP's backward (every saved tensor of the layer, the gradient of the layer
  output and 3 [T, i] gradients, or one TiledMLP tile), the post-attention RMSNorm's backward (the attention
  block's saved tensors and five fp32 [T, d] tensors). Checked against the live tensors of a real checkpointed
  layer on CPU (tests/test_memplan.py).
- CPU heap retention (CPU only): glibc's malloc keeps freed blocks resident; CPU_HEAP_RETENTION (measured once)
  x the activations one forward produces.
- fixed: on a GPU 1 GiB (CUDA context, cuBLAS/NCCL workspaces; stated, not measured here); on CPU the process
  baseline (interpreter, torch, transformers, DeepSpeed), measured by `longext bench memory`.

peak = weights + trainable state + bucket + kept activations + max(loss, one layer's backward) [+ CPU heap
retention] + fixed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

GiB = 2**30
GPU_FIXED = 1 * GiB
CPU_BASELINE = int(0.52 * GiB)  # process baseline of a CPU rank, measured by `longext bench memory` (bench/memory.py)
# glibc's default malloc keeps freed heap blocks resident: in `longext bench memory` the peak RSS of a CPU step sat
# above the live tensors by about this share of the activations a forward pass produces (measured once: the mean
# of the SmolLM2-135M 2k cases at ZeRO 0 and 2, 0.75 and 0.42; with MALLOC_MMAP_THRESHOLD_=65536 it is ~1 %)
CPU_HEAP_RETENTION = 0.58
ZERO3_MAX_LIVE = 1_000_000_000  # DeepSpeed's stage3_max_live_parameters / stage3_max_reuse_distance defaults
ZERO3_PERSISTENCE = 100_000  # DeepSpeed's stage3_param_persistence_threshold default (elements)
REFUSE_RATIO = 1.1  # `train` refuses (memory_check: refuse) when the estimate exceeds the budget by more than this
BUDGET_ENV = "LONGEXT_MEMORY_BUDGET"  # forces train's budget, e.g. 2GB (tests; or a machine shared with others)
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """Bytes from '80GB', '80GiB', '24 gb', '512MiB', '1e9'; ValueError otherwise."""
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        raise ValueError("expected a memory size such as 80GB, 80GiB or 512MiB")
    return int(float(match.group(1)) * _UNITS[unit])


# ------------------------------------------------------------------------------------------ dims
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


# ------------------------------------------------------------------------------------------ setup
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
        modules_to_save=tuple(lora.modules_to_save),
    )


def resolve_auto(dims: Dims, s: Setup) -> Setup:
    """tiled_loss / tiled_mlp / fused_norm `auto` decided by the training code's rule (longext.sp) for this setup."""
    from longext.sp import auto_savers

    rules = auto_savers(s.micro_batch * s.seq_len // s.sequence_parallel, s.sequence_parallel, dims.vocab)
    return replace(s, **{k: v for k, v in rules.items() if getattr(s, k) == "auto"})


# --------------------------------------------------------------------------------------- estimate
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


def estimate(dims: Dims, s: Setup, budget: int | None = None) -> Estimate:
    """Peak bytes per device of one training step, term by term (module docstring)."""
    s = resolve_auto(dims, s)
    trainable = dims.params if s.full else lora_params(dims, s.lora_targets, s.lora_r, s.modules_to_save)
    terms = [*_weight_terms(dims, s, trainable), *_state_terms(s, trainable), *_activation_terms(dims, s)]
    gpu = s.device == "cuda"
    terms.append(Term("fixed overhead", GPU_FIXED if gpu else CPU_BASELINE,
                      "CUDA context, cuBLAS/NCCL workspaces (stated)" if gpu else "CPU process baseline (measured)"))
    flops, flops_terms = step_flops(dims, s, trainable)
    return Estimate(terms, sum(t.bytes for t in terms), budget, s, flops, flops_terms, dims.params, trainable)


def _bytes(s: Setup) -> int:
    """Weight and activation bytes per element: bf16 or fp32."""
    return 2 if s.precision == "bf16" else 4


def _weight_terms(dims: Dims, s: Setup, trainable: int) -> list[Term]:
    P, w, D = dims.params, _bytes(s), s.gpus
    if s.zero_stage == 3:
        # gathered weights stay live up to stage3_max_live_parameters (DeepSpeed's default 1e9; a parameter reused
        # within stage3_max_reuse_distance, also 1e9, is not released); tensors under stage3_param_persistence_
        # threshold (1e5 elements: the norms) are never partitioned
        persistent = dims.params - dims.partitioned_params
        live = min(dims.partitioned_params, max(ZERO3_MAX_LIVE, dims.embed_params))
        resident = 0 if s.offload_params else dims.partitioned_params * w // D
        kept = "0 (offloaded)" if s.offload_params else f"{dims.partitioned_params:,} params x {w} B / {D}"
        out = [Term("weights", resident + (persistent + live) * w,
                    f"{kept} + gathered live {live:,} x {w} B + persistent {persistent:,} x {w} B")]
    else:
        out = [Term("weights", P * w, f"{P:,} params x {w} B")]
    if not s.full and s.modules_to_save:  # peft trains a copy next to the frozen original
        copies = trainable - lora_params(dims, s.lora_targets, s.lora_r)
        out.append(Term("modules_to_save copies", copies * w, f"{copies:,} x {w} B"))
    return out


def _state_terms(s: Setup, Nt: int) -> list[Term]:
    """Gradients, fp32 master copy, AdamW moments of the Nt trainable params; the ZeRO gradient bucket."""
    from longext.engine import reduce_bucket  # the buffer the engine configures; engine imports torch: lazily

    D, a = s.gpus, _bytes(s)
    grad_div, state_div = (D if s.zero_stage >= 2 else 1), (D if s.zero_stage >= 1 else 1)
    master = 4 if s.precision == "bf16" or s.zero_stage >= 1 else 0  # fp32 runs copy only inside a ZeRO optimizer
    fp32_grad = 4 if s.precision == "bf16" else 0
    grads, state = a * Nt // grad_div, (fp32_grad + master + 8) * Nt // state_div
    label = (f"{a} B grad" + (f" / {D}" if grad_div > 1 else "")
             + f" + ({fp32_grad} grad32 + {master} master + 8 AdamW)" + (f" / {D}" if state_div > 1 else ""))
    if s.offload_optimizer:  # ZeRO-Offload: gradient partitions go to CPU with the optimizer (DeepSpeed's estimators)
        grads, state, label = 0, 0, label + "; offloaded to CPU"
    out = [Term("trainable state", grads + state, f"{Nt:,} trainable x [{label}]")]
    if s.zero_stage >= 1:
        # a GPU's caching allocator holds the whole bucket; in CPU RAM only its written part (the gradients) is
        # resident: with the bucket capped at the trainable count (reduce_bucket) the two agree
        bucket = reduce_bucket(Nt)
        gbytes = 4 if s.zero_stage == 1 else a
        out.append(Term("gradient bucket", bucket * gbytes,
                        f"reduce_bucket_size min(5e8, trainable) = {bucket:,} x {gbytes} B"))
    return out


def _activation_terms(dims: Dims, s: Setup) -> list[Term]:
    """Kept activations, the larger of the loss and one layer's backward, and (CPU) the heap's retention."""
    a, gpu, n, T = _bytes(s), s.device == "cuda", dims.layers, _tokens(s)
    d, V = dims.hidden, dims.vocab
    per_layer = sum(b for _, b, _ in _attention_saved(dims, s) + _mlp_saved(dims, s))
    attn_sq = _eager_probs(dims, s)
    full_layer = T * per_layer + attn_sq
    if s.gradient_checkpointing and s.checkpoint_offload and gpu:  # save_on_cpu wraps the whole forward
        out = [Term("kept activations", 0, "layer inputs and final norm input offloaded to CPU")]
    elif s.gradient_checkpointing:
        out = [Term("kept activations", n * T * a * d + T * 4 * d,
                    f"{n} layers x T={T:,} x {a}d B (layer inputs) + final norm input T x 4d")]
    else:
        # the final norm keeps its input (4d); layer 0's norm keeps none unless the embedding trains (its input
        # does not require grad): the two cancel for LoRA
        eager = f" + eager scores {attn_sq:,} B/layer" if attn_sq else ""
        out = [Term("kept activations", n * full_layer + (T * 4 * d if s.full else 0),
                    f"{n} layers x T={T:,} x {per_layer:,} B/token{eager}")]
    backward = layer_backward(dims, s)
    loss, loss_formula = _loss_term(T, V, d, a, s.tiled_loss)
    out.append(Term("loss (logits)", loss, loss_formula) if loss >= backward.bytes else backward)
    if not gpu and s.allocator == "glibc":
        out.append(Term("CPU heap retention", int(CPU_HEAP_RETENTION * n * T * per_layer),
                        f"{CPU_HEAP_RETENTION} x the forward's activations (glibc keeps freed blocks)"))
    return out


def _tokens(s: Setup) -> int:
    """T: tokens per device (Ulysses splits each sample's sequence over sequence_parallel devices)."""
    return s.micro_batch * s.seq_len // s.sequence_parallel


def _kernel_kv_heads(dims: Dims, s: Setup) -> int:
    """Key/value heads the attention kernel holds per local token: G, or sp when Ulysses repeats the kv heads
    (sp > G: each rank gets one kv head over sp x T tokens)."""
    return max(dims.kv_heads, s.sequence_parallel)


def _tiles(dims: Dims, s: Setup) -> int:
    """TiledMLP's shard count (longext.sp: about hidden_size tokens of each sample's local sequence per shard; a
    shard holds those tokens of every sample of the micro-batch); 1 = the MLP runs untiled."""
    from longext.sp import mlp_tiles

    return mlp_tiles(s.seq_len // s.sequence_parallel, dims.hidden) if s.tiled_mlp else 1


def _used_inputs(dims: Dims, s: Setup) -> dict[str, bool]:
    """Which layer inputs autograd keeps for trainable linears: the norm output (q/k/v), o_proj's input, the
    post-attention norm output (gate/up) and down_proj's input. Under ZeRO-3 every linear runs through its own
    autograd function, which saves the input even of a frozen weight."""
    keep = set(dims.linear_shapes()) if s.full or s.zero_stage == 3 else set(s.lora_targets)
    tiled = _tiles(dims, s) > 1  # TiledMLP keeps its own input and recomputes the rest per tile
    return {"attn_in": bool(keep & {"q_proj", "k_proj", "v_proj"}), "o_in": "o_proj" in keep,
            "mlp_in": bool(keep & {"gate_proj", "up_proj"}) and not tiled,
            "down_in": "down_proj" in keep and not tiled}


def _lora_outputs(s: Setup, group: set[str]) -> tuple[int, int]:
    """(count, bytes per token) of the r-dim LoRA A outputs autograd keeps for the targets in `group`."""
    k = 0 if s.full else len(set(s.lora_targets) & group)
    return k, k * _bytes(s) * (s.lora_r or 0)


NORM_IN, POST_NORM_IN, DOWN_IN = "input norm: fp32 input", "post-attention norm: fp32 input", "down_proj input"


def _norm_input(name: str, s: Setup, d: int) -> tuple[str, int, str]:
    """What an RMSNorm saves per token: transformers' module its fp32 copy of the input (in fp32 the input
    itself); the fused norm (longext.sp.RMSNormFunction) the input in its own dtype and one fp32 scale."""
    if s.fused_norm:
        return name, _bytes(s) * d + 4, "a d + 4"
    return name, 4 * d, "4d"


def _attention_saved(dims: Dims, s: Setup) -> list[tuple[str, int, str]]:
    """(name, bytes per local token, formula) of what a decoder layer's attention block saves for backward
    (sdpa / flash kernels; eager's O(L^2) probabilities are _eager_probs)."""
    a, d, H, h = _bytes(s), dims.hidden, dims.heads, dims.head_dim
    q, Gk, used = H * h, _kernel_kv_heads(dims, s), _used_inputs(dims, s)
    out = [_norm_input(NORM_IN, s, d)]
    if s.full:
        out.append(("input norm: normalized input (the weight trains)", a * d, "a d"))
    if used["attn_in"]:
        out.append(("q/k/v input (norm output)", a * d, "a d"))
    kv = "G" if Gk == dims.kv_heads else "sp"
    out += [("q, k, v after RoPE (kernel layout)", a * (q + 2 * Gk * h), f"a (H h + 2 {kv} h), {kv}={Gk}"),
            ("attention output + log-sum-exp", a * q + 4 * H, "a H h + 4H")]
    # the kernels write their output token-major, so o_proj's input shares its storage with the kept attention
    # output; eager attention transposes it into a new tensor, Ulysses' second all-to-all into another
    if used["o_in"] and (s.attn == "eager" or s.sequence_parallel > 1):
        out.append(("o_proj input (a copy of the output)", a * q, "a H h"))
    k, lora = _lora_outputs(s, {"q_proj", "k_proj", "v_proj", "o_proj"})
    if k:
        out.append(("LoRA A outputs (attention)", lora, f"{k} x a r"))
    return out


def _mlp_saved(dims: Dims, s: Setup) -> list[tuple[str, int, str]]:
    """(name, bytes per local token, formula) of what a decoder layer's MLP half saves for backward."""
    a, d, i, used = _bytes(s), dims.hidden, dims.intermediate, _used_inputs(dims, s)
    out = [_norm_input(POST_NORM_IN, s, d)]
    if s.full:
        out.append(("post-attention norm: normalized input (the weight trains)", a * d, "a d"))
    if _tiles(dims, s) > 1:
        return out + [("TiledMLP input", a * d, "a d")]
    out.append(("gate, SiLU(gate), up", 3 * a * i, "3 a i"))
    if used["mlp_in"]:
        out.append(("gate/up input (norm output)", a * d, "a d"))
    if used["down_in"]:
        out.append((DOWN_IN, a * i, "a i"))
    k, lora = _lora_outputs(s, {"gate_proj", "up_proj", "down_proj"})
    if k:
        out.append(("LoRA A outputs (MLP)", lora, f"{k} x a r"))
    return out


def _eager_probs(dims: Dims, s: Setup) -> int:
    """Eager attention keeps the [H, T, L] softmax per layer (fp32, plus its cast to bf16): O(L^2)."""
    if s.attn != "eager":
        return 0
    return dims.heads * _tokens(s) * s.seq_len * (4 if _bytes(s) == 4 else 4 + _bytes(s))


def backward_moments(dims: Dims, s: Setup) -> dict[str, list[Term]]:
    """The tensors alive at the three candidate peaks of one decoder layer's backward. With gradient checkpointing,
    the recomputed layer's saved tensors (all of them exist when its backward starts; autograd frees each with its
    node), plus the gradients alive at:

    - the attention kernel's backward: the attention block's saved tensors (the MLP's are freed by then), the
      gradient of the residual stream, of the attention output, dq/dk/dv, and the kernel's workspace (flash
      kernels on a GPU: a fp32 dq accumulator, and under GQA dk/dv at every query head before they are summed);
    - the MLP's backward (its product's backward): every saved tensor of the layer but down_proj's input, the
      gradient of the layer output and those of the MLP intermediates (with TiledMLP: its input gradient and one
      tile, recomputed, with its gradients);
    - the post-attention RMSNorm's backward (the peak with TiledMLP): the attention block's saved tensors, the
      norm's fp32 input, the gradient of the layer output and five fp32 [T, d] tensors of the norm's backward
      (fused_norm: its input, its output and input gradients, and fp32 temporaries of one row chunk).

    Ulysses: T = tokens per device. The kernel sees sp x T tokens with H/sp query heads, the same bytes as T tokens
    with H heads, and max(G/sp, 1) kv heads: k/v at max(G, sp) heads per local token. Without checkpointing the
    saved tensors are in the kept activations and only the gradients count here."""
    T, a, d, i = _tokens(s), _bytes(s), dims.hidden, dims.intermediate
    h, q, Gk = dims.head_dim, dims.heads * dims.head_dim, _kernel_kv_heads(dims, s)
    ckpt = s.gradient_checkpointing

    def per_token(parts):
        return [Term(name, T * b, f"T x {f} = {T:,} x {b:,} B") for name, b, f in parts]

    # in fp32 the input norm's "upcast" is its input itself, and the fused norm saves its input as is: the layer
    # input, counted in the kept activations
    layer_input = a == 4 or s.fused_norm
    saved_attn = per_token([p for p in _attention_saved(dims, s) if not (ckpt and layer_input and p[0] == NORM_IN)])
    if _eager_probs(dims, s):
        saved_attn.append(Term("attention probabilities (eager)", _eager_probs(dims, s), "H T L (4 + a)"))
    reload = ([Term("layer input, back from CPU", T * a * d, f"T x a d = {T:,} x {a * d:,} B")]
              if ckpt and s.checkpoint_offload and s.device == "cuda" else [])
    grads_attn = per_token([("gradient of the residual stream", a * d, "a d"),
                            ("gradient of the attention output", a * q, "a H h"),
                            ("dq, dk, dv", a * (q + 2 * Gk * h), f"a (H h + 2 x {Gk} h)")])
    grads_attn += _attention_workspace(dims, s)
    attention = (reload + saved_attn if ckpt else []) + grads_attn

    tiles = _tiles(dims, s)
    grads_mlp = per_token([("gradient of the layer output", a * d, "a d")])
    if tiles > 1:
        tile = math.ceil(T / tiles)
        k, lora = _lora_outputs(s, {"gate_proj", "up_proj", "down_proj"})
        per = 6 * a * i + a * d + lora
        extra = f" + {k} a r LoRA" if lora else ""
        grads_mlp += per_token([("TiledMLP input gradient", a * d, "a d")])
        grads_mlp.append(Term("one MLP tile: recomputed gate, SiLU, up, output and their gradients", tile * per,
                              f"{tile:,} tokens x (6 a i + a d{extra}) B, {tiles} tiles"))
    else:
        grads_mlp += per_token([("gradients of down input, SiLU(gate), up", 3 * a * i, "3 a i")])
    # the peak is the product's backward (3 saved + 3 gradient [T, i] tensors); down_proj's saved input is freed
    # with down_proj's backward, which runs before it
    saved_mlp = per_token([p for p in _mlp_saved(dims, s) if p[0] != DOWN_IN])
    held = sum(t.bytes for t in saved_attn)
    mlp = (reload + [Term("attention block's saved tensors (as above)", held, "sum of the attention parts")]
           + saved_mlp if ckpt else []) + grads_mlp
    # the post-attention RMSNorm's backward runs in fp32 (the norm upcasts): with the MLP's tensors freed, five fp32
    # [T, d] tensors at its peak (its output's gradient in fp32 and four temporaries of the pow/mean/rsqrt chain)
    # in fp32 the norm takes its input as is, so the layer output's gradient is accumulated into one of the five
    if s.fused_norm:  # RMSNormFunction: the input gradient in the activation dtype and fp32 row-chunk temporaries
        from longext.sp import NORM_CHUNK_ELEMENTS

        rows = min(T, max(1, NORM_CHUNK_ELEMENTS // d))
        grads_norm = per_token([("gradient of the layer output", a * d, "a d"),
                                ("norm output gradient (held by autograd through the norm's backward)", a * d, "a d"),
                                ("norm input gradient", a * d, "a d")])
        grads_norm.append(Term("fused norm: fp32 row-chunk temporaries", rows * 4 * d * 4,
                               f"{rows:,} rows x 4 x 4d B"))
    else:
        grads_norm = per_token([("gradient of the layer output", a * d, "a d")] if a < 4 else [])
        grads_norm += per_token([("post-attention norm: fp32 backward tensors", 20 * d, "5 x 4d")])
    norm = (reload + [Term("attention block's saved tensors (as above)", held, "sum of the attention parts")]
            + per_token([p for p in _mlp_saved(dims, s) if p[0] == POST_NORM_IN]) if ckpt else []) + grads_norm
    return {"attention kernel's backward": attention, "MLP's backward": mlp, "post-attention norm's backward": norm}


def layer_backward(dims: Dims, s: Setup) -> Term:
    """Peak bytes one decoder layer's backward adds to the kept activations: the largest of its moments
    (backward_moments), as a Term whose parts name every tensor alive then."""
    moments = [(sum(t.bytes for t in parts), where, parts) for where, parts in backward_moments(dims, s).items()]
    (total, where, parts), *others = sorted(moments, key=lambda m: m[0], reverse=True)
    ckpt = s.gradient_checkpointing
    what = "recomputed layer's saved tensors + gradients" if ckpt else "gradients"
    rest = ", ".join(f"the {w}: {b / GiB:,.2f} GiB" for b, w, _ in others)
    return Term("one layer's backward", total, f"{what} at the {where} ({rest})", parts)


def _attention_workspace(dims: Dims, s: Setup) -> list[Term]:
    """What the attention backward allocates besides dq/dk/dv. Flash kernels on a GPU (sdpa's flash backend and
    flash-attn 2 share the code): a fp32 dq accumulator [T, H, h] and softmax_d [H, T]; under GQA (the kernel's
    query heads outnumber its kv heads) dk and dv at every query head, summed to the kv heads at the end. The CPU
    kernel works in per-thread blocks. Eager: the gradients of the probabilities and of the fp32 scores."""
    T, a, H, h = _tokens(s), _bytes(s), dims.heads, dims.head_dim
    q = H * h
    if s.attn == "eager":
        probs = dims.heads * T * s.seq_len
        return [Term("gradients of the attention probabilities (eager)", probs * (4 + a), "H T L (4 + a)")]
    if s.device != "cuda":
        return []
    out = [Term("flash backward: fp32 dq accumulator + softmax_d", T * (4 * q + 4 * H),
                f"T x (4 H h + 4H) = {T:,} x {4 * q + 4 * H:,} B")]
    if H > _kernel_kv_heads(dims, s):
        out.append(Term("flash backward: dk, dv at every query head (GQA)", T * 2 * a * q,
                        f"T x 2 a H h = {T:,} x {2 * a * q:,} B"))
    return out


def _loss_term(T: int, V: int, d: int, a: int, tiled: bool) -> tuple[int, str]:
    """Peak bytes of the cross-entropy: three fp32 [tokens, V] tensors, for all T tokens or for one tile (then the
    final hidden states and their gradient, which the tiled loss computes in the forward, are alive too)."""
    from longext.sp import loss_tiles

    if not tiled:
        return 12 * T * V, f"12 B x T={T:,} x V={V:,} (logits, log-softmax, grad; fp32)"
    tiles = loss_tiles(T, V)
    tokens = math.ceil(T / tiles)
    return (12 * tokens * V + 2 * a * T * d,
            f"{tiles} tiles: 12 B x {tokens:,} tokens x V={V:,} + hidden and its grad 2 a T d")


def step_flops(dims: Dims, s: Setup, trainable: int) -> tuple[float, dict]:
    """FLOPs of one optimizer step over all devices: forward 2*N_mm*L + attention 4*L^2*q per layer (dense count;
    causal kernels skip about half), backward = input gradients (same as forward) + weight gradients of the
    trainable weights (2*N_trainable*L) + attention x2; gradient checkpointing recomputes the layers' forward."""
    L, n, q = s.seq_len, dims.layers, dims.heads * dims.head_dim
    samples = s.micro_batch * s.grad_accum * max(1, s.gpus // s.sequence_parallel)
    dense = 2 * dims.matmul_params * L
    attention = 4 * n * L * L * q
    forward = dense + attention
    backward = dense + 2 * min(trainable, dims.matmul_params) * L + 2 * attention
    recompute = (dense - 2 * dims.embed_params * L + attention) if s.gradient_checkpointing else 0
    per_sample = forward + backward + recompute
    return float(per_sample * samples), {"forward": forward, "backward": backward, "recompute": recompute,
                                         "per_sample": per_sample, "samples_per_step": samples}


# --------------------------------------------------------------------------------------- switches
def fixing_switches(dims: Dims, s: Setup, budget: int) -> list[tuple[str, object]] | None:
    """The switches, cheapest first, that bring the estimate under `budget` ([] if it fits already, None if even
    all of them do not): each is added only when it lowers the estimate, and the search stops once it fits."""
    s = resolve_auto(dims, s)
    if estimate(dims, s).total <= budget:
        return []
    chosen: list[tuple[str, object]] = []
    current = s
    for name, value in _candidates(dims, s):
        trial, step = replace(current, **{name: value}), [(name, value)]
        if name == "offload_params" and current.zero_stage != 3:  # parameter offload is a ZeRO-3 feature
            trial, step = replace(trial, zero_stage=3), [("zero_stage", 3), (name, value)]
        if name == "checkpoint_offload" and not current.gradient_checkpointing:
            trial, step = replace(trial, gradient_checkpointing=True), [("gradient_checkpointing", True), (name, value)]
        if estimate(dims, trial).total < estimate(dims, current).total:
            current, chosen = trial, chosen + step
            if name == "sequence_parallel":  # the smallest degree that is enough
                for k in _sp_degrees(dims, s):
                    if k < value and estimate(dims, replace(current, sequence_parallel=k)).total <= budget:
                        current, chosen[-1] = replace(current, sequence_parallel=k), (name, k)
                        break
            if estimate(dims, current).total <= budget:
                return chosen
    return None


def _candidates(dims: Dims, s: Setup):
    if not s.gradient_checkpointing:
        yield "gradient_checkpointing", True
    if not s.tiled_loss:
        yield "tiled_loss", True
    if not s.tiled_mlp:
        yield "tiled_mlp", True
    if not s.fused_norm:
        yield "fused_norm", True
    degrees = [k for k in _sp_degrees(dims, s) if k > s.sequence_parallel]
    if degrees:
        yield "sequence_parallel", degrees[-1]
    if s.zero_stage < 3 and s.gpus > 1:
        yield "zero_stage", 3
    if not s.offload_optimizer:
        yield "offload_optimizer", True
    if not s.offload_params:
        yield "offload_params", True
    if s.device == "cuda" and not s.checkpoint_offload:
        yield "checkpoint_offload", True


def _sp_degrees(dims: Dims, s: Setup) -> list[int]:
    """Sequence-parallel degrees that can work: divide the devices, the heads, the length; kv heads compatible."""
    return [k for k in range(1, s.gpus + 1) if s.gpus % k == 0 and dims.heads % k == 0
            and (dims.kv_heads % k == 0 or k % dims.kv_heads == 0) and s.seq_len % k == 0]


def switch_text(switches: list[tuple[str, object]]) -> str:
    def value(v):
        return str(v).lower() if isinstance(v, bool) else str(v)

    return ", ".join(f"train.{k}={value(v)}" for k, v in switches)


def gib(x: float) -> str:
    return f"{x / GiB:,.2f} GiB"


# ------------------------------------------------------------------------------------------ report
def render_plan(est: Estimate, switches, name: str = "") -> list:
    """rich renderables: the terms table, the total against the budget, the verdict and the switches."""
    from rich.table import Table

    s = est.setup
    plural = "s" if s.gpus > 1 else ""
    where = f"{s.gpus} GPU{plural}" if s.device == "cuda" else f"{s.gpus} CPU rank{plural}"
    title = (f"{name}: {s.seq_len:,} tokens x {s.micro_batch}, {where}, {s.precision}, ZeRO-{s.zero_stage}, "
             f"{'full fine-tuning' if s.full else f'LoRA r{s.lora_r}'}, sp {s.sequence_parallel}")
    table = Table(title=title, title_justify="left")
    table.add_column("per device", style="bold")
    table.add_column("GiB", justify="right")
    table.add_column("formula")
    for t in est.terms:
        table.add_row(t.name, f"{t.bytes / GiB:,.2f}", t.formula)
        for part in t.parts:
            table.add_row(f"  {part.name}", f"{part.bytes / GiB:,.2f}", part.formula, style="dim")
    table.add_row("total", f"{est.total / GiB:,.2f}", "", style="bold")
    switches_on = [k for k in ("gradient_checkpointing", "tiled_loss", "tiled_mlp", "fused_norm", "checkpoint_offload",
                               "offload_optimizer", "offload_params") if getattr(s, k)]
    lines = [table, f"switches on: {', '.join(switches_on) or 'none'}",
             f"parameters {est.params:,}, trainable {est.trainable:,}; step FLOPs {est.flops_per_step:.3e} "
             f"({est.flops_terms['samples_per_step']} sample(s) of {s.seq_len:,} tokens; "
             f"{est.flops_per_step / (est.flops_terms['samples_per_step'] * s.seq_len):.3e} per token)"]
    if est.budget is not None:
        verdict = "fits" if est.fits else "does NOT fit"
        share = f"{est.total / est.budget:.0%}"
        lines.append(f"total {gib(est.total)} of {gib(est.budget)} per device ({share}): {verdict}")
        if not est.fits:
            lines.append(f"would fit with: {switch_text(switches)}" if switches else
                         "does not fit even with every switch: use more devices or a shorter data.seq_len")
    return lines


def budget_problem(est: Estimate, switches) -> str | None:
    """The one-line refusal of `train` (memory_check: refuse) when the estimate is over REFUSE_RATIO x budget."""
    if est.budget is None or est.total <= REFUSE_RATIO * est.budget:
        return None
    fix = f"set {switch_text(switches)}" if switches else "use more devices or a shorter data.seq_len"
    return (f"train.memory_check: the estimated peak {gib(est.total)} per device is over the {gib(est.budget)} "
            f"available ({est.total / est.budget:.1f}x); {fix} (details: `longext plan`; or memory_check: warn)")


def device_budget(ranks: int = 1) -> tuple[str, int]:
    """(device, bytes per rank): the GPU's memory on CUDA, else the available RAM shared by this node's ranks.
    LONGEXT_MEMORY_BUDGET (e.g. 2GB) overrides the bytes."""
    import os

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    forced = os.environ.get(BUDGET_ENV)
    if forced:
        try:
            return device, parse_size(forced)
        except ValueError as err:
            from longext.errors import LongextError

            raise LongextError(f"{BUDGET_ENV}: {err} (got {forced!r})") from None
    if device == "cuda":
        return device, torch.cuda.get_device_properties(0).total_memory
    import psutil

    return device, psutil.virtual_memory().available // max(1, ranks)


def default_budget(cpu: bool, ranks: int) -> int:
    """`plan` without --gpu-memory: available RAM / ranks for --cpu; else this machine's GPU, else 80 GB."""
    import psutil
    import torch

    if cpu:
        return psutil.virtual_memory().available // max(1, ranks)
    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 80 * 10**9
