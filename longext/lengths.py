"""Token lengths as users write them: `4096`, `4k`, `128k`, `1m` (k = 1024, m = 1024²)."""

from __future__ import annotations

import re

from longext.errors import LongextError

_UNITS = {"": 1, "k": 1024, "m": 1024 * 1024}
_PATTERN = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([km]?)\s*", re.IGNORECASE)
ALLOWED = "a positive whole number of tokens like 4096, 4k, 128k or 1m"
MAX_TOKENS = 1 << 30  # 1024m: a sanity bound, far beyond every published context window (ALST trained 15m)


def parse_length(value: object) -> int:
    """Number of tokens from an int or a string with an optional k/m suffix; ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"expected {ALLOWED}")
    if isinstance(value, int):
        tokens = value
    elif isinstance(value, float) and value.is_integer():
        tokens = int(value)
    elif isinstance(value, str) and (match := _PATTERN.fullmatch(value)):
        scaled = float(match.group(1)) * _UNITS[match.group(2).lower()]
        if not scaled.is_integer():
            raise ValueError(f"{value!r} is not a whole number of tokens; expected {ALLOWED}")
        tokens = int(scaled)
    else:
        raise ValueError(f"expected {ALLOWED}")
    if tokens <= 0:
        raise ValueError(f"expected {ALLOWED}")
    if tokens > MAX_TOKENS:
        raise ValueError(f"{format_length(tokens)} tokens is beyond any model; expected at most {format_length(MAX_TOKENS)}")
    return tokens


def format_length(tokens: int) -> str:
    """Short form for tables and file names: 16384 -> '16k', 1000 -> '1000'."""
    for suffix, unit in (("m", 1024 * 1024), ("k", 1024)):
        if tokens % unit == 0:
            return f"{tokens // unit}{suffix}"
    return str(tokens)


def length_flag(flag: str, value: object) -> int:
    """Tokens from a flag's value like 16k. Raises LongextError naming the flag (one line, exit code 2)."""
    try:
        return parse_length(value)
    except ValueError as err:
        raise LongextError(f"{flag}: {err} (got {value!r})") from None
