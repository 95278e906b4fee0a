"""The document mask for each attention kernel: a packed row's `segment_ids` become what the kernel needs so
that every token attends only to earlier tokens of its own document.

    sdpa               a 4D block-causal bool mask [b, 1, L, L] (True = attend); transformers passes a 4D mask to
                       the kernel as it is (masking_utils: "already prepared")
    eager              the same mask as additive floats (0 / dtype min), which eager attention adds to its scores
    flash_attention_2  no mask: the micro-batch is flattened to one row [1, b*L] and every document piece becomes a
    flash_attention_3  varlen sequence through `cu_seq_lens_q/k` and `max_length_q/k`, which transformers hands to
                       flash-attn's varlen kernel (modeling_flash_attention_utils); padding-free, O(tokens) memory

The 4D masks cost L² bytes per row (1 GiB at 32k): fine on CPU test lengths, and on GPU `attn_implementation:
auto` picks flash_attention_2 when flash-attn is installed. Micro-batches without `segment_ids`, or whose rows each
hold a single document piece, pass through unchanged (the kernels' own causal path is the same, and faster).
"""

from __future__ import annotations

import torch

from longext.errors import LongextError

FLASH = ("flash_attention_2", "flash_attention_3")
FLASH_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
MASKED = ("sdpa", "eager", *FLASH)
MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "position_ids")


def model_inputs(batch: dict, attn_implementation: str, dtype: torch.dtype = torch.float32) -> dict:
    """The model's keyword inputs for a micro-batch (input_ids, attention_mask, labels, position_ids, and the flash
    varlen keys when flattened); other entries of the batch (per-sample method inputs) are not included."""
    inputs = {k: batch[k] for k in MODEL_INPUTS}
    segments = batch.get("segment_ids")
    if segments is None or bool((segments == segments[:, :1]).all()):
        return inputs  # one document piece per row (long documents, mostly): plain causal attention is the same
    if attn_implementation in FLASH:
        return {**flatten_rows(inputs), **flash_varlen_kwargs(segments)}
    if attn_implementation == "sdpa":
        return {**inputs, "attention_mask": block_causal_mask(segments)}
    if attn_implementation == "eager":
        mask = block_causal_mask(segments)
        zero = torch.zeros((), dtype=dtype)
        return {**inputs, "attention_mask": torch.where(mask, zero, torch.tensor(torch.finfo(dtype).min, dtype=dtype))}
    raise LongextError(f"data.document_mask: no document mask for attention {attn_implementation!r} yet "
                       f"(have {', '.join(MASKED)}); set data.document_mask: false")


def block_causal_mask(segments: torch.Tensor) -> torch.Tensor:
    """[b, 1, L, L] bool: query i sees key j when j <= i and both are in the same segment."""
    length = segments.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    same = segments[:, :, None] == segments[:, None, :]
    return (same & causal)[:, None]


def flatten_rows(inputs: dict) -> dict:
    """[b, L] → [1, b*L] for every per-token input; flash's varlen kernel keeps the rows apart through the segment
    boundaries (a row's first token always starts a segment)."""
    out = {k: v.reshape(1, -1) for k, v in inputs.items() if k != "attention_mask"}
    out["attention_mask"] = None
    return out


def flash_varlen_kwargs(segments: torch.Tensor) -> dict:
    """cu_seq_lens_q/k (int32 [pieces + 1], cumulative lengths over the flattened batch) and max_length_q/k (int)."""
    b, length = segments.shape
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    bounds = torch.nonzero(starts.reshape(-1)).flatten()
    cu = torch.cat([bounds, torch.tensor([b * length])]).to(torch.int32)
    longest = int(cu.diff().max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
