"""Activations of one training step: what autograd keeps per layer and token, the loss, the peak of one layer's
backward (backward_moments) and, on CPU, the heap's retention (the formulas: longext/plan/__init__.py)."""

from __future__ import annotations

import math

from longext.plan.shapes import (
    GiB, Dims, Setup, Term, device_tokens, element_bytes, kernel_kv_heads, mlp_tile_count,
)

# glibc's default malloc keeps freed heap blocks resident: in `longext bench memory` the peak RSS of a CPU step sat
# above the live tensors by about this share of the activations a forward pass produces (measured once: the mean
# of the SmolLM2-135M 2k cases at ZeRO 0 and 2, 0.75 and 0.42; with MALLOC_MMAP_THRESHOLD_=65536 it is ~1 %)
CPU_HEAP_RETENTION = 0.58


def activation_terms(dims: Dims, s: Setup) -> list[Term]:
    """Kept activations, the larger of the loss and one layer's backward, and (CPU) the heap's retention."""
    a, gpu, n, T = element_bytes(s), s.device == "cuda", dims.layers, device_tokens(s)
    d, V = dims.hidden, dims.vocab
    per_layer = sum(b for _, b, _ in _attention_saved(dims, s) + _mlp_saved(dims, s))
    attn_sq = _eager_probs(dims, s) + expert_weights_with_lora(dims, s)  # per layer, whatever the length
    full_layer = T * per_layer + attn_sq
    if s.gradient_checkpointing and s.checkpoint_offload and gpu:  # save_on_cpu wraps the whole forward
        out = [Term("kept activations", 0, "layer inputs and final norm input offloaded to CPU")]
    elif s.gradient_checkpointing:
        out = [Term("kept activations", n * T * a * d + T * 4 * d,
                    f"{n} layers x T={T:,} x {a}d B (layer inputs) + final norm input T x 4d")]
    else:
        # the final norm keeps its input (4d); layer 0's norm keeps none unless the embedding trains (its input
        # does not require grad): the two cancel for LoRA
        eager = f" + eager scores / expert weights {attn_sq:,} B/layer" if attn_sq else ""
        out = [Term("kept activations", n * full_layer + (T * 4 * d if s.full else 0),
                    f"{n} layers x T={T:,} x {per_layer:,} B/token{eager}")]
    backward = layer_backward(dims, s)
    loss, loss_formula = _loss_term(T, V, d, a, s.tiled_loss, bool(dims.final_softcap))
    out.append(Term("loss (logits)", loss, loss_formula) if loss >= backward.bytes else backward)
    if mask := _document_mask(s):
        out.append(mask)
    if not gpu and s.allocator == "glibc":
        out.append(Term("CPU heap retention", int(CPU_HEAP_RETENTION * n * T * per_layer),
                        f"{CPU_HEAP_RETENTION} x the forward's activations (glibc keeps freed blocks)"))
    return out


def _used_inputs(dims: Dims, s: Setup) -> dict[str, bool]:
    """Which layer inputs autograd keeps for trainable linears: the norm output (q/k/v), o_proj's input, the
    post-attention norm output (gate/up) and down_proj's input. Under ZeRO-3 every linear runs through its own
    autograd function, which saves the input even of a frozen weight."""
    keep = set(dims.linear_shapes()) if s.full or s.zero_stage == 3 else set(s.lora_targets)
    tiled = mlp_tile_count(dims, s) > 1  # TiledMLP keeps its own input and recomputes the rest per tile
    return {"attn_in": bool(keep & {"q_proj", "k_proj", "v_proj", "qkv_proj"}), "o_in": "o_proj" in keep,
            "mlp_in": bool(keep & {"gate_proj", "up_proj", "gate_up_proj"}) and not tiled and not dims.moe,
            "down_in": "down_proj" in keep and not tiled and not dims.moe}


def _lora_outputs(s: Setup, group: set[str]) -> tuple[int, int]:
    """(count, bytes per token) of the r-dim LoRA A outputs autograd keeps for the targets in `group`."""
    k = 0 if s.full else len(set(s.lora_targets) & group)
    return k, k * element_bytes(s) * (s.lora_r or 0)


NORM_IN, POST_NORM_IN, DOWN_IN = "input norm: fp32 input", "post-attention norm: fp32 input", "down_proj input"
# the norms whose input each half of a layer keeps, by norm layout (longext.plan.shapes.Dims.norm_layout)
ATTENTION_NORMS = {"pre": (NORM_IN,), "sandwich": (NORM_IN, "post-attention norm (of the attention output): fp32 input"),
                   "post": ("post-attention norm (of the attention output): fp32 input",)}
MLP_NORMS = {"pre": (POST_NORM_IN,), "sandwich": ("pre-feedforward norm: fp32 input",
                                                  "post-feedforward norm (of the MLP output): fp32 input"),
             "post": ("post-feedforward norm (of the MLP output): fp32 input",)}


def _norm_input(name: str, s: Setup, d: int) -> tuple[str, int, str]:
    """What an RMSNorm saves per token: transformers' module its fp32 copy of the input (in fp32 the input
    itself); the fused norm (longext.savers.RMSNormFunction) the input in its own dtype and one fp32 scale."""
    if s.fused_norm:
        return name, element_bytes(s) * d + 4, "a d + 4"
    return name, 4 * d, "4d"


def _normalized(norm: str, a: int, d: int) -> tuple[str, int, str]:
    """A norm whose weight trains also keeps its normalized input (for the weight's gradient)."""
    return f"{norm.split(':')[0]}: normalized input (the weight trains)", a * d, "a d"


def _attention_saved(dims: Dims, s: Setup) -> list[tuple[str, int, str]]:
    """(name, bytes per local token, formula) of what a decoder layer's attention block saves for backward
    (sdpa / flash kernels; eager's O(L^2) probabilities are _eager_probs)."""
    a, d, H, h = element_bytes(s), dims.hidden, dims.heads, dims.head_dim
    q, Gk, used = H * h, kernel_kv_heads(dims, s), _used_inputs(dims, s)
    out = [_norm_input(name, s, d) for name in ATTENTION_NORMS[dims.norm_layout]]
    if s.full:
        out += [_normalized(name, a, d) for name in ATTENTION_NORMS[dims.norm_layout]]
    if used["attn_in"]:
        what = "the layer input" if dims.norm_layout == "post" else "norm output"
        out.append((f"q/k/v input ({what})", a * d, "a d"))
    if dims.qk_norm or dims.qk_norm_full:  # Qwen3, Gemma 3 (per head), OLMo 2 (whole projection): fp32 inputs
        out.append(("q/k norms: fp32 inputs", 4 * (q + dims.kv_heads * h), "4 (H h + G h)"))
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
    a, d, i, used = element_bytes(s), dims.hidden, dims.intermediate, _used_inputs(dims, s)
    out = [_norm_input(name, s, d) for name in MLP_NORMS[dims.norm_layout]]
    if s.full:
        out += [_normalized(name, a, d) for name in MLP_NORMS[dims.norm_layout]]
    if mlp_tile_count(dims, s) > 1:
        return out + [("TiledMLP input", a * d, "a d")]
    if dims.moe:
        return out + moe_saved(dims, s)
    out.append(("gate, SiLU(gate), up", 3 * a * i, "3 a i"))
    if used["mlp_in"]:
        out.append(("gate/up input (norm output)", a * d, "a d"))
    if used["down_in"]:
        out.append((DOWN_IN, a * i, "a i"))
    k, lora = _lora_outputs(s, {"gate_proj", "up_proj", "down_proj"})
    if k:
        out.append(("LoRA A outputs (MLP)", lora, f"{k} x a r"))
    return out


def moe_saved(dims: Dims, s: Setup) -> list[tuple[str, int, str]]:
    """What a mixture-of-experts block (transformers 5's grouped experts) saves per token, with frozen experts:
    the router's fp32 probabilities and top-k picks, and for each of the k token-expert pairs the expert's gate and
    up halves and its activation (3 a i), its output and fp32 routing weight (the weights' gradient needs them) and
    three int64 indices (sort, gather). LoRA on the experts (lora.experts) keeps their two inputs too. Measured
    against the saved tensors of a real block (tests/test_families.py)."""
    a, d, i, k, E = element_bytes(s), dims.hidden, dims.expert_intermediate, dims.active_experts, dims.experts
    out = [("router: fp32 probabilities, top-k indices and weights", 4 * E + 12 * k + 4, "4E + 12k + 4"),
           ("experts: gate, up and activation per routed pair", k * 3 * a * i, f"{k} x 3 a i"),
           ("experts: output, routing weight, indices per routed pair", k * (a * d + 28), f"{k} x (a d + 28)")]
    if s.lora_experts and not s.full:
        out.append(("experts' LoRA: the two expert inputs per routed pair", k * a * (d + i), f"{k} x a (d + i)"))
    return out


def expert_weights_with_lora(dims: Dims, s: Setup) -> int:
    """LoRA on the experts (peft 0.21's ParamWrapper) folds each LoRA delta into its expert weight in the forward and
    the grouped matmul keeps that new [experts, out, in] tensor for backward: a copy of the layer's expert weights."""
    if not (dims.moe and s.lora_experts and not s.full):
        return 0
    return dims.experts * dims.expert_params * element_bytes(s)


def _document_mask(s: Setup) -> Term | None:
    """The document mask of packed rows (longext.data.masks): one [b, 1, L, L] tensor per micro-batch for sdpa
    (bool) and eager (floats), whole on every sequence-parallel rank; none for flash's varlen inputs."""
    from longext.data.mask_policy import dense_mask_bytes

    size = dense_mask_bytes(s.attn, s.micro_batch, s.seq_len) if s.document_mask else 0
    if not size:
        return None
    return Term("document mask", size, f"[{s.micro_batch}, 1, {s.seq_len:,}, {s.seq_len:,}] x "
                                       f"{size // (s.micro_batch * s.seq_len**2)} B ({s.attn})")


def _eager_probs(dims: Dims, s: Setup) -> int:
    """Eager attention keeps the [H, T, L] softmax per layer (fp32, plus its cast to bf16): O(L^2); with soft-capped
    scores (Gemma 2) also the tanh output."""
    if s.attn != "eager":
        return 0
    per = (4 if element_bytes(s) == 4 else 4 + element_bytes(s)) + (element_bytes(s) if dims.attn_softcap else 0)
    return dims.heads * device_tokens(s) * s.seq_len * per


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
    T, a, d, i = device_tokens(s), element_bytes(s), dims.hidden, dims.intermediate
    if dims.moe:  # a token's MLP activations: those of its k experts
        i = dims.active_experts * dims.expert_intermediate
    h, q, Gk = dims.head_dim, dims.heads * dims.head_dim, kernel_kv_heads(dims, s)
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

    tiles = mlp_tile_count(dims, s)
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
        if dims.moe:
            k = dims.active_experts
            grads_mlp += per_token([("gradients of the experts' outputs", k * a * d, f"{k} x a d")])
    # the peak is the product's backward (3 saved + 3 gradient [T, i] tensors); down_proj's saved input is freed
    # with down_proj's backward, which runs before it
    saved_mlp = per_token([p for p in _mlp_saved(dims, s) if p[0] != DOWN_IN])
    if expert_weights_with_lora(dims, s):
        saved_mlp.append(Term("experts' weights with their LoRA folded in (peft)", expert_weights_with_lora(dims, s),
                              "E x 3 d i x a"))
    held = sum(t.bytes for t in saved_attn)
    mlp = (reload + [Term("attention block's saved tensors (as above)", held, "sum of the attention parts")]
           + saved_mlp if ckpt else []) + grads_mlp
    # the post-attention RMSNorm's backward runs in fp32 (the norm upcasts): with the MLP's tensors freed, five fp32
    # [T, d] tensors at its peak (its output's gradient in fp32 and four temporaries of the pow/mean/rsqrt chain)
    # in fp32 the norm takes its input as is, so the layer output's gradient is accumulated into one of the five
    if s.fused_norm:  # RMSNormFunction: the input gradient in the activation dtype and fp32 row-chunk temporaries
        from longext.savers import NORM_CHUNK_ELEMENTS

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
    T, a, H, h = device_tokens(s), element_bytes(s), dims.heads, dims.head_dim
    q = H * h
    if s.attn == "eager":
        probs = dims.heads * T * s.seq_len
        return [Term("gradients of the attention probabilities (eager)", probs * (4 + a), "H T L (4 + a)")]
    if s.device != "cuda":
        return []
    out = [Term("flash backward: fp32 dq accumulator + softmax_d", T * (4 * q + 4 * H),
                f"T x (4 H h + 4H) = {T:,} x {4 * q + 4 * H:,} B")]
    if H > kernel_kv_heads(dims, s):
        out.append(Term("flash backward: dk, dv at every query head (GQA)", T * 2 * a * q,
                        f"T x 2 a H h = {T:,} x {2 * a * q:,} B"))
    return out


def _loss_term(T: int, V: int, d: int, a: int, tiled: bool, softcap: bool = False) -> tuple[int, str]:
    """Peak bytes of the cross-entropy: three fp32 [tokens, V] tensors, for all T tokens or for one tile (then the
    final hidden states and their gradient, which the tiled loss computes in the forward, are alive too). Soft-capped
    logits (Gemma 2) add two [tokens, V] tensors in the activation dtype: the head's raw output and the tanh output
    its backward keeps."""
    from longext.sp import loss_tiles

    per, cap = 12 + (2 * a if softcap else 0), f" + 2 x {a} B soft-capping" if softcap else ""
    if not tiled:
        return per * T * V, f"{per} B x T={T:,} x V={V:,} (logits, log-softmax, grad; fp32{cap})"
    tiles = loss_tiles(T, V)
    tokens = math.ceil(T / tiles)
    return (per * tokens * V + 2 * a * T * d,
            f"{tiles} tiles: {per} B x {tokens:,} tokens x V={V:,}{cap} + hidden and its grad 2 a T d")
