"""Passkey retrieval (Mohtashami & Jaggi 2023, "Landmark Attention", §4.2): find a number hidden at a
given depth of L tokens of filler. Prompts are sized by counting tokens, not characters."""

from __future__ import annotations

import math
import random
import re
import time
from dataclasses import dataclass
from typing import Callable

import torch

from longext.errors import LongextError
from longext.evaluate.stats import wilson_interval
from longext.lengths import format_length
from longext.recipe import PasskeySpec

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
CLASSIC_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
EXTRA_TOKENS = 3  # new tokens beyond the digits: a leading space, a period, tokenizers that group digits


@dataclass(frozen=True)
class PasskeyPrompt:
    """One prompt: `ids` (<= the requested length), the needle's first token index, and its filler split."""

    ids: list[int]
    key: str
    depth: float
    needle_at: int  # token index where the needle text starts
    sentences_before: int  # filler sentences before / after the needle
    sentences_after: int


def filler_sentences(text: str | None = None) -> list[str]:
    """Sentences to repeat as filler: the classic five, or the sentences of `text` (e.g. a book)."""
    text = CLASSIC_FILLER if text is None else text
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split()))]
    sentences = [s for s in sentences if s]
    if not sentences:
        raise LongextError("passkey filler: the text has no sentences")
    return sentences


def prompt_text(sentences: list[str], offset: int, before: int, after: int, key: str) -> tuple[str, str]:
    """(text up to the needle, whole prompt) with `before` + `after` filler sentences cycled from `offset`."""
    filler = [" " + sentences[(offset + i) % len(sentences)] for i in range(before + after)]
    head = INTRO + "".join(filler[:before])
    return head, head + NEEDLE.format(key=key) + "".join(filler[before:]) + QUESTION


def passkey_prompt(tokenizer, length: int, key: str, depth: float,
                   sentences: list[str] | None = None, offset: int = 0) -> PasskeyPrompt:
    """The longest prompt (whole filler sentences) of at most `length` tokens, needle at `depth` of the filler.

    Raises:
        LongextError: `length` cannot even hold the intro, needle and question.
    """
    sentences = sentences or filler_sentences()

    def build(n: int) -> tuple[str, list[int]]:
        before = round(depth * n)
        head, text = prompt_text(sentences, offset, before, n - before, key)
        return head, tokenizer(text)["input_ids"]

    bare = len(build(0)[1])
    if bare > length:
        raise LongextError(f"passkey at {format_length(length)}: the prompt needs at least {bare} tokens")
    cycle = len(build(len(sentences))[1]) - bare
    per = max(cycle / len(sentences), 1e-9)  # tokens per filler sentence, on average
    n = int((length - bare) / per)
    n = largest_fitting(lambda k: len(build(k)[1]), n, length, per)
    head, ids = build(n)
    before = round(depth * n)
    needle_at = len(tokenizer(head)["input_ids"])
    return PasskeyPrompt(ids, key, depth, needle_at, before, n - before)


def largest_fitting(count: Callable[[int], int], n: int, length: int, per: float) -> int:
    """Largest k with count(k) <= length, from the estimate n; count grows with k by ~`per` a step."""
    tokens = count(n)
    for _ in range(64):
        if tokens > length:
            n = max(0, n - max(1, math.ceil((tokens - length) / per)))
        elif count(n + 1) > length:
            return n
        else:
            n += max(1, int((length - tokens) / per))
        tokens = count(n)
    while n > 0 and count(n) > length:  # only reached if the jumps above never settled
        n -= 1
    return n


def trial_key(seed: int, length: int, trial: int, digits: int) -> str:
    """The passkey of one trial: the same for every model, different per length and trial."""
    rng = random.Random(f"passkey:{seed}:{length}:{trial}")
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def answer_is_correct(answer: str, key: str) -> bool:
    """True when the first run of digits in the generated answer is exactly the key."""
    found = re.search(r"\d+", answer)
    return found is not None and found.group() == key


def generate_answer(model, tokenizer, ids: list[int], max_new_tokens: int,
                    done: Callable[[str], bool] | None = None) -> str:
    """Greedy continuation of ids (with the KV cache), decoded without special tokens.

    `done(text)`, when given, is asked after every new token and ends generation early once it is true (RULER:
    once the answer holds every reference, more text cannot change its score).
    """
    from transformers import StoppingCriteria, StoppingCriteriaList

    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)  # [1, s]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    class Done(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
            text = tokenizer.decode(input_ids[0, x.shape[1] :], skip_special_tokens=True)
            return torch.tensor([done(text)], device=input_ids.device)

    with torch.inference_mode():
        out = model.generate(
            input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=pad, use_cache=True,
            stopping_criteria=StoppingCriteriaList([Done()]) if done else None,
        )
    return tokenizer.decode(out[0, x.shape[1] :], skip_special_tokens=True)


def passkey_at_lengths(
    model,
    tokenizer,
    lengths: list[int],
    spec: PasskeySpec,
    seed: int,
    *,
    filler: str | None = None,
    set_length: Callable[[int], None] | None = None,
    progress: Callable[[str, int], None] | None = None,
) -> dict[int, dict]:
    """Accuracy of passkey retrieval at each length, with every trial recorded.

    Trial i at length L hides `trial_key(seed, L, i)` at depth `spec.depths[i % len(depths)]`;
    `filler` is text to take sentences from (default: the classic grass/sky/sun lines).
    """
    sentences = filler_sentences(filler)

    def trial(length: int, i: int) -> Trial:
        key = trial_key(seed, length, i, spec.digits)
        depth = spec.depths[i % len(spec.depths)]
        offset = random.Random(f"filler:{seed}:{length}:{i}").randrange(len(sentences))
        prompt = passkey_prompt(tokenizer, length, key, depth, sentences, offset if filler else 0)
        return Trial(prompt.ids, spec.digits + EXTRA_TOKENS, lambda answer: {
            "trial": i, "depth": depth, "key": key, "answer": answer, "correct": answer_is_correct(answer, key),
            "prompt_tokens": len(prompt.ids), "needle_at": prompt.needle_at,
        })

    return run_trials(model, tokenizer, lengths, spec.trials, "passkey", trial, set_length, progress)


@dataclass(frozen=True)
class Trial:
    """One retrieval question: the prompt, how many tokens to generate, and the record of a given answer."""

    ids: list[int]
    max_new_tokens: int
    record: Callable[[str], dict]
    done: Callable[[str], bool] | None = None  # ends generation early (generate_answer)


def run_trials(model, tokenizer, lengths: list[int], trials: int, label: str, trial: Callable[[int, int], Trial],
               set_length: Callable[[int], None] | None, progress: Callable[[str, int], None] | None) -> dict[int, dict]:
    """Greedy answers to `trial(length, i)` for each length (ascending) and i < trials: per length the accuracy,
    its 95 % Wilson interval (`ci95`), the counts, the seconds and every trial's record (which says whether it was
    `correct`)."""
    out = {}
    for length in sorted(set(lengths)):
        if set_length:
            set_length(length)
        name = f"{label} {format_length(length)}"
        records, started = [], time.perf_counter()
        for i in range(trials):
            question = trial(length, i)
            if progress:
                progress(name, 0)
            answer = generate_answer(model, tokenizer, question.ids, question.max_new_tokens, question.done)
            if progress:
                progress(name, len(question.ids))
            records.append(question.record(answer))
        correct = sum(r["correct"] for r in records)
        out[length] = {
            "accuracy": correct / len(records), "correct": correct, "trials": len(records),
            "ci95": list(wilson_interval(correct, len(records))), "seconds": time.perf_counter() - started,
            "records": records,
        }
    return out
