"""RULER's retrieval and multi-hop tracing tasks: needle in a haystack (8 variants) and variable tracking.

Each sample is a *draft*: every random choice (keys, values, where the needles go, the variable names) is drawn
once from the sample's seeded generator, and `render(n)` lays the same needles into a haystack of n units. The
sizing search (fit.py) then picks the largest n that fits the length, so a prompt depends only on
(seed, task, length, sample) and not on how many sizes the search tried.

Haystacks (RULER's `type_haystack`):
- noise: n copies of the passkey paper's grass/sky/sun lines, one per line;
- essay: the first n words of the haystack texts (RULER: Paul Graham's essays; here the offline books or your
  texts), needles at sentence boundaries, at depths drawn from 40 evenly spaced percentages;
- needle: n distractor needles of the same form (other keys, other values), one per line.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass
from typing import Callable

from longext.evaluate.ruler.fit import largest_fit
from longext.evaluate.ruler.tasks import NIAH_MANY, NIAH_NEEDLE, NIAH_ONE, NOISE, VT, RulerTask
from longext.evaluate.ruler.words import distinct

DEPTHS = tuple(round(100 * i / 39) for i in range(40))  # RULER: np.linspace(0, 100, 40), rounded
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> list[str]:
    """Sentences of `text` (RULER uses nltk's punkt; a split after . ! ? and whitespace is close enough here)."""
    return [s for s in SENTENCE_END.split(text.strip()) if s]


def inserted(units: list[str], items: list[str], fractions: list[float]) -> list[str]:
    """`units` with items[j] placed before unit floor(fractions[j] * len(units)); fractions sorted ascending."""
    out, n = list(units), len(units)
    for j, (item, f) in enumerate(zip(items, fractions)):
        out.insert(min(int(f * n), n) + j, item)
    return out


def essay_context(words: list[str], n: int, needles: list[str], depths: list[int]) -> str:
    """The first n words (cycled when the texts are shorter), needles between sentences at `depths` percent."""
    if not words:
        return " ".join(needles)
    text = " ".join(words[i % len(words)] for i in range(n))
    sentences = split_sentences(text)
    cuts = [0] + sorted(int(len(sentences) * d / 100) for d in depths) + [len(sentences)]
    parts = []
    for i in range(1, len(cuts)):
        parts.append(" ".join(sentences[cuts[i - 1] : cuts[i]]))
        if i - 1 < len(needles):
            parts.append(needles[i - 1])
    return " ".join(parts)


@dataclass
class NiahDraft:
    """One needle-in-a-haystack sample before sizing."""

    task: RulerTask
    needles: list[str]  # in text order
    references: list[str]  # the values asked for
    query: str
    depths: list[int]  # essay: percent depth per needle
    fractions: list[float]  # noise / needle haystacks: relative position per needle
    words: list[str]  # essay words
    distractor: Callable[[int], str]  # needle haystack: the i-th distractor line
    minimum: int = 0
    capacity: int | None = None

    def render(self, n: int) -> tuple[str, str]:
        a = self.task.args
        if a["haystack"] == "essay":
            context = essay_context(self.words, n, self.needles, self.depths)
        else:
            units = [NOISE] * n if a["haystack"] == "noise" else [self.distractor(i) for i in range(n)]
            context = "\n".join(inserted(units, self.needles, self.fractions))
        single = a["num_q"] * a["num_v"] == 1
        body, prefix = NIAH_ONE if single else NIAH_MANY
        type_v = a["type_v"][:-1] if single else a["type_v"]
        return body.format(type_v=type_v, context=context, query=self.query), prefix.format(type_v=type_v, query=self.query)


def niah_draft(task: RulerTask, rng: random.Random, words: list[str]) -> NiahDraft:
    """Keys, values, the asked-for keys and the needle positions of one sample (RULER's niah generator)."""
    a = task.args
    keys = distinct(rng, a["type_k"], a["num_k"])
    values = distinct(rng, a["type_v"], a["num_k"] * a["num_v"])
    by_key = [values[i * a["num_v"] : (i + 1) * a["num_v"]] for i in range(a["num_k"])]
    needles = [NIAH_NEEDLE.format(type_v=a["type_v"], key=k, value=v) for k, vs in zip(keys, by_key) for v in vs]
    rng.shuffle(needles)
    asked = rng.sample(range(a["num_k"]), a["num_q"])
    queries = [keys[i] for i in asked]
    query = f"{', '.join(queries[:-1])}, and {queries[-1]}" if len(queries) > 1 else queries[0]
    depths = rng.sample(DEPTHS, len(needles))
    fractions = sorted(rng.random() for _ in needles)
    hay_rng, hay, taken = random.Random(rng.random()), [], set(keys) | set(values)

    def distractor(i: int) -> str:
        while len(hay) <= i:  # drawn in order and kept, so the i-th line never depends on n
            key, value = distinct(hay_rng, a["type_k"], 1, taken)[0], distinct(hay_rng, a["type_v"], 1, taken)[0]
            hay.append(NIAH_NEEDLE.format(type_v=a["type_v"], key=key, value=value))
        return hay[i]

    return NiahDraft(task, needles, [v for i in asked for v in by_key[i]], query, depths, fractions, words,
                     distractor)


# ------------------------------------------------------------------------------------- variable tracking
def variable_names(rng: random.Random, count: int, letters: int) -> list[str]:
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choices(string.ascii_uppercase, k=letters))
        if name not in names:
            names.append(name)
    return names


def chains(rng: random.Random, num_chains: int, hops: int, letters: int) -> tuple[list[list[str]], list[list[str]]]:
    """(names, lines) per chain: `VAR A = 12345`, then `VAR B = VAR A ` ... (RULER keeps the trailing space)."""
    names = variable_names(rng, num_chains * (hops + 1), letters)
    out_names, out_lines = [], []
    for c in range(num_chains):
        chain = names[c * (hops + 1) : (c + 1) * (hops + 1)]
        lines = [f"VAR {chain[0]} = {rng.randint(10000, 99998)}"]
        lines += [f"VAR {chain[j + 1]} = VAR {chain[j]} " for j in range(hops)]
        out_names.append(chain)
        out_lines.append(lines)
    return out_names, out_lines


def noise_with_chains(n: int, lines: list[list[str]], fractions: list[list[float]]) -> str:
    units = [NOISE] * n
    for chain, where in zip(lines, fractions):
        units = inserted(units, chain, where)
    return "\n".join(units).replace(". \n", ".\n")


@dataclass
class VtDraft:
    """One variable-tracking sample: a few-shot example (its own chain, 3-letter names), then the task."""

    lines: list[list[str]]
    fractions: list[list[float]]
    references: list[str]
    value: str
    example: str  # the solved example block that precedes the task ('' when it does not fit)
    minimum: int = 0
    capacity: int | None = None

    @property
    def needles(self) -> list[str]:
        return [line for chain in self.lines for line in chain]

    def render(self, n: int) -> tuple[str, str]:
        num_v = len(self.references)
        body = VT[0].format(context=noise_with_chains(n, self.lines, self.fractions), query=self.value)
        return self.example + body, VT[1].format(num_v=num_v, query=self.value)


def vt_draft(task: RulerTask, rng: random.Random, tokens: Callable[[str], int], example_budget: int) -> VtDraft:
    """RULER's variable tracking: `num_chains` chains of `num_hops` assignments in the noise haystack; the answer
    is every variable of the first chain. The example is sized to `example_budget` tokens (RULER: 500)."""
    num_chains, hops = task.args["num_chains"], task.args["num_hops"]

    def placed(count: int) -> list[list[float]]:
        return [sorted(rng.random() for _ in range(hops + 1)) for _ in range(count)]

    names, lines = chains(rng, num_chains, hops, letters=5)
    where = placed(num_chains)
    ex_names, ex_lines = chains(rng, num_chains, hops, letters=3)
    ex_where = placed(num_chains)
    ex_value = ex_lines[0][0].split("=")[-1].strip()

    def example(k: int) -> str:
        body = VT[0].format(context=noise_with_chains(k, ex_lines, ex_where), query=ex_value)
        prefix = VT[1].format(num_v=hops + 1, query=ex_value)
        return f"{body}{prefix} {' '.join(ex_names[0])}\n\n"

    k = largest_fit(lambda m: tokens(example(m)), example_budget)
    value = lines[0][0].split("=")[-1].strip()
    return VtDraft(lines, where, names[0], value, example(k) if k is not None else "")
