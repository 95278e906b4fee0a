"""RULER's aggregation tasks: common-words extraction (cwe) and frequent-words extraction (fwe).

Both ask for the most frequent words of a long list, so the model must take in the whole context rather than
find one place in it. As in needles.py, a draft fixes every random choice and `render(n)` builds the list for n
haystack units (cwe: distinct words; fwe: the size of the Zipf sample).
"""

from __future__ import annotations

import math
import random
import string
from dataclasses import dataclass, field

from longext.evaluate.ruler.tasks import CWE, FWE, RulerTask

SHORT = 4096  # below this length RULER lists each word fewer times, with a smaller example
TINY = 2048  # below this (shorter than RULER ever goes) the solved example is left out: it alone fills ~1k tokens


def numbered(words: list[str]) -> str:
    """'1. w1 2. w2 ...' (RULER's list format)."""
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


def word_list(words: list[str], common: int, common_repeats: int, other_repeats: int, order_seed: float) -> list[str]:
    """The first `common` words `common_repeats` times each, the rest `other_repeats` times, shuffled."""
    listed = words[:common] * common_repeats + words[common:] * other_repeats
    random.Random(order_seed).shuffle(listed)
    return listed


@dataclass
class CweDraft:
    """One common-words sample: a solved example list, then the list to answer, both from the word pool."""

    words: list[str]  # candidates in draw order: the first n are the sample's words, the first num_cw the common
    example: str
    repeats: tuple[int, int]
    num_cw: int
    order_seed: float
    needles: list[str] = field(default_factory=list)
    minimum: int = 10

    @property
    def capacity(self) -> int:
        return len(self.words)

    @property
    def references(self) -> list[str]:
        return self.words[: self.num_cw]

    def render(self, n: int) -> tuple[str, str]:
        listed = word_list(self.words[:n], self.num_cw, *self.repeats, self.order_seed)
        return self.example + CWE[0].format(context=numbered(listed)), CWE[1]

    def exhausted(self) -> str:
        return (f"its word pool ({len(self.words)} words after the example's) runs out before the prompt is full; "
                f"add texts to eval.ruler.haystack (their words join the pool)")


def cwe_draft(task: RulerTask, rng: random.Random, pool: list[str], length: int) -> CweDraft:
    """RULER's settings: from 4k on, the 10 common words 30 times each and the others 3 times (example: 40 words,
    10 / 3 times); below 4k, 6 / 1 times (example: 20 words, 3 / 1 times); below 2k (longext's addition, for
    smoke tests) 3 / 1 times without the example. The example's words are disjoint from the sample's."""
    a = task.args
    order = list(pool)
    rng.shuffle(order)
    if length < SHORT:
        shot_words, shot_repeats, repeats = 20, (3, 1), (6, 1)
    else:
        shot_words, shot_repeats, repeats = 40, (10, 3), (a["freq_cw"], a["freq_ucw"])
    shots, candidates = order[-shot_words:], order[:-shot_words]
    listed = word_list(shots, a["num_cw"], *shot_repeats, rng.random())
    example = f"{CWE[0].format(context=numbered(listed))}{CWE[1]} {numbered(shots[: a['num_cw']])}\n"
    if length < TINY:
        example, repeats = "", (3, 1)
    return CweDraft(candidates, example, repeats, a["num_cw"], rng.random(), minimum=a["num_cw"])


# ----------------------------------------------------------------------------------------------- fwe
def zeta(alpha: float, terms: int = 1000) -> float:
    """Riemann zeta for alpha > 1: the first `terms` terms plus the Euler-Maclaurin tail (error ~1e-12 at 2)."""
    head = sum(k**-alpha for k in range(1, terms + 1))
    return head + terms ** (1 - alpha) / (alpha - 1) - terms**-alpha / 2


@dataclass
class FweDraft:
    """One frequent-words sample: coded words with Zipf(alpha) counts; the most frequent one is the '...' noise
    the prompt says to ignore, the next three are the answer.

    Haystack unit n maps to the n-th list size N whose answer is unambiguous (the 4th count above the 5th): every N
    from a few dozen words on, so only prompts far shorter than RULER's 4k skip a few sizes.
    """

    vocab: list[str]
    alpha: float
    order_seed: float
    needles: list[str] = field(default_factory=list)
    minimum: int = 0
    capacity: int | None = None

    @property
    def references(self) -> list[str]:
        return self.vocab[1:4]

    def counts(self, size: int) -> list[int]:
        z = zeta(self.alpha)
        return [int(size * k**-self.alpha / z) for k in range(1, len(self.vocab) + 1)]

    def size(self, n: int) -> int:
        """The n-th list size whose answer is unambiguous: the counts of ranks 2-4 all above rank 5's. From
        ceil(zeta / (4^-a - 5^-a)) words on (74 at a = 2) every size is; below, the few that are."""
        z, a = zeta(self.alpha), self.alpha
        rank = lambda size, k: int(size * k**-a / z)  # noqa: E731
        always = math.ceil(z / (4**-a - 5**-a))
        below = [size for size in range(1, always) if rank(size, 4) > rank(size, 5)]
        return below[n] if n < len(below) else always + n - len(below)

    def render(self, n: int) -> tuple[str, str]:
        listed = [w for w, c in zip(self.vocab, self.counts(self.size(n))) for _ in range(c)]
        random.Random(self.order_seed).shuffle(listed)
        return FWE[0].format(context=" ".join(listed)), FWE[1]


def fwe_draft(task: RulerTask, rng: random.Random, length: int) -> FweDraft:
    """RULER's vocabulary: (L - generation budget) // 50 distinct 6-letter coded words, in a seeded order."""
    size = max((length - task.tokens_to_generate) // 50, 5)
    vocab: set[str] = set()
    while len(vocab) < size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=6)))
    words = sorted(vocab)
    rng.shuffle(words)
    words[0] = "..."
    return FweDraft(words, task.args["alpha"], rng.random())
