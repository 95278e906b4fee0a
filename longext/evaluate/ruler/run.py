"""Run RULER tasks on a loaded model: samples through the passkey runner (greedy, KV cache, one length at a
time with the method's set_length), scored with RULER's metrics, aggregated per task and length with intervals.
"""

from __future__ import annotations

import re
import time
from typing import Callable

from longext.errors import LongextError
from longext.evaluate.passkey import Trial, run_trials
from longext.evaluate.ruler.qa import load_qa
from longext.evaluate.ruler.samples import Sources, build_sample
from longext.evaluate.ruler.tasks import QA_TASKS, SYNTHETIC, TASKS, postprocess, sample_score
from longext.evaluate.ruler.words import word_pool
from longext.evaluate.stats import wilson_interval
from longext.recipe import RulerSpec


def chosen_tasks(spec: RulerSpec, qa_sets: dict | None = None) -> list[str]:
    """The tasks to run: `spec.tasks`, or every synthetic task plus each QA task whose dataset was given.

    Raises:
        LongextError: a QA task is asked for without its dataset.
    """
    qa_sets = qa_sets or {}
    if not spec.tasks:
        return [*SYNTHETIC, *(t for t, d in QA_TASKS.items() if d in qa_sets)]
    missing = [t for t in spec.tasks if t in QA_TASKS and QA_TASKS[t] not in qa_sets]
    if missing:
        where = f"{spec.qa!r} has no" if spec.qa else "no --ruler-qa file gives"
        raise LongextError(f"--tasks: {', '.join(missing)} need{'s' if len(missing) == 1 else ''} local "
                           f"{' and '.join(QA_TASKS[t] for t in missing)} data: {where} it (RULER's squad.json / "
                           f"hotpotqa.json; see docs/eval.md#ruler)")
    return list(dict.fromkeys(spec.tasks))


def load_sources(spec: RulerSpec, text_field: str = "text") -> Sources:
    """The essay haystack (eval.ruler.haystack: `books` or texts), the cwe word pool and the QA sets."""
    from longext.data import load_documents
    from longext.materials import resolve_texts

    field = "eval.ruler.haystack"
    texts = load_documents(resolve_texts([spec.haystack], split="eval", field=field), text_field)
    words = re.sub(r"\s+", " ", " ".join(texts)).strip().split(" ") if texts else []
    if len(words) < 100:
        raise LongextError(f"{field}: {spec.haystack!r} has {len(words)} words; the essay haystack needs real text "
                           f"(books, or text files)")
    qa = load_qa(spec.qa, "--ruler-qa") if spec.qa else {}
    return Sources(words, word_pool(texts), qa)


def check_ruler(tokenizer, lengths: list[int], tasks: list[str], spec: RulerSpec, seed: int, sources: Sources) -> None:
    """Build the first sample of every task at the shortest length (and cwe's at the longest: its word pool can
    run out): every problem stops the eval before the first forward pass."""
    for name in tasks:
        build_sample(TASKS[name], tokenizer, min(lengths), seed, 0, sources, spec.chat)
        if TASKS[name].family == "cwe" and max(lengths) != min(lengths):
            build_sample(TASKS[name], tokenizer, max(lengths), seed, 0, sources, spec.chat)


def answer_complete(references: list[str], metric: str) -> Callable[[str], bool]:
    """True once the answer's score can no longer rise: every reference found (`all`), or one (`part`)."""
    return lambda text: sample_score(text, references, metric) == 1.0


def ruler_at_lengths(
    model,
    tokenizer,
    lengths: list[int],
    spec: RulerSpec,
    seed: int,
    sources: Sources,
    *,
    tasks: list[str] | None = None,
    set_length: Callable[[int], None] | None = None,
    progress: Callable[[str, int], None] | None = None,
) -> dict[int, dict]:
    """Per length: every task's score (mean of its samples' RULER scores, in [0, 1]) with its 95 % interval, the
    average over tasks, and every sample's record. Samples are a function of (seed, task, length, index)."""
    tasks = tasks or chosen_tasks(spec, sources.qa)

    def trial(length: int, i: int) -> Trial:
        task = TASKS[tasks[i // spec.samples]]
        started = time.perf_counter()
        sample = build_sample(task, tokenizer, length, seed, i % spec.samples, sources, spec.chat)

        def record(answer: str) -> dict:
            score = sample_score(answer, sample.references, task.metric)
            return {"task": task.name, "sample": sample.index, "prompt_tokens": len(sample.ids),
                    "units": sample.units, "references": sample.references, "answer": postprocess(answer),
                    "score": score, "correct": score == 1.0, "seconds": time.perf_counter() - started}

        return Trial(sample.ids, task.tokens_to_generate, record, answer_complete(sample.references, task.metric))

    rows = run_trials(model, tokenizer, lengths, len(tasks) * spec.samples, "ruler", trial, set_length, progress)
    return {length: summarize(row["records"], tasks, row["seconds"]) for length, row in rows.items()}


def summarize(records: list[dict], tasks: list[str], seconds: float) -> dict:
    """One length's results: per task score / ci95 / samples / correct / seconds / records, and the average."""
    out: dict = {"tasks": {}}
    for name in tasks:
        mine = [r for r in records if r["task"] == name]
        total = sum(r["score"] for r in mine)
        out["tasks"][name] = {
            "score": total / len(mine), "ci95": list(wilson_interval(total, len(mine))), "samples": len(mine),
            "correct": sum(r["correct"] for r in mine), "seconds": sum(r["seconds"] for r in mine), "records": mine,
        }
    scores = [t["score"] for t in out["tasks"].values()]
    total, n = sum(r["score"] for r in records), len(records)
    out.update({"score": sum(scores) / len(scores), "ci95": list(wilson_interval(total, n)), "samples": n,
                "seconds": seconds})
    return out
