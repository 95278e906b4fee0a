"""Multi-key needle in a haystack (RULER's niah_multikey_1, Hsieh et al. 2024): several "special magic number"
needles, each under its own key word, hidden in filler; the prompt asks for one key's number.

Harder than passkey retrieval in the way that long-context claims usually fail: the answer must be told
apart from distractor needles of the same form, not just found. The queried needle sits at the trial's
depth; the distractors at seeded random depths. Prompts are sized by counting tokens, like passkey's.

The prompt is the RULER suite's niah_multikey_1 prompt (its template, needle sentence, keys and numbers come from
longext/evaluate/ruler/); what this module adds is passkey-style control: the asked-for needle at a chosen depth,
the classic or book filler, and scoring by the first number of a short answer, which tells a distractor's number
from a miss. `--suite ruler` runs the same task RULER's way (random depths, the essay haystack, string match).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from longext.errors import LongextError
from longext.evaluate.passkey import EXTRA_TOKENS, Trial, answer_is_correct, filler_sentences, run_trials
from longext.evaluate.ruler.fit import largest_fit
from longext.evaluate.ruler.tasks import NIAH_NEEDLE, NIAH_ONE
from longext.evaluate.ruler.words import distinct, number
from longext.lengths import format_length
from longext.recipe import NiahSpec

_BEFORE, _AFTER = NIAH_ONE[0].split("{context}")
INTRO = _BEFORE.format(type_v="number")  # "A special magic number is hidden within the following text. ...\n"
NEEDLE = NIAH_NEEDLE.replace("{type_v}", "numbers")  # "One of the special magic numbers for {key} is: {value}."
QUESTION = (_AFTER + NIAH_ONE[1]).replace("{type_v}", "number").replace("{query}", "{key}")


@dataclass(frozen=True)
class Needle:
    key: str
    value: str
    depth: float  # relative position among the filler sentences (0 = start)


@dataclass(frozen=True)
class NiahPrompt:
    """One prompt: `ids` (<= the requested length), the needles in text order and which one is asked for."""

    ids: list[int]
    needles: tuple[Needle, ...]
    query: Needle
    needle_at: int  # token index where the queried needle's sentence starts


def trial_needles(seed: int, length: int, trial: int, spec: NiahSpec, depth: float) -> tuple[list[Needle], Needle]:
    """The trial's needles (the queried one at `depth`, the others at random depths) and the queried one: the same
    for every model, different per length and trial; distinct adjective-noun keys and distinct values."""
    rng = random.Random(f"niah:{seed}:{length}:{trial}")
    keys = distinct(rng, "words", spec.needles)
    values: list[str] = []
    while len(values) < spec.needles:
        value = number(rng, spec.digits)
        if value not in values:
            values.append(value)
    depths = [depth] + [rng.random() for _ in range(spec.needles - 1)]
    needles = [Needle(k, v, d) for k, v, d in zip(keys, values, depths)]
    return needles, needles[0]


def prompt_text(sentences: list[str], offset: int, n: int, needles: list[Needle], query: Needle) -> tuple[str, str]:
    """(text up to the queried needle, whole prompt): n filler sentences cycled from `offset`, each needle inserted
    before filler sentence round(depth * n) (ties keep the needles' order), the pieces joined by spaces as RULER
    joins its essay haystack, inside RULER's template."""
    slots = sorted(range(len(needles)), key=lambda i: (round(needles[i].depth * n), i))
    pieces, head = [], None
    order = iter(slots)
    nxt = next(order, None)
    for s in range(n + 1):
        while nxt is not None and round(needles[nxt].depth * n) == s:
            if needles[nxt] is query:
                head = INTRO + " ".join(pieces)
            pieces.append(NEEDLE.format(key=needles[nxt].key, value=needles[nxt].value))
            nxt = next(order, None)
        if s < n:
            pieces.append(sentences[(offset + s) % len(sentences)])
    text = INTRO + " ".join(pieces) + QUESTION.format(key=query.key)
    return head if head is not None else "", text


def niah_prompt(tokenizer, length: int, needles: list[Needle], query: Needle,
                sentences: list[str] | None = None, offset: int = 0) -> NiahPrompt:
    """The longest prompt (whole filler sentences) of at most `length` tokens.

    Raises:
        LongextError: `length` cannot even hold the intro, the needles and the question.
    """
    sentences = sentences or filler_sentences()

    def build(n: int) -> tuple[str, list[int]]:
        head, text = prompt_text(sentences, offset, n, needles, query)
        return head, tokenizer(text)["input_ids"]

    n = largest_fit(lambda k: len(build(k)[1]), length, probe=len(sentences))
    if n is None:
        raise LongextError(f"needle in a haystack at {format_length(length)}: the prompt needs at least "
                           f"{len(build(0)[1])} tokens ({len(needles)} needle{'s' if len(needles) != 1 else ''})")
    head, ids = build(n)
    ordered = tuple(sorted(needles, key=lambda x: (round(x.depth * n), needles.index(x))))
    return NiahPrompt(ids, ordered, query, len(tokenizer(head)["input_ids"]))


def niah_at_lengths(
    model,
    tokenizer,
    lengths: list[int],
    spec: NiahSpec,
    seed: int,
    *,
    filler: str | None = None,
    set_length: Callable[[int], None] | None = None,
    progress: Callable[[str, int], None] | None = None,
) -> dict[int, dict]:
    """Accuracy of multi-key needle retrieval at each length, with every trial recorded.

    Trial i at length L asks for a needle at depth `spec.depths[i % len(depths)]`, with `spec.needles - 1`
    distractors; `filler` is text to take sentences from (default: the classic grass/sky/sun lines).
    """
    sentences = filler_sentences(filler)

    def trial(length: int, i: int) -> Trial:
        depth = spec.depths[i % len(spec.depths)]
        needles, query = trial_needles(seed, length, i, spec, depth)
        offset = random.Random(f"niah-filler:{seed}:{length}:{i}").randrange(len(sentences))
        prompt = niah_prompt(tokenizer, length, needles, query, sentences, offset if filler else 0)

        def record(answer: str) -> dict:
            distractor = next((x.key for x in needles[1:] if answer_is_correct(answer, x.value)), None)
            return {
                "trial": i, "depth": depth, "key": query.key, "value": query.value, "answer": answer,
                "correct": answer_is_correct(answer, query.value), "distractor": distractor,
                "needles": len(needles), "prompt_tokens": len(prompt.ids), "needle_at": prompt.needle_at,
            }

        return Trial(prompt.ids, spec.digits + EXTRA_TOKENS, record)

    rows = run_trials(model, tokenizer, lengths, spec.trials, "needle", trial, set_length, progress)
    for row in rows.values():
        row["distractor_answers"] = sum(r["distractor"] is not None for r in row["records"])
    return rows
