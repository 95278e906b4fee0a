"""Sizing a prompt to a token budget: the largest haystack (in whole units) whose tokenized prompt fits.

RULER sizes each task by a binary search over the number of haystack units (essay words, noise lines, needle
lines, listed words, documents). The same search here, started from a linear estimate so that a 128k prompt
takes a handful of tokenizations instead of seventeen.
"""

from __future__ import annotations

from typing import Callable


def largest_fit(count: Callable[[int], int], limit: int, capacity: int | None = None, probe: int = 16) -> int | None:
    """Largest n in [0, capacity] with count(n) <= limit, or None when even count(0) is over.

    count(n) = tokens of the prompt with n haystack units; it grows with n by roughly a constant per unit (not
    strictly: merges at unit boundaries can shift a token). Only values whose count was checked are returned.
    """
    base = count(0)
    if base > limit:
        return None
    top = capacity if capacity is not None else 1 << 40
    lo, lo_count, hi, hi_count = 0, base, None, None
    n = min(probe, top)
    while hi is None and n > lo:  # gallop up by linear extrapolation until a count is over the limit
        c = count(n)
        if c > limit:
            hi, hi_count = n, c
            break
        lo, lo_count = n, c
        if n == top:
            return n
        per = max((c - base) / n, 1e-6)
        n = min(top, n + max(1, int((limit - c) / per)))
    if hi is None:
        return lo
    step = 0
    while hi - lo > 1:  # interpolate within the bracket, every other step bisect: at most ~2 log2(hi - lo) counts
        guess = lo + int((limit - lo_count) * (hi - lo) / max(hi_count - lo_count, 1))
        n = guess if step % 2 == 0 and lo < guess < hi else (lo + hi) // 2
        step += 1
        c = count(n)
        if c <= limit:
            lo, lo_count = n, c
        else:
            hi, hi_count = n, c
    return lo
