"""Whether a resolved recipe trains with the document mask (data.document_mask: auto / true / false), and what its
tensor costs. Standard library only: `longext plan` and `train --dry-run` ask it before torch loads.

Every method masks documents (its position sampler runs on each document piece, longext.data.batches; LongGen's
sparse layers run each piece as a sequence of its own), at any sequence-parallel degree (longext.sp), so what
decides is the packing and the size of the mask tensor: none for flash-attn's varlen inputs, [b, 1, L, L] for
sdpa (bool) and eager (floats), built whole on every rank of a sequence-parallel group after its all-to-all.
"""

from __future__ import annotations

MASK_BYTES_AUTO = 1 << 30  # auto: the 4D mask of sdpa/eager up to 1 GiB per micro-batch (32k tokens at batch 1)
MASK_BYTES_MAX = 4 << 30  # true: refused above 4 GiB (use flash-attn: no mask tensor at all)


def mask_kernel(kernel: str, own_attention: bool) -> str:
    """The kernel whose mask the document mask takes: a method that routes attention itself (LongGen) runs its full
    layers through sdpa with sdpa's bool mask, whatever model.attn_implementation says."""
    return "sdpa" if own_attention else kernel


def dense_mask_bytes(kernel: str, micro_batch_size: int, seq_len: int) -> int:
    """Bytes of the document mask tensor for `kernel` (longext.data.masks): none for flash's varlen inputs, a
    [b, 1, L, L] bool for sdpa, floats (4 bytes, fp32 at most) for eager."""
    if kernel.startswith("flash_attention"):
        return 0
    return micro_batch_size * seq_len * seq_len * (4 if kernel == "eager" else 1)


def document_mask_problems(recipe, kernel: str, seq_len: int) -> list[tuple[str, str]]:
    """(field, message) for a document_mask: true that this recipe cannot honour: per_doc packing, or a mask tensor
    too large to build for `kernel` (see mask_kernel) at `seq_len`."""
    data = recipe.data
    if data.document_mask is not True:
        return []
    if data.packing != "concat":
        return [("data.document_mask", "applies to concat packing; per_doc rows hold one document already "
                                       "(set data.packing: concat or remove document_mask)")]
    size = dense_mask_bytes(kernel, recipe.train.micro_batch_size, seq_len)
    if size > MASK_BYTES_MAX:
        return [("data.document_mask", f"with attention {kernel} the mask is a [batch, 1, {seq_len}, {seq_len}] tensor "
                                       f"of {size / 2**30:.0f} GiB per micro-batch; install flash-attn "
                                       f"(model.attn_implementation flash_attention_2 needs none) or set "
                                       f"document_mask: false")]
    return []


def document_mask_enabled(recipe, kernel: str, seq_len: int) -> bool:
    """What data.document_mask means for this recipe: true/false as written; auto = on for concat packing where the
    mask tensor of `kernel` stays within MASK_BYTES_AUTO (the resolved recipe records the answer)."""
    data = recipe.data
    if data.document_mask != "auto":
        return data.document_mask
    small = dense_mask_bytes(kernel, recipe.train.micro_batch_size, seq_len) <= MASK_BYTES_AUTO
    return data.packing == "concat" and small
