"""Position-id samplers: pure functions of lengths and a seeded generator (the data pipeline seeds
them from the recipe seed and the sample's index, so `--resume` draws the same positions).

Every sampler returns integer, non-decreasing position ids `[seq_len]`, plus extra per-sample model
inputs (E2-LLM's RoPE scale); the scale is applied inside the rotary module, so positions fed to RoPE
become fractions `(m + t)/g` without ever being rounded.
"""

from __future__ import annotations

import math

import torch


def pose_positions(seq_len: int, target_len: int, chunks: int, gen: torch.Generator) -> torch.Tensor:
    """PoSE (Zhu et al. 2023, methods.md §2.7): `chunks` contiguous pieces of the window, piece i shifted
    by a skip u_i, 0 = u_0 <= u_1 <= ... <= target_len - seq_len, so positions span [0, target_len).

    Piece lengths come from `chunks - 1` distinct random cut points; the first piece keeps shift 0 as in
    the official code (it evens out how often large relative distances are drawn).
    """
    if not 1 <= chunks <= seq_len <= target_len:
        raise ValueError(f"need 1 <= chunks <= seq_len <= target_len, got {chunks}, {seq_len}, {target_len}")
    cuts = torch.randperm(seq_len - 1, generator=gen)[: chunks - 1].add(1).sort().values
    bounds = torch.cat([torch.zeros(1, dtype=torch.long), cuts, torch.tensor([seq_len])])
    skips = torch.randint(0, target_len - seq_len + 1, (chunks - 1,), generator=gen).sort().values
    skips = torch.cat([torch.zeros(1, dtype=torch.long), skips])
    shift = torch.repeat_interleave(skips, bounds.diff())  # [seq_len]: each token's piece's skip
    return torch.arange(seq_len) + shift


def e2llm_scales(original: int, seq_len: int, g_max: int, scales: list[float] | None = None) -> list[float]:
    """E2-LLM's scale set G (methods.md §3.1): {1..g_max} or the explicit list, keeping only g with
    g*L0 >= R so the offset range t in [0, g*L0 - R] is not empty."""
    candidates = scales if scales else [float(g) for g in range(1, g_max + 1)]
    usable = [float(g) for g in candidates if g * original >= seq_len]
    if not usable:
        raise ValueError(f"no scale g with g * L0 >= R among {candidates} (L0 {original}, R {seq_len})")
    return usable


def e2llm_positions(
    seq_len: int, original: int, scales: list[float], sinks: int, gen: torch.Generator
) -> tuple[torch.Tensor, float]:
    """E2-LLM (Liu et al. 2024, Eq. 5-7): scale g ~ U(G), offset t ~ U{0..floor(g*L0 - R)}; tokens
    m >= `sinks` get position m + t, the first `sinks` keep m. RoPE sees (m + t(m)) / g; the largest
    is (R - 1 + g*L0 - R)/g < L0, inside the pretrained range."""
    g = e2llm_scale(scales, gen)
    return e2llm_shifted(seq_len, original, g, sinks, gen), g


def e2llm_scale(scales: list[float], gen: torch.Generator) -> float:
    """g ~ U(G): one draw per sample."""
    return scales[int(torch.randint(len(scales), (1,), generator=gen))]


def e2llm_shifted(length: int, original: int, g: float, sinks: int, gen: torch.Generator) -> torch.Tensor:
    """Positions of `length` tokens at scale g: m for the first `sinks`, m + t after, t ~ U{0..floor(g*L0 - length)}
    (a document piece of a packed row draws its own t, so its largest position stays below g*L0 too)."""
    t = int(torch.randint(0, math.floor(g * original - length) + 1, (1,), generator=gen))
    positions = torch.arange(length)
    positions[sinks:] += t
    return positions


def e2llm_eval_scale(length: int, original: int, rule: str) -> float:
    """g used at inference for a window of `length` tokens: exact L/L0, its ceiling, or the next power of
    two; never below 1 (methods.md §3.2)."""
    ratio = length / original
    if ratio <= 1:
        return 1.0
    if rule == "exact":
        return ratio
    if rule == "ceil":
        return float(math.ceil(ratio))
    if rule == "pow2":
        return float(2 ** math.ceil(math.log2(ratio)))
    raise ValueError(f"unknown scale rule {rule!r}")


def longrecipe_positions(
    segment_lengths: list[int], target_len: int, gen: torch.Generator, gap_mode: str = "composition",
    max_gap: int | None = None, contiguous_prefix: bool = True,
) -> torch.Tensor:
    """LongRecipe's position index transformation (Hu et al. 2024 §3.2; methods.md §4.1.4, canonical version).

    Positions are contiguous inside each segment (kept sentence); the gap before every segment but the first
    is random. `composition`: all L - B skipped positions go into the n - 1 gaps between segments (a uniformly
    random weak composition), so the first token is at 0 and the last at exactly target_len - 1; the released
    code also leaves a random tail gap, which on short samples (few segments) loses a large part of the
    window. `bounded` (paper): independent gaps in {0..max_gap};
    the caller must keep max_gap small enough (positions past target_len are clipped to target_len - 1 and
    stay non-decreasing). With `contiguous_prefix` the first r ~ U{1..(B+1)//2} tokens get 0..r-1 (PoSE-like
    head, one jump at r; unlike the released code, r is moved to the end of its sentence so that the jump falls
    between sentences). Returns [B] int64 non-decreasing positions.
    """
    lengths = torch.tensor(segment_lengths, dtype=torch.long)
    B, n = int(lengths.sum()), len(segment_lengths)
    if B > target_len or (lengths <= 0).any():
        raise ValueError(f"need positive segment lengths with sum <= target_len, got sum {B}, target {target_len}")
    extra = target_len - B
    if n == 1:
        gaps = torch.zeros(1, dtype=torch.long)
    elif gap_mode == "composition":
        # stars and bars: a uniformly random split of `extra` into the n - 1 gaps between segments
        bars = torch.randperm(extra + n - 2, generator=gen)[: n - 2].sort().values
        edges = torch.cat([torch.tensor([-1]), bars, torch.tensor([extra + n - 2])])
        gaps = torch.cat([torch.zeros(1, dtype=torch.long), edges.diff() - 1])
    elif gap_mode == "bounded":
        if max_gap is None:
            raise ValueError("bounded gap mode needs max_gap")
        gaps = torch.cat([torch.zeros(1, dtype=torch.long), torch.randint(0, max_gap + 1, (n - 1,), generator=gen)])
    else:
        raise ValueError(f"unknown gap mode {gap_mode!r}")
    shift = torch.repeat_interleave(gaps.cumsum(0), lengths)  # [B]: skipped positions before each token
    positions = (torch.arange(B) + shift).clamp(max=target_len - 1)
    if contiguous_prefix:
        r = int(torch.randint(1, (B + 1) // 2 + 1, (1,), generator=gen))
        ends = lengths.cumsum(0)
        r = int(ends[int(torch.searchsorted(ends, r))])  # finish the sentence r falls in: the jump is between sentences
        positions[:r] = torch.arange(r)
    return positions
