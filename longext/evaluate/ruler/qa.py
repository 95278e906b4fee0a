"""RULER's question answering over many documents (qa_1: SQuAD 2.0, qa_2: HotpotQA), from local copies only.

`--ruler-qa PATH` names a JSON file or a folder of them; each file is recognised by its shape:
- SQuAD (RULER's squad.json = SQuAD 2.0 dev): {"data": [{"paragraphs": [{"context": str, "qas": [{"question": str,
  "answers": [{"text": str}], "is_impossible": bool}]}]}]}; unanswerable questions are skipped;
- HotpotQA (RULER's hotpotqa.json = the dev distractor set): [{"question": str, "answer": str,
  "context": [[title, [sentence, ...]], ...]}].

A sample is one question with its gold document(s) among distractor documents (for SQuAD first the other
paragraphs of the same article, as RULER), as many as fit the length, in a seeded order.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from longext.errors import LongextError
from longext.evaluate.ruler.tasks import QA, QA_DOCUMENT


@dataclass(frozen=True)
class Question:
    query: str
    answers: tuple[str, ...]
    gold: tuple[int, ...]  # indices into QaSet.docs
    related: tuple[int, ...] = ()  # SQuAD: the other paragraphs of the same article


@dataclass(frozen=True)
class QaSet:
    source: str  # the file it came from
    questions: tuple[Question, ...]
    docs: tuple[str, ...]


def read_squad(data: dict, source: str) -> QaSet:
    contexts = sorted({p["context"] for article in data["data"] for p in article["paragraphs"]})
    index = {c: i for i, c in enumerate(contexts)}
    questions = []
    for article in data["data"]:
        article_docs = [index[p["context"]] for p in article["paragraphs"]]
        for p in article["paragraphs"]:
            here = index[p["context"]]
            for qa in p["qas"]:
                if qa.get("is_impossible", False) or not qa.get("answers"):
                    continue
                questions.append(Question(qa["question"], tuple(a["text"] for a in qa["answers"]), (here,),
                                          tuple(i for i in article_docs if i != here)))
    return QaSet(source, tuple(questions), tuple(contexts))


def read_hotpotqa(data: list, source: str) -> QaSet:
    def doc(title: str, sentences: list[str]) -> str:
        return f"{title}\n{''.join(sentences)}"

    docs = sorted({doc(t, s) for item in data for t, s in item["context"]})
    index = {d: i for i, d in enumerate(docs)}
    questions = tuple(Question(item["question"], (item["answer"],), tuple(index[doc(t, s)] for t, s in item["context"]))
                      for item in data)
    return QaSet(source, questions, tuple(docs))


def load_qa(path: str, field_name: str = "--ruler-qa") -> dict[str, QaSet]:
    """{"squad": ..., "hotpotqa": ...} from a JSON file or a folder of them (each recognised by its shape)."""
    root = Path(path).expanduser()
    if not root.exists():
        raise LongextError(f"{field_name}: no such file or folder: {path!r} (expected RULER's squad.json and/or "
                           f"hotpotqa.json, or a folder holding them)")
    files = sorted(root.glob("*.json")) if root.is_dir() else [root]
    found: dict[str, QaSet] = {}
    for file in files:
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise LongextError(f"{field_name}: cannot read {file}: {err}") from None
        try:
            if isinstance(data, dict) and isinstance(data.get("data"), list):
                found.setdefault("squad", read_squad(data, str(file)))
            elif isinstance(data, list) and data and isinstance(data[0], dict) and "context" in data[0]:
                found.setdefault("hotpotqa", read_hotpotqa(data, str(file)))
        except (KeyError, TypeError, ValueError) as err:
            raise LongextError(f"{field_name}: {file} is not in the SQuAD or HotpotQA JSON shape (missing or bad "
                               f"field {err})") from None
    if not found:
        raise LongextError(f"{field_name}: no SQuAD- or HotpotQA-shaped JSON in {path!r}")
    for name, qa in found.items():
        if not qa.questions:
            raise LongextError(f"{field_name}: {qa.source} has no answerable questions")
    return found


@dataclass
class QaDraft:
    """One QA sample: the question, its gold documents and the distractors in the order they are added."""

    question: Question
    docs: tuple[str, ...]
    fill: list[int]  # distractor document indices, in the order they join
    order_seed: float
    minimum: int = 1

    @property
    def references(self) -> list[str]:
        return list(self.question.answers)

    @property
    def needles(self) -> list[str]:
        return [self.docs[i] for i in self.question.gold]

    @property
    def capacity(self) -> int | None:
        return None if self.fill else len(self.question.gold)  # distractors are cycled when they run out

    def chosen(self, n: int) -> list[int]:
        extra = max(0, n - len(self.question.gold))
        picked = list(self.question.gold) + [self.fill[i % len(self.fill)] for i in range(extra if self.fill else 0)]
        random.Random(f"{self.order_seed}:{n}").shuffle(picked)
        return picked

    def render(self, n: int) -> tuple[str, str]:
        docs = [QA_DOCUMENT.format(i=i + 1, document=self.docs[d]) for i, d in enumerate(self.chosen(n))]
        return QA[0].format(context="\n\n".join(docs), query=self.question.query), QA[1]

    def exhausted(self) -> str:
        return "the QA file has no other documents to fill the prompt with"


def qa_draft(qa: QaSet, rng: random.Random, question_order: random.Random, index: int) -> QaDraft:
    """Sample `index`: the index-th question of a seeded order of the file's questions (the same questions at every
    length), with the same-article paragraphs first among the distractors, then the others."""
    order = list(range(len(qa.questions)))
    question_order.shuffle(order)
    question = qa.questions[order[index % len(order)]]
    related = [i for i in question.related if i not in question.gold]
    rng.shuffle(related)
    taken = set(question.gold) | set(related)
    others = [i for i in range(len(qa.docs)) if i not in taken]
    rng.shuffle(others)
    return QaDraft(question, qa.docs, related + others, rng.random(), minimum=len(question.gold))
