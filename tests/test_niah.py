"""Multi-key needle in a haystack: prompt layout, trial determinism, scoring, report and `longext eval --niah`."""

from __future__ import annotations

import json
import re

import pytest

from longext.errors import LongextError
from longext.evaluate import niah as nh
from longext.evaluate.passkey import answer_is_correct, filler_sentences
from longext.evaluate.report import depth_grid, markdown, rich_table, write_report
from longext.recipe import NiahSpec

from conftest import synthetic_text


def is_word_key(key: str) -> bool:
    """RULER's `words` keys: adjective-noun pairs like 'brave-lantern'."""
    from longext.evaluate.ruler.words import ADJECTIVES, NOUNS

    adjective, _, noun = key.partition("-")
    return adjective in ADJECTIVES and noun in NOUNS


def needles_for(spec: NiahSpec, depth: float, trial: int = 0, length: int = 1000, seed: int = 0):
    return nh.trial_needles(seed, length, trial, spec, depth)


# ---------------------------------------------------------------------------------------- trials
def test_trial_needles_are_deterministic_distinct_and_sized_by_the_spec():
    spec = NiahSpec(needles=6, digits=7)
    for trial in range(20):
        needles, query = needles_for(spec, 0.3, trial)
        assert needles == needles_for(spec, 0.3, trial)[0] and query is needles[0] and query.depth == 0.3
        assert len({n.key for n in needles}) == len({n.value for n in needles}) == 6
        assert all(len(n.value) == 7 and n.value.isdigit() and n.value[0] != "0" for n in needles)
        assert all(0.0 <= n.depth <= 1.0 and is_word_key(n.key) for n in needles)
    assert needles_for(spec, 0.3, 0)[0] != needles_for(spec, 0.3, 0, seed=1)[0]
    assert needles_for(spec, 0.3, 0)[0] != needles_for(spec, 0.3, 0, length=2000)[0]
    assert needles_for(spec, 0.3, 0)[0] != needles_for(spec, 0.3, 1)[0]


# ---------------------------------------------------------------------------------------- prompts
@pytest.mark.parametrize("length", [400, 512, 777, 1500])
def test_prompt_has_the_requested_length_within_one_sentence(tiny_tokenizer, length):
    needles, query = needles_for(NiahSpec(), 0.5, length=length)
    prompt = nh.niah_prompt(tiny_tokenizer, length, needles, query)
    longest_sentence = max(len(tiny_tokenizer(" " + s)["input_ids"]) for s in filler_sentences())
    assert length - longest_sentence - 2 <= len(prompt.ids) <= length
    text = tiny_tokenizer.decode(prompt.ids)
    assert text.startswith(nh.INTRO) and text.endswith(nh.QUESTION.format(key=query.key))


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_every_needle_appears_once_in_depth_order_and_the_asked_one_at_its_depth(tiny_tokenizer, depth):
    needles, query = needles_for(NiahSpec(needles=5), depth, trial=3)
    prompt = nh.niah_prompt(tiny_tokenizer, 1000, needles, query)
    text = tiny_tokenizer.decode(prompt.ids)
    sentences = [nh.NEEDLE.format(key=n.key, value=n.value) for n in prompt.needles]
    assert all(text.count(s) == 1 for s in sentences)
    at = [text.index(s) for s in sentences]
    assert at == sorted(at) and sorted(n.depth for n in prompt.needles) == [n.depth for n in prompt.needles]
    rest = tiny_tokenizer.decode(prompt.ids[prompt.needle_at:]).lstrip()
    assert rest.startswith(nh.NEEDLE.format(key=query.key, value=query.value))
    # round(depth x n) of the n filler sentences come before the asked-for needle (each classic sentence has one '.')
    filler = text[len(nh.INTRO) : text.index(nh.QUESTION.format(key=query.key))]
    for n in prompt.needles:
        filler = filler.replace(nh.NEEDLE.format(key=n.key, value=n.value), "")
    before = text[len(nh.INTRO) : text.index(nh.NEEDLE.format(key=query.key, value=query.value))]
    for n in prompt.needles:
        before = before.replace(nh.NEEDLE.format(key=n.key, value=n.value), "")
    assert before.count(".") == round(depth * filler.count("."))


def test_book_text_can_be_the_filler(tiny_tokenizer):
    needles, query = needles_for(NiahSpec(), 0.5)
    prompt = nh.niah_prompt(tiny_tokenizer, 600, needles, query, filler_sentences(synthetic_text(400, 3)), offset=7)
    text = tiny_tokenizer.decode(prompt.ids)
    assert 530 <= len(prompt.ids) <= 600 and f"magic numbers for {query.key} is: {query.value}." in text


def test_length_too_short_for_the_bare_prompt_is_an_error(tiny_tokenizer):
    needles, query = needles_for(NiahSpec(needles=4), 0.5)
    with pytest.raises(LongextError, match=r"^needle in a haystack at 60: the prompt needs at least \d+ tokens \(4 needles\)"):
        nh.niah_prompt(tiny_tokenizer, 60, needles, query)


# ---------------------------------------------------------------------------------------- scoring
def test_niah_on_a_tiny_random_model_returns_well_formed_deterministic_records(tiny_llama, tiny_tokenizer):
    spec = NiahSpec(trials=4, depths=[0.2, 0.8], needles=3, digits=4)
    calls = []
    rows = nh.niah_at_lengths(tiny_llama, tiny_tokenizer, [448, 384], spec, seed=3, set_length=calls.append)
    assert list(rows) == [384, 448] and calls == [384, 448]
    for length, row in rows.items():
        assert row["trials"] == 4 and row["correct"] == sum(r["correct"] for r in row["records"])
        assert [r["depth"] for r in row["records"]] == [0.2, 0.8, 0.2, 0.8]
        for i, r in enumerate(row["records"]):
            needles, query = nh.trial_needles(3, length, i, spec, r["depth"])
            assert (r["key"], r["value"], r["needles"]) == (query.key, query.value, 3)
            assert r["prompt_tokens"] <= length and r["correct"] == answer_is_correct(r["answer"], query.value)
            hits = [n.key for n in needles[1:] if answer_is_correct(r["answer"], n.value)]
            assert r["distractor"] == (hits[0] if hits else None)
        assert row["distractor_answers"] == sum(r["distractor"] is not None for r in row["records"])
    again = nh.niah_at_lengths(tiny_llama, tiny_tokenizer, [384], spec, seed=3)
    assert [r["answer"] for r in again[384]["records"]] == [r["answer"] for r in rows[384]["records"]]


# ---------------------------------------------------------------------------------------- report
def record(depth: float, correct: bool) -> dict:
    return {"depth": depth, "correct": correct, "distractor": None if correct else "apple"}


def niah_results() -> dict:
    ppl = {"1024": {"ppl": 20.0, "seconds": 1.0}, "2048": {"ppl": 40.0, "seconds": 2.0}}
    niah = {"1024": {"accuracy": 1.0, "correct": 2, "trials": 2, "seconds": 2.0, "distractor_answers": 0,
                     "records": [record(0.1, True), record(0.9, True)]},
            "2048": {"accuracy": 0.5, "correct": 1, "trials": 2, "seconds": 4.0, "distractor_answers": 1,
                     "records": [record(0.1, True), record(0.9, False)]}}
    key = {L: {**row, "records": [record(r["depth"], not r["correct"]) for r in row["records"]]}
           for L, row in niah.items()}
    return {
        "target": "runs/demo", "lengths": [1024, 2048], "original_context": 1024, "target_context": 2048,
        "reference_length": 1024, "settings": {"niah": NiahSpec().model_dump()}, "machine": {"cpu": "test"},
        "models": [{"name": "demo", "baseline": False, "perplexity": ppl, "passkey": key, "niah": niah}],
    }


def test_depth_grid_counts_each_length_and_depth_cell():
    lengths, depths, cells = depth_grid(niah_results()["models"][0]["niah"])
    assert (lengths, depths) == ([1024, 2048], [0.1, 0.9])
    assert cells == {(1024, 0.1): (1, 1), (1024, 0.9): (1, 1), (2048, 0.1): (1, 1), (2048, 0.9): (0, 1)}


def test_report_has_the_needle_table_column_and_plots(tmp_path):
    from rich.console import Console

    out = write_report(tmp_path / "eval", niah_results())
    assert {"niah.png", "niah-depth.png", "passkey.png", "passkey-depth.png"} <= {p.name for p in out.iterdir()}
    assert all((out / f).read_bytes()[:4] == b"\x89PNG" for f in ("niah.png", "niah-depth.png"))
    md = markdown(niah_results())
    assert "## Needle in a haystack (multi-key)" in md and "| 2k (target) | 1/2 (9–91 %) |" in md
    assert "Answers that gave a distractor needle's number: demo 1." in md
    assert "- needle in a haystack: 6 trials per length, 4 needles (7-digit numbers)" in md
    table = rich_table(niah_results())
    assert [c.header for c in table.columns][-1] == "needle"
    console = Console(record=True, width=200)
    console.print(table)
    assert "1/2" in console.export_text()
    assert json.loads((out / "eval.json").read_text())["models"][0]["niah"]["2048"]["correct"] == 1


# ---------------------------------------------------------------------------------------- command
def test_eval_niah_end_to_end_on_a_saved_tiny_model(tiny_model_dir, tmp_path):
    from longext.cli import main

    out = tmp_path / "report"
    code = main(["eval", str(tiny_model_dir), "--lengths", "320,384", "--niah", "--no-passkey", "--no-ppl",
                 "--trials", "2", "--set", "niah.needles=2", "--set", "niah.digits=3", "--out", str(out)])
    assert code == 0
    (model,) = json.loads((out / "eval.json").read_text())["models"]
    assert "passkey" not in model and "perplexity" not in model
    assert list(model["niah"]) == ["320", "384"] and all(row["trials"] == 2 for row in model["niah"].values())
    assert all(r["needles"] == 2 and len(r["value"]) == 3 for row in model["niah"].values() for r in row["records"])
    assert {"eval.md", "niah.png", "niah-depth.png"} <= {p.name for p in out.iterdir()}


def test_eval_stops_before_any_forward_pass_when_a_length_cannot_hold_the_needles(tiny_model_dir, tmp_path):
    from longext.evaluate.run import EvalRequest, run_eval

    request = EvalRequest.from_cli(tiny_model_dir, lengths="128,512", niah=True, passkey=False, perplexity=False,
                                   out=tmp_path / "r")
    with pytest.raises(LongextError, match=r"^needle in a haystack at 128: the prompt needs at least \d+ tokens"):
        run_eval(request)
    assert not (tmp_path / "r").exists()


def test_correct_and_distractor_answers_are_counted(tiny_llama, tiny_tokenizer, monkeypatch):
    """No model this small answers a needle question, so the answerer here reads the prompt it is given: the
    asked-for number on even trials, the first distractor's number on odd ones. It also checks that every prompt
    holds the asked key's needle."""
    import re

    asked = []

    def reader(model, tokenizer, ids, max_new_tokens, done=None):
        text = tokenizer.decode(ids)
        key = re.search(r"What is the special magic number for ([\w-]+)", text).group(1)
        numbers = dict(re.findall(r"magic numbers for ([\w-]+) is: (\d+)\.", text))
        asked.append(key)
        other = next(value for name, value in numbers.items() if name != key)
        return f" {numbers[key]}." if len(asked) % 2 == 1 else f" {other}."

    from longext.evaluate import passkey

    monkeypatch.setattr(passkey, "generate_answer", reader)  # what run_trials calls for passkey and needle alike
    spec = NiahSpec(trials=4, depths=[0.3, 0.7], needles=3, digits=5)
    row = nh.niah_at_lengths(tiny_llama, tiny_tokenizer, [600], spec, seed=1)[600]
    assert (row["correct"], row["accuracy"], row["distractor_answers"]) == (2, 0.5, 2)
    assert [r["correct"] for r in row["records"]] == [True, False, True, False]
    assert [r["key"] for r in row["records"]] == asked
    assert all(is_word_key(r["distractor"]) and r["distractor"] != r["key"] for r in row["records"][1::2])


def test_needle_prompt_is_the_ruler_suites_niah_multikey_1_prompt(tiny_tokenizer):
    """One version of the task: the same template, needle sentence and key/value draws as `--suite ruler`'s
    niah_multikey_1, only the placement and the haystack are this module's."""
    import random

    from longext.evaluate.ruler.needles import niah_draft
    from longext.evaluate.ruler.tasks import TASKS

    needles, query = needles_for(NiahSpec(needles=4), 0.5)
    _, text = nh.prompt_text(filler_sentences(), 0, 12, needles, query)
    draft = niah_draft(TASKS["niah_multikey_1"], random.Random(0), words=[])
    body, prefix = draft.render(0)  # RULER's prompt with an empty haystack: just its needles
    ruler_text = body + prefix
    assert ruler_text.startswith(nh.INTRO) and text.startswith(nh.INTRO)
    assert ruler_text.endswith(nh.QUESTION.format(key=draft.query)) and text.endswith(nh.QUESTION.format(key=query.key))
    for n in needles:
        assert text.count(nh.NEEDLE.format(key=n.key, value=n.value)) == 1
    assert all(re.fullmatch(nh.NEEDLE.format(key=r"[a-z]+-[a-z]+", value=r"\d{7}").replace(".", r"\."), line)
               for line in draft.needles)
