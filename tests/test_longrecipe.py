"""LongRecipe: sentence selection, the position transform, the static-NTK base, and runs on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import losses, write_recipe
from longext.data.batches import piece_lengths
from longext.errors import RecipeError
from longext.methods.longrecipe.selection import digit_ids, sentence_end_ids, token_texts
from longext.methods.longrecipe.sentences import SentenceRows, kept_sentences, sentence_starts
from longext.methods.longrecipe import static_ntk_base
from longext.positions import longrecipe_positions
from longext.recipe import load_recipe
from longext.train import run_training

LR = {"kind": "longrecipe", "target_len": 512}


# ------------------------------------------------------------------------------------------ base
@pytest.mark.parametrize("theta, s, target, L0, paper", [
    (5.0e5, 10, 81920, 8192, 48.9e6),     # Llama-3-8B 8K -> 80K
    (5.0e5, 16, 131072, 8192, 131.5e6),   # Llama-3-8B 8K -> 128K
    (1.0e6, 4, 131072, 32768, 13.5e6),    # Qwen2-7B 32K -> 128K
])
def test_static_ntk_base_matches_the_papers_table(theta, s, target, L0, paper):
    base = static_ntk_base(theta, s, target, L0, 128)
    assert base == pytest.approx(theta * (s * target / L0 - (s - 1)) ** (128 / 126))
    assert round(base / 1e5) == round(paper / 1e5)  # the paper rounds to 0.1M


def test_the_base_is_resolved_recorded_and_exported_as_plain_rope_theta(longrecipe_run, tmp_path):
    from transformers import AutoConfig

    from longext.export import run_export

    recipe = load_recipe(longrecipe_run / "recipe.yaml")
    want = static_ntk_base(10000.0, 4.0, 512, 128, 16)  # tiny model: b = 1e4, d = 16, s = round(512/128)
    assert recipe.method.rope_factor == 4.0 and recipe.rope.theta == pytest.approx(want)
    assert recipe.data.seq_len == round(0.3 * 512)
    rope = json.loads((longrecipe_run / "rope.json").read_text())
    assert rope["parameters"] == {"rope_type": "default", "rope_theta": pytest.approx(want)}
    assert rope["extra"]["method"] == "longrecipe"
    result = run_export(longrecipe_run, tmp_path / "out")
    config = AutoConfig.from_pretrained(tmp_path / "out")
    assert config.rope_parameters["rope_theta"] == pytest.approx(want)
    assert config.rope_parameters.get("rope_type", "default") == "default"
    assert result.max_abs_diff < 1e-4


# ------------------------------------------------------------------------------------- selection
def sentences_of(ids, ends) -> list[list[int]]:
    doc = np.asarray(ids, dtype=np.uint32)
    starts = sentence_starts(doc, np.array(sorted(ends), dtype=np.uint32))
    return [doc[a:b].tolist() for a, b in zip(starts, [*starts[1:], len(doc)])]


def kept_of(sentences, impactful, keep_other, gen) -> list[list[int]]:
    doc = np.array([t for s in sentences for t in s], dtype=np.uint32)
    starts = np.cumsum([0] + [len(s) for s in sentences[:-1]])
    marked = None if impactful is None else np.array(sorted(impactful), dtype=np.uint32)
    return [s for s, k in zip(sentences, kept_sentences(doc, starts, marked, keep_other, gen)) if k]


def test_sentences_end_at_punctuation_and_newline_tokens(tiny_tokenizer):
    texts = token_texts(tiny_tokenizer)
    ends = sentence_end_ids(texts)
    ids = tiny_tokenizer("He came home. Was it 42? Yes!\nThe end", add_special_tokens=False)["input_ids"]
    pieces = [tiny_tokenizer.decode(s) for s in sentences_of(ids, ends)]
    assert "".join(pieces) == "He came home. Was it 42? Yes!\nThe end"
    assert pieces[0] == "He came home." and pieces[1].strip() == "Was it 42?"
    assert pieces[-1].strip() == "The end"


def test_digit_selection_keeps_whole_sentences_and_the_configured_ratio(tiny_tokenizer, corpus_dir):
    texts = token_texts(tiny_tokenizer)
    text = (corpus_dir / "doc0.txt").read_text()
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    sentences = sentences_of(ids, sentence_end_ids(texts))
    digits = digit_ids(texts)
    kept = kept_of(sentences, digits, 0.3, torch.Generator().manual_seed(0))
    with_digit = [s for s in sentences if not digits.isdisjoint(s)]
    others = [s for s in sentences if digits.isdisjoint(s)]
    assert with_digit and len(others) > 200
    kept_keys = {tuple(s) for s in kept}
    assert all(tuple(s) in kept_keys for s in with_digit)  # every sentence with a digit stays
    kept_others = [s for s in kept if digits.isdisjoint(s)]
    assert len(kept_others) / len(others) == pytest.approx(0.3, abs=0.06)
    # whole sentences, in their original order: kept is a subsequence of sentences
    it = iter(map(tuple, sentences))
    assert all(any(s == t for t in it) for s in map(tuple, kept))
    assert kept_of(sentences, None, 0.0, torch.Generator()) == sentences  # mode none


def test_rows_are_cut_from_the_kept_sentences_in_order():
    """26 kept tokens in sentences of 5, 7, 3, 9 and 2 (two documents) at seq_len 8: three rows, the rest dropped; a
    sentence that does not fit continues in the next row as a piece of its own there."""
    tokens = np.repeat(np.arange(1, 6, dtype=np.uint32), [5, 7, 3, 9, 2])
    rows = SentenceRows(tokens, np.array([0, 5, 12, 15, 24, 26]), np.array([0, 15, 26]), 8, {})
    block = rows.rows([0, 1, 2])
    assert len(rows) == 3
    assert block["input_ids"][0].tolist() == [1] * 5 + [2] * 3 and block["sentences"][0].tolist() == [0] * 5 + [1] * 3
    assert block["input_ids"][1].tolist() == [2] * 4 + [3] * 3 + [4]
    assert block["sentences"][1].tolist() == [0] * 4 + [1] * 3 + [2] and block["segments"][1].tolist() == [0] * 7 + [1]
    assert block["sentences"][2].tolist() == [0] * 8 and block["segments"][2].tolist() == [0] * 8


def test_the_cached_selection_is_the_in_memory_one(tmp_path, tiny_model_dir, tiny_tokenizer, corpus_dir):
    """The sentence cache against the definition, in plain lists: every document plus EOS cut after each sentence
    end, sentences kept by the digits rule with one draw each from one generator, concatenated and cut into rows."""
    from longext.data.prepare import prepare_corpus
    from longext.methods.longrecipe.sentences import selected_rows
    from longext.recipe.methods import LongRecipeSelection

    docs = [tiny_tokenizer((corpus_dir / f"doc{i}.txt").read_text(), add_special_tokens=False)["input_ids"]
            for i in range(3)]
    texts, eos = token_texts(tiny_tokenizer), tiny_tokenizer.eos_token_id
    ends, digits = sentence_end_ids(texts) | {eos}, digit_ids(texts)
    gen = torch.Generator().manual_seed(7)
    stream = []
    for doc in docs:
        sentences, current = [], []
        for t in [*doc, eos]:
            current.append(t)
            if t in ends:
                sentences.append(current)
                current = []
        draws = torch.rand(len(sentences), generator=gen).tolist()
        stream += [t for s, u in zip(sentences, draws) if u < 0.25 or not digits.isdisjoint(s) for t in s]
    data = load_recipe(write_recipe(tmp_path, tiny_model_dir, corpus_dir)).data
    corpus = prepare_corpus(data, tiny_tokenizer, 64, seed=7)
    rows = selected_rows(corpus, tiny_tokenizer, LongRecipeSelection(mode="digits", keep_other=0.25), 7, 64, None)
    n = len(stream) // 64
    assert len(rows) == n and rows.tokens.tolist() == stream
    assert rows.rows(list(range(n)))["input_ids"].tolist() == [stream[i * 64:(i + 1) * 64] for i in range(n)]
    again = selected_rows(corpus, tiny_tokenizer, LongRecipeSelection(mode="digits", keep_other=0.25), 7, 64, None)
    assert again.manifest == rows.manifest  # read back from the cache


# ------------------------------------------------------------------------------------- positions
@pytest.mark.parametrize("prefix", [True, False])
def test_positions_are_contiguous_in_sentences_and_span_the_target(prefix):
    lengths = [17, 3, 40, 9, 25, 11, 30, 18]  # 153 tokens ~ 0.3 * 512
    for seed in range(20):
        pos = longrecipe_positions(lengths, 512, torch.Generator().manual_seed(seed), "composition", None, prefix)
        assert pos.dtype == torch.long and pos.shape == (sum(lengths),)
        assert (pos.diff() >= 1).all()  # strictly increasing, so non-decreasing
        assert pos[0] == 0 and pos[-1] == 511  # spans the whole window: >= 0.95 L
        start = 0
        for n in lengths:
            assert (pos[start:start + n].diff() == 1).all()  # contiguous inside each sentence
            start += n


def test_positions_without_prefix_put_every_gap_between_sentences():
    pos = longrecipe_positions([4, 4, 4], 40, torch.Generator().manual_seed(3), "composition", None, False)
    jumps = (pos.diff() > 1).nonzero().flatten().tolist()
    assert set(jumps) <= {3, 7}


def test_bounded_gaps_stay_within_max_gap():
    lengths = [5] * 10
    pos = longrecipe_positions(lengths, 512, torch.Generator().manual_seed(0), "bounded", 4, False)
    gaps = pos.diff() - 1
    assert gaps.min() >= 0 and gaps.max() <= 4 and pos[-1] < 512


def test_positions_are_a_pure_function_of_the_seed():
    a = longrecipe_positions([10] * 8, 300, torch.Generator().manual_seed(5))
    b = longrecipe_positions([10] * 8, 300, torch.Generator().manual_seed(5))
    c = longrecipe_positions([10] * 8, 300, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ------------------------------------------------------------------------------------------ runs
@pytest.fixture(scope="module")
def longrecipe_run(tmp_path_factory, tiny_model_dir, corpus_dir):
    tmp = tmp_path_factory.mktemp("longrecipe")
    path = write_recipe(tmp, tiny_model_dir, corpus_dir, name="lr", method=LR, rope={"kind": "none"},
                        data={"seq_len": "auto"}, train={"steps": 2})
    return run_training(load_recipe(path))


def test_training_batches_carry_the_transformed_positions(tiny_model_dir, corpus_dir, tmp_path):
    from longext.methods.longrecipe.data import build_longrecipe_data
    from longext.models import load_tokenizer
    from longext.resolve import resolve

    path = write_recipe(tmp_path, tiny_model_dir, corpus_dir, method=LR, rope={"kind": "none"}, data={"seq_len": "auto"})
    recipe = resolve(load_recipe(path)).recipe
    data = build_longrecipe_data(recipe, load_tokenizer(recipe.model.path))
    batch = data.micro_batch(3)
    assert batch["input_ids"].shape == (1, 154) and batch["position_ids"][0, -1] == 511
    again = build_longrecipe_data(recipe, load_tokenizer(recipe.model.path)).micro_batch(3)  # as after --resume
    assert torch.equal(batch["input_ids"], again["input_ids"]) and torch.equal(batch["position_ids"], again["position_ids"])
    row = int(data._order(0)[3])
    start = 0
    for n in piece_lengths(data.samples.rows([row])["sentences"][0]):
        assert (batch["position_ids"][0, start:start + n].diff() == 1).all()
        start += n


def test_longrecipe_run_trains_an_adapter(longrecipe_run):
    assert (longrecipe_run / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(losses(longrecipe_run)) == [1, 2]


@pytest.mark.parametrize("section, value, message", [
    ("rope", {"kind": "ntk"}, "rope.kind: LongRecipe sets its own enlarged RoPE base"),
    ("method", {**LR, "positions": {"gap_mode": "bounded"}}, "method.positions.max_gap: bounded gap mode needs max_gap"),
    ("data", {"packing": "per_doc"}, "data.packing: LongRecipe fills every sample"),
    ("method", {**LR, "rope_factor": 0.5}, r"method.rope_factor: must be >= 1"),
])
def test_recipe_errors_name_the_field(tmp_path, tiny_model_dir, corpus_dir, section, value, message):
    sections = {"method": LR, "rope": {"kind": "none"}, section: value}
    path = write_recipe(tmp_path, tiny_model_dir, corpus_dir, **sections)
    with pytest.raises(RecipeError, match=message):
        load_recipe(path)


# ---------------------------------------------------------------------------------------- merge
def test_merge_equals_the_weighted_average_of_the_two_state_dicts(tmp_path, tiny_tokenizer):
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file, save_file

    from conftest import build_tiny_model
    from longext.methods.longrecipe.stages import WEIGHTS, merged_adapter_state

    vocab, w = len(tiny_tokenizer), 0.3
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    peft = get_peft_model(build_tiny_model(vocab_size=vocab), config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)  # a "trained" adapter: nonzero B, changed head
    peft.save_pretrained(tmp_path / "tuned")
    originals = {
        n.replace(".original_module", ""): p.detach().clone() for n, p in peft.named_parameters() if ".original_module." in n
    }
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "adapter_config.json").write_text((tmp_path / "tuned" / "adapter_config.json").read_text())
    state = load_file(tmp_path / "tuned" / WEIGHTS)
    assert any(k in state for k in originals)  # the modules_to_save weight is in the adapter under this key
    save_file(merged_adapter_state(state, originals, w), str(tmp_path / "merged" / WEIGHTS))

    def full_state(adapter):
        model = PeftModel.from_pretrained(build_tiny_model(vocab_size=vocab), tmp_path / adapter)
        return model.merge_and_unload().state_dict()

    original, tuned, merged = build_tiny_model(vocab_size=vocab).state_dict(), full_state("tuned"), full_state("merged")
    assert not torch.allclose(tuned["lm_head.weight"], original["lm_head.weight"])
    for key in original:
        assert torch.allclose(merged[key], w * original[key] + (1 - w) * tuned[key], atol=1e-6), key


# ---------------------------------------------------------------------------------------- stages
STAGED = {**LR, "replay": {"steps": 2, "seq_len": 64}, "merge": {"weight_original": 0.5}}


def _staged(tmp_path, tiny_model_dir, corpus_dir, name):
    return write_recipe(tmp_path, tiny_model_dir, corpus_dir, name=name, method=STAGED, rope={"kind": "none"},
                        lora={"modules_to_save": ["norm"]}, data={"seq_len": "auto"},
                        train={"steps": 2, "save_every": 1, "lr": 3.0e-3})


@pytest.fixture(scope="module")
def staged_run(tmp_path_factory, tiny_model_dir, corpus_dir):
    return run_training(load_recipe(_staged(tmp_path_factory.mktemp("staged"), tiny_model_dir, corpus_dir, "full")))


def test_three_stages_in_one_job(staged_run):
    from safetensors.torch import load_file

    status = json.loads((staged_run / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == status["steps"] == 4
    assert status["stages"] == {"extension": "done", "replay": "done", "merge": "done"}
    recipe = load_recipe(staged_run / "recipe.yaml")
    assert recipe.method.replay.lr == pytest.approx(3.0e-4) and recipe.method.replay.seq_len == 64
    lrs = [json.loads(line)["lr"] for line in (staged_run / "metrics.jsonl").read_text().splitlines()]
    # replay runs at its own, lower lr; metrics.jsonl logs the rate each step's update used
    assert lrs == pytest.approx([3.0e-3, 3.0e-3, 3.0e-4, 3.0e-4])
    tuned, merged = (load_file(staged_run / d / "adapter_model.safetensors") for d in ("adapter-tuned", "adapter"))
    assert tuned.keys() == merged.keys()
    for key, value in tuned.items():
        want = value * 0.5 if "lora_B" in key else value if "lora_A" in key else None
        if want is not None:
            assert torch.allclose(merged[key], want), key
        else:  # the final norm, trained in full: the average with the original (all ones)
            assert torch.allclose(merged[key], 0.5 * (value + 1.0), atol=1e-6), key


def test_replay_batches_are_contiguous_short_samples(staged_run):
    from longext.methods.longrecipe.stages import build_replay_data
    from longext.models import load_tokenizer

    recipe = load_recipe(staged_run / "recipe.yaml")
    batch = build_replay_data(recipe, load_tokenizer(recipe.model.path)).micro_batch(0)
    assert torch.equal(batch["position_ids"], torch.arange(64)[None])


@pytest.mark.parametrize("killed_in", ["extension", "replay", "merge"])
def test_a_run_killed_in_any_stage_resumes_to_the_same_result(staged_run, tmp_path, tiny_model_dir, corpus_dir,
                                                              monkeypatch, killed_in):
    import os
    import signal

    from safetensors.torch import load_file

    import longext.methods.longrecipe.stages as stages
    import longext.train as train_module
    from longext.errors import TrainingStopped

    path = _staged(tmp_path, tiny_model_dir, corpus_dir, "killed")
    with monkeypatch.context() as m:
        if killed_in == "merge":
            def crash(*args):
                raise RuntimeError("killed while merging")

            m.setattr(stages, "merge_with_original", crash)
            with pytest.raises(RuntimeError, match="killed while merging"):
                run_training(load_recipe(path))
        else:
            kill_at = {"extension": 1, "replay": 3}[killed_in]

            class KilledLog(train_module.MetricsLog):
                def step(self, step, *args, **kw):
                    if step == kill_at:
                        os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would
                    return super().step(step, *args, **kw)

            m.setattr(train_module, "MetricsLog", KilledLog)
            with pytest.raises(TrainingStopped, match=f"at step {kill_at}/4"):
                run_training(load_recipe(path))
    run = tmp_path / "runs" / "killed"
    status = json.loads((run / "status.json").read_text())
    assert status["stages"][killed_in] == ("pending" if killed_in == "merge" else "running")
    assert [s for s, state in status["stages"].items() if state == "done"] == \
        {"extension": [], "replay": ["extension"], "merge": ["extension", "replay"]}[killed_in]
    resumed = run_training(load_recipe(path), resume=True)
    assert json.loads((run / "status.json").read_text())["stages"] == {"extension": "done", "replay": "done", "merge": "done"}
    want, got = losses(staged_run), losses(resumed)
    assert sorted(got) == [1, 2, 3, 4]
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7)
    for adapter in ("adapter", "adapter-tuned"):
        a, b = (load_file(r / adapter / "adapter_model.safetensors") for r in (staged_run, resumed))
        for key in a:
            assert torch.allclose(a[key], b[key], atol=1e-6), (adapter, key)


# -------------------------------------------------------------------------------------- analysis
def _planted_reference(tmp_path, tiny_model_dir, tiny_tokenizer, corpus_dir, planted: int):
    """A copy of the tiny base whose output row of `planted` is moved along the mean final hidden state at the
    positions that predict it: only that type's true-token logit changes, and its summed change is > 0."""
    from transformers import AutoModelForCausalLM

    from longext.methods.longrecipe.analysis import sample_windows

    ids = tiny_tokenizer((corpus_dir / "doc0.txt").read_text(), add_special_tokens=False)["input_ids"]
    windows = sample_windows([ids], tiny_tokenizer.eos_token_id, 96, 3)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = [model(input_ids=w[None], output_hidden_states=True).hidden_states[-1][0, :-1] for w in windows]
        at = torch.cat([h[w[1:] == planted] for h, w in zip(hidden, windows)])
        assert len(at) > 0
        model.lm_head.weight[planted] += 5.0 * at.mean(0)
    model.save_pretrained(tmp_path / "reference")
    tiny_tokenizer.save_pretrained(tmp_path / "reference")
    return tmp_path / "reference"


def test_analyze_ranks_the_planted_token_type_first_and_is_deterministic(tmp_path, tiny_model_dir, tiny_tokenizer,
                                                                          corpus_dir, capsys):
    from longext.cli import main

    (planted,) = tiny_tokenizer(" the", add_special_tokens=False)["input_ids"]
    reference = _planted_reference(tmp_path, tiny_model_dir, tiny_tokenizer, corpus_dir, planted)
    outs = []
    for name in ("a.json", "b.json"):
        argv = ["analyze", str(tiny_model_dir), str(reference), "--texts", str(corpus_dir / "doc0.txt"),
                "--length", "96", "--samples", "3", "--out", str(tmp_path / name)]
        assert main(argv) == 0, capsys.readouterr()
        outs.append(json.loads((tmp_path / name).read_text()))
    assert outs[0] == {**outs[1], "ranking": outs[0]["ranking"]} and outs[0]["ranking"] == outs[1]["ranking"]
    ranked = outs[0]["ranking"]
    assert ranked[0]["id"] == planted and ranked[0]["text"] == " the" and ranked[0]["delta"] > 0
    assert all(abs(r["delta"]) < 1e-3 for r in ranked[1:])  # nothing else changed
    assert outs[0]["tokens"] == 3 * 95


def test_logit_change_selection_keeps_sentences_with_top_types(tmp_path, tiny_tokenizer):
    from longext.errors import LongextError
    from longext.methods.longrecipe.selection import FORMAT, load_impactful

    ranked = [{"id": i, "text": "", "count": 1, "delta": 10.0 - i, "mean": 0.0} for i in range(10)]
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"format": FORMAT, "tokenizer_size": len(tiny_tokenizer), "ranking": ranked}))
    assert load_impactful(str(path), 0.2, len(tiny_tokenizer)) == {0, 1}
    assert load_impactful(str(path), 0.01, len(tiny_tokenizer)) == {0}
    sentences = [[5, 6], [1, 7], [8, 0, 9], [3]]
    assert kept_of(sentences, {0, 1}, 0.0, torch.Generator()) == [[1, 7], [8, 0, 9]]
    with pytest.raises(LongextError, match="method.selection.analysis: .* 400-token tokenizer, this model.s has 7"):
        load_impactful(str(path), 0.2, 7)
    with pytest.raises(LongextError, match="method.selection.analysis: cannot read"):
        load_impactful(str(tmp_path / "missing.json"), 0.2, 7)


def test_logit_change_mode_needs_an_analysis_file(tmp_path, tiny_model_dir, corpus_dir):
    method = {**LR, "selection": {"mode": "logit_change"}}
    path = write_recipe(tmp_path, tiny_model_dir, corpus_dir, method=method, rope={"kind": "none"})
    with pytest.raises(RecipeError, match="method.selection.analysis: logit_change selection needs"):
        load_recipe(path)


def test_resume_refuses_to_move_the_stage_boundary(staged_run):
    from longext.errors import LongextError
    from longext.rundir import check_start

    recipe = load_recipe(staged_run / "recipe.yaml", ["train.steps=3"])
    with pytest.raises(LongextError, match="train.steps ends the extension stage"):
        check_start(staged_run, recipe, resume=True)


def test_dry_run_shows_the_enlarged_base(tmp_path, tiny_model_dir, corpus_dir):
    from longext.resolve import describe_resolved, resolve

    path = write_recipe(tmp_path, tiny_model_dir, corpus_dir, method=STAGED, rope={"kind": "none"}, data={"seq_len": "auto"})
    text = describe_resolved(resolve(load_recipe(path)))
    assert f'"rope_theta": {static_ntk_base(10000.0, 4.0, 512, 128, 16)}' in text
    assert "seq_len: 154" in text and "lr: 0.0001" in text  # replay lr = train.lr / 10


def test_logit_change_mode_builds_samples_from_the_analysis_file(tmp_path, tiny_model_dir, tiny_tokenizer, corpus_dir):
    from longext.methods.longrecipe.selection import FORMAT
    from longext.methods.longrecipe.data import build_longrecipe_data
    from longext.resolve import resolve

    digits = sorted(digit_ids(token_texts(tiny_tokenizer)))
    ranked = [{"id": i, "text": "", "count": 1, "delta": 1.0, "mean": 1.0} for i in digits]
    analysis = tmp_path / "analysis.json"
    analysis.write_text(json.dumps({"format": FORMAT, "tokenizer_size": len(tiny_tokenizer), "ranking": ranked}))

    def build(selection):
        method = {**LR, "selection": selection}
        path = write_recipe(tmp_path, tiny_model_dir, corpus_dir, method=method, rope={"kind": "none"}, data={"seq_len": "auto"})
        recipe = resolve(load_recipe(path)).recipe
        return torch.as_tensor(np.asarray(build_longrecipe_data(recipe, tiny_tokenizer).samples.tokens, dtype=np.int64))

    by_analysis = build({"mode": "logit_change", "analysis": str(analysis), "top_fraction": 1.0, "keep_other": 0.2})
    by_digits = build({"mode": "digits", "keep_other": 0.2})
    assert torch.equal(by_analysis, by_digits)  # an analysis ranking exactly the digit tokens selects like `digits`
