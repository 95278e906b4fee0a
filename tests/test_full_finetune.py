"""Full fine-tuning (train.full_finetune): every weight trains in the real DeepSpeed engine, the run directory holds
model/ instead of adapter/, and eval, export, resume, LongRecipe's merge and `plan` work on such runs."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from helpers import bad_input, losses, run_fresh, tokens, write_recipe
from longext.cli import main
from longext.recipe import load_recipe
from longext.train import run_training

L0 = 128  # the tiny model's window (conftest)
SPARSE = {"type": "attn_sink", "sink_tokens": 4, "window": 32}
LONGGEN = {"kind": "longgen", "target_len": 256, "sparse": SPARSE}


def full_recipe(tmp_path: Path, model_dir: Path, corpus: Path, name: str, **sections) -> Path:
    """write_recipe's small recipe with train.full_finetune: true and no lora section."""
    path = write_recipe(tmp_path, model_dir, corpus, name=name, **sections)
    recipe = yaml.safe_load(path.read_text())
    del recipe["lora"]
    recipe["train"]["full_finetune"] = True
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def train(path: Path, *overrides: str, resume: bool = False) -> Path:
    return run_training(load_recipe(path, list(overrides)), resume=resume)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def hand_built(run: Path, trained: bool = True):
    """The run's model assembled with transformers alone: base config + rope.json, then the tensors of model/
    (or the base's own weights, `trained=False`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    state = json.loads((run / "rope.json").read_text())
    config = AutoConfig.from_pretrained(recipe["model"]["path"])
    config.rope_parameters = dict(state["parameters"])
    config.max_position_embeddings = state["max_position_embeddings"]
    model = AutoModelForCausalLM.from_pretrained(recipe["model"]["path"], config=config, dtype=torch.float32,
                                                 attn_implementation="sdpa")
    if trained:
        model.load_state_dict(weights(run / "model"), strict=False)  # lm_head may be tied: absent from the file
    return model.eval()


# ------------------------------------------------------------------------------------------ training
def test_every_kind_of_weight_trains_and_the_run_holds_model_not_adapter(tmp_path, tiny_model_dir, corpus_dir):
    run = train(full_recipe(tmp_path, tiny_model_dir, corpus_dir, "ft", train={"steps": 2}))
    base, tuned = weights(tiny_model_dir), weights(run / "model")
    assert tuned.keys() == base.keys()
    for name in ("model.embed_tokens.weight", "model.layers.0.mlp.gate_proj.weight", "model.norm.weight",
                 "model.layers.1.self_attn.q_proj.weight", "model.layers.0.input_layernorm.weight", "lm_head.weight"):
        assert not torch.equal(tuned[name], base[name]), name
    assert not (run / "adapter").exists() and (run / "model" / "config.json").is_file()
    assert "lora" not in yaml.safe_load((run / "recipe.yaml").read_text())  # and recipe.yaml loads again:
    assert load_recipe(run / "recipe.yaml").train.full_finetune
    assert json.loads((run / "status.json").read_text())["state"] == "finished"


def test_zero_stages_give_the_same_losses_and_weights(tmp_path, tiny_model_dir, corpus_dir):
    runs = {s: train(full_recipe(tmp_path, tiny_model_dir, corpus_dir, f"z{s}", train={"zero_stage": s, "steps": 3}))
            for s in (0, 2, 3)}
    want = losses(runs[0])
    for stage in (2, 3):
        got = losses(runs[stage])
        assert got.keys() == want.keys() == {1, 2, 3}
        for step in want:
            assert got[step] == pytest.approx(want[step], rel=1e-5), (stage, step)
        a, b = weights(runs[0] / "model"), weights(runs[stage] / "model")  # ZeRO-3: gathered from the partitions
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("stage", [0, 3])
def test_resume_reproduces_the_uninterrupted_losses_and_weights(tmp_path, tiny_model_dir, corpus_dir, stage):
    common = dict(train={"steps": 4, "save_every": 2, "lr": 3.0e-3, "zero_stage": stage})
    whole = train(full_recipe(tmp_path, tiny_model_dir, corpus_dir, "whole", **common))
    part = full_recipe(tmp_path, tiny_model_dir, corpus_dir, "part", **common)
    train(part, "train.steps=2")
    resumed = train(part, resume=True)
    want, got = losses(whole), losses(resumed)
    assert sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7)
    a, b = weights(whole / "model"), weights(resumed / "model")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ recipe, plan
def test_a_lora_section_next_to_full_finetune_is_one_line_and_exit_2(capsys, tmp_path, tiny_model_dir, corpus_dir):
    path = write_recipe(tmp_path, tiny_model_dir, corpus_dir, train={"full_finetune": True})
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if text.startswith("lora:"))
    lines = bad_input(capsys, "train", path, "--dry-run")
    assert lines == [f"error: {path}:{line} lora: LoRA is not used when train.full_finetune is true (every weight "
                     f"trains); remove the lora section or set full_finetune: false"]
    full = full_recipe(tmp_path, tiny_model_dir, corpus_dir, "f")
    assert len(bad_input(capsys, "train", full, "-s", "lora.r=4", "--dry-run")) == 1  # --set counts as explicit


def test_plan_reads_the_recipes_flag(capsys, tmp_path, tiny_model_dir, corpus_dir):
    path = full_recipe(tmp_path, tiny_model_dir, corpus_dir, "plan")
    assert main(["plan", str(path), "--cpu", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["setup"]["lora_r"] is None and plan["trainable_params"] == plan["params"] > 0
    assert main(["plan", str(path), "--cpu"]) == 0
    assert "full fine-tuning" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ eval, export
@pytest.fixture(scope="module")
def linear_run(tmp_path_factory, tiny_model_dir, corpus_dir):
    tmp = tmp_path_factory.mktemp("full-linear")
    return train(full_recipe(tmp, tiny_model_dir, corpus_dir, "lin", data={"seq_len": 128},
                             train={"steps": 3, "lr": 1.0e-2}))


def test_eval_loads_the_trained_weights_with_the_rope_state(linear_run, corpus_dir, tmp_path):
    from longext.targets import load_target

    loaded = load_target(linear_run, dtype=torch.float32)
    assert loaded.model.config.rope_parameters["rope_type"] == "linear" and loaded.target_context == 256
    ids = tokens(200)  # past L0
    with torch.no_grad():
        got = loaded.model(ids).logits
        by_hand = hand_built(linear_run)(ids).logits
        untrained = hand_built(linear_run, trained=False)(ids).logits
    assert (got - by_hand).abs().max() < 1e-5
    assert (got - untrained).abs().max() > 1e-2
    args = ["eval", linear_run, "--lengths", "256", "--texts", corpus_dir / "doc0.txt", "--no-passkey",
            "--out", tmp_path / "eval", "-s", "perplexity.targets=64", "-s", "perplexity.windows=1"]
    assert main([str(a) for a in args]) == 0
    ppl = json.loads((tmp_path / "eval" / "eval.json").read_text())["models"][0]["perplexity"]["256"]["ppl"]
    assert 1 < ppl < 1e4


def test_export_writes_the_trained_weights_and_passes_every_check(linear_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from longext.export import run_export
    from longext.export_check import FP32_RTOL

    result = run_export(linear_run, tmp_path / "model")
    assert result.dtype == "float32" and result.merge_diff == 0.0
    assert result.max_abs_diff < 1e-4 and result.artifact_diff < 1e-4
    assert result.bound == pytest.approx(FP32_RTOL * max(1.0, result.logit_scale))
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    params = json.loads((linear_run / "rope.json").read_text())["parameters"]
    assert config["rope_parameters"] == params and config["max_position_embeddings"] == 256
    assert config["rope_scaling"] == {"rope_type": "linear", "type": "linear", "factor": 2.0}
    assert config["longext"]["method"] == "standard" and config["longext"]["original_context"] == L0
    exported, trained = weights(tmp_path / "model"), weights(linear_run / "model")
    assert exported.keys() == trained.keys() and all(torch.equal(exported[k], trained[k]) for k in trained)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32).eval()
    ids = tokens(200, seed=1)
    with torch.no_grad():
        assert (plain(ids).logits - hand_built(linear_run)(ids).logits).abs().max() < 1e-4


def test_an_unfinished_full_run_has_no_trained_weights(linear_run, tmp_path, capsys):
    run = tmp_path / "unfinished"
    shutil.copytree(linear_run, run, ignore=shutil.ignore_patterns("model"))
    [line] = bad_input(capsys, "export", run, "--out", tmp_path / "m")
    assert re.match(r"^error: RUN: .*unfinished has no trained weights yet; finish or resume training first$", line)
    assert main([str(a) for a in ("eval", run, "--lengths", "256", "--no-ppl", "--out", tmp_path / "e")]) == 2
    err = capsys.readouterr().err  # eval's progress bar has started: the error is its last line
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in err and len(errors) == 1
    assert re.match(r"^error: TARGET: .*unfinished has no trained weights yet \(train it, or resume", errors[0])
    assert not (tmp_path / "m").exists()


FRESH = r"""
with torch.no_grad():
    logits = model(ids).logits
torch.save({"logits": logits, "refused": refused, "longgen": dict(model.config.longgen)}, out)
"""


def test_longgen_full_run_exports_its_modeling_code(tmp_path, tiny_model_dir, corpus_dir):
    from longext.export import run_export
    from longext.targets import load_target

    run = train(full_recipe(tmp_path, tiny_model_dir, corpus_dir, "lg", method=LONGGEN,
                            rope={"kind": "none", "theta": 5.0e4}, data={"seq_len": "auto"},
                            train={"steps": 2, "lr": 1.0e-2, "zero_stage": 2}))
    spec = json.loads((run / "rope.json").read_text())["extra"]["longgen"]
    loaded = load_target(run, dtype=torch.float32)
    ids = tokens(200, seed=3)  # longer than sink + window: the sparse layer drops keys
    with torch.no_grad():
        got = loaded.model(ids).logits
        all_full = hand_built(run)(ids).logits
    assert (got - all_full).abs().max() > 1e-3  # eval runs the sparse layout, not all-full attention
    result = run_export(run, tmp_path / "model")
    assert result.max_abs_diff < 1e-4 and result.merge_diff == 0.0
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["longgen"] == spec and config["model_type"].startswith("longext_")
    assert config["auto_map"]["AutoModelForCausalLM"] == f"modeling_longext_longgen.{config['architectures'][0]}"
    fresh = run_fresh(tmp_path, FRESH, tmp_path / "model", ids)  # no longext in that process
    assert fresh["refused"] is not None and fresh["longgen"] == spec
    assert (fresh["logits"] - got).abs().max() < 1e-4


def test_e2llm_full_run_evaluates_with_its_rule_and_exports_one_window(tmp_path, tiny_model_dir, corpus_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    from longext.errors import LongextError
    from longext.export import run_export
    from longext.targets import load_target
    from longext.rotary import ScaledRotary

    run = train(full_recipe(tmp_path, tiny_model_dir, corpus_dir, "e2", method={"kind": "e2llm", "target_len": 512},
                            rope={"kind": "none"}, data={"seq_len": "auto"}, train={"steps": 2, "lr": 1.0e-2}))
    loaded = load_target(run, dtype=torch.float32)
    rotary = loaded.model.model.rotary_emb
    assert isinstance(rotary, ScaledRotary)
    for length, g in ((128, 1.0), (200, 2.0), (384, 3.0)):
        loaded.set_length(length)
        assert rotary.scale == g
    with pytest.raises(LongextError, match="--length: an E2-LLM run serves any window"):
        run_export(run, tmp_path / "none")
    result = run_export(run, tmp_path / "x384", length=384)
    assert result.max_abs_diff < 1e-4
    config = AutoConfig.from_pretrained(tmp_path / "x384")
    assert config.rope_parameters["rope_type"] == "linear" and config.rope_parameters["factor"] == 3.0
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "x384", dtype=torch.float32).eval()
    ids = tokens(384, rows=1)
    with torch.no_grad():
        assert (plain(ids).logits - loaded.model(input_ids=ids).logits).abs().max() < 1e-4  # set_length(384) above
    exported, trained = weights(tmp_path / "x384"), weights(run / "model")
    assert exported.keys() == trained.keys() and all(torch.equal(exported[k], trained[k]) for k in trained)


# ------------------------------------------------------------------------------------------ LongRecipe merge
def test_longrecipe_merge_averages_the_full_weights_with_the_base(tmp_path, tiny_model_dir, corpus_dir):
    method = {"kind": "longrecipe", "target_len": 512, "merge": {"weight_original": 0.25}}
    run = train(full_recipe(tmp_path, tiny_model_dir, corpus_dir, "lr", method=method, rope={"kind": "none"},
                            data={"seq_len": "auto"}, train={"steps": 2, "lr": 3.0e-3}))
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "finished" and status["stages"]["merge"] == "done"
    base, tuned, merged = weights(tiny_model_dir), weights(run / "model-tuned"), weights(run / "model")
    assert merged.keys() == tuned.keys()
    for name in merged:
        torch.testing.assert_close(merged[name], 0.25 * base[name] + 0.75 * tuned[name], rtol=0, atol=1e-6)
    assert any(not torch.equal(tuned[k], base[k]) for k in tuned)
    assert (run / "model" / "config.json").is_file()
