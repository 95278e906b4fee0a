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
- gradient bucket: ZeRO 1-3 allocate `reduce_bucket_size` (5e8) elements for gradient reduction. On a GPU the
  caching allocator holds all of it; in CPU RAM only the written part (the gradients) is resident.
- activations kept for backward, per layer and token, in bytes (sdpa / flash kernels, LoRA on the recipe's targets):
      4d + 4d                 the two RMSNorm inputs (the norm upcasts to fp32 and keeps that)
      a(d + 2Gh) + a*d + 4H   rotated q, k, v, the attention output and its log-sum-exp
      3a*i                    MLP: gate (for SiLU), SiLU(gate) and up (for the product)
      a*d per LoRA input      q/k/v share the norm output, gate/up share one, down its own (o's input is the
                              kept attention output, except with eager attention); under ZeRO-3 every
                              linear's input (its linear autograd function saves it even for frozen weights)
      a*r per LoRA module     the A projection's output
  with gradient checkpointing only the layer input (a*d) is kept per layer, and one layer is recomputed in
  backward; eager attention adds the softmax output H*T*L*(4 or 4 + a) per layer (O(L^2)); TiledMLP keeps the
  MLP input (a*d) instead of 3a*i. Sequence parallelism divides T.
- loss: transformers' cross-entropy holds three fp32 [T, V] tensors at its peak (logits, log-softmax, their
  gradient): 12*T*V bytes; the tiled loss holds one tile of at most longext.sp.LOGITS_PER_TILE logits.
- backward working set of one layer: gradients of the MLP intermediates, a*T*(3i + 2d).
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
REDUCE_BUCKET = 500_000_000  # DeepSpeed's default reduce_bucket_size (elements)
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
        tiled_mlp="auto" if t.tiled_mlp == "auto" else bool(t.tiled_mlp), attn="sdpa" if attn == "auto" else attn,
        lora_r=None if full else lora.r, lora_targets=tuple(lora.targets), modules_to_save=tuple(lora.modules_to_save),
    )


def resolve_auto(dims: Dims, s: Setup) -> Setup:
    """tiled_loss / tiled_mlp `auto` decided by the training code's own rule (longext.sp) for this setup."""
    from longext.sp import AUTO_TILED_LOSS_LOGITS, AUTO_TILED_MLP_TOKENS

    local = s.micro_batch * s.seq_len // s.sequence_parallel
    if s.tiled_loss == "auto":
        s = replace(s, tiled_loss=s.sequence_parallel > 1 or local * dims.vocab >= AUTO_TILED_LOSS_LOGITS)
    if s.tiled_mlp == "auto":
        s = replace(s, tiled_mlp=local >= AUTO_TILED_MLP_TOKENS)
    return s


# --------------------------------------------------------------------------------------- estimate
@dataclass
class Term:
    name: str
    bytes: int
    formula: str


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
        gpu, written = s.device == "cuda", min(REDUCE_BUCKET, Nt)
        gbytes = 4 if s.zero_stage == 1 else a
        formula = f"reduce_bucket_size 5e8 x {gbytes} B" if gpu else f"written part: {written:,} x {gbytes} B (RSS)"
        out.append(Term("gradient bucket", (REDUCE_BUCKET if gpu else written) * gbytes, formula))
    return out


def _activation_terms(dims: Dims, s: Setup) -> list[Term]:
    """Kept activations, the larger of the loss and one layer's backward, and (CPU) the heap's retention."""
    a, gpu, n, T = _bytes(s), s.device == "cuda", dims.layers, s.micro_batch * s.seq_len // s.sequence_parallel
    d, i, V = dims.hidden, dims.intermediate, dims.vocab
    kv, q = dims.kv_heads * dims.head_dim, dims.heads * dims.head_dim
    mlp = a * d if s.tiled_mlp else 3 * a * i
    per_layer = 8 * d + a * (q + 2 * kv) + a * q + 4 * dims.heads + mlp + _lora_inputs(s, dims)
    attn_sq = dims.heads * T * s.seq_len * (4 if a == 4 else 4 + a) if s.attn == "eager" else 0  # softmax (+ cast)
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
    tile = min(T, d) if s.tiled_mlp else T
    backward = T * a * 2 * d + tile * a * 3 * i + (full_layer if s.gradient_checkpointing else 0)
    loss, loss_formula = _loss_term(T, V, d, s.tiled_loss)
    if loss >= backward:
        out.append(Term("loss (logits)", loss, loss_formula))
    else:
        what = "recomputed layer + " if s.gradient_checkpointing else ""
        tiled = " per MLP tile" if s.tiled_mlp else ""
        out.append(Term("one layer's backward", backward, f"{what}a x T x (2d + 3i{tiled})"))
    if not gpu and s.allocator == "glibc":
        out.append(Term("CPU heap retention", int(CPU_HEAP_RETENTION * n * T * per_layer),
                        f"{CPU_HEAP_RETENTION} x the forward's activations (glibc keeps freed blocks)"))
    return out


def _loss_term(T: int, V: int, d: int, tiled: bool) -> tuple[int, str]:
    """Peak bytes of the cross-entropy: three fp32 [tokens, V] tensors, for all T tokens or for one tile."""
    from longext.sp import loss_tiles

    if not tiled:
        return 12 * T * V, f"12 B x T={T:,} x V={V:,} (logits, log-softmax, grad; fp32)"
    tiles = loss_tiles(T, V)
    tokens = math.ceil(T / tiles)
    return 12 * tokens * V + 4 * T * d, f"{tiles} tiles: 12 B x {tokens:,} tokens x V={V:,} + grad hidden T x 4d"


def _lora_inputs(s: Setup, dims: Dims) -> int:
    """Bytes per token per layer that LoRA (or full fine-tuning) makes autograd keep: the inputs of trainable linears
    that nothing else keeps, and each LoRA module's r-dim A output."""
    a = 2 if s.precision == "bf16" else 4
    d, i, q = dims.hidden, dims.intermediate, dims.heads * dims.head_dim
    targets = set(dims.linear_shapes()) if s.full else set(s.lora_targets)
    # ZeRO-3 runs every linear through its own autograd function, which saves the input even of a frozen weight
    keep = set(dims.linear_shapes()) if s.zero_stage == 3 else targets
    # the attention kernels (sdpa, flash) write their output token-major, so o_proj's input shares its storage
    # with the kept attention output; eager attention's output is transposed into a new tensor
    inputs = {"attn_in": d, "o_in": q if s.attn == "eager" else 0, "mlp_in": d, "down_in": i}
    used = {"attn_in": keep & {"q_proj", "k_proj", "v_proj"}, "o_in": keep & {"o_proj"},
            "mlp_in": keep & {"gate_proj", "up_proj"}, "down_in": keep & {"down_proj"}}
    if s.tiled_mlp:
        used["mlp_in"] = set()  # TiledMLP keeps its input itself (counted as a*d)
        used["down_in"] = set()
    out = sum(a * inputs[k] for k, v in used.items() if v)
    if s.full:
        out += 2 * a * d  # the norm weights train too: their normalized inputs are kept
    else:
        out += a * s.lora_r * len(targets & set(dims.linear_shapes()))
    return out


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
def plan_recipe(recipe, gpus: int = 1, budget: int | None = None, device: str = "cuda", full: bool = False):
    """(Estimate, fixing switches or None) for a recipe, reading only the model config (longext.plan.resolve)."""
    from longext.plan import resolve

    resolved = resolve(recipe)
    dims = Dims.from_config(resolved.model_config)
    setup = resolve_auto(dims, setup_from_recipe(resolved.recipe, gpus, device, full))
    est = estimate(dims, setup, budget)
    switches = fixing_switches(dims, setup, budget) if budget is not None else []
    return est, switches


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
    table.add_row("total", f"{est.total / GiB:,.2f}", "", style="bold")
    switches_on = [k for k in ("gradient_checkpointing", "tiled_loss", "tiled_mlp", "checkpoint_offload",
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
