"""Memory savers for long sequences, from DeepSpeed's Arctic Long Sequence Training (ALST) and around it: TiledMLP,
a fused RMSNorm, CPU offload of activation checkpoints, and the rule that decides each `auto` switch (the tiled loss
itself is in longext/sp.py, next to the sharded loss it shares code with). Each saver changes one model instance
(a per-instance `forward`); parameter names, checkpoints and exports stay those of the stock model.
"""

from __future__ import annotations

import contextlib
import math
from types import MethodType

import torch

from longext.families import FAMILIES

AUTO_TILED_LOSS_LOGITS = 2**28  # tiled_loss auto: on from this many logits per rank (1 GiB in fp32)
AUTO_TILED_MLP_TOKENS = 65536  # tiled_mlp auto: on from this many tokens per rank
AUTO_FUSED_NORM_TOKENS = 65536  # fused_norm auto: on from this many tokens per rank
NORM_CHUNK_ELEMENTS = 2**22  # fused RMSNorm backward: rows per chunk x hidden size (16 MiB per fp32 temporary)


# ------------------------------------------------------------------------------------ auto rules
def auto_savers(tokens_per_rank: int, sequence_parallel: int, vocab: int) -> dict[str, bool]:
    """What `auto` means for each memory saver (the training code's rule; `longext plan` uses it too)."""
    return {"tiled_loss": sequence_parallel > 1 or tokens_per_rank * vocab >= AUTO_TILED_LOSS_LOGITS,
            "tiled_mlp": tokens_per_rank >= AUTO_TILED_MLP_TOKENS,
            "fused_norm": tokens_per_rank >= AUTO_FUSED_NORM_TOKENS}


def resolve_switches(train, seq_len: int, config):
    """`config`: the model's transformers config or its config.json as a dict. TrainSpec with tiled_loss / tiled_mlp / fused_norm `auto` decided from the per-rank length (and vocabulary);
    the fused norm only where it computes exactly what the family's RMSNorm computes (longext.families)."""
    from longext.errors import LongextError
    from longext.families import family_of

    family = family_of(config)
    if train.fused_norm is True and not family.fused_norm:
        raise LongextError(f"train.fused_norm: {family.label}'s RMSNorm ({family.norm}) computes the norm differently "
                           f"from the fused one (Llama's), so it cannot replace it; use false or auto (got true)")
    local = train.micro_batch_size * seq_len // train.sequence_parallel  # tokens per rank per forward
    vocab = config["vocab_size"] if isinstance(config, dict) else config.vocab_size
    rules = auto_savers(local, train.sequence_parallel, vocab)
    rules["fused_norm"] = rules["fused_norm"] and family.fused_norm
    update = {k: v for k, v in rules.items() if getattr(train, k) == "auto"}
    return train.model_copy(update=update) if update else train


# -------------------------------------------------------------------------------------- TiledMLP
def apply_tiled_mlp(model) -> None:
    """Every decoder layer's MLP runs through DeepSpeed's TiledMLP: sequence tiles of about `hidden_size` tokens,
    each recomputed in backward, so the [tokens, intermediate] activations of one tile exist at a time. On this
    model instance only (a per-instance `forward`); parameter names and LoRA adapters are unchanged."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for layer in base.get_decoder().layers:
        if getattr(layer.mlp, "longext_tiled", False):
            continue
        layer.mlp.forward = MethodType(_tiled_mlp_forward, layer.mlp)
        layer.mlp.longext_tiled = True


def _plain_mlp(mlp, x: torch.Tensor) -> torch.Tensor:
    return type(mlp).forward(mlp, x)  # the family's own MLP forward (LoRA layers inside it apply as usual)


def _tiled_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    # All ranks have equal shard lengths (fixed seq_len split evenly), so they agree on the count without the
    # all-reduce DeepSpeed's docstring shows.
    shards = mlp_tiles(x.shape[-2], x.shape[-1])
    if shards <= 1 or not torch.is_grad_enabled():
        return _plain_mlp(self, x)
    params = [p for p in self.parameters() if p.requires_grad]
    if params and not x.requires_grad:
        # TiledMLP's output requires grad only through x (its parameters are not autograd inputs): a first MLP with
        # LoRA but no trainable module before it would silently get no gradient
        x = x.detach().requires_grad_()
    return TiledMLP.apply(_plain_mlp, self, x, shards, params)


def mlp_tiles(tokens: int, hidden: int) -> int:
    """TiledMLP's shard count for a sequence of `tokens` (DeepSpeed's rule: tiles of about hidden_size tokens)."""
    return math.ceil(tokens / hidden)


# ------------------------------------------------------------------------------------ fused norm
# The RMSNorm classes that compute the norm as Llama's does (longext.families: fused_norm), which RMSNormFunction
# reproduces: weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype)
FUSED_NORM_CLASSES = tuple(f.norm for f in FAMILIES.values() if f.fused_norm)


class RMSNormFunction(torch.autograd.Function):
    """Llama's RMSNorm with a hand-written backward (what Liger-Kernel's fused RMSNorm, used by ALST, does in one
    kernel): the forward computes exactly what transformers' module does, in row chunks, and keeps only its input,
    in its own dtype, and one fp32 scale per row; the backward computes the input gradient in row chunks,
    dx = rstd (g - xhat mean(g xhat)) with g = dy w and xhat = x rstd, in fp32 per chunk. Autograd through
    transformers' module instead keeps the fp32 copy of the input (4 bytes per element in bf16) and, in
    backward, holds five fp32 [tokens, hidden] tensors at once."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        d = x.shape[-1]
        rows = x.reshape(-1, d)
        y, rstd = torch.empty_like(rows), rows.new_empty(rows.shape[0], 1, dtype=torch.float32)
        step = max(1, NORM_CHUNK_ELEMENTS // d)
        for a in range(0, rows.shape[0], step):  # in row chunks: the fp32 temporaries stay small here too
            x32 = rows[a:a + step].to(torch.float32)
            rstd[a:a + step] = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
            y[a:a + step] = weight * (x32 * rstd[a:a + step]).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        d = x.shape[-1]
        rows, grads, scale = x.reshape(-1, d), dy.reshape(-1, d), rstd.reshape(-1, 1)
        dx = torch.empty_like(rows)
        dw = torch.zeros(d, dtype=torch.float32, device=x.device) if ctx.needs_input_grad[1] else None
        step = max(1, NORM_CHUNK_ELEMENTS // d)
        for a in range(0, rows.shape[0], step):
            xhat = rows[a:a + step].to(torch.float32) * scale[a:a + step]
            g = grads[a:a + step]
            if dw is not None:  # as autograd computes d(weight * h): dy * h in the activation dtype, summed
                dw += (g * xhat.to(x.dtype)).to(torch.float32).sum(0)
            g = (g * weight).to(torch.float32)
            dx[a:a + step] = (scale[a:a + step] * (g - xhat * (g * xhat).mean(-1, keepdim=True))).to(x.dtype)
        return dx.view(x.shape), None if dw is None else dw.to(weight.dtype), None


def _fused_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)


def apply_fused_norm(model) -> None:
    """Every RMSNorm of the model (decoder norms, the final norm, Qwen3's q/k norms) runs through
    RMSNormFunction. On this model instance only (a per-instance `forward`); weights and names are unchanged, so
    checkpoints and exports are those of the stock model."""
    for module in model.modules():
        if type(module).__name__ in FUSED_NORM_CLASSES and not getattr(module, "longext_fused", False):
            module.forward = MethodType(_fused_norm_forward, module)
            module.longext_fused = True


# ------------------------------------------------------------------------------ activation offload
def activation_offload(train):
    """Context for the forward pass: saved activations (with gradient checkpointing, essentially the layer inputs it
    keeps) go to pinned CPU memory and come back in backward. GPU only; on CPU the activations already live in CPU
    memory, so the switch is a no-op there (documented in docs/scaling.md)."""
    if train.checkpoint_offload and train.gradient_checkpointing and torch.cuda.is_available():
        return torch.autograd.graph.save_on_cpu(pin_memory=True)
    return contextlib.nullcontext()
