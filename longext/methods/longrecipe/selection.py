"""Impactful-token selection over sentences (methods.md §4.1.1-4.1.2).

A sentence ends at (and includes) a token whose text ends in `.`, `?` or `!` or holds a newline — the
tokenizer-independent form of the released code's id list {13, 198, 30, 0, 627} for Llama-3. Selection keeps
every sentence that holds an impactful token (`digits`: a token with a digit, the released code's proxy for
the paper's numeral finding) and each other sentence with probability `keep_other`; `none` keeps them all.
Decisions are drawn from a seeded generator, so the same recipe always selects the same sentences. The selection
runs over the token caches and is cached itself (sentences.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from longext.errors import LongextError

SENTENCE_END = (".", "?", "!")
FORMAT = "longext-logit-change/1"  # the ranking file of `longext analyze` (longrecipe/analysis.py)


def token_texts(tokenizer) -> list[str]:
    """Decoded text of every token id."""
    return [tokenizer.decode([i]) for i in range(len(tokenizer))]


def sentence_end_ids(texts: list[str]) -> set[int]:
    return {i for i, t in enumerate(texts) if "\n" in t or t.rstrip().endswith(SENTENCE_END)}


def digit_ids(texts: list[str]) -> set[int]:
    return {i for i, t in enumerate(texts) if any(c.isdigit() for c in t)}


def impactful_ids(selection, texts: list[str]) -> set[int] | None:
    """The token ids that make a sentence impactful for method.selection, or None to keep every sentence."""
    if selection.mode == "digits":
        return digit_ids(texts)
    if selection.mode == "logit_change":
        return load_impactful(selection.analysis, selection.top_fraction, len(texts))
    return None


def is_analysis_file(path: Path) -> bool:
    """A file `longext analyze` wrote (its format tag), so --out may replace it."""
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and report.get("format") == FORMAT


def read_analysis(path: str) -> dict:
    """The ranking file of `longext analyze` at `path` (a recipe path: `~`, `$LONGEXT_CACHE`); LongextError naming
    method.selection.analysis when it cannot be read or is not one."""
    from longext.files import expand_path

    field = "method.selection.analysis"
    try:
        report = json.loads(Path(expand_path(path)).read_text())
    except (OSError, ValueError) as err:
        raise LongextError(f"{field}: cannot read {path}: {err}") from None
    if not isinstance(report, dict) or report.get("format") != FORMAT:
        raise LongextError(f"{field}: {path} is not a file written by `longext analyze` (format {FORMAT})")
    return report


def analysis_problem(path: str) -> str | None:
    try:
        read_analysis(path)
    except LongextError as err:
        return str(err)
    return None


def load_impactful(path: str, top_fraction: float, tokenizer_size: int) -> set[int]:
    """Ids of the top `top_fraction` of the ranked token types (at least one) of an analysis file."""
    field = "method.selection.analysis"
    report = read_analysis(path)
    if report["tokenizer_size"] != tokenizer_size:
        raise LongextError(
            f"{field}: {path} was made with a {report['tokenizer_size']}-token tokenizer, this model's has "
            f"{tokenizer_size}"
        )
    ranked = report["ranking"]
    return {r["id"] for r in ranked[: max(1, math.ceil(top_fraction * len(ranked)))]}
