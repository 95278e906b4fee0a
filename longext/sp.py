"""Sequence parallelism from DeepSpeed's Arctic Long Sequence Training (ALST): Ulysses attention, the rank layout,
sharded batches and the tiled logits loss. The other memory savers (TiledMLP, fused RMSNorm, checkpoint offload,
the `auto` rules) are in longext/savers.py.

Ulysses (`train.sequence_parallel: N`). The N ranks of a sequence-parallel group get the same sample and each
keeps 1/N of its sequence: tokens, position ids (contiguous, PoSE skips, E2-LLM offsets, LongRecipe gaps: the
positions travel with their tokens) and pre-shifted labels; packed documents' ids (data.document_mask) stay whole. Everything per token runs on the local shard:
embeddings, RoPE (also HARPE's per-head cos/sin, which is computed from the shard's own positions for every head
before attention), MLPs, norms, the loss. Only the core attention sees the whole sequence: DeepSpeed's
`UlyssesSPAttentionHF` all-to-alls q/k/v from [L/N tokens, all heads] to [L tokens, heads/N], runs the model's
sdpa/flash kernel causally, and all-to-alls back. Per-sample inputs (E2-LLM's scale) are not sharded.

`register_with_transformers` replaces `ALL_ATTENTION_FUNCTIONS[<kernel>]` for the whole process, which is why it
runs only in a rank process with N > 1 (never in the single-process path) and only once per process. The wrapper
drops attention masks and attends causally over the gathered sequence, so padding must sit at the end of a sample
(data.packing per_doc does that). Packed documents (data.document_mask) are masked by the kernel it wraps
(longext.data.masks.document_attention), from the whole-sequence document ids every rank of the group holds: the
all-to-all gives a rank every token of its heads, so it needs every token's document. DeepSpeed's own packed-sample
support (0.19.8: position ids all-gathered for flash-attn to find restarts at 0) covers flash with contiguous
positions at batch 1 only; PoSE, E2-LLM and sinks start documents elsewhere than 0, and sdpa ignores positions.

The loss (the sp-times-gradient trap, ulysses-cpu.md gotcha 1). Each rank backpropagates the sum of its tokens'
cross-entropy divided by the valid-token count of the whole sample (all-reduced over the group): the gradients
DeepSpeed sums over the group are then exactly those of the token-mean over the sample. ZeRO 0-2 average gradients
over the world / N data-parallel groups, ZeRO-3 over the whole world, so at stage 3 the loss is multiplied by N.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from longext.data.masks import DOCUMENT_KEY, FLASH, FLASH_KEYS, document_attention
from longext.errors import LongextError, Problems

LOGITS_PER_TILE = 2**26  # tiled loss: at most this many logits (256 MiB in fp32) exist at once
ATTENTION_FOR_SP = ("sdpa", "flash_attention_2")  # eager needs a 4D mask, which Ulysses cannot shard
# kernels a method installs on the model that run under Ulysses too: LongGen's hybrid function gets the whole
# sequence for heads/sp heads and builds its (head-independent) pattern from sequence indices
METHOD_ATTENTION_FOR_SP = ("longgen_sparse",)


@dataclass(frozen=True)
class Layout:
    """How the ranks split the work: `sp` ranks share one sample's sequence, `dp` groups see different samples.
    Ranks sp*g .. sp*g + sp - 1 form group g (DeepSpeed's parallel_state_sp numbering)."""

    sp: int = 1
    sp_rank: int = 0
    dp: int = 1
    dp_rank: int = 0
    mpu: object | None = None  # deepspeed.runtime.sequence_parallel.parallel_state_sp when sp > 1

    @property
    def group(self):
        return self.mpu.get_sequence_parallel_group() if self.mpu is not None else None


# ------------------------------------------------------------------------------------- validation
def parallel_problems(recipe, config, method) -> list[str]:
    """One line per way the recipe's sequence parallelism cannot work with this model config (no weights);
    `method` (longext.methods.base.Method) names its training lengths and its own limits."""
    sp, out = recipe.train.sequence_parallel, []
    if sp == 1:
        return out
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    # DeepSpeed shards the heads: sp divides them, and sp and the kv heads divide one another (kv repeated if sp > kv)
    fits = ", ".join(str(d) for d in range(1, heads + 1) if heads % d == 0 and (kv % d == 0 or d % kv == 0))
    if heads % sp:
        out.append(f"train.sequence_parallel: {sp} does not divide the model's {heads} attention heads "
                   f"(allowed: {fits})")
    elif kv % sp and sp % kv:
        out.append(f"train.sequence_parallel: {sp} and the model's {kv} key/value heads must divide one another "
                   f"(allowed: {fits})")
    for field, length in method.training_lengths(recipe):
        if isinstance(length, int) and length % sp:
            out.append(f"{field}: {length} tokens do not split evenly over train.sequence_parallel {sp} ranks "
                       f"(use a multiple of {sp}, e.g. {length - length % sp or sp})")
    out += method.parallel_problems(recipe, sp)
    impl = recipe.model.attn_implementation
    if impl not in ("auto", *ATTENTION_FOR_SP):
        out.append(f"model.attn_implementation: {impl} cannot run under train.sequence_parallel {sp} "
                   f"(allowed: auto, {', '.join(ATTENTION_FOR_SP)}); Ulysses drops the 4D mask {impl} needs")
    return out


def world_problems(sp: int, world: int, launcher: str = "--nproc") -> list[str]:
    """sp must divide the number of ranks, and there must be more than one of them for sp > 1."""
    if sp == 1:
        return []
    if world == 1:
        return [f"train.sequence_parallel: {sp} needs {sp} ranks or a multiple; launch with {launcher} {sp}"]
    if world % sp:
        return [f"train.sequence_parallel: {sp} does not divide the {world} ranks of this launch "
                f"(use {launcher} {sp * max(1, world // sp)} or a sequence_parallel that divides {world})"]
    return []


def check_parallel(recipe, config, method, world: int | None = None) -> None:
    """Raise one error line per problem (exit 2) before any weights load."""
    problems = parallel_problems(recipe, config, method)
    if world is not None:
        problems += world_problems(recipe.train.sequence_parallel, world)
    if problems:
        raise Problems(problems)


# ---------------------------------------------------------------------------------- model set-up
_REGISTERED: dict[str, tuple] = {}  # kernel -> (SP shape, mpu) of register_with_transformers in this process


def layout(rank: int, world: int, sp: int) -> Layout:
    check_world = world_problems(sp, world)
    if check_world:
        raise Problems(check_world)
    return Layout(sp=sp, sp_rank=rank % sp, dp=world // sp, dp_rank=rank // sp)


def apply_sequence_parallel(model, lay: Layout, micro_batch_size: int) -> Layout:
    """Register DeepSpeed's Ulysses attention for this model's kernel and return the layout with its mpu (the
    groups deepspeed.initialize needs). A no-op for sp == 1. Once per kernel and process, one SP shape per process."""
    if lay.sp == 1:
        return lay
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    config = model.config
    impl = config._attn_implementation
    if impl not in ATTENTION_FOR_SP + METHOD_ATTENTION_FOR_SP:  # resolve.resolve refuses eager earlier
        raise LongextError(f"model.attn_implementation: {impl} cannot run under sequence parallelism "
                           f"(allowed: {', '.join(ATTENTION_FOR_SP)})")
    shape = (lay.sp, micro_batch_size, config.num_attention_heads, config.num_key_value_heads,
             getattr(config, "head_dim", None), config.hidden_size)
    if impl not in _REGISTERED:
        if any(seen != shape for seen, _ in _REGISTERED.values()):
            raise RuntimeError(f"Ulysses attention is already registered in this process for {_REGISTERED}")
        if _REGISTERED:  # a second kernel (e.g. LongGen's after sdpa): DeepSpeed builds its groups once per call
            import deepspeed.runtime.sequence_parallel.parallel_state_sp as groups

            groups._release_sequence_parallel_groups()
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        # the kernel Ulysses calls after its all-to-all masks packed documents itself (longext.data.masks)
        ALL_ATTENTION_FUNCTIONS[impl] = document_attention(ALL_ATTENTION_FUNCTIONS[impl], impl in FLASH)
        mpu = UlyssesSPAttentionHF.register_with_transformers(
            model_name_or_path=model, core_attn_implementation=impl, sequence_parallel_size=lay.sp,
            micro_batch_size=micro_batch_size, seq_length_is_variable=True,
        )
        _REGISTERED[impl] = (shape, mpu)
    mpu = _REGISTERED[impl][1]
    assert mpu.get_sequence_parallel_rank() == lay.sp_rank, "DeepSpeed's SP groups differ from longext's layout"
    return Layout(lay.sp, lay.sp_rank, lay.dp, lay.dp_rank, mpu)


# ----------------------------------------------------------------------------------------- batches
def shard_batch(batch: dict, lay: Layout) -> dict:
    """This rank's slice of a micro-batch: input_ids, attention_mask and position_ids [b, L/sp], and
    `shift_labels`, the labels shifted left over the *whole* sequence before slicing (so each shard's last token
    predicts the first token of the next shard; -100 after the last). Per-sample entries ([b], e.g. E2-LLM's
    rope_scale) are kept whole. With sp == 1 the sequence is whole and only the shift is done."""
    labels = batch["labels"]
    length = labels.shape[1]
    if length % lay.sp:  # resolve.resolve refuses such lengths; a bug if it happens here
        raise RuntimeError(f"sequence length {length} is not divisible by sequence_parallel {lay.sp}")
    n = length // lay.sp
    piece = slice(lay.sp_rank * n, (lay.sp_rank + 1) * n)
    out = {k: v for k, v in batch.items() if k != "labels"}
    for key in ("input_ids", "attention_mask", "position_ids"):
        if batch[key] is not None:  # attention_mask None: flattened rows with flash varlen keys (longext.data.masks)
            out[key] = batch[key][:, piece]
    out["shift_labels"] = F.pad(labels[:, 1:], (0, 1), value=-100)[:, piece]
    return out


# -------------------------------------------------------------------------------------------- loss
def loss_tiles(tokens: int, vocab: int) -> int:
    """Number of sequence tiles so that one tile's logits stay under LOGITS_PER_TILE."""
    return max(1, math.ceil(tokens * vocab / LOGITS_PER_TILE))


def token_loss_sum(lm_head, hidden: torch.Tensor, labels: torch.Tensor, tiles: int = 1,
                   softcap: float | None = None) -> torch.Tensor:
    """Sum over tokens with labels != -100 of the next-token cross-entropy (logits in fp32, as transformers does;
    `softcap`: Gemma 2's final_logit_softcapping, cap * tanh(logits / cap) before the loss, as its CausalLM does).

    hidden [b, s, H], labels [b, s] already shifted. With tiles > 1 no more than one tile of [b*s/tiles, vocab]
    logits exists at a time, and the value and gradients equal the untiled sum:
    - frozen lm_head (LoRA's usual case): DeepSpeed's TiledFusedLogitsLoss, which runs each tile's forward and
      backward inside the forward and keeps only d(sum)/d(hidden), scaled later by whatever multiplies the sum;
    - trainable lm_head (LoRA target or modules_to_save): a loop of checkpointed tiles (logits recomputed in
      backward, one tile at a time). TiledFusedLogitsLoss would put the lm_head's gradient of the bare sum into
      .grad during the forward, before the 1/count, ZeRO and accumulation factors applied after it."""

    def tile_loss(head, x, y):
        logits = head(x)
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return F.cross_entropy(logits.float(), y, ignore_index=-100, reduction="sum")

    x, y = hidden.flatten(0, 1), labels.flatten()
    tokens = y.numel()
    tiles = math.ceil(tokens / math.ceil(tokens / max(1, tiles)))  # the count torch.chunk really makes
    if tiles <= 1:
        return tile_loss(lm_head, x, y)
    params = [p for p in lm_head.parameters() if p.requires_grad]
    if not params:
        from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledFusedLogitsLoss

        return TiledFusedLogitsLoss.apply(tile_loss, lm_head, hidden, labels, None, tiles, params, "sum")
    from torch.utils.checkpoint import checkpoint

    pieces = zip(torch.chunk(x, tiles), torch.chunk(y, tiles))
    return sum(checkpoint(tile_loss, lm_head, xs, ys, use_reentrant=False) for xs, ys in pieces)


def micro_batch_loss(engine, inputs: dict, lay: Layout, tiled: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to pass to engine.backward, the micro-batch's mean token loss for logging), for a sharded batch.

    The forward goes through the engine (so DeepSpeed's backward hooks see its outputs) and stops before the
    logits: logits_to_keep=1 projects a single token, the loss is computed here from the final hidden states."""
    labels = inputs["shift_labels"].to(engine.device)
    mask = inputs["attention_mask"]
    varlen = {k: v.to(engine.device) if torch.is_tensor(v) else v for k, v in inputs.items()
              if k in (*FLASH_KEYS, DOCUMENT_KEY)}  # flash's varlen inputs, the whole-sequence document ids
    out = engine(
        input_ids=inputs["input_ids"].to(engine.device), attention_mask=None if mask is None else mask.to(engine.device),
        position_ids=inputs["position_ids"].to(engine.device), output_hidden_states=True, logits_to_keep=1, **varlen,
    )
    hidden = out.hidden_states[-1]  # after the final norm (transformers ties it to last_hidden_state)
    head = engine.module.get_output_embeddings()
    config = engine.module.config
    tiles = loss_tiles(labels.numel(), config.vocab_size) if tiled else 1  # ZeRO-3: weight is a shard
    total = token_loss_sum(head, hidden, labels, tiles, getattr(config, "final_logit_softcapping", None))
    stats = torch.stack([total.detach().float(), (labels != -100).sum().float()])
    if lay.sp > 1:
        torch.distributed.all_reduce(stats, group=lay.group)
    count = stats[1].clamp(min=1.0)
    # ZeRO-3 divides the summed gradients by the world size, ZeRO 0-2 by world / sp (module docstring)
    factor = lay.sp if engine.zero_optimization_stage() == 3 else 1
    return total * (factor / count), stats[0] / count
