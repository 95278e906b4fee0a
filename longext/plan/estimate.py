"""The estimate of one training step's peak memory per device, term by term, and its FLOPs."""

from __future__ import annotations

from longext.plan.activations import activation_terms
from longext.plan.shapes import (
    GiB, Dims, Estimate, Setup, Term, element_bytes, lora_params, resolve_auto,
)

GPU_FIXED = 1 * GiB
CPU_BASELINE = int(0.52 * GiB)  # process baseline of a CPU rank, measured by `longext bench memory` (bench/memory.py)
ZERO3_MAX_LIVE = 1_000_000_000  # DeepSpeed's stage3_max_live_parameters / stage3_max_reuse_distance defaults


def estimate(dims: Dims, s: Setup, budget: int | None = None) -> Estimate:
    """Peak bytes per device of one training step, term by term (module docstring)."""
    s = resolve_auto(dims, s)
    trainable = dims.params if s.full else lora_params(dims, s.lora_targets, s.lora_r, s.modules_to_save,
                                                       s.lora_experts)
    terms = [*_weight_terms(dims, s, trainable), *_state_terms(s, trainable), *activation_terms(dims, s)]
    gpu = s.device == "cuda"
    terms.append(Term("fixed overhead", GPU_FIXED if gpu else CPU_BASELINE,
                      "CUDA context, cuBLAS/NCCL workspaces (stated)" if gpu else "CPU process baseline (measured)"))
    flops, flops_terms = step_flops(dims, s, trainable)
    return Estimate(terms, sum(t.bytes for t in terms), budget, s, flops, flops_terms, dims.params, trainable,
                    active=dims.matmul_params, breakdown=dims.breakdown(), model=dims.describe())


def _weight_terms(dims: Dims, s: Setup, trainable: int) -> list[Term]:
    P, w, D = dims.params, element_bytes(s), s.gpus
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
        copies = trainable - lora_params(dims, s.lora_targets, s.lora_r, experts=s.lora_experts)
        out.append(Term("modules_to_save copies", copies * w, f"{copies:,} x {w} B"))
    return out


def _state_terms(s: Setup, Nt: int) -> list[Term]:
    """Gradients, fp32 master copy, AdamW moments of the Nt trainable params; the ZeRO gradient bucket."""
    from longext.engine import reduce_bucket  # the buffer the engine configures; engine imports torch: lazily

    D, a = s.gpus, element_bytes(s)
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


def step_flops(dims: Dims, s: Setup, trainable: int) -> tuple[float, dict]:
    """FLOPs of one optimizer step over all devices: forward 2*N_mm*L (N_mm: the weights a token multiplies with;
    for a mixture of experts its router and top-k experts only) + attention 4*L*K*q per layer with K = L keys
    (dense count; causal kernels skip about half) or K = min(L, window) in sliding-window layers, backward = input
    gradients (same as forward) + weight gradients of the trainable weights (2*N_trainable*L) + attention x2;
    gradient checkpointing recomputes the layers' forward."""
    L, n, q = s.seq_len, dims.layers, dims.heads * dims.head_dim
    samples = s.micro_batch * s.grad_accum * max(1, s.gpus // s.sequence_parallel)
    dense = 2 * dims.matmul_params * L
    window = min(L, dims.sliding_window or L)
    attention = 4 * L * q * ((n - dims.sliding_layers) * L + dims.sliding_layers * window)
    forward = dense + attention
    backward = dense + 2 * min(trainable, dims.matmul_params) * L + 2 * attention
    recompute = (dense - 2 * dims.embed_params * L + attention) if s.gradient_checkpointing else 0
    per_sample = forward + backward + recompute
    return float(per_sample * samples), {"forward": forward, "backward": backward, "recompute": recompute,
                                         "per_sample": per_sample, "samples_per_step": samples}
