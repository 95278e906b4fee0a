"""Whether a resolved recipe trains with the document mask (data.document_mask: auto / true / false), and what its
tensor costs. Standard library only: `longext plan` and `train --dry-run` ask it before torch loads."""

from __future__ import annotations

MASK_BYTES_AUTO = 1 << 30  # auto: the 4D mask of sdpa/eager up to 1 GiB per micro-batch (32k tokens at batch 1)
MASK_BYTES_MAX = 4 << 30  # true: refused above 4 GiB (use flash-attn: no mask tensor at all)


def dense_mask_bytes(kernel: str, micro_batch_size: int, seq_len: int) -> int:
    """Bytes of the document mask tensor for `kernel` (longext.data.masks): none for flash's varlen inputs, a
    [b, 1, L, L] bool for sdpa, floats (4 bytes, fp32 at most) for eager."""
    if kernel.startswith("flash_attention"):
        return 0
    return micro_batch_size * seq_len * seq_len * (1 if kernel == "sdpa" else 4)


def document_mask_problems(recipe, method, kernel: str, seq_len: int) -> list[tuple[str, str]]:
    """(field, message) for a document_mask: true that this recipe cannot honour: per_doc packing, a method that
    cannot mask documents yet (`method`: its longext.methods.base.Method), a mask tensor too large to build."""
    data = recipe.data
    if data.document_mask is not True:
        return []
    if data.packing != "concat":
        return [("data.document_mask", "applies to concat packing; per_doc rows hold one document already "
                                       "(set data.packing: concat or remove document_mask)")]
    if method.document_mask_problem:
        return [("data.document_mask", f"cannot yet be combined with {method.document_mask_problem} "
                                       f"(method.kind {recipe.method.kind}); use document_mask: auto or false")]
    if recipe.train.sequence_parallel > 1:
        return [("data.document_mask", f"cannot yet be combined with train.sequence_parallel "
                                       f"{recipe.train.sequence_parallel} (Ulysses attends over whole rows); use "
                                       f"document_mask: auto or false")]
    size = dense_mask_bytes(kernel, recipe.train.micro_batch_size, seq_len)
    if size > MASK_BYTES_MAX:
        return [("data.document_mask", f"with attention {kernel} the mask is a [batch, 1, {seq_len}, {seq_len}] tensor "
                                       f"of {size / 2**30:.0f} GiB per micro-batch; install flash-attn "
                                       f"(model.attn_implementation flash_attention_2 needs none) or set "
                                       f"document_mask: false")]
    return []


def document_mask_enabled(recipe, method, kernel: str, seq_len: int) -> bool:
    """What data.document_mask means for this recipe: true/false as written; auto = on where it is supported and,
    for sdpa/eager, where its mask stays within MASK_BYTES_AUTO (the resolved recipe records the answer)."""
    data = recipe.data
    if data.document_mask != "auto":
        return data.document_mask
    probe = recipe.model_copy(update={"data": data.model_copy(update={"document_mask": True})})
    small = dense_mask_bytes(kernel, recipe.train.micro_batch_size, seq_len) <= MASK_BYTES_AUTO
    return small and not document_mask_problems(probe, method, kernel, seq_len)
