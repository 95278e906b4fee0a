"""RULER suite: every task's generator against a reference solver written here, RULER's scorer against hand-made
answers, the intervals against the formula, and `longext eval --suite ruler` end to end on a tiny model."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from longext.errors import LongextError
from longext.evaluate.ruler.fit import largest_fit
from longext.evaluate.ruler.qa import load_qa
from longext.evaluate.ruler.samples import Sources, build_sample
from longext.evaluate.ruler.tasks import SYNTHETIC, TASKS, postprocess, sample_score
from longext.evaluate.ruler.words import word_pool
from longext.evaluate.stats import format_rate, wilson_interval

TOY = Path(__file__).resolve().parents[1] / "bench" / "toy-base"  # a committed 1024-token BPE trained on books


@pytest.fixture(scope="module")
def toy_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOY)


@pytest.fixture(scope="module")
def sources(corpus_dir) -> Sources:
    """The test corpus as the essay haystack; its ~80 distinct words plus 4225 made-up ones for cwe's pool."""
    import itertools

    texts = [p.read_text() for p in sorted(corpus_dir.glob("*.txt"))]
    made_up = " ".join("".join(w) for w in itertools.product("bcdfgklmnprst", "aeiou", "bcdfgklmnprst", "aeiou"))
    return Sources(" ".join(texts).split(), word_pool([*texts, made_up]), {})


# ------------------------------------------------------------------------------------- reference solvers
def solve_niah(text: str) -> list[str]:
    """Values of the asked-for keys, read off the prompt: the question names the keys; the needles give values."""
    asked = re.search(r"What (?:is|are all) the special magic \w+ for (.+?) mentioned in the provided text\?", text)
    keys = re.split(r", and |, ", asked.group(1))
    needles = re.findall(r"One of the special magic \w+ for (\S+) is: (\S+)\.", text)
    return [value for key in keys for k, value in needles if k == key]


def solve_vt(text: str) -> set[str]:
    """Every variable that ends up holding the asked-for value, by following the assignments of the task part."""
    task = text[text.rindex("Memorize and track") :]
    value = re.search(r"assigned the value (\d+) in the text above", task).group(1)
    holding = {name for name, v in re.findall(r"VAR (\w+) = (\d+)", task) if v == value}
    links = re.findall(r"VAR (\w+) = VAR (\w+)", task)
    while True:
        more = {a for a, b in links if b in holding} - holding
        if not more:
            return holding
        holding |= more


def top_words(listed: list[str], k: int) -> tuple[set[str], int, int]:
    """(the k most frequent, the k-th count, the (k+1)-th count)."""
    ranked = Counter(listed).most_common()
    return {w for w, _ in ranked[:k]}, ranked[k - 1][1], ranked[k][1] if len(ranked) > k else 0


def solve_cwe(text: str) -> set[str]:
    task = text[text.rindex("Below is a numbered list") :]
    listed = re.findall(r"\d+\. ([a-z]+)", task.split("\nQuestion:")[0])
    common, kth, next_count = top_words(listed, 10)
    assert kth > next_count  # the answer is unambiguous
    return common


def solve_fwe(text: str) -> set[str]:
    context = text.split("coded words. ", 1)[1].split("\nQuestion:")[0]
    listed = [w for w in context.split() if w != "..."]
    top, kth, next_count = top_words(listed, 3)
    assert kth > next_count
    return top


# ----------------------------------------------------------------------------------------------- generators
@pytest.mark.parametrize("name", SYNTHETIC)
@pytest.mark.parametrize("length", [8192, 16384])
def test_generator_fills_the_length_places_each_needle_once_and_the_answer_follows(toy_tokenizer, sources, name,
                                                                                    length):
    task = TASKS[name]
    sample = build_sample(task, toy_tokenizer, length, seed=0, index=1, sources=sources)
    total = len(sample.ids) + task.tokens_to_generate  # RULER: prompt + generation budget <= the length
    assert 0.99 * length <= total <= length
    assert sample.ids == toy_tokenizer(sample.text)["input_ids"]
    for needle in sample.needles:
        assert sample.text.count(needle) == 1, needle
    if task.family == "niah":
        assert sorted(solve_niah(sample.text)) == sorted(sample.references)
        assert len(sample.needles) == task.args["num_k"] * task.args["num_v"]
        for value in sample.references:
            assert sample.text.count(value) == 1
    elif task.family == "vt":
        assert solve_vt(sample.text) == set(sample.references) and len(sample.references) == 5
    elif task.family == "cwe":
        assert solve_cwe(sample.text) == set(sample.references)
    else:
        assert solve_fwe(sample.text) == set(sample.references)


def test_samples_are_a_function_of_seed_task_length_and_index(toy_tokenizer, sources):
    build = lambda **kw: build_sample(TASKS["niah_multikey_1"], toy_tokenizer, **{"length": 2048, "seed": 0,  # noqa: E731
                                                                                 "index": 0, "sources": sources, **kw})
    first = build()
    assert build().ids == first.ids
    for changed in (build(index=1), build(seed=1), build(length=2560)):
        assert changed.references != first.references


def test_prompt_ends_with_rulers_answer_prefix_and_asks_in_the_singular_for_one_value(toy_tokenizer, sources):
    one = build_sample(TASKS["niah_single_2"], toy_tokenizer, 2048, 0, 0, sources)
    assert one.text.startswith("A special magic number is hidden within the following text.")
    assert one.text.endswith(f" The special magic number for {solve_key(one.text)} mentioned in the provided text is")
    many = build_sample(TASKS["niah_multivalue"], toy_tokenizer, 2048, 0, 0, sources)
    assert many.text.startswith("Some special magic numbers are hidden") and many.text.endswith("provided text are")
    vt = build_sample(TASKS["vt"], toy_tokenizer, 2048, 0, 0, sources)
    assert vt.text.count("Memorize and track") == 2  # the solved example, then the task
    value = re.findall(r"value (\d+) in the text above", vt.text)[-1]
    assert vt.text.endswith(f"5 variables are assigned the value {value}, they are: ")


def solve_key(text: str) -> str:
    return re.search(r"for (\S+) mentioned in the provided text\?", text).group(1)


def test_noise_and_needle_haystacks_are_rulers(toy_tokenizer, sources):
    noise = build_sample(TASKS["niah_single_1"], toy_tokenizer, 2048, 0, 0, sources)
    lines = noise.text.split("\n")[1:-1]
    assert set(lines) - set(noise.needles) == {"The grass is green. The sky is blue. The sun is yellow. Here we go. "
                                               "There and back again."}
    hay = build_sample(TASKS["niah_multikey_3"], toy_tokenizer, 2048, 0, 0, sources)
    lines = hay.text.split("\n")[1:-1]
    uuid = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
    assert len(lines) == hay.units + 1 and all(re.fullmatch(rf"One of the special magic uuids for {uuid} is: {uuid}\.",
                                                            line) for line in lines)


def test_chat_template_wraps_the_task_and_the_answer_prefix_follows(toy_tokenizer, sources):
    tok = toy_tokenizer.__class__.from_pretrained(TOY)
    tok.chat_template = "{% for m in messages %}<|user|>{{ m['content'] }}<|end|>{% endfor %}<|assistant|>"
    sample = build_sample(TASKS["fwe"], tok, 2048, 0, 0, sources, chat=True)
    assert sample.text.startswith("<|user|>Read the following coded text")
    assert sample.text.endswith("<|end|><|assistant|> Answer: According to the coded text above, the three most "
                                "frequently appeared words are:")
    assert sample.ids == tok(sample.text, add_special_tokens=False)["input_ids"]
    assert 0.99 * 2048 <= len(sample.ids) + 50 <= 2048


def test_too_short_a_length_names_the_task_and_what_it_needs(toy_tokenizer, sources):
    with pytest.raises(LongextError, match=r"^ruler cwe at 256: the smallest prompt needs \d+ tokens"):
        build_sample(TASKS["cwe"], toy_tokenizer, 256, 0, 0, sources)


def test_a_word_pool_that_runs_out_is_named(toy_tokenizer):
    small = Sources("Some words here. And more.".split() * 50, word_pool([]), {})
    with pytest.raises(LongextError, match=r"^ruler cwe at 64k: its word pool \(\d+ words"):
        build_sample(TASKS["cwe"], toy_tokenizer, 65536, 0, 0, small)


def test_largest_fit_equals_the_brute_force_answer_and_respects_the_capacity():
    def count(n: int) -> int:
        return 37 + 19 * n + (n % 5 == 0) * 3  # not monotone at every step, like merges at unit boundaries

    for limit in (30, 40, 41, 500, 4096, 70000):
        fits = [n for n in range(0, 5000) if count(n) <= limit]
        assert largest_fit(count, limit) == (max(fits) if fits else None)
    assert largest_fit(count, 70000, capacity=10) == 10


# ------------------------------------------------------------------------------------------------------ qa
def squad_json(n_articles: int = 6) -> dict:
    """SQuAD 2.0's shape: articles of paragraphs with answerable and unanswerable questions."""
    data = []
    for a in range(n_articles):
        paragraphs = []
        for p in range(4):
            context = (f"Paragraph {a}-{p} tells of the town of Vale{a}{p}. Its old mill was built by mason "
                       f"Ardo{a}{p} in the year 17{a}{p}. The river there runs north and the hills are green.")
            paragraphs.append({"context": context, "qas": [
                {"id": f"q{a}{p}", "question": f"Who built the old mill of Vale{a}{p}?", "is_impossible": False,
                 "answers": [{"text": f"mason Ardo{a}{p}", "answer_start": 0}, {"text": f"Ardo{a}{p}", "answer_start": 0}]},
                {"id": f"x{a}{p}", "question": "Who painted the moon?", "is_impossible": True, "answers": [],
                 "plausible_answers": [{"text": "nobody", "answer_start": 0}]},
            ]})
        data.append({"title": f"Vale {a}", "paragraphs": paragraphs})
    return {"version": "v2.0", "data": data}


def hotpot_json(n: int = 12) -> list:
    """HotpotQA's dev-distractor shape: each question with its (title, sentences) documents."""
    items = []
    for i in range(n):
        context = [[f"Title {i}-{j}", [f"Person {i}-{j} was born in Harbor{i}{j}. ", "They liked boats."]]
                   for j in range(4)]
        items.append({"_id": f"h{i}", "question": f"Where was Person {i}-0 born?", "answer": f"Harbor{i}0",
                      "context": context, "supporting_facts": [[f"Title {i}-0", 0]], "type": "bridge",
                      "level": "easy"})
    return items


@pytest.fixture(scope="module")
def qa_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("qa")
    (d / "squad.json").write_text(json.dumps(squad_json()))
    (d / "hotpotqa.json").write_text(json.dumps(hotpot_json()))
    return d


def test_qa_files_are_read_by_shape_and_unanswerable_questions_skipped(qa_dir):
    sets = load_qa(str(qa_dir))
    assert set(sets) == {"squad", "hotpotqa"}
    assert len(sets["squad"].questions) == 24 and len(sets["squad"].docs) == 24
    assert all(len(q.related) == 3 for q in sets["squad"].questions)  # the other paragraphs of its article
    assert len(sets["hotpotqa"].questions) == 12 and len(sets["hotpotqa"].docs) == 48
    assert load_qa(str(qa_dir / "hotpotqa.json")).keys() == {"hotpotqa"}


@pytest.mark.parametrize("name", ["qa_1", "qa_2"])
def test_qa_prompt_holds_the_gold_documents_once_among_distractors(toy_tokenizer, sources, qa_dir, name):
    qa = Sources(sources.words, sources.pool, load_qa(str(qa_dir)))
    sample = build_sample(TASKS[name], toy_tokenizer, 4096, 0, 2, qa)
    assert 0.99 * 4096 <= len(sample.ids) + 32 <= 4096
    question = re.search(r"Question: (.+?) Answer:$", sample.text).group(1)
    gold = [doc for doc in sample.needles]
    assert gold and all(sample.text.count(doc) == 1 for doc in gold)
    # reference solver: the document that names the question's subject holds the answer
    subject = re.search(r"(Vale\d+|Person \d+-\d+)", question).group(1)
    holder = next(doc for doc in gold if subject in doc)
    assert any(ref in holder for ref in sample.references)
    numbers = re.findall(r"Document (\d+):", sample.text)
    assert numbers == [str(i + 1) for i in range(len(numbers))] and len(numbers) > 10
    again = build_sample(TASKS[name], toy_tokenizer, 8192, 0, 2, qa)
    assert re.search(r"Question: (.+?) Answer:$", again.text).group(1) == question  # same question at every length


def test_bad_qa_paths_are_one_line_errors(tmp_path):
    with pytest.raises(LongextError, match=r"^--ruler-qa: no such file or folder: '.*nowhere'"):
        load_qa(str(tmp_path / "nowhere"))
    (tmp_path / "x.json").write_text('{"data": [{"paragraphs": [{"qas": []}]}]}')
    with pytest.raises(LongextError, match=r"^--ruler-qa: .*x.json is not in the SQuAD or HotpotQA JSON shape"):
        load_qa(str(tmp_path / "x.json"))
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(LongextError, match=r"^--ruler-qa: cannot read .*x.json"):
        load_qa(str(tmp_path))


# -------------------------------------------------------------------------------------------------- scoring
@pytest.mark.parametrize("answer, references, metric, score", [
    (" 1234567.", ["1234567"], "all", 1.0),
    (" The numbers are 1234567 and 7654321.", ["1234567", "7654321", "1111111", "2222222"], "all", 0.5),
    ("  APPLE, Pear\x00banana ", ["apple", "pear", "banana"], "all", 1.0),
    ("nothing", ["apple"], "all", 0.0),
    (" Ardo12 built it", ["mason Ardo12", "Ardo12"], "part", 1.0),
    (" the mason", ["mason Ardo12", "Ardo12"], "part", 0.0),
])
def test_sample_score_is_rulers_string_match(answer, references, metric, score):
    assert sample_score(answer, references, metric) == score


def test_postprocess_turns_control_characters_into_newlines_and_strips():
    assert postprocess("  a\tb\x01c \n") == "a\nb\nc"


def test_summary_is_the_mean_per_task_and_the_average_with_wilson_intervals():
    from longext.evaluate.ruler.run import summarize

    records = [{"task": t, "score": s, "correct": s == 1.0, "seconds": 1.0}
               for t, s in (("a", 1.0), ("a", 0.5), ("b", 0.0), ("b", 0.25))]
    out = summarize(records, ["a", "b"], seconds=9.0)
    assert out["tasks"]["a"]["score"] == 0.75 and out["tasks"]["b"]["score"] == 0.125
    assert out["tasks"]["a"]["correct"] == 1 and out["tasks"]["a"]["samples"] == 2
    assert out["score"] == pytest.approx(0.4375) and out["samples"] == 4 and out["seconds"] == 9.0
    assert out["ci95"] == list(wilson_interval(1.75, 4))


# ---------------------------------------------------------------------------------------------- intervals
@pytest.mark.parametrize("successes, n, low, high", [
    # hand-computed from (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n), z = 1.95996
    (0, 3, 0.0, 0.5615),
    (1, 3, 0.0615, 0.7923),
    (5, 10, 0.2366, 0.7634),
    (10, 10, 0.7225, 1.0),
    (0, 10, 0.0, 0.2775),
    (7, 20, 0.1812, 0.5671),
])
def test_wilson_interval_matches_hand_computed_values(successes, n, low, high):
    lo, hi = wilson_interval(successes, n)
    assert lo == pytest.approx(low, abs=1e-4) and hi == pytest.approx(high, abs=1e-4)


def test_wilson_interval_edges_and_bad_input():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(4, 3)
    assert format_rate(1, 3) == "1/3 (6–79 %)"


# --------------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def toy_model_dir(tmp_path_factory, toy_tokenizer) -> Path:
    """A tiny Llama built from a config (L0 = 512) with the committed toy tokenizer, saved like a model folder."""
    from conftest import build_tiny_model

    d = tmp_path_factory.mktemp("ruler-tiny")
    build_tiny_model("llama", vocab_size=len(toy_tokenizer), max_position_embeddings=512).save_pretrained(d)
    toy_tokenizer.save_pretrained(d)
    return d


def test_eval_suite_ruler_end_to_end_on_a_tiny_model(toy_model_dir, corpus_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from longext.cli import main
    from longext.evaluate.ruler.run import load_sources
    from longext.recipe import RulerSpec

    out = tmp_path / "r"
    args = ["eval", str(toy_model_dir), "--suite", "ruler", "--length", "512", "--samples", "1",
            "--set", f"ruler.haystack={corpus_dir}", "--out", str(out)]
    assert main(args) == 0
    results = json.loads((out / "eval.json").read_text())
    (model,) = results["models"]
    assert results["lengths"] == [512] and set(model) >= {"ruler"} and "perplexity" not in model
    row = model["ruler"]["512"]
    assert list(row["tasks"]) == list(SYNTHETIC) and row["samples"] == len(SYNTHETIC)
    # reference: the same prompts rebuilt here, answered by stock transformers' greedy generate
    plain = AutoModelForCausalLM.from_pretrained(toy_model_dir, dtype=torch.float32).eval()
    sources = load_sources(RulerSpec(haystack=str(corpus_dir)))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(toy_model_dir)
    for name in ("niah_multikey_2", "vt", "fwe"):
        (record,) = row["tasks"][name]["records"]
        sample = build_sample(TASKS[name], tok, 512, 0, 0, sources)
        assert record["prompt_tokens"] == len(sample.ids) and record["references"] == sample.references
        assert len(sample.ids) + TASKS[name].tokens_to_generate <= 512
        with torch.no_grad():
            ids = plain.generate(torch.tensor([sample.ids]), max_new_tokens=TASKS[name].tokens_to_generate,
                                 do_sample=False, pad_token_id=tok.eos_token_id)
        answer = tok.decode(ids[0, len(sample.ids):], skip_special_tokens=True)
        assert record["answer"] == postprocess(answer)
        assert record["score"] == sample_score(answer, sample.references, TASKS[name].metric)
    scores = [t["score"] for t in row["tasks"].values()]
    assert row["score"] == pytest.approx(sum(scores) / len(scores))
    assert {"ruler.png", "ruler-tasks.png"} <= {p.name for p in out.iterdir()}
    md = (out / "eval.md").read_text()
    assert "## RULER" in md and "| niah_single_1 | " in md and "| **average** |" in md


def test_ruler_flags_are_checked_before_the_model_loads(capsys, toy_model_dir, corpus_dir, tmp_path):
    from helpers import bad_input

    base = ["eval", toy_model_dir, "--lengths", "512", "--set", f"ruler.haystack={corpus_dir}", "--out", tmp_path / "r"]
    assert bad_input(capsys, *base, "--suite", "rulers") == [
        "error: --suite: expected a comma-separated list of ppl, passkey, niah, ruler (got 'rulers')"]
    lines = bad_input(capsys, *base, "--suite", "ruler", "--tasks", "vt,vtx")
    assert lines[0].startswith("error: --tasks: Input should be 'niah_single_1', 'niah_single_2'")
    lines = bad_input(capsys, *base, "--suite", "ruler", "--tasks", "qa_1,vt")
    assert lines == ["error: --tasks: qa_1 needs local squad data: no --ruler-qa file gives it (RULER's squad.json / "
                     "hotpotqa.json; see docs/eval.md#ruler)"]
    assert not (tmp_path / "r").exists()


def test_a_length_too_short_for_a_task_stops_before_any_forward_pass(toy_model_dir, corpus_dir, tmp_path):
    from longext.evaluate.run import EvalRequest, run_eval

    request = EvalRequest.from_cli(toy_model_dir, lengths="128,512", suite="ruler", tasks="vt,cwe",
                                   overrides=[f"ruler.haystack={corpus_dir}"], out=tmp_path / "r")
    with pytest.raises(LongextError, match=r"^ruler vt at 128: the smallest prompt needs \d+ tokens \(with the 30 "
                                           r"generated\); test longer lengths \(--lengths\)"):
        run_eval(request)
    assert not (tmp_path / "r").exists()


def test_ruler_qa_flag_adds_the_qa_tasks(toy_tokenizer, qa_dir, sources):
    from longext.evaluate.ruler.run import chosen_tasks
    from longext.recipe import RulerSpec

    spec = RulerSpec(qa=str(qa_dir))
    assert chosen_tasks(spec, load_qa(str(qa_dir))) == [*SYNTHETIC, "qa_1", "qa_2"]
    assert chosen_tasks(RulerSpec(), {}) == list(SYNTHETIC)
    assert chosen_tasks(RulerSpec(tasks=["qa_2", "vt", "qa_2"]), load_qa(str(qa_dir))) == ["qa_2", "vt"]


def test_generation_stops_once_done_and_is_a_prefix_of_the_full_answer(tiny_llama, tiny_tokenizer):
    """Stopping once the answer holds every reference cannot change a RULER score: the answer so far is the
    start of what the full budget would give, and string match only grows with the text."""
    from longext.evaluate.passkey import generate_answer

    ids = tiny_tokenizer("The house had a garden and the river ran by it.")["input_ids"]
    full = generate_answer(tiny_llama, tiny_tokenizer, ids, 24)
    target = full[: len(full) // 2]
    early = generate_answer(tiny_llama, tiny_tokenizer, ids, 24, done=lambda text: target in text)
    assert full.startswith(early) and target in early and len(early) < len(full)


def test_the_recipe_schema_names_exactly_the_tasks_the_suite_defines():
    from longext.evaluate.ruler.tasks import TASKS
    from longext.recipe.sections import RULER_TASK_NAMES

    assert RULER_TASK_NAMES == tuple(TASKS)
