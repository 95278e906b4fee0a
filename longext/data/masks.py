"""The document mask for each attention kernel: a packed row's `segment_ids` become what the kernel needs so
that every token attends only to earlier tokens of its own document.

    sdpa               a 4D block-causal bool mask [b, 1, L, L] (True = attend); transformers passes a 4D mask to
                       the kernel as it is (masking_utils: "already prepared")
    eager              the same mask as additive floats (0 / dtype min), which eager attention adds to its scores
    flash_attention_2  no mask: the micro-batch is flattened to one row [1, b*L] and every document piece becomes a
    flash_attention_3  varlen sequence through `cu_seq_lens_q/k` and `max_length_q/k`, which transformers hands to
                       flash-attn's varlen kernel (modeling_flash_attention_utils); padding-free, O(tokens) memory
    other kernels      a method's own attention function (LongGen's) gets sdpa's bool mask and `document_ids`

Besides the mask, the model gets `document_ids` (the segment ids, [b, L]) as a keyword argument, which transformers
hands down to every attention function: a method's own kernel reads it (LongGen's sparse layers run each document
piece as a sequence of its own), and under sequence parallelism it is the only mask there is. Ulysses drops
attention masks and all-to-alls q/k/v to the whole sequence; `document_attention` wraps the kernel it calls after
that exchange and builds the mask (or the varlen inputs) there, from the whole-sequence ids every rank holds
(longext.sp keeps `document_ids` unsharded).

The 4D masks cost L² bytes per row (1 GiB at 32k): fine on CPU test lengths, and on GPU `attn_implementation:
auto` picks flash_attention_2 when flash-attn is installed. Micro-batches without `segment_ids`, or whose rows each
hold a single document piece, pass through unchanged (the kernels' own causal path is the same, and faster).
"""

from __future__ import annotations

import torch

from longext.errors import LongextError

FLASH = ("flash_attention_2", "flash_attention_3")
FLASH_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
REFUSED = ("flex_attention",)  # would need a BlockMask from the segments: not built yet
MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "position_ids")
DOCUMENT_KEY = "document_ids"  # the keyword argument the attention functions receive


def model_inputs(batch: dict, attn_implementation: str, dtype: torch.dtype = torch.float32, sp: int = 1) -> dict:
    """The model's keyword inputs for a micro-batch (input_ids, attention_mask, labels, position_ids; with several
    document pieces in a row also document_ids, and the flash varlen keys when flattened); other entries of the batch
    (per-sample method inputs) are not included. `sp` > 1: sequence parallelism, where the mask is built after
    Ulysses' all-to-all (document_attention) and the inputs stay [b, L] for sharding."""
    inputs = {k: batch[k] for k in MODEL_INPUTS}
    segments = batch.get("segment_ids")
    if segments is None or bool((segments == segments[:, :1]).all()):
        return inputs  # one document piece per row (long documents, mostly): plain causal attention is the same
    if attn_implementation in REFUSED:
        raise LongextError(f"data.document_mask: no document mask for attention {attn_implementation!r} yet; "
                           f"use sdpa, eager or flash_attention_2, or set data.document_mask: false")
    if sp > 1:
        return {**inputs, DOCUMENT_KEY: segments}
    if attn_implementation in FLASH:
        return {**flatten_rows(inputs), **flash_varlen_kwargs(segments)}
    mask = block_causal_mask(segments)
    if attn_implementation == "eager":
        zero = torch.zeros((), dtype=dtype)
        mask = torch.where(mask, zero, torch.tensor(torch.finfo(dtype).min, dtype=dtype))
    return {**inputs, "attention_mask": mask, DOCUMENT_KEY: segments}


def block_causal_mask(segments: torch.Tensor) -> torch.Tensor:
    """[b, 1, L, L] bool: query i sees key j when j <= i and both are in the same segment."""
    length = segments.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()
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
    cu = torch.cat([bounds, torch.tensor([b * length], device=bounds.device)]).to(torch.int32)
    longest = int(cu.diff().max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def document_attention(core, flash: bool):
    """An attention function that masks documents itself, for the kernel Ulysses calls after its all-to-all
    (longext.sp): when it gets no mask and whole-sequence `document_ids` as long as its queries, it builds the block-
    causal mask (sdpa, and kernels that take sdpa's mask) or flattens q/k/v and passes the varlen boundaries (flash);
    otherwise it is `core` unchanged."""

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        ids = kwargs.get(DOCUMENT_KEY)
        if ids is None or attention_mask is not None or ids.shape[-1] != query.shape[2] or key.shape[2] != query.shape[2]:
            return core(module, query, key, value, attention_mask, *args, **kwargs)
        ids = ids.to(query.device)
        if not flash:
            return core(module, query, key, value, _cached_mask(ids), *args, **kwargs)
        b, heads, length, dim = query.shape
        flat = [x.transpose(0, 1).reshape(x.shape[1], 1, b * length, dim).transpose(0, 1) for x in (query, key, value)]
        kwargs = {**kwargs, **flash_varlen_kwargs(ids), "position_ids": None}
        out, weights = core(module, *flat, None, *args, **kwargs)  # [1, b*L, heads, dim]
        return out.reshape(b, length, *out.shape[2:]), weights

    return attention


_LAST: list = []  # [(ids, mask)] of the latest micro-batch


def _cached_mask(ids: torch.Tensor) -> torch.Tensor:
    """One mask per micro-batch, not one per layer: every layer of a forward gets the same ids."""
    if _LAST and _LAST[0][0].shape == ids.shape and torch.equal(_LAST[0][0], ids):
        return _LAST[0][1]
    mask = block_causal_mask(ids)
    _LAST[:] = [(ids.clone(), mask)]
    return mask
