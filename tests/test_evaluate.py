"""`longext eval`: chunked perplexity vs the full-logit loss, passkey prompts, report files, flag errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from longext.errors import LongextError
from longext.evaluate import passkey as pk
from longext.evaluate.perplexity import (
    document_token_ids, fixed_ends, perplexity_at_lengths, plan_windows, sliding_windows, window_nll,
)
from longext.evaluate.report import markdown, rich_table, write_report
from longext.evaluate.run import EvalRequest, ladder_lengths
from longext.recipe import PasskeySpec, PerplexitySpec

from conftest import build_tiny_model, synthetic_text


def full_logit_nll(model, ids: torch.Tensor, scored: int) -> float:
    """Reference: transformers' own loss over the last `scored` tokens, from [s, v] logits."""
    labels = torch.full_like(ids, -100)
    labels[-scored:] = ids[-scored:]
    with torch.no_grad():
        return model(input_ids=ids[None], labels=labels[None]).loss.item()


@pytest.fixture(scope="module")
def docs(tiny_tokenizer):
    return document_token_ids(tiny_tokenizer, [synthetic_text(700, seed) for seed in (10, 11)])


# ------------------------------------------------------------------------------------ perplexity
def test_chunked_nll_equals_transformers_full_logit_loss(tiny_llama):
    ids = torch.randint(0, tiny_llama.config.vocab_size, (80,), generator=torch.Generator().manual_seed(0))
    ours = window_nll(tiny_llama, ids, scored=30, rows=7) / 30  # 5 chunks of the head + loss
    assert ours == pytest.approx(full_logit_nll(tiny_llama, ids, 30), abs=1e-5)


def test_chunked_nll_sees_the_lora_adapter_of_a_peft_model(tiny_llama):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).eval()
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)  # a non-zero adapter, so forgetting it would show
    ids = torch.randint(0, 400, (60,), generator=torch.Generator().manual_seed(1))
    tuned = window_nll(model, ids, 20)
    assert tuned / 20 == pytest.approx(full_logit_nll(model, ids, 20), abs=1e-5)
    with model.disable_adapter():
        assert window_nll(model, ids, 20) != pytest.approx(tuned, abs=1e-3)


def test_head_only_ever_sees_chunks_never_the_whole_sequence(tiny_llama):
    rows_seen = []
    hook = tiny_llama.lm_head.register_forward_hook(lambda m, args, out: rows_seen.append(out.shape[-2]))
    try:
        window_nll(tiny_llama, torch.arange(100) % 400, scored=90, rows=32)
    finally:
        hook.remove()
    assert rows_seen == [32, 32, 26]


def test_model_with_constant_logits_has_perplexity_equal_to_vocab_size(tiny_tokenizer, docs):
    model = build_tiny_model(vocab_size=len(tiny_tokenizer))
    torch.nn.init.zeros_(model.lm_head.weight)
    spec = PerplexitySpec(targets=16, windows=2)
    rows = perplexity_at_lengths(model, docs, [32, 64], spec)
    for row in rows.values():
        assert row["ppl"] == pytest.approx(len(tiny_tokenizer), rel=1e-6)
        assert row["scored_tokens"] == 32 and row["windows"] == 2
        assert set(row) == {"ppl", "nll", "scored_tokens", "windows", "seconds", "tokens_per_s"}


def test_fixed_mode_scores_the_same_tokens_at_every_length(docs):
    spec = PerplexitySpec(targets=24, windows=3)
    plan = plan_windows([len(t) for t in docs], [32, 64, 128], spec)
    scored = {L: [docs[w.doc][w.end - w.scored : w.end].tolist() for w in ws] for L, ws in plan.items()}
    assert scored[32] == scored[64] == scored[128]
    assert all(w.length == L and w.start >= 0 for L, ws in plan.items() for w in ws)


def test_fixed_ends_are_spread_over_the_usable_range_deterministically():
    ends = fixed_ends([50, 300, 1000], need=100, n=4)
    assert ends == fixed_ends([50, 300, 1000], need=100, n=4)
    assert all(100 <= end <= [50, 300, 1000][doc] for doc, end in ends)
    assert {doc for doc, _ in ends} == {1, 2} and len(set(ends)) == 4
    assert fixed_ends([100], need=100, n=5) == [(0, 100)]  # one possible end, one window


def test_sliding_windows_score_consecutive_tokens_once():
    windows = sliding_windows([100, 40, 75], length=50, stride=10, cap=100)
    spans = [(w.doc, w.end - w.scored, w.end) for w in windows]
    assert spans[0] == (0, 1, 50) and spans[1] == (0, 50, 60) and spans[5] == (0, 90, 100)
    assert spans[6:] == [(2, 1, 50), (2, 50, 60), (2, 60, 70)]  # the 40-token document is too short
    assert len(sliding_windows([10_000], length=50, stride=10, cap=7)) == 7


def test_too_short_texts_give_an_error_naming_the_length_and_the_longest_text():
    with pytest.raises(LongextError, match=r"perplexity at 1k: .*need 1024 tokens, the longest of 2 has 700"):
        plan_windows([700, 300], [768, 1024], PerplexitySpec())


def test_targets_must_fit_in_the_shortest_length():
    with pytest.raises(LongextError, match=r"^eval.perplexity.targets: 512 scored tokens .*shortest is 256"):
        plan_windows([10_000], [256, 1024], PerplexitySpec(targets=512))
    with pytest.raises(LongextError, match=r"^eval.perplexity.stride"):
        plan_windows([10_000], [256], PerplexitySpec(mode="sliding", stride=256))


def test_sliding_mode_runs_and_reports_per_length(tiny_llama, docs):
    spec = PerplexitySpec(mode="sliding", stride=16, windows=1)
    rows = perplexity_at_lengths(tiny_llama, docs, [32, 64], spec)
    assert rows[32]["windows"] == 2 and rows[64]["windows"] == 4  # cap = windows * (L // stride)
    assert rows[32]["scored_tokens"] == 31 + 16 and math.isfinite(rows[64]["ppl"])


def test_progress_and_set_length_are_called_per_pass(tiny_llama, docs):
    calls, set_to = [], []
    perplexity_at_lengths(tiny_llama, docs, [64, 32], PerplexitySpec(targets=8, windows=2),
                          set_length=set_to.append, progress=lambda label, n: calls.append((label, n)))
    assert set_to == [32, 64]
    assert calls == [("ppl 32", 0), ("ppl 32", 32)] * 2 + [("ppl 64", 0), ("ppl 64", 64)] * 2


# --------------------------------------------------------------------------------------- passkey
@pytest.mark.parametrize("length", [170, 200, 333, 512, 1000])
def test_passkey_prompt_has_the_requested_length_within_one_sentence(tiny_tokenizer, length):
    prompt = pk.passkey_prompt(tiny_tokenizer, length, "48213", 0.5)
    longest_sentence = max(len(tiny_tokenizer(" " + s)["input_ids"]) for s in pk.filler_sentences())
    assert length - longest_sentence - 2 <= len(prompt.ids) <= length
    text = tiny_tokenizer.decode(prompt.ids)
    assert text.startswith(pk.INTRO) and text.endswith(pk.QUESTION)


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_needle_sits_at_the_requested_depth_at_a_sentence_boundary(tiny_tokenizer, depth):
    prompt = pk.passkey_prompt(tiny_tokenizer, 1000, "70615", depth)
    assert tiny_tokenizer.decode(prompt.ids[prompt.needle_at :]).startswith(pk.NEEDLE.format(key="70615"))
    assert tiny_tokenizer.decode(prompt.ids[: prompt.needle_at]).endswith((pk.INTRO, "."))
    n = prompt.sentences_before + prompt.sentences_after
    assert prompt.sentences_before == round(depth * n)
    intro = len(tiny_tokenizer(pk.INTRO)["input_ids"])
    needle, question = (len(tiny_tokenizer(t)["input_ids"]) for t in (pk.NEEDLE.format(key="70615"), pk.QUESTION))
    filler_tokens = len(prompt.ids) - intro - needle - question
    assert (prompt.needle_at - intro) / filler_tokens == pytest.approx(depth, abs=0.03)


def test_book_text_can_be_the_filler(tiny_tokenizer):
    sentences = pk.filler_sentences(synthetic_text(400, 3))
    prompt = pk.passkey_prompt(tiny_tokenizer, 300, "11111", 0.5, sentences, offset=7)
    assert 250 <= len(prompt.ids) <= 300 and "11111 is the pass key" in tiny_tokenizer.decode(prompt.ids)


def test_length_too_short_for_the_bare_prompt_is_an_error(tiny_tokenizer):
    with pytest.raises(LongextError, match=r"^passkey at 20: the prompt needs at least \d+ tokens"):
        pk.passkey_prompt(tiny_tokenizer, 20, "12345", 0.5)


def test_eval_stops_before_any_forward_pass_when_a_length_cannot_hold_the_passkey_prompt(
    tiny_model_dir, corpus_dir, tmp_path
):
    from longext.evaluate.run import run_eval

    request = EvalRequest.from_cli(tiny_model_dir, lengths="64,256", texts=[str(corpus_dir)], out=tmp_path / "r",
                                   overrides=["perplexity.targets=32"])
    with pytest.raises(LongextError, match=r"^passkey at 64: the prompt needs at least \d+ tokens"):
        run_eval(request)


def test_keys_are_deterministic_and_have_the_requested_digits():
    keys = [pk.trial_key(0, 4096, i, 5) for i in range(20)]
    assert keys == [pk.trial_key(0, 4096, i, 5) for i in range(20)]
    assert all(len(k) == 5 and k.isdigit() and k[0] != "0" for k in keys) and len(set(keys)) > 15
    assert keys != [pk.trial_key(1, 4096, i, 5) for i in range(20)]


@pytest.mark.parametrize(
    "answer, correct",
    [(" 48213.", True), ("48213", True), (" is 48213 and", True), ("\n48213 is the pass key", True),
     (" 482130.", False), (" 4821", False), (" 4821 3", False), (" 048213", False), (" pass key", False),
     ("", False), (" 12345 48213", False)],
)
def test_answer_is_correct_when_its_first_digit_run_is_the_key(answer, correct):
    assert pk.answer_is_correct(answer, "48213") is correct


def test_passkey_end_to_end_on_a_tiny_random_model_returns_well_formed_records(tiny_llama, tiny_tokenizer):
    spec = PasskeySpec(trials=4, depths=[0.2, 0.8], digits=4)
    rows = pk.passkey_at_lengths(tiny_llama, tiny_tokenizer, [240, 180], spec, seed=3)
    assert list(rows) == [180, 240]
    for length, row in rows.items():
        assert row["trials"] == 4 and row["correct"] == sum(r["correct"] for r in row["records"])
        assert row["accuracy"] == row["correct"] / 4
        assert [r["depth"] for r in row["records"]] == [0.2, 0.8, 0.2, 0.8]
        assert [r["key"] for r in row["records"]] == [pk.trial_key(3, length, i, 4) for i in range(4)]
        assert all(r["prompt_tokens"] <= length and isinstance(r["answer"], str) for r in row["records"])
        assert all(r["correct"] == pk.answer_is_correct(r["answer"], r["key"]) for r in row["records"])
    again = pk.passkey_at_lengths(tiny_llama, tiny_tokenizer, [180], spec, seed=3)
    assert [r["answer"] for r in again[180]["records"]] == [r["answer"] for r in rows[180]["records"]]


def test_generate_answer_is_the_greedy_continuation(tiny_llama, tiny_tokenizer):
    from helpers import tokens

    ids = tokens(40, rows=1)[0].tolist()
    seq = torch.tensor([ids])
    with torch.no_grad():  # reference: argmax of the full forward, one token at a time, no cache
        for _ in range(6):
            seq = torch.cat([seq, tiny_llama(seq).logits[:, -1:].argmax(-1)], dim=1)
    want = tiny_tokenizer.decode(seq[0, 40:], skip_special_tokens=True)
    assert pk.generate_answer(tiny_llama, tiny_tokenizer, ids, 6) == want


def test_passkey_scores_a_model_that_retrieves():
    """The committed toy base (pretrained with passkey documents, L0 = 128) finds some keys in the classic filler
    and misses others: both branches of the scoring, on a real model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    toy = Path(__file__).resolve().parents[1] / "bench" / "toy-base"
    model = AutoModelForCausalLM.from_pretrained(toy, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(toy)
    row = pk.passkey_at_lengths(model, tokenizer, [128], PasskeySpec(trials=12), seed=0)[128]
    records = row["records"]
    assert 1 <= row["correct"] <= 11 and row["accuracy"] == row["correct"] / 12
    assert row["correct"] == sum(r["correct"] for r in records)
    for r in records:
        assert r["correct"] == (r["key"] in r["answer"] and pk.answer_is_correct(r["answer"], r["key"]))


def test_perplexity_is_the_token_weighted_mean_over_windows(tiny_llama, docs):
    """Sliding windows score different numbers of tokens; the result is transformers' loss summed over every
    scored token, not a mean of per-window means."""
    spec = PerplexitySpec(mode="sliding", stride=16, windows=1)
    got = perplexity_at_lengths(tiny_llama, docs, [64], spec)[64]
    windows = plan_windows([len(t) for t in docs], [64], spec)[64]
    assert len({w.scored for w in windows}) > 1  # the weighting matters
    total = sum(full_logit_nll(tiny_llama, docs[w.doc][w.start:w.end], w.scored) * w.scored for w in windows)
    scored = sum(w.scored for w in windows)
    assert got["nll"] == pytest.approx(total / scored, abs=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(total / scored), rel=1e-5)


# ---------------------------------------------------------------------------------------- report
def hand_results() -> dict:
    ppl = {"1024": {"ppl": 20.0, "nll": 3.0, "scored_tokens": 1024, "windows": 2, "seconds": 1.5, "tokens_per_s": 1.0},
           "2048": {"ppl": 40.0, "nll": 3.7, "scored_tokens": 1024, "windows": 2, "seconds": 3.0, "tokens_per_s": 1.0}}
    key = {"1024": {"accuracy": 0.5, "correct": 1, "trials": 2, "seconds": 2.0, "records": []},
           "2048": {"accuracy": 1.0, "correct": 2, "trials": 2, "seconds": 4.0, "records": []}}
    return {
        "target": "runs/demo", "created": "2026-01-01T00:00:00", "lengths": [1024, 2048],
        "original_context": 1024, "target_context": 2048, "reference_length": 1024,
        "settings": {"perplexity": PerplexitySpec().model_dump(mode="json"), "passkey": PasskeySpec().model_dump()},
        "machine": {"cpu": "test cpu", "torch": torch.__version__},
        "models": [{"name": "base", "baseline": True, "perplexity": ppl, "passkey": key},
                   {"name": "demo", "baseline": False, "perplexity": ppl}],
    }


def test_report_writes_every_file_and_the_json_round_trips(tmp_path):
    out = write_report(tmp_path / "eval", hand_results())
    assert sorted(p.name for p in out.iterdir()) == ["eval.json", "eval.md", "passkey.png", "ppl.png"]
    assert json.loads((out / "eval.json").read_text()) == hand_results()
    md = (out / "eval.md").read_text()
    assert "| 1k (L0) | 20.00 | 1.00 | 20.00 | 1.00 |" in md and "| 2k (target) | 40.00 | 2.00 | 40.00 | 2.00 |" in md
    assert "| 2k (target) | 2/2 (34–100 %) | – |" in md  # correct/trials (95 % Wilson interval)
    assert (out / "ppl.png").read_bytes()[:4] == b"\x89PNG"


def test_report_replaces_an_older_report_and_leaves_no_temp_dirs(tmp_path):
    first = hand_results()
    write_report(tmp_path / "eval", first)
    second = {**first, "target": "runs/other"}
    write_report(tmp_path / "eval", second)
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["target"] == "runs/other"
    assert [p.name for p in tmp_path.iterdir()] == ["eval"]


def test_report_refuses_to_replace_a_folder_that_is_not_a_report(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(LongextError, match=r"^--out: .*mine exists and is not a longext eval report"):
        write_report(tmp_path / "mine", hand_results())
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_rich_table_has_a_row_per_length_and_columns_per_model():
    from rich.console import Console

    table = rich_table(hand_results())
    assert table.row_count == 2 and len(table.columns) == 1 + 3 * 2
    console = Console(record=True, width=200)
    console.print(table)
    text = console.export_text()
    assert "1/2 (9–91 %)" in text and "40.00" in text
    assert "## Passkey retrieval" in markdown(hand_results())


# ------------------------------------------------------------------------------------------ run
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(length="abc"),
         "--length: expected a positive whole number of tokens like 4096, 4k, 128k or 1m (got 'abc')"),
        (dict(lengths="4k,x"),
         "--lengths: expected a positive whole number of tokens like 4096, 4k, 128k or 1m (got 'x')"),
        (dict(lengths=" , "), "--lengths: expected a comma-separated list like 4k,8k,16k (got ' , ')"),
        (dict(length="4k", mode="rolling"), "--mode: expected fixed or sliding (got 'rolling')"),
        (dict(), "--length: give the longest context to test, e.g. --length 16k, or a ladder with --lengths 4k,8k,16k"),
        (dict(length="4k", lengths="1k,2k"), "--length, --lengths: give one of them"),
        (dict(length="4k", passkey=False, perplexity=False),
         "--ppl, --passkey, --niah, --suite, --lm-eval: all are off, nothing to evaluate"),
        (dict(length="4k", overrides=["niah.depths=[-0.1]"]),
         "--set eval.niah.depths.0: a depth is between 0 and 1 (got -0.1)"),
        (dict(length="4k", filler=""), "--filler: String should have at least 1 character (got '')"),
        (dict(length="4k", overrides=["niah.needles=40"]),
         "--set eval.niah.needles: Input should be less than or equal to 32 (got 40)"),
        (dict(length="4k", baseline=True), "--baseline: {dir} is not a run directory"),
        (dict(length="4k", overrides=["passkey.trials=0"]),
         "--set eval.passkey.trials: Input should be greater than or equal to 1 (got 0)"),
        (dict(length="4k", overrides=["eval.perplexity.modee=fixed"]),
         "--set eval.perplexity.modee: unknown field, did you mean mode?"),
        (dict(length="4k", overrides=["passkey.depths=[0.5, 1.5]"]),
         "--set eval.passkey.depths.1: a depth is between 0 and 1 (got 1.5)"),
        (dict(length="4k", overrides=["trials"]), "--set: expected KEY=VALUE such as train.lr=1e-5 (got 'trials')"),
    ],
)
def test_bad_flags_give_one_line_errors_naming_the_flag(tmp_path, kwargs, message):
    with pytest.raises(LongextError) as err:
        EvalRequest.from_cli(tmp_path, **kwargs)
    assert err.value.lines()[0].startswith(message.format(dir=tmp_path))
    assert len(err.value.lines()) == 1


def test_a_folder_that_is_neither_a_run_nor_a_model_is_refused_before_anything_loads(tmp_path):
    with pytest.raises(LongextError, match=r"^TARGET: .* is neither a run directory \(no recipe.yaml\) nor a model "
                                           r"directory \(no config.json\)$"):
        EvalRequest.from_cli(tmp_path, length="4k")


def test_missing_target_directory_is_named(tmp_path):
    with pytest.raises(LongextError, match=r"^TARGET: no such directory: .*nowhere$"):
        EvalRequest.from_cli(tmp_path / "nowhere", length="4k")


@pytest.mark.parametrize(
    "longest, l0, ladder",
    [
        (16384, 8192, [1024, 2048, 4096, 8192, 12288, 16384]),
        (131072, 8192, [2048, 4096, 8192, 12288, 16384, 32768, 65536, 131072]),
        (4096, 8192, [1024, 2048, 4096]),
        (256, 128, [128, 192, 256]),
        (1 << 20, 4096, [4096, 6144, 32768, 65536, 131072, 262144, 524288, 1 << 20]),
    ],
)
def test_ladder_keeps_l0_and_the_longest_and_at_most_eight_lengths(longest, l0, ladder):
    assert ladder_lengths(longest, l0) == ladder


def test_request_starts_from_the_run_recipe_then_set_then_flags(tmp_path):
    (tmp_path / "recipe.yaml").write_text(
        "name: demo\nmodel: {path: models/x}\nmethod: {kind: standard, target_len: 256}\ntrain: {steps: 1}\n"
        "eval: {lengths: [64, 128], passkey: {trials: 2}, perplexity: {targets: 16}}\n"
    )
    request = EvalRequest.from_cli(tmp_path, overrides=["passkey.trials=3", "eval.perplexity.windows=4"], trials=5)
    assert request.lengths == (64, 128) and request.ladder(128) == [64, 128]
    assert request.spec.passkey.trials == 5 and request.spec.perplexity.windows == 4
    assert request.spec.perplexity.targets == 16 and request.out == tmp_path / "eval"
    assert EvalRequest.from_cli(tmp_path, length="256").ladder(128) == [128, 192, 256]


def test_plain_model_directory_reports_to_evals_by_default(tmp_path):
    (tmp_path / "config.json").write_text("{}")  # what makes a folder a model directory for the request
    request = EvalRequest.from_cli(tmp_path, lengths="2k,1k,2k", mode="sliding", texts=["a.txt"])
    assert request.lengths == (1024, 2048) and request.out == Path("evals") / tmp_path.name
    assert request.spec.perplexity.mode == "sliding" and request.spec.perplexity.texts == ["a.txt"]
    assert request.texts_flag == "--texts"


def test_eval_command_end_to_end_on_a_saved_tiny_model(tiny_model_dir, corpus_dir, tmp_path):
    from longext.cli import main

    out = tmp_path / "report"
    code = main([
        "eval", str(tiny_model_dir), "--lengths", "192,256,320", "--texts", str(corpus_dir), "--trials", "2",
        "--set", "perplexity.targets=32", "--set", "passkey.digits=3", "--out", str(out),
    ])
    assert code == 0
    results = json.loads((out / "eval.json").read_text())
    assert results["lengths"] == [192, 256, 320] and results["original_context"] == 128
    (model,) = results["models"]
    assert list(model["perplexity"]) == ["192", "256", "320"] and model["passkey"]["320"]["trials"] == 2
    assert all(row["scored_tokens"] == 64 for row in model["perplexity"].values())
    assert {"eval.md", "ppl.png", "passkey.png"} <= {p.name for p in out.iterdir()}


def test_eval_of_a_run_with_baseline_compares_both_models_on_the_same_tokens_and_keys(
    tmp_path, tiny_model_dir, corpus_dir
):
    from helpers import write_recipe
    from longext.cli import main
    from longext.recipe import load_recipe
    from longext.train import run_training

    recipe = write_recipe(tmp_path, tiny_model_dir, corpus_dir, name="ev", train={"steps": 2},
                          eval={"lengths": [192, 256], "perplexity": {"targets": 32}, "passkey": {"trials": 2}})
    run = run_training(load_recipe(recipe))
    assert main(["eval", str(run), "--baseline", "--texts", str(corpus_dir)]) == 0
    results = json.loads((run / "eval" / "eval.json").read_text())
    base, tuned = results["models"]
    assert (base["name"], base["baseline"], tuned["name"], tuned["baseline"]) == ("base", True, "ev", False)
    assert results["lengths"] == [192, 256] and results["target_context"] == 256
    for part in ("perplexity", "passkey"):
        assert list(base[part]) == list(tuned[part]) == ["192", "256"]
    assert base["perplexity"]["256"]["ppl"] != tuned["perplexity"]["256"]["ppl"]  # the adapter and RoPE count
    keys = [[r["key"] for r in m["passkey"]["256"]["records"]] for m in (base, tuned)]
    assert keys[0] == keys[1]
    # reference: the plain base model directory, loaded by stock transformers, on the same documents and spec
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    texts = [p.read_text() for p in sorted(corpus_dir.glob("*.txt"))]
    ids = document_token_ids(AutoTokenizer.from_pretrained(tiny_model_dir), texts)
    assert base["text_tokens"] == tuned["text_tokens"] == [len(t) for t in ids]
    want = perplexity_at_lengths(plain, ids, [192, 256], load_recipe(recipe).eval.perplexity)
    for length in (192, 256):
        assert base["perplexity"][str(length)]["ppl"] == pytest.approx(want[length]["ppl"], rel=1e-6)
        assert base["perplexity"][str(length)]["scored_tokens"] == want[length]["scored_tokens"]


# ---------------------------------------------------------------------------------------- filler
def test_filler_is_classic_books_or_the_named_texts(corpus_dir, tmp_path):
    from longext.evaluate.run import load_filler

    assert load_filler("classic") is None
    text = load_filler(str(corpus_dir))
    assert all(p.read_text().strip()[:200] in text for p in sorted(corpus_dir.glob("*.txt")))
    with pytest.raises(LongextError, match=r"^eval.filler: no such file or folder: '.*nowhere'"):
        load_filler(str(tmp_path / "nowhere"))
    (tmp_path / "flat.txt").write_text("no sentence ends here at all")
    with pytest.raises(LongextError, match=r"^eval.filler: '.*flat.txt' has no sentences"):
        load_filler(str(tmp_path / "flat.txt"))


def test_eval_filler_flag_puts_the_texts_in_the_prompts(tiny_model_dir, corpus_dir, tmp_path):
    from longext.cli import main

    def needle_positions(*extra) -> list[int]:
        out = tmp_path / f"r{len(extra)}"
        args = ["eval", str(tiny_model_dir), "--lengths", "256", "--no-ppl", "--trials", "3", "--out", str(out)]
        assert main([*args, *extra]) == 0
        results = json.loads((out / "eval.json").read_text())
        assert results["settings"]["filler"] == (extra[1] if extra else "classic")
        assert f"haystack: {extra[1] if extra else 'classic'}" in (out / "eval.md").read_text()
        return [r["needle_at"] for r in results["models"][0]["passkey"]["256"]["records"]]

    classic, corpus = needle_positions(), needle_positions("--filler", str(corpus_dir))
    # the same depths over other sentences put the needle at other token positions
    assert classic != corpus
