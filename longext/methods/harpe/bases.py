"""HARPE base sets (methods.md §5.1): the published table, uniform spacing, an explicit list, and the
peak–valley greedy search. Pure functions of numbers; the recipe and model checks live in
`longext.methods.harpe`.

The peak–valley waveform is a reconstruction: HARPE borrows the search from Attention Buckets and does
not define peaks/valleys. Here A_b(Δ) = Σ_i cos(Δ · b^(−2i/d)) over integer Δ in [0, L), peaks and
valleys are its strict local maxima and minima, and matching is nearest-neighbour (methods.md §5.1).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

# HARPE Table 2: Llama-2-7B, peak–valley with b_min 1M, b_max 5M, stride 30K; heads 1..32, ascending.
HARPE_LLAMA2_32H = tuple(
    m * 1e6
    for m in (
        1.00, 1.15, 1.30, 1.45, 2.17, 2.20, 2.23, 2.47,
        2.50, 2.65, 2.68, 2.71, 2.74, 2.80, 2.83, 2.92,
        3.01, 3.04, 3.10, 3.13, 3.16, 3.22, 3.43, 3.46,
        3.61, 3.88, 4.09, 4.15, 4.39, 4.45, 4.51, 4.54,
    )
)
TABLES = {"harpe_llama2_32h": HARPE_LLAMA2_32H}


def table_bases(name: str, n: int) -> list[float]:
    """The published set for n bases. n = 32: the table itself. n < 32 (GQA: one base per kv group):
    the n entries at evenly spaced ranks round(j * 31 / (n - 1)), so the smallest and the largest
    base are kept and the shape is sampled evenly. n > 32 has no rule and raises ValueError."""
    table = TABLES[name]
    if n > len(table):
        raise ValueError(f"the table has {len(table)} bases, the model needs {n}")
    if n == 1:
        return [table[-1]]
    ranks = np.round(np.linspace(0, len(table) - 1, n)).astype(int)
    return [table[r] for r in ranks]


def rescaled(bases: list[float], low: float, high: float) -> list[float]:
    """Map the set's range [min, max] affinely onto [low, high] (a table's shape at another scale)."""
    lo, hi = min(bases), max(bases)
    if hi == lo:
        return [high for _ in bases]
    return [low + (b - lo) * (high - low) / (hi - lo) for b in bases]


def uniform_bases(b_min: float, b_max: float, n: int) -> list[float]:
    """b_h = b_min + h (b_max − b_min)/(n − 1), h = 0..n−1 (HARPE §3, uniform scheme)."""
    if n == 1:
        return [b_max]
    return [b_min + h * (b_max - b_min) / (n - 1) for h in range(n)]


def ordered(bases: list[float], order: str) -> list[float]:
    """ascending / descending by value, or as_is (the search's pick order, the explicit list's order)."""
    if order == "ascending":
        return sorted(bases)
    if order == "descending":
        return sorted(bases, reverse=True)
    return list(bases)


# ------------------------------------------------------------------------------- peak–valley
def candidate_grid(b_min: float, b_max: float, stride: float) -> np.ndarray:
    """B_c = {b_min + i · stride} up to b_max inclusive (float64)."""
    count = int(np.floor((b_max - b_min) / stride + 1e-9)) + 1
    return b_min + stride * np.arange(count, dtype=np.float64)


def waveform(base: float, dim: int, length: int) -> np.ndarray:
    """A_b(Δ) = Σ_{i<d/2} cos(Δ · b^(−2i/d)) for Δ = 0..length−1 (float64), the RoPE attention upper bound."""
    inv_freq = base ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
    delta = np.arange(length, dtype=np.float64)
    out = np.zeros(length)
    for f in inv_freq:  # one row at a time: length x d/2 never materialised
        out += np.cos(delta * f)
    return out


def peaks_valleys(wave: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions Δ of strict local maxima and minima (interior points only)."""
    left, mid, right = wave[:-2], wave[1:-1], wave[2:]
    peaks = np.nonzero((mid > left) & (mid > right))[0] + 1
    valleys = np.nonzero((mid < left) & (mid < right))[0] + 1
    return peaks, valleys


def _nearest_distance_sum(points: np.ndarray, targets: np.ndarray) -> float:
    """Σ_p |p − nearest target| with targets sorted; an empty target set costs the points' own span."""
    if len(points) == 0:
        return 0.0
    if len(targets) == 0:
        return float(np.abs(points).sum())
    idx = np.clip(np.searchsorted(targets, points), 1, len(targets) - 1)
    left, right = targets[idx - 1], targets[idx]
    return float(np.minimum(np.abs(points - left), np.abs(points - right)).sum())


@lru_cache(maxsize=8)  # resolve and plan both ask; the search at 128k takes tens of seconds
def peak_valley_bases(b_min: float, b_max: float, stride: float, n: int, dim: int, length: int) -> tuple[float, ...]:
    """HARPE Alg. 1 (peak–valley complement), greedy, in pick order; deterministic.

    Start from b_min; each round adds the candidate b minimising
    Σ_{p ∈ peaks(b)} |p − nearest valley so far| + Σ_{v ∈ valleys(b)} |v − nearest peak so far|,
    i.e. whose peaks fill the existing valleys best and vice versa. Ties go to the smaller base.
    """
    grid = candidate_grid(b_min, b_max, stride)
    if n > len(grid):
        raise ValueError(f"the candidate grid has {len(grid)} bases ({b_min:g}..{b_max:g} by {stride:g}), need {n}")
    extrema = [peaks_valleys(waveform(b, dim, length)) for b in grid]
    chosen = [0]
    peaks, valleys = extrema[0]
    while len(chosen) < n:
        best, best_score = None, np.inf
        for j in range(len(grid)):
            if j in chosen:
                continue
            p, v = extrema[j]
            score = _nearest_distance_sum(p, valleys) + _nearest_distance_sum(v, peaks)
            if score < best_score:
                best, best_score = j, score
        chosen.append(best)
        peaks = np.union1d(peaks, extrema[best][0])
        valleys = np.union1d(valleys, extrema[best][1])
    return tuple(float(grid[j]) for j in chosen)
