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
                              (longext.savers.RMSNormFunction) each keeps its input as is and one fp32 scale: a*d + 4
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
  layer on CPU (tests/test_plan.py).
- document mask (data.document_mask on, longext.data.masks): one [b, 1, L, L] mask per micro-batch, bool for sdpa
  and floats (4 B) for eager, whole on every sequence-parallel rank (Ulysses' kernel masks the gathered sequence);
  none with flash-attn (varlen inputs).
- CPU heap retention (CPU only): glibc's malloc keeps freed blocks resident; CPU_HEAP_RETENTION (measured once)
  x the activations one forward produces.
- fixed: on a GPU 1 GiB (CUDA context, cuBLAS/NCCL workspaces; stated, not measured here); on CPU the process
  baseline (interpreter, torch, transformers, DeepSpeed), measured by `longext bench memory`.

peak = weights + trainable state + bucket + kept activations + max(loss, one layer's backward) [+ document mask]
[+ CPU heap retention] + fixed.

Modules: shapes (Dims, Setup, Term, Estimate), estimate (weights, trainable state, FLOPs), activations (kept
activations, loss, one layer's backward), switches (what would make it fit), budget (sizes, this machine's budget,
`train`'s refusal), render (the printed table).
"""

from __future__ import annotations

from longext.plan.activations import backward_moments, layer_backward
from longext.plan.budget import budget_problem, default_budget, device_budget, gib, parse_size
from longext.plan.estimate import estimate, step_flops
from longext.plan.render import render_plan
from longext.plan.shapes import GiB, Dims, Estimate, Setup, Term, lora_params, resolve_auto, setup_from_recipe
from longext.plan.switches import fixing_switches, switch_text

__all__ = [
    "GiB", "Dims", "Estimate", "Setup", "Term", "backward_moments", "budget_problem", "default_budget", "device_budget",
    "estimate", "fixing_switches", "gib", "layer_backward", "lora_params", "parse_size", "plan_resolved",
    "render_plan", "resolve_auto", "setup_from_recipe", "step_flops", "switch_text",
]


def plan_resolved(resolved, gpus: int = 1, budget: int | None = None, device: str = "cuda", full: bool = False):
    """(Estimate, fixing switches or None) for a resolved recipe (longext.resolve.Resolved: no weights loaded)."""
    dims = Dims.from_config(resolved.model_config)
    setup = resolve_auto(dims, setup_from_recipe(resolved.recipe, gpus, device, full))
    est = estimate(dims, setup, budget)
    switches = fixing_switches(dims, setup, budget) if budget is not None else []
    return est, switches
