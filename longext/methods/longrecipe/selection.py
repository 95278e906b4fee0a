"""Impactful-token selection over sentences (methods.md §4.1.1-4.1.2).

A sentence ends at (and includes) a token whose text ends in `.`, `?` or `!` or holds a newline — the
tokenizer-independent form of the released code's id list {13, 198, 30, 0, 627} for Llama-3. Selection keeps
every sentence that holds an impactful token (`digits`: a token with a digit, the released code's proxy for
the paper's numeral finding) and each other sentence with probability `keep_other`; `none` keeps them all.
Decisions are drawn from a seeded generator, so the same recipe always selects the same sentences.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

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


def split_sentences(ids: list[int], ends: set[int]) -> list[list[int]]:
    """Consecutive pieces of `ids`, each ending with a sentence-end token (the last piece may not)."""
    out, current = [], []
    for t in ids:
        current.append(t)
        if t in ends:
            out.append(current)
            current = []
    if current:
        out.append(current)
    return out


def select_sentences(
    sentences: list[list[int]], impactful: set[int] | None, keep_other: float, gen: torch.Generator
) -> list[list[int]]:
    """Sentences holding an impactful token, plus each other one with probability keep_other (order kept).
    `impactful` None keeps every sentence."""
    if impactful is None:
        return list(sentences)
    draws = torch.rand(len(sentences), generator=gen).tolist()
    return [s for s, u in zip(sentences, draws) if u < keep_other or not impactful.isdisjoint(s)]


def fill_samples(sentences: list[list[int]], seq_len: int) -> tuple[list[list[int]], list[list[int]]]:
    """Concatenate sentences into samples of exactly seq_len tokens; returns (samples, segment lengths per
    sample). A sentence that does not fit is continued in the next sample (a separate segment there); the
    last, incomplete sample is dropped."""
    samples, segments, row, segs = [], [], [], []
    for sentence in sentences:
        rest = sentence
        while rest:
            room = seq_len - len(row)
            piece, rest = rest[:room], rest[room:]
            row.extend(piece)
            segs.append(len(piece))
            if len(row) == seq_len:
                samples.append(row)
                segments.append(segs)
                row, segs = [], []
    return samples, segments


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
