"""One RULER sample, sized to a length: draft (random choices) -> the largest haystack that fits -> token ids.

Length as RULER counts it: the whole input the model reads, i.e. the task template, the answer prefix and (with
`chat`) the tokenizer's chat template, tokenized as it is fed (with the tokenizer's special tokens), **plus** the
task's generation budget (RULER's max_seq_length "includes all input tokens and generated tokens"). So a 4k
niah prompt is at most 4096 - 128 tokens and the answer still ends within 4096 positions.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from longext.errors import LongextError
from longext.evaluate.ruler.aggregate import cwe_draft, fwe_draft
from longext.evaluate.ruler.fit import largest_fit
from longext.evaluate.ruler.needles import niah_draft, vt_draft
from longext.evaluate.ruler.qa import QaSet, qa_draft
from longext.evaluate.ruler.tasks import RulerTask
from longext.lengths import format_length

EXAMPLE_TOKENS = 500  # RULER's budget for the solved variable-tracking example; L // 8 below 4k


@dataclass(frozen=True)
class Sources:
    """What the generators draw from: the essay haystack's words, the common-words pool, the QA sets."""

    words: list[str]
    pool: list[str]
    qa: dict[str, QaSet]


@dataclass(frozen=True)
class Sample:
    """A prompt ready to run: `ids` (prompt + budget within the length), its text, what a right answer contains
    (`references`) and the inserted pieces that must each occur once in it (`needles`)."""

    task: str
    index: int
    ids: list[int]
    text: str
    references: list[str]
    needles: list[str]
    units: int  # haystack units the search settled on


def prompt_text(tokenizer, body: str, prefix: str, chat: bool) -> str:
    """The input as the model sees it: the task, in the chat template's user turn when `chat`, then the answer
    prefix (RULER appends it after the model template, so the model continues the answer)."""
    if not chat:
        return body + prefix
    turn = [{"role": "user", "content": body}]
    return tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True) + prefix


def encode(tokenizer, text: str, chat: bool) -> list[int]:
    """Token ids as fed: with the tokenizer's special tokens, except after a chat template (it has its own)."""
    return tokenizer(text, add_special_tokens=not chat)["input_ids"]


def draft(task: RulerTask, rng: random.Random, sources: Sources, length: int, tokens: Callable[[str], int],
          seed: int, index: int):
    """The task family's draft for one sample (see needles.py, aggregate.py, qa.py)."""
    family = task.family
    if family == "niah":
        return niah_draft(task, rng, sources.words)
    if family == "vt":
        return vt_draft(task, rng, tokens, min(EXAMPLE_TOKENS, length // 8))
    if family == "cwe":
        return cwe_draft(task, rng, sources.pool, length)
    if family == "fwe":
        return fwe_draft(task, rng, length)
    dataset = task.args["dataset"]
    if dataset not in sources.qa:
        raise LongextError(f"ruler {task.name}: needs a local {dataset} file (--ruler-qa)")
    return qa_draft(sources.qa[dataset], rng, random.Random(f"ruler-qa:{seed}:{task.name}"), index)


def build_sample(task: RulerTask, tokenizer, length: int, seed: int, index: int, sources: Sources,
                 chat: bool = False) -> Sample:
    """Sample `index` of `task` at `length`: a function of (seed, task, length, index) only.

    Raises:
        LongextError: the length cannot hold the task's smallest prompt plus its generation budget, or a finite
            source (the word pool, the QA documents) runs out before the prompt is full.
    """
    rng = random.Random(f"ruler:{seed}:{task.name}:{length}:{index}")

    def plain(text: str) -> int:  # vt's solved example is sized on its own, as plain text inside the task
        return len(encode(tokenizer, text, False))

    d = draft(task, rng, sources, length, plain, seed, index)
    budget = length - task.tokens_to_generate

    def text(n: int) -> str:
        return prompt_text(tokenizer, *d.render(n), chat)

    n = largest_fit(lambda k: len(encode(tokenizer, text(k), chat)), budget, d.capacity)
    if n is None or n < d.minimum:
        need = len(encode(tokenizer, text(d.minimum), chat)) + task.tokens_to_generate
        raise LongextError(f"ruler {task.name} at {format_length(length)}: the smallest prompt needs {need} tokens "
                           f"(with the {task.tokens_to_generate} generated); test longer lengths (--lengths)")
    full = text(n)
    ids = encode(tokenizer, full, chat)
    if d.capacity is not None and n == d.capacity and len(ids) < 0.99 * budget:
        raise LongextError(f"ruler {task.name} at {format_length(length)}: {d.exhausted()}")
    return Sample(task.name, index, ids, full, list(d.references), list(d.needles), n)
