"""LongGen: hybrid full / static-sparse attention layers (Ge et al. 2024, arXiv 2410.01485; methods.md §6).

A few layers (by default the middle third) keep full attention; the others read only a static sparse
pattern of keys, defined once in `_pattern`:

    attn_sink     k <= q and (k < sink_tokens or q - k < window)
    block_sparse  k <= q and (Q - K < local_blocks or (K + 1 + h * head_step) % vert_stride == 0)
                  Q, K = q // block_size, k // block_size; head_step = 0 if homo_head else
                  max(1, vert_stride // num_heads)   (Phi-3-small's rule, methods.md §6.1 [choice])

q and k are *slots*: the index of a token in its sequence as the model sees it (pads included), the
same convention transformers uses for sliding windows. Padding removes keys on top of the pattern; with
LEFT padding a row's first slots are pads, so its attn_sink sinks are pads too (pad right, or use batch 1).

Kernels for the sparse layers (one registered attention function, "longgen_sparse"; full layers go to
SDPA with the same mask transformers builds for it):
  block  plain torch, CPU and GPU, in one of two forms:
         - chunked SDPA (`chunked_attention`; attn_sink, and block_sparse with homo_head when no gradient is
           needed, see `_chunkable`): queries in chunks
           of SDPA_CHUNK rows; a chunk's keys are a few slices of K/V (sinks + window, or the vertical
           blocks + the band), concatenated and read by torch's fused SDPA under a small mask; SDPA's own
           backward. Time and saved tensors ~ S * (budget + chunk). On CPU in fp32 with no padding,
           attn_sink chunks are cut into slices that need no mask, read by the CPU flash kernel and merged
           by their log-sum-exp (`_MergedSinkWindowAttention`; saves only q, k, v, output, lse).
         - gathered blocks (`block_attention`; block_sparse with shifted heads, whose heads read different
           blocks, and block_sparse training): query block i gathers the key blocks it may read and attends to them, chunks of query
           blocks at a time, flash-style (a custom autograd.Function that keeps the row log-sum-exp and
           recomputes each chunk in backward). Time ~ S * budget, memory ~ S * d.
  flex   torch FlexAttention with a BlockMask from the same `_pattern` (CUDA; chosen by "auto").
  dense  the reference: the dense pattern mask through SDPA (also used for decode steps and any
         query/key layout the block kernel does not cover, e.g. a pruned cache).

`LongGenCache` keeps, for sparse layers, only the keys a future query can still read, with their
absolute slots (RoPE is applied before caching, so cached keys keep their rotation and the mask is
applied at their original slots); full layers keep everything.

This file imports only torch, transformers and the standard library: `longext export` copies it next
to the weights, and `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` runs it with
no longext installed. Nothing here modifies a transformers class: `apply_longgen` changes one model
instance's config and registers a named attention function.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from transformers import (
    AttentionInterface, DynamicCache, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, MixtralConfig,
    MixtralForCausalLM, Olmo2Config, Olmo2ForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM,
    Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM,
)
from transformers.cache_utils import Cache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTN_NAME = "longgen_sparse"
SPARSE_TYPES = ("attn_sink", "block_sparse")
KERNELS = ("auto", "block", "flex", "dense")
PLACEMENTS = ("middle", "bottom", "top", "interleaved")
SINK_KERNEL_BLOCK = 64  # block size of the block kernel for attn_sink (the pattern itself has no blocks)


# --------------------------------------------------------------------------------------------- spec
@dataclass
class LongGenSpec:
    """Layout and sparse pattern; stored as a plain dict in `config.longgen` (to_dict / from_dict)."""

    full_layers: list[int] = field(default_factory=list)  # full-attention layers; all others are sparse
    sparse_type: str = "attn_sink"  # attn_sink | block_sparse
    sink_tokens: int = 64  # attn_sink
    window: int = 1984  # attn_sink: keys at distance < window (the query itself included) are visible
    block_size: int = 64  # block_sparse
    local_blocks: int = 16  # block_sparse
    vert_stride: int = 8  # block_sparse
    homo_head: bool = True  # block_sparse: same pattern on every head (False: shifted per head)
    kernel: str = "auto"  # auto (flex on CUDA when available, else block) | block | flex | dense

    def __post_init__(self):
        self.full_layers = sorted(int(i) for i in self.full_layers)
        problems = []
        if self.sparse_type not in SPARSE_TYPES:
            problems.append(f"sparse_type: got {self.sparse_type!r}, allowed {', '.join(SPARSE_TYPES)}")
        if self.kernel not in KERNELS:
            problems.append(f"kernel: got {self.kernel!r}, allowed {', '.join(KERNELS)}")
        for name, low in (("sink_tokens", 0), ("window", 1), ("block_size", 1), ("local_blocks", 1),
                          ("vert_stride", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                problems.append(f"{name}: got {value!r}, allowed an integer >= {low}")
        if len(set(self.full_layers)) != len(self.full_layers):
            problems.append(f"full_layers: got {self.full_layers}, allowed distinct layer indices")
        if problems:
            raise ValueError("LongGen spec: " + "; ".join(problems))

    def check_layers(self, num_layers: int) -> None:
        """ValueError if a full layer index is outside [0, num_layers)."""
        bad = [i for i in self.full_layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"LongGen full_layers: got {bad}, allowed 0..{num_layers - 1} ({num_layers} layers)")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LongGenSpec:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"LongGen spec: unknown keys {sorted(unknown)}")
        return cls(**d)


def full_layer_indices(num_layers: int, fraction: float = 1 / 3, placement: str = "middle") -> list[int]:
    """Indices of the k = round(num_layers * fraction) full-attention layers (halves round up).

    middle: the centred block [s, s + k) with s = (N - k) // 2 (methods.md §6.1); bottom: [0, k);
    top: [N - k, N); interleaved: k layers spread evenly, floor((i + 1/2) * N / k).
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"LongGen layout: num_layers got {num_layers!r}, allowed an integer >= 1")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"LongGen layout: full_fraction got {fraction!r}, allowed 0 <= fraction <= 1")
    if placement not in PLACEMENTS:
        raise ValueError(f"LongGen layout: placement got {placement!r}, allowed {', '.join(PLACEMENTS)}")
    n = num_layers
    k = math.floor(n * fraction + 0.5)
    if placement == "middle":
        start = (n - k) // 2
        return list(range(start, start + k))
    if placement == "bottom":
        return list(range(k))
    if placement == "top":
        return list(range(n - k, n))
    return [math.floor((i + 0.5) * n / k) for i in range(k)]


# ------------------------------------------------------------------------------------------ pattern
def _head_step(spec: LongGenSpec, num_heads: int) -> int:
    return 0 if spec.homo_head else max(1, spec.vert_stride // num_heads)


def _pattern(spec: LongGenSpec, q, k, h, num_heads: int):
    """The sparse pattern, elementwise on broadcastable integer tensors of slots q, k and head h.

    The one definition every kernel, the reference mask and the cache eviction derive from.
    """
    if spec.sparse_type == "attn_sink":
        return (k <= q) & ((k < spec.sink_tokens) | (q - k < spec.window))
    qb, kb = q // spec.block_size, k // spec.block_size
    vertical = (kb + 1 + h * _head_step(spec, num_heads)) % spec.vert_stride == 0
    return (k <= q) & ((qb - kb < spec.local_blocks) | vertical)


def _pattern_heads(spec: LongGenSpec, num_heads: int) -> int:
    """How many distinct head patterns there are: num_heads for shifted block_sparse, else 1."""
    return num_heads if spec.sparse_type == "block_sparse" and not spec.homo_head else 1


def reference_mask(spec: LongGenSpec, q_pos, k_pos, num_heads: int) -> torch.Tensor:
    """[H or 1, len(q_pos), len(k_pos)] bool: may query slot q_pos[i] read key slot k_pos[j] (causal included)."""
    q_pos, k_pos = torch.as_tensor(q_pos), torch.as_tensor(k_pos)
    h = torch.arange(_pattern_heads(spec, num_heads), device=q_pos.device)
    return _pattern(spec, q_pos[None, :, None], k_pos[None, None, :].to(q_pos.device), h[:, None, None], num_heads)


def budget(spec: LongGenSpec, seq_len: int, num_heads: int = 1) -> int:
    """Most keys one sparse-layer query can read at this length (the last query reads the most).

    For shifted block_sparse heads the count depends on the head; pass num_heads for the exact maximum.
    """
    if seq_len <= 0:
        return 0
    counts = reference_mask(spec, [seq_len - 1], torch.arange(seq_len), num_heads).sum(-1)
    return int(counts.max())


def _retained(spec: LongGenSpec, slots: torch.Tensor, seen: int, num_heads: int) -> torch.Tensor:
    """[len(slots)] bool: may any query at slot >= seen (any head) still read these key slots?"""
    if spec.sparse_type == "attn_sink":
        return (slots < spec.sink_tokens) | (slots > seen - spec.window)
    kb, qb = slots // spec.block_size, seen // spec.block_size
    keep = qb - kb < spec.local_blocks  # later query blocks are further away: local now or never
    step = _head_step(spec, num_heads)
    for h in range(_pattern_heads(spec, num_heads)):
        keep |= (kb + 1 + h * step) % spec.vert_stride == 0
    return keep


# ------------------------------------------------------------------------------------------ kernels
def dense_attention(spec, query, key, value, q_slots, k_slots, padding, scaling):
    """Reference kernel: the dense pattern mask (∧ padding [B, 1, q, k] bool) through SDPA.

    query [B, H, q, d], key/value [B, KV, k, d] -> [B, q, H, d]. Rows with no visible key are zeros.
    """
    num_heads = query.shape[1]
    allowed = reference_mask(spec, q_slots, k_slots, num_heads)[None]  # [1, H or 1, q, k]
    if padding is not None:
        allowed = allowed & padding
    row_any = allowed.any(-1, keepdim=True)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=allowed | ~row_any, scale=scaling, enable_gqa=key.shape[1] != num_heads
    )
    return (out * row_any).transpose(1, 2).contiguous()


def bs_of(spec: LongGenSpec) -> int:
    """The block kernel's block size: the pattern's own for block_sparse."""
    return spec.block_size if spec.sparse_type == "block_sparse" else SINK_KERNEL_BLOCK


def _band_blocks(spec: LongGenSpec, bs: int) -> int:
    """How many key blocks (the query's own included) a query block's band spans."""
    if spec.sparse_type == "attn_sink":
        return math.ceil((spec.window - 1) / bs) + 1
    return spec.local_blocks


def _global_blocks(spec: LongGenSpec, nblocks: int, num_heads: int, device):
    """[hm, n] key-block indices read outside the band (sinks / vertical stride), and their validity."""
    if spec.sparse_type == "attn_sink":
        n = min(nblocks, math.ceil(spec.sink_tokens / bs_of(spec)))
        return torch.arange(n, device=device)[None], torch.ones(1, n, dtype=torch.bool, device=device)
    step, vs = _head_step(spec, num_heads), spec.vert_stride
    first = (-1 - torch.arange(_pattern_heads(spec, num_heads), device=device) * step) % vs
    idx = first[:, None] + vs * torch.arange(math.ceil(nblocks / vs), device=device)[None]
    valid = idx < nblocks
    return idx.clamp(max=nblocks - 1), valid


_LAYOUTS: dict = {}


def _block_layout(spec: LongGenSpec, seq_len: int, num_heads: int, device):
    """What the block kernel reads for a causal prefix of seq_len slots (data-independent, cached).

    Returns (kidx [hm, nq, tot], blocked [1, hm, nq, 1, bs, tot] bool, cols [nq] ints). Query block i
    reads the key slots kidx[h, i]: the w blocks of its band i-w+1..i, then the n global blocks (sinks /
    vertical stride, ascending; hm = 1, or one row per head when shifted). `blocked` is True where
    `_pattern` forbids the pair, where the slot is before 0, and where a global block lies inside the
    band (each key is read once). Query blocks <= i need only the first cols[i] columns.
    """
    key = (repr(sorted(spec.to_dict().items())), bs_of(spec), seq_len, num_heads, str(device))
    if key in _LAYOUTS:
        return _LAYOUTS[key]
    bs = bs_of(spec)
    nq = math.ceil(seq_len / bs)
    w = min(_band_blocks(spec, bs), nq)
    blocks = torch.arange(nq, device=device)
    r = torch.arange(bs, device=device)
    gidx, gvalid = _global_blocks(spec, nq, num_heads, device)  # [hm, n]
    hm, n = gidx.shape
    band = (blocks[:, None] - w + 1) * bs + torch.arange(w * bs, device=device)  # [nq, w*bs]
    glob = (gidx[:, :, None] * bs + r).view(hm, 1, n * bs).expand(hm, nq, n * bs)
    kidx = torch.cat([band[None].expand(hm, nq, w * bs), glob], dim=-1)  # [hm, nq, tot]
    once = torch.cat([  # each block once: band slots >= 0, global blocks only before the band
        (band >= 0)[None].expand(hm, nq, w * bs),
        ((gidx[:, None, :] < blocks[None, :, None] - w + 1) & gvalid[:, None, :]).repeat_interleave(bs, dim=-1),
    ], dim=-1)
    qs = (blocks[:, None] * bs + r).view(1, nq, bs, 1)
    heads = torch.arange(hm, device=device).view(hm, 1, 1, 1)
    allowed = _pattern(spec, qs, kidx[:, :, None, :], heads, num_heads) & once[:, :, None, :]
    used = allowed.any(dim=2).any(dim=0)  # [nq, tot]
    last = (used * torch.arange(1, used.shape[-1] + 1, device=device)).amax(-1)  # 1 + last used column
    cols = last.cummax(0).values.tolist()
    if len(_LAYOUTS) >= 8:
        _LAYOUTS.clear()
    _LAYOUTS[key] = (kidx.clamp(min=0), ~allowed[None, :, :, None], cols)
    return _LAYOUTS[key]


CHUNK_ELEMENTS = 1 << 22  # the block kernel's working set per step (scores + gathered keys), in elements


class _GatheredAttention(torch.autograd.Function):
    """Attention of query blocks over gathered key slots, in chunks of query blocks, flash-style.

    q [B, hi, nq, R, d] (pre-scaled; R = g*bs rows per block), k/v [B, hi*L, d] (heads flattened into
    slots), cidx [hi, nq, tot] indices into that flattened dim, hidden [Bm, hm, nq, 1, bs, tot] bool
    (True = not visible; Bm in {1, B}, hm in {1, hi}). Saves only q, k, v, the output and the row
    log-sum-exp: the gathered keys and the probabilities are recomputed per chunk in backward.
    """

    @staticmethod
    def forward(ctx, q, k, v, cidx, hidden, cols):
        B, hi, nq, R, d = q.shape
        tot = cidx.shape[-1]
        ctx.step = max(1, CHUNK_ELEMENTS // max(1, B * hi * tot * (R + d)))
        ctx.cols = cols
        out = q.new_empty(q.shape)
        lse = q.new_empty(B, hi, nq, R, dtype=torch.float32)
        for a in range(0, nq, ctx.step):
            b = min(nq, a + ctx.step)
            p, _, vv, lse[:, :, a:b] = _GatheredAttention._probs(ctx, q, k, v, cidx, hidden, a, b, None)
            out[:, :, a:b] = p @ vv
        ctx.save_for_backward(q, k, v, cidx, hidden, out, lse)
        return out

    @staticmethod
    def _probs(ctx, q, k, v, cidx, hidden, a, b, lse):
        """(p [B, hi, c, R, n], gathered k and v [B, hi, c, n, d], lse) for query blocks a..b-1, over the
        n columns they use. Softmax statistics in float32 whatever the input dtype."""
        B, hi, _, R, d = q.shape
        n = ctx.cols[b - 1]
        idx = cidx[:, a:b, :n].reshape(-1)
        kk = k.index_select(1, idx).view(B, hi, b - a, n, d)
        vv = v.index_select(1, idx).view(B, hi, b - a, n, d)
        s = (q[:, :, a:b] @ kk.transpose(-1, -2)).float()  # [B, hi, c, R, n]
        bs = hidden.shape[-2]
        s = s.view(B, hi, b - a, R // bs, bs, n).masked_fill_(hidden[:, :, a:b, ..., :n], float("-inf")).view(s.shape)
        if lse is not None:  # backward: the forward's statistics
            return torch.exp(s - lse[..., None]).to(q.dtype), kk, vv, lse
        m = s.amax(dim=-1)
        m = m.masked_fill_(m == float("-inf"), 0.0)  # rows that see nothing: p = 0, lse = +inf below
        p = s.sub_(m[..., None]).exp_()  # s is this chunk's own buffer
        total = p.sum(dim=-1)
        p = p.div_(total.clamp_min(torch.finfo(p.dtype).tiny)[..., None])
        lse = (m + total.log()).masked_fill_(total == 0, float("inf"))
        return p.to(q.dtype), kk, vv, lse

    @staticmethod
    def backward(ctx, dout):
        q, k, v, cidx, hidden, out, lse = ctx.saved_tensors
        B, hi, nq, R, d = q.shape
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        delta = (dout * out).sum(-1)  # [B, hi, nq, R]
        for a in range(0, nq, ctx.step):
            b = min(nq, a + ctx.step)
            p, kk, vv, _ = _GatheredAttention._probs(ctx, q, k, v, cidx, hidden, a, b, lse[:, :, a:b])
            do = dout[:, :, a:b]
            idx = cidx[:, a:b, : ctx.cols[b - 1]].reshape(-1)
            dv.index_add_(1, idx, (p.transpose(-1, -2) @ do).view(B, -1, d))
            ds = p * (do @ vv.transpose(-1, -2) - delta[:, :, a:b, :, None])
            dq[:, :, a:b] = ds @ kk
            dk.index_add_(1, idx, (ds.transpose(-1, -2) @ q[:, :, a:b]).view(B, -1, d))
        return dq, dk, dv, None, None, None


def block_attention(spec, query, key, value, key_valid, scaling):
    """Block kernel for a causal prefix: query and key slots both 0..S-1.

    query [B, H, S, d], key/value [B, KV, S, d], key_valid [B, S] bool or None -> [B, S, H, d].
    Each query block gathers its key blocks (`_block_layout`); chunks of query blocks attend to them
    with batched matmuls (`_GatheredAttention`). Time ~ S * keys-per-block, memory ~ S * d plus one
    chunk; the backward recomputes each chunk.
    """
    B, H, S, d = query.shape
    kv_heads, bs = key.shape[1], bs_of(spec)
    if _pattern_heads(spec, H) > 1:  # shifted heads read different blocks: one key copy per query head
        key = key.repeat_interleave(H // kv_heads, dim=1)
        value = value.repeat_interleave(H // kv_heads, dim=1)
    hi = key.shape[1]
    g, nq = H // hi, math.ceil(S / bs)
    kidx, blocked, cols = _block_layout(spec, S, H, query.device)  # [hm, nq, tot], [1, hm, nq, 1, bs, tot]
    tail = nq * bs - S
    L = nq * bs
    # queries grouped by kv head and block: [B, hi, nq, g*bs, d]; keys with heads flattened into slots
    q = F.pad(query * scaling, (0, 0, 0, tail)).view(B, hi, g, nq, bs, d).transpose(2, 3).reshape(B, hi, nq, g * bs, d)
    k = F.pad(key, (0, 0, 0, tail)).reshape(B, hi * L, d)
    v = F.pad(value, (0, 0, 0, tail)).reshape(B, hi * L, d)
    cidx = kidx.expand(hi, -1, -1) + L * torch.arange(hi, device=kidx.device)[:, None, None]
    hidden = blocked
    if key_valid is not None:
        kv = F.pad(key_valid, (0, tail), value=False)[:, kidx]  # [B, hm, nq, tot]
        hidden = blocked | ~kv[:, :, :, None, None, :]
    out = _GatheredAttention.apply(q, k, v, cidx, hidden, cols)  # [B, hi, nq, g*bs, d]
    out = out.view(B, hi, nq, g, bs, d).transpose(2, 3).reshape(B, H, L, d)[:, :, :S]
    return out.transpose(1, 2).contiguous()


SDPA_CHUNK = 512  # query rows per SDPA call of the chunked kernel: fewer wasted keys when smaller, more calls


def _chunkable(spec: LongGenSpec, query: torch.Tensor) -> bool:
    """Does `block` run `chunked_attention` here? attn_sink: always. block_sparse with homo_head: without
    gradients only (measured at 16k on SmolLM2 shapes, CPU: forward 1.6x faster than the gathered blocks,
    forward + backward the same, while autograd would keep each chunk's mask). Shifted heads: never (each
    head reads other blocks)."""
    if spec.sparse_type == "attn_sink":
        return True
    return _pattern_heads(spec, query.shape[1]) == 1 and not (torch.is_grad_enabled() and query.requires_grad)


def _chunk_pieces(spec: LongGenSpec, a: int, b: int) -> list[tuple[int, int, int, int]]:
    """Key slots the queries a..b-1 may read, as pieces (start, stop, unit, step): the slots start..stop-1
    cut into runs of `unit`, every step-th run kept (unit = step = 1: a plain slice). Together a superset of
    what the pattern lets these queries read, with each slot once; the mask trims the rest.

    attn_sink: the sinks [0, sink) and the window [a - window + 1, b) (one slice while they touch);
    block_sparse (homo): the vertical blocks before the band of query a's block, then the band up to b.
    """
    if spec.sparse_type == "attn_sink":
        lo = max(0, a - spec.window + 1)
        if lo <= spec.sink_tokens:
            return [(0, b, 1, 1)]
        return ([(0, spec.sink_tokens, 1, 1)] if spec.sink_tokens else []) + [(lo, b, 1, 1)]
    bs, vs = spec.block_size, spec.vert_stride
    lo = max(0, a // bs - spec.local_blocks + 1)  # first band block of the chunk's first query
    n = len(range(vs - 1, lo, vs))  # vertical blocks K = vs-1, 2vs-1, ... before the band
    pieces = [((vs - 1) * bs, (vs + (n - 1) * vs) * bs, bs, vs)] if n else []
    return pieces + [(lo * bs, b, 1, 1)]


def _take(x: torch.Tensor, piece) -> torch.Tensor:
    """The piece's slots of x [B, h, S, d] along dim 2 (slices and a strided view; no index gather)."""
    start, stop, unit, step = piece
    x = x[:, :, start:stop]
    return x.unflatten(2, (-1, unit))[:, :, ::step].flatten(2, 3) if step > 1 else x


def _chunk_mask(spec, pieces, a, b, num_heads, key_valid, dtype, device, cache: dict):
    """(additive mask of `dtype` [B or 1, 1, b-a, n], row_any [B, 1, b-a, 1] or None) for one query chunk.

    Rows that see no key (a padded query with only pads in reach) get an all-zero mask row here and a zero
    output row from row_any, as the dense reference does. attn_sink chunks past the sinks all share one mask
    (the pattern depends on q - k there; sinks are all visible): it is built once per call, so autograd
    keeps one copy and not one per chunk.
    """
    key = None
    if key_valid is None and spec.sparse_type == "attn_sink" and pieces[-1][0] > spec.sink_tokens:
        key = (len(pieces), pieces[-1][0] - a, b - a)
        if key in cache:
            return cache[key], None
    k_slots = torch.cat([torch.arange(s, e, device=device).view(-1, u)[::t].flatten() for s, e, u, t in pieces])
    q_slots = torch.arange(a, b, device=device)
    allowed = _pattern(spec, q_slots[:, None], k_slots[None, :], 0, num_heads)[None, None]  # [1, 1, c, n]
    row_any = None
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, k_slots]  # [B, 1, c, n]
        row_any = allowed.any(-1, keepdim=True)
        allowed = allowed | ~row_any
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
    if key is not None:
        cache[key] = mask
    return mask, row_any


def _sink_window_parts(spec: LongGenSpec, a: int, b: int) -> list[tuple[int, int, str]] | None:
    """attn_sink queries a..b-1 as key slices (start, stop, kind) that need no mask, or None where the sinks
    and the window overlap (early chunks). kind: "all" (every query reads every key), "causal" (the chunk's
    own keys: query i reads key j <= i) or "edge" (the window's lower edge: key j >= i; run as causal on
    reversed rows and keys). Each key slot in one part; every row reads at least one key of every part.
    """
    w, c = spec.window, b - a
    if a - w + 1 < spec.sink_tokens or c > w - 1:
        return None
    parts = [(0, spec.sink_tokens, "all")] if spec.sink_tokens else []
    if w - 1 - c > 0:
        parts.append((b - w + 1, a, "all"))
    return parts + [(a - w + 1, b - w + 1, "edge"), (a, b, "causal")]


def _flash_cpu_available(query: torch.Tensor) -> bool:
    return query.device.type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


class _MergedSinkWindowAttention(torch.autograd.Function):
    """attn_sink over a causal prefix, no padding, on CPU: each query chunk's keys are split into slices that
    need no mask (`_sink_window_parts`), each read by torch's fused CPU flash attention, which also returns
    the row log-sum-exp; the parts are merged flash-style (out = sum_p exp(lse_p - lse) * out_p). Early
    chunks (sinks inside the window) run as one masked call. The backward calls the same op's backward per
    part with the merged output and log-sum-exp (the split-KV flash backward), so no key, probability or
    mask is stored: saved are q, k, v, the output and the log-sum-exp.

    q [B, H, S, d], k/v [B, KV, S, d] -> out [B, S, H, d].
    """

    @staticmethod
    def _parts(spec, a, b, num_heads, dtype, device):
        """[(start, stop, kind, additive mask or None)] for queries a..b-1: the maskless split, or, for the
        early chunks, `_chunk_pieces`' slices with their own masks (every row still sees a key in each)."""
        parts = _sink_window_parts(spec, a, b)
        if parts is not None:
            return [(s, e, kind, None) for s, e, kind in parts]
        out, q_slots = [], torch.arange(a, b, device=device)[:, None]
        for s, e, _, _ in _chunk_pieces(spec, a, b):
            allowed = _pattern(spec, q_slots, torch.arange(s, e, device=device)[None], 0, num_heads)
            mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
            out.append((s, e, "all", None if bool(allowed.all()) else mask))
        return out

    @staticmethod
    def forward(ctx, q, k, v, spec, scaling):
        B, H, S, d = q.shape
        op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        out = q.new_empty(B, S, H, d)
        lse = q.new_empty(B, H, S, dtype=torch.float32)
        for a in range(0, S, SDPA_CHUNK):
            b = min(S, a + SDPA_CHUNK)
            acc = m = None
            for s, e, kind, mask in _MergedSinkWindowAttention._parts(spec, a, b, H, q.dtype, q.device):
                flip = kind == "edge"
                qq, kk, vv = q[:, :, a:b], k[:, :, s:e], v[:, :, s:e]
                if flip:
                    qq, kk, vv = qq.flip(2), kk.flip(2), vv.flip(2)
                o, l = op(qq, kk, vv, 0.0, kind != "all", attn_mask=mask, scale=scaling)
                if flip:
                    o, l = o.flip(2), l.flip(2)
                o, l = o.float(), l.float()
                if acc is None:
                    acc, m = o, l
                else:
                    new = torch.logaddexp(m, l)
                    acc = acc * (m - new).exp_()[..., None] + o * (l - new).exp_()[..., None]
                    m = new
            out[:, a:b] = acc.transpose(1, 2)
            lse[:, :, a:b] = m
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.spec, ctx.scaling = spec, scaling
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        B, H, S, d = q.shape
        op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        dout_h, out_h = dout.transpose(1, 2), out.transpose(1, 2)  # [B, H, S, d] views
        for a in range(0, S, SDPA_CHUNK):
            b = min(S, a + SDPA_CHUNK)
            for s, e, kind, mask in _MergedSinkWindowAttention._parts(ctx.spec, a, b, H, q.dtype, q.device):
                flip = kind == "edge"
                t = [dout_h[:, :, a:b], q[:, :, a:b], k[:, :, s:e], v[:, :, s:e], out_h[:, :, a:b], lse[:, :, a:b]]
                if flip:
                    t = [x.flip(2) for x in t]
                g = op(*t, 0.0, kind != "all", attn_mask=mask, scale=ctx.scaling)
                if flip:
                    g = [x.flip(2) for x in g]
                dq[:, :, a:b] += g[0]
                dk[:, :, s:e] += g[1]
                dv[:, :, s:e] += g[2]
        return dq, dk, dv, None, None


def chunked_attention(spec, query, key, value, key_valid, scaling):
    """Chunked-SDPA kernel for a causal prefix (query and key slots 0..S-1); patterns shared by all heads.

    query [B, H, S, d], key/value [B, KV, S, d], key_valid [B, S] bool or None -> [B, S, H, d]. Queries go in
    chunks of SDPA_CHUNK rows; each chunk's keys are a few contiguous (or block-strided) slices of key/value
    (`_chunk_pieces`: for attn_sink the sinks and the window), concatenated, and torch's fused SDPA reads
    them under a small [chunk, keys] mask (causal edge, window edge, padding). GQA through SDPA's
    enable_gqa; the backward is SDPA's own, through autograd. Work and saved tensors grow as
    S * (sink + window + chunk), not S^2 (with padding, or for block_sparse, autograd also keeps each chunk's
    [B or 1, 1, chunk, keys] mask: S * keys floats per layer). attn_sink without padding in fp32 on CPU goes
    to `_MergedSinkWindowAttention` instead (no masks past the first chunks, nothing but q, k, v, output and
    lse saved).
    """
    B, H, S, d = query.shape
    merged = spec.sparse_type == "attn_sink" and key_valid is None and query.dtype == torch.float32
    if merged and _flash_cpu_available(query):
        return _MergedSinkWindowAttention.apply(query, key, value, spec, scaling)
    gqa = key.shape[1] != H
    masks, outs = {}, []
    for a in range(0, S, SDPA_CHUNK):
        b = min(S, a + SDPA_CHUNK)
        pieces = _chunk_pieces(spec, a, b)
        kk = torch.cat([_take(key, p) for p in pieces], dim=2) if len(pieces) > 1 else _take(key, pieces[0])
        vv = torch.cat([_take(value, p) for p in pieces], dim=2) if len(pieces) > 1 else _take(value, pieces[0])
        mask, row_any = _chunk_mask(spec, pieces, a, b, H, key_valid, query.dtype, query.device, masks)
        out = F.scaled_dot_product_attention(query[:, :, a:b], kk, vv, attn_mask=mask, scale=scaling, enable_gqa=gqa)
        if row_any is not None:
            out = out * row_any
        outs.append(out.transpose(1, 2))  # [B, c, H, d]
    return torch.cat(outs, dim=1)


_FLEX_COMPILED = None


def flex_attention_kernel(spec, query, key, value, key_valid, scaling):
    """FlexAttention with a BlockMask built from `_pattern` (full causal prefix, as block_attention).

    Compiled on CUDA; eager elsewhere (CPU flex has no backward in torch 2.13, so it serves inference).
    """
    global _FLEX_COMPILED
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, H, S, _ = query.shape

    def mask_mod(b, h, q_idx, kv_idx):
        ok = _pattern(spec, q_idx, kv_idx, h, H)
        return ok & key_valid[b, kv_idx] if key_valid is not None else ok

    block_mask = create_block_mask(
        mask_mod, B if key_valid is not None else None, H if _pattern_heads(spec, H) > 1 else None, S, S,
        device=query.device,
    )
    fn = flex_attention
    if query.is_cuda:
        if _FLEX_COMPILED is None:
            _FLEX_COMPILED = torch.compile(flex_attention, dynamic=False)
        fn = _FLEX_COMPILED
    out = fn(query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=key.shape[1] != H)
    return out.transpose(1, 2).contiguous()


def _flex_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------ the registered function
_SPECS: dict = {}


def _spec_of(config) -> LongGenSpec:
    raw = getattr(config, "longgen", None)
    if not raw:
        raise ValueError("attn_implementation 'longgen_sparse' needs config.longgen (call apply_longgen)")
    key = repr(sorted(raw.items()))
    if key not in _SPECS:
        _SPECS[key] = LongGenSpec.from_dict(dict(raw))
    return _SPECS[key]


def _bool_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    if mask is None or mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2  # additive float mask: 0 = visible, very negative = not


def _key_padding(mask: torch.Tensor | None, n: int) -> tuple[bool, torch.Tensor | None]:
    """(is_plain, key_valid [B, n]): is the [B, 1, n, n] mask exactly causal ∧ key padding?"""
    if mask is None:
        return True, None
    if mask.shape[-2:] != (n, n) or mask.shape[1] != 1:
        return False, None
    key_valid = mask[:, 0, -1, :]  # the last query sees every non-padded key
    causal = torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()
    return bool(torch.equal(mask[:, 0], causal[None] & key_valid[:, None, :])), key_valid


def longgen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface function: full layers -> SDPA; sparse layers -> the spec's kernel.

    Key slots come from LongGenCache (`key._longgen_slots`, set by its update) or are 0..K-1; the queries
    are the last q_len slots (the cache update put the current tokens last).
    """
    spec = _spec_of(module.config)
    documents = _documents(kwargs.get("document_ids"), query, key)
    if module.layer_idx in spec.full_layers:
        if documents is not None and attention_mask is None:
            attention_mask = _same_document_causal(documents)
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    if dropout:
        raise ValueError("LongGen sparse layers do not implement attention dropout")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    q_len, k_len = query.shape[2], key.shape[2]
    slots = getattr(key, "_longgen_slots", None)
    mask = _bool_mask(attention_mask)
    if slots is None:
        slots = torch.arange(k_len, device=query.device)
        total = k_len
    else:
        total = int(slots[-1]) + 1
    kernel = spec.kernel
    if kernel == "auto":
        kernel = "flex" if _flex_available(query.device) else "block"
    if documents is not None:
        return per_document_attention(spec, kernel, query, key, value, documents, scaling), None
    contiguous = q_len == k_len == total  # a causal prefix: block / flex kernels apply
    if kernel != "dense" and contiguous:
        plain, key_valid = _key_padding(mask, k_len)
        if plain:
            if kernel == "flex":
                fn = flex_attention_kernel
            else:  # "block": chunked SDPA over key slices where the pattern allows, else gathered key blocks
                fn = chunked_attention if _chunkable(spec, query) else block_attention
            return fn(spec, query, key, value, key_valid, scaling), None
    q_slots = torch.arange(total - q_len, total, device=query.device)
    padding = None
    if mask is not None:  # [B, 1, q, total] over absolute slots -> the columns of the keys we hold
        padding = mask[:, :, -q_len:, :].index_select(-1, slots.to(mask.device))
    return dense_attention(spec, query, key, value, q_slots, slots, padding, scaling), None


# --------------------------------------------------------------------------- packed documents (training)
def _documents(document_ids, query, key):
    """The [B, S] document ids of a packed training batch (longext passes them with data.document_mask), when the
    queries and keys are that whole sequence; None otherwise (inference, single documents)."""
    if document_ids is None or not query.shape[2] == key.shape[2] == document_ids.shape[-1]:
        return None
    return document_ids.to(query.device)


def _same_document_causal(documents: torch.Tensor) -> torch.Tensor:
    """[B, 1, S, S] bool: k <= q within the same document."""
    S = documents.shape[-1]
    causal = torch.ones(S, S, dtype=torch.bool, device=documents.device).tril()
    return (causal & (documents[:, :, None] == documents[:, None, :]))[:, None]


def per_document_attention(spec, kernel, query, key, value, documents, scaling):
    """Sparse attention over a packed row as if each document were alone: every run of equal document ids is a
    causal prefix of its own, whose slots (sinks, window, blocks) count from the document's first token, through the
    spec's kernel. query [B, H, S, d], key/value [B, KV, S, d] -> [B, S, H, d]."""
    rows = []
    for b in range(query.shape[0]):
        ids = documents[b]
        cuts = (torch.nonzero(ids[1:] != ids[:-1]).flatten() + 1).tolist()
        outs = []
        for start, stop in zip([0, *cuts], [*cuts, ids.shape[0]]):
            q, k, v = (x[b:b + 1, :, start:stop] for x in (query, key, value))
            outs.append(_prefix_attention(spec, kernel, q, k, v, scaling))
        rows.append(torch.cat(outs, dim=1))
    return torch.cat(rows, dim=0)


def _prefix_attention(spec, kernel, query, key, value, scaling):
    """One causal prefix (slots 0..S-1, no padding) through `kernel` (block, flex or dense)."""
    if kernel == "flex":
        return flex_attention_kernel(spec, query, key, value, None, scaling)
    if kernel == "block":
        fn = chunked_attention if _chunkable(spec, query) else block_attention
        return fn(spec, query, key, value, None, scaling)
    slots = torch.arange(query.shape[2], device=query.device)
    return dense_attention(spec, query, key, value, slots, slots, None, scaling)


def register_longgen_attention() -> None:
    """Register "longgen_sparse" (and SDPA's mask builder under that name, so padding reaches it)."""
    AttentionInterface.register(ATTN_NAME, longgen_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def _base(model):
    """The transformers PreTrainedModel under a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def apply_longgen(model, spec: LongGenSpec) -> None:
    """Make this model instance hybrid: config.longgen = spec; sparse layers read only the pattern.

    Full layers run SDPA with the usual mask. Idempotent; works on a peft-wrapped model too.
    """
    base = _base(model)
    config = base.config.get_text_config(decoder=True)
    spec.check_layers(config.num_hidden_layers)
    register_longgen_attention()
    config.longgen = spec.to_dict()
    base.config.longgen = spec.to_dict()
    base.set_attn_implementation(ATTN_NAME)


# ------------------------------------------------------------------------------------------- cache
class LongGenSparseLayer(DynamicLayer):
    """Cache layer of a sparse layer: keeps the keys a query at a later slot can read, and their slots."""

    def __init__(self, spec: LongGenSpec, num_heads: int):
        super().__init__()
        self.spec, self.num_heads = spec, num_heads
        self.cumulative_length = 0
        self.slots = None

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        self.slots = torch.empty(0, dtype=torch.long, device=key_states.device)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        new = torch.arange(self.cumulative_length, self.cumulative_length + n, device=self.slots.device)
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        slots = torch.cat([self.slots, new])
        self.cumulative_length += n
        keep = _retained(self.spec, slots, self.cumulative_length, self.num_heads)
        if bool(keep.all()):
            self.keys, self.values, self.slots = keys, values, slots
        else:
            idx = keep.nonzero().squeeze(-1)
            self.keys, self.values = keys.index_select(-2, idx), values.index_select(-2, idx)
            self.slots = slots[idx]
        keys._longgen_slots = slots  # read by longgen_attention: which absolute slot each returned key has
        return keys, values

    def get_seq_length(self) -> int:
        return self.cumulative_length  # absolute: position ids keep counting past the evicted keys

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def reset(self) -> None:
        super().reset()
        self.slots = None

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError("LongGenCache sparse layers cannot be cropped (evicted keys are gone)")


class LongGenCache(DynamicCache):
    """DynamicCache whose sparse layers keep only what their pattern can still read; full layers keep all."""

    def __init__(self, config, spec: LongGenSpec | None = None):
        config = config.get_text_config(decoder=True)
        spec = spec or LongGenSpec.from_dict(dict(config.longgen))
        heads = config.num_attention_heads
        layers = [
            DynamicLayer() if i in spec.full_layers else LongGenSparseLayer(spec, heads)
            for i in range(config.num_hidden_layers)
        ]
        Cache.__init__(self, layers=layers)


def kv_bytes(cache) -> int:
    """Bytes held by the cached keys and values of all layers."""
    total = 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            if t is not None:
                total += t.numel() * t.element_size()
    return total


# ---------------------------------------------------------------------------------- exported model
class _LongGenCausalLM:
    """Mixin for the exported CausalLM classes: the family's model with LongGen applied from config.longgen at init;
    generate uses LongGenCache by default."""

    def __init__(self, config):
        super().__init__(config)
        apply_longgen(self, LongGenSpec.from_dict(dict(config.longgen)))

    def _check_and_adjust_attn_implementation(self, attn_implementation, is_init_check=False, **kwargs):
        register_longgen_attention()  # from_pretrained resolves the name before __init__ runs
        if getattr(self.config, "longgen", None):
            return ATTN_NAME
        return super()._check_and_adjust_attn_implementation(attn_implementation, is_init_check, **kwargs)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        if (model_kwargs.get("past_key_values") is None and generation_config.use_cache is not False
                and generation_config.cache_implementation in (None, "dynamic")):
            model_kwargs["past_key_values"] = LongGenCache(self.config)
            return
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)


def _same_checkpoint_layout(model_type: str, family: str) -> None:
    """transformers saves some families in the hub's layout (Mixtral's and Qwen3-MoE's experts one tensor per
    expert) and converts them when it loads its own model types; our model_type gets the family's conversions too."""
    try:
        from transformers.conversion_mapping import (
            get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping,
        )
    except ImportError:  # a transformers without conversions saves what it loads
        return
    mapping = get_checkpoint_conversion_mapping(family)
    if mapping is not None:
        register_checkpoint_conversion_mapping(model_type, mapping, overwrite=True)


def _export_pair(name: str, model_type: str, config_cls, model_cls):
    """The exported config and CausalLM classes of one family. Their model_type is LongGen's own, so that
    transformers without trust_remote_code refuses the folder instead of loading it as all-full attention."""
    config = type(f"LongGen{name}Config", (config_cls,), {
        "__module__": __name__, "model_type": f"longext_longgen_{model_type}",
        "__annotations__": {"longgen": "dict | None"}, "longgen": None,
    })
    model = type(f"LongGen{name}ForCausalLM", (_LongGenCausalLM, model_cls),
                 {"__module__": __name__, "config_class": config})
    _same_checkpoint_layout(config.model_type, model_type)
    return config, model


LongGenLlamaConfig, LongGenLlamaForCausalLM = _export_pair("Llama", "llama", LlamaConfig, LlamaForCausalLM)
LongGenMistralConfig, LongGenMistralForCausalLM = _export_pair("Mistral", "mistral", MistralConfig, MistralForCausalLM)
LongGenQwen2Config, LongGenQwen2ForCausalLM = _export_pair("Qwen2", "qwen2", Qwen2Config, Qwen2ForCausalLM)
LongGenQwen3Config, LongGenQwen3ForCausalLM = _export_pair("Qwen3", "qwen3", Qwen3Config, Qwen3ForCausalLM)
LongGenPhi3Config, LongGenPhi3ForCausalLM = _export_pair("Phi3", "phi3", Phi3Config, Phi3ForCausalLM)
LongGenOlmo2Config, LongGenOlmo2ForCausalLM = _export_pair("Olmo2", "olmo2", Olmo2Config, Olmo2ForCausalLM)
LongGenMixtralConfig, LongGenMixtralForCausalLM = _export_pair("Mixtral", "mixtral", MixtralConfig, MixtralForCausalLM)
LongGenQwen3MoeConfig, LongGenQwen3MoeForCausalLM = _export_pair("Qwen3Moe", "qwen3_moe", Qwen3MoeConfig,
                                                                 Qwen3MoeForCausalLM)

# family model_type -> (config class, CausalLM class): what `longext export` names in auto_map (Gemma 2/3: LongGen
# does not apply, see longext's docs/models.md)
EXPORT_CLASSES = {
    "llama": (LongGenLlamaConfig, LongGenLlamaForCausalLM),
    "mistral": (LongGenMistralConfig, LongGenMistralForCausalLM),
    "qwen2": (LongGenQwen2Config, LongGenQwen2ForCausalLM),
    "qwen3": (LongGenQwen3Config, LongGenQwen3ForCausalLM),
    "phi3": (LongGenPhi3Config, LongGenPhi3ForCausalLM),
    "olmo2": (LongGenOlmo2Config, LongGenOlmo2ForCausalLM),
    "mixtral": (LongGenMixtralConfig, LongGenMixtralForCausalLM),
    "qwen3_moe": (LongGenQwen3MoeConfig, LongGenQwen3MoeForCausalLM),
}
