"""Confidence intervals for the retrieval rates and RULER scores of the eval report.

With 3 or 10 trials a rate alone says little: 0/3 and 1/3 look different but are not. Every rate the report
prints comes with its 95 % Wilson score interval (Wilson 1927), which unlike the textbook p ± 1.96·sqrt(p(1-p)/n)
stays inside [0, 1] and does not collapse to a point at 0/n or n/n.
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # the 97.5 % quantile of the standard normal: a two-sided 95 % interval


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """(low, high) of the Wilson score interval for a proportion `successes / n`.

        centre = (p + z²/2n) / (1 + z²/n),   half = z / (1 + z²/n) · sqrt(p(1-p)/n + z²/4n²)

    `successes` may be fractional: for the mean of n scores in [0, 1] (a RULER task's string-match score) the
    variance is at most p(1-p), the Bernoulli case, so the same interval is a conservative one for the mean.
    n = 0 gives (0, 1): nothing is known.
    """
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return 0.0, 1.0
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def format_rate(successes: int, n: int) -> str:
    """'7/10 (40–89 %)': the count and its 95 % interval in whole percent, for tables."""
    low, high = wilson_interval(successes, n)
    return f"{successes}/{n} ({format_interval(low, high)})"


def format_interval(low: float, high: float) -> str:
    """'40–89 %' from fractions."""
    return f"{100 * low:.0f}–{100 * high:.0f} %"
