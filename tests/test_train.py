"""Training runs in a real DeepSpeed engine on CPU: ZeRO stages, resume, signals, families, ranks."""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import losses, write_recipe
from longext.errors import LongextError, TrainingStopped
from longext.recipe import load_recipe
from longext.train import run_training

REPO = Path(__file__).resolve().parent.parent


def train(path: Path, *overrides: str, resume: bool = False) -> Path:
    return run_training(load_recipe(path, list(overrides)), resume=resume)


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_each_zero_stage_trains_and_saves_a_nonzero_adapter(tmp_path, tiny_model_dir, corpus_dir, stage):
    from safetensors.torch import load_file

    path = write_recipe(tmp_path, tiny_model_dir, corpus_dir, name=f"z{stage}", train={"zero_stage": stage, "steps": 3})
    run = train(path)
    weights = load_file(run / "adapter" / "adapter_model.safetensors")
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: non-zero means it trained
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["r"] == 4


def test_zero_stages_give_the_same_losses_in_fp32(tmp_path, tiny_model_dir, corpus_dir):
    runs = [
        train(write_recipe(tmp_path, tiny_model_dir, corpus_dir, name=f"s{s}", train={"zero_stage": s, "steps": 3}))
        for s in (0, 3)
    ]
    a, b = (losses(r) for r in runs)
    assert a.keys() == b.keys()
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-5)
    # the ZeRO-3 engine swapped torch.nn.functional.linear for its own process-wide; the run puts torch's back
    import torch
    from deepspeed.runtime.zero.linear import zero3_linear_wrap

    assert torch.nn.functional.linear is not zero3_linear_wrap


SCHEDULES = {"constant": {}, "cosine": {"warmup_steps": 2, "schedule": "cosine", "min_lr_ratio": 0.1}}


def crash_after(run: Path, step: int) -> None:
    """Leave `run` as a hard kill after step `step`'s checkpoint would: `latest` names that checkpoint and no
    later checkpoint exists (checkpoints.save publishes the folder, then writes `latest`)."""
    import shutil

    ckpt = run / "checkpoints"
    tag = f"step-{step:06d}"
    assert (ckpt / tag).is_dir()
    for later in ckpt.glob("step-*"):
        if later.name > tag:
            shutil.rmtree(later)
    (ckpt / "latest").write_text(tag)


@pytest.mark.parametrize(("stage", "schedule"), [(0, "constant"), (0, "cosine"), (3, "cosine")])
def test_resume_reproduces_the_uninterrupted_losses(tmp_path, tiny_model_dir, corpus_dir, stage, schedule):
    # warmup + cosine: every step has its own lr, so a scheduler state not saved or not restored changes the
    # resumed steps' lr (and from step 5 on their losses)
    common = dict(train={"steps": 6, "save_every": 3, "grad_accum": 2, "lr": 3.0e-3, "zero_stage": stage,
                         **SCHEDULES[schedule]})
    full = train(write_recipe(tmp_path, tiny_model_dir, corpus_dir, name="full", **common))
    part = write_recipe(tmp_path, tiny_model_dir, corpus_dir, name="part", **common)
    crash_after(train(part), 3)
    resumed = train(part, resume=True)
    want, got = losses(full), losses(resumed)
    assert sorted(got) == list(range(1, 7))
    for step in range(4, 7):
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7)
    assert logged(resumed, "lr") == pytest.approx(logged(full, "lr"), rel=1e-12)
    if schedule != "constant":
        assert len(set(logged(full, "lr")[3:])) == 3  # the resumed steps really had different rates


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_resume_with_more_steps_continues_as_the_longer_run(tmp_path, tiny_model_dir, corpus_dir, schedule):
    # train.steps may change on resume (rundir.RESUMABLE_CHANGES): a 3-step run extended to 6 must follow the
    # 6-step run from step 4 on, lr and losses alike
    common = dict(train={"steps": 6, "save_every": 3, "grad_accum": 2, "lr": 3.0e-3, **SCHEDULES[schedule]})
    full = train(write_recipe(tmp_path, tiny_model_dir, corpus_dir, name="full", **common))
    part = write_recipe(tmp_path, tiny_model_dir, corpus_dir, name="part", **common)
    train(part, "train.steps=3")
    resumed = train(part, resume=True)
    assert logged(resumed, "lr") == pytest.approx(logged(full, "lr"), rel=1e-12)
    want, got = losses(full), losses(resumed)
    assert sorted(got) == list(range(1, 7))
    for step in range(4, 7):
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7)


def logged(run: Path, key: str) -> list[float]:
    return [json.loads(line)[key] for line in (run / "metrics.jsonl").read_text().splitlines()]


# The schedule written out (train.steps 6, warmup_steps 2, min_lr_ratio 0.1, lr 1e-3): warmup k < 2 gives
# lr * (k + 1) / 3; after it, progress p = (k - 2) / (6 - 2) and lr * (0.1 + 0.9 * shape(p)), shape(p) being
# (1 + cos(pi p)) / 2 for cosine and 1 - p for linear. k is the 0-based optimizer step.
WARMUP = [1.0e-3 / 3, 2.0e-3 / 3]
EXPECTED_LR = {
    "cosine": WARMUP + [1.0e-3 * (0.1 + 0.9 * (1 + math.cos(math.pi * p)) / 2) for p in (0.0, 0.25, 0.5, 0.75)],
    "linear": WARMUP + [1.0e-3 * v for v in (1.0, 0.775, 0.55, 0.325)],
}


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_logged_lr_follows_warmup_then_the_decay(tmp_path, tiny_model_dir, corpus_dir, schedule):
    path = write_recipe(tmp_path, tiny_model_dir, corpus_dir, name=schedule, data={"seq_len": 32}, train={
        "steps": 6, "lr": 1.0e-3, "warmup_steps": 2, "schedule": schedule, "min_lr_ratio": 0.1})
    run = train(path)
    assert logged(run, "lr") == pytest.approx(EXPECTED_LR[schedule], rel=1e-9)


def test_keep_checkpoints_keeps_exactly_the_newest(tmp_path, tiny_model_dir, corpus_dir):
    path = write_recipe(tmp_path, tiny_model_dir, corpus_dir, name="keep", data={"seq_len": 32},
                        train={"steps": 4, "save_every": 1, "keep_checkpoints": 2})
    ckpt = train(path) / "checkpoints"
    assert sorted(p.name for p in ckpt.glob("step-*")) == ["step-000003", "step-000004"]
    assert (ckpt / "latest").read_text().strip() == "step-000004"


def test_gradient_checkpointing_gives_the_same_losses(tmp_path, tiny_model_dir, corpus_dir):
    plain = train(write_recipe(tmp_path, tiny_model_dir, corpus_dir, name="nogc", train={"steps": 2}))
    ckpt = train(write_recipe(tmp_path, tiny_model_dir, corpus_dir, name="gc", train={"steps": 2, "gradient_checkpointing": True}))
    a, b = losses(plain), losses(ckpt)
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5)


def test_a_finished_run_is_not_overwritten_without_being_asked(tmp_path, tiny_model_dir, corpus_dir):
    path = write_recipe(tmp_path, tiny_model_dir, corpus_dir, name="once", train={"steps": 1})
    train(path)
    with pytest.raises(LongextError, match="already holds a finished run"):
        train(path)
    train(path, "output.overwrite=true")  # allowed when asked


def test_resume_refuses_a_changed_recipe(tmp_path, tiny_model_dir, corpus_dir):
    path = write_recipe(tmp_path, tiny_model_dir, corpus_dir, name="chg", train={"steps": 2, "save_every": 1})
    train(path)
    with pytest.raises(LongextError, match="differs .* in train.lr"):
        train(path, "train.lr=0.5", "train.steps=3", resume=True)


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_model_dir, corpus_dir):
    # AdamW moves every weight by ~lr per step whatever the gradient: lr 1e30 overflows the next forward.
    path = write_recipe(
        tmp_path, tiny_model_dir, corpus_dir, name="nan", train={"steps": 5, "save_every": 1, "lr": 1.0e30, "grad_clip": None}
    )
    with pytest.raises(TrainingStopped, match="non-finite loss .* last good checkpoint is .*step-000001"):
        train(path)
    run = tmp_path / "runs" / "nan"
    assert json.loads((run / "status.json").read_text())["state"] == "failed"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000001"


def _stock_first_loss(model_dir: Path, batch: dict, rope_parameters: dict | None, max_positions: int) -> float:
    """Stock transformers' loss on `batch` for the saved model, with `rope_parameters` (None: as saved)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from longext.train import MODEL_INPUTS

    config = AutoConfig.from_pretrained(model_dir)
    if rope_parameters is not None:
        config.rope_parameters = rope_parameters
    config.max_position_embeddings = max_positions
    model = AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    with torch.no_grad():
        return model(**{k: batch[k] for k in MODEL_INPUTS}).loss.item()


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_one_training_step_for_each_supported_family(tmp_path, corpus_dir, tiny_tokenizer, arch):
    from conftest import build_tiny_model
    from transformers import AutoConfig, AutoTokenizer

    from longext.data import build_train_data
    from longext.resolve import resolve

    model_dir = tmp_path / arch
    # larger weights (as in test_e2llm_pose's peaked model): attention is peaked, so the RoPE moves the loss
    build_tiny_model(arch, vocab_size=len(tiny_tokenizer), initializer_range=0.2).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    # seq_len 256 > L0 = 128: positions past L0, where YaRN and the plain RoPE differ most
    path = write_recipe(tmp_path, model_dir, corpus_dir, name=arch, train={"steps": 1}, rope={"kind": "yarn"},
                        data={"seq_len": 256})
    run = train(path)
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((run / "rope.json").read_text())["parameters"]["rope_type"] == "yarn"
    got = losses(run)[1]
    assert math.isfinite(got)

    # LoRA B starts at zero: step 1 is the base model with the run's RoPE, YaRN s = target_len 256 / L0 128
    recipe = resolve(load_recipe(path)).recipe
    batch = build_train_data(recipe, AutoTokenizer.from_pretrained(model_dir)).micro_batch(0)
    assert batch["input_ids"].shape == (1, 256)
    theta = AutoConfig.from_pretrained(model_dir).rope_parameters["rope_theta"]
    yarn = {"rope_type": "yarn", "factor": 2.0, "rope_theta": theta, "original_max_position_embeddings": 128,
            "beta_fast": 32.0, "beta_slow": 1.0}
    want = _stock_first_loss(model_dir, batch, yarn, 256)
    assert got == pytest.approx(want, rel=1e-5)
    plain = _stock_first_loss(model_dir, batch, None, 256)
    assert abs(plain - want) > 1e-3  # this batch tells the YaRN model from the unscaled one


def _cli(*args: str, **kw) -> subprocess.Popen:
    # The in-process tests above made this process rank 0 of a world of one; a child must not inherit that.
    dist_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in dist_vars}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "longext", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_sigterm_mid_run_checkpoints_and_resume_matches_an_uninterrupted_run(tmp_path, tiny_model_dir, corpus_dir):
    common = dict(train={"steps": 60, "lr": 2.0e-3}, data={"seq_len": 128})
    full = train(write_recipe(tmp_path, tiny_model_dir, corpus_dir, name="ref", **common))
    path = write_recipe(tmp_path, tiny_model_dir, corpus_dir, name="sig", **common)
    run = tmp_path / "elsewhere"  # not the recipe's output.dir: the resume command must say --out
    metrics = run / "metrics.jsonl"
    proc = _cli("train", str(path), "--out", str(run), "-s", "train.log_every=5")
    deadline = time.monotonic() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "training never logged 3 steps"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "interrupted by SIGTERM" in out and "Traceback" not in out
    stopped_at = json.loads((run / "status.json").read_text())["step"]
    assert 3 <= stopped_at < 60
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step-{stopped_at:06d}"
    [line] = [line for line in out.splitlines() if line.startswith("error:")]
    command = f"longext train {path} -s train.log_every=5 --out {run} --resume"
    assert line.endswith(f"; continue with `{command}`"), line
    from longext.cli import main

    assert main(shlex.split(command)[1:]) == 0  # the printed command, as printed, continues the run
    resumed = run
    want, got = losses(full), losses(resumed)
    assert sorted(got) == list(range(1, 61))
    for step in range(stopped_at + 1, 61):
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7)


def test_two_cpu_ranks_match_one_rank_with_the_same_global_batch(tmp_path, tiny_model_dir, corpus_dir):
    # 1 rank x grad_accum 2 sees exactly the samples 2 ranks x grad_accum 1 see (data.py indexing).
    one = train(write_recipe(tmp_path, tiny_model_dir, corpus_dir, name="one", train={"zero_stage": 2, "grad_accum": 2}))
    path = write_recipe(tmp_path, tiny_model_dir, corpus_dir, name="two", train={"zero_stage": 2, "grad_accum": 1})
    proc = _cli("train", str(path), "--nproc", "2")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert out.count("run directory:") == 1, out  # every rank finishes; one says so
    a, b = losses(one), losses(tmp_path / "runs" / "two")
    assert a.keys() == b.keys()
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4)
    assert (tmp_path / "runs" / "two" / "adapter" / "adapter_model.safetensors").is_file()


# ------------------------------------------------------------------ optimizer hyper-parameters reach DeepSpeed
ADAM = {"lr": 3.0e-3, "weight_decay": 0.05, "betas": [0.8, 0.99], "eps": 1.0e-6}  # none of them the default


@pytest.mark.parametrize("stage", [0, 2])
def test_recipe_adamw_settings_reach_the_engine_optimizer(tmp_path, tiny_model_dir, corpus_dir, monkeypatch, stage):
    import longext.train

    engines = []
    real = longext.train.make_engine

    def spy(*args, **kwargs):  # the real engine, only remembered
        engines.append(real(*args, **kwargs))
        return engines[-1]

    monkeypatch.setattr(longext.train, "make_engine", spy)
    path = write_recipe(tmp_path, tiny_model_dir, corpus_dir, name=f"adam{stage}", data={"seq_len": 32},
                        train={"steps": 1, "zero_stage": stage, **ADAM})
    train(path)
    (engine,) = engines
    groups = engine.optimizer.param_groups  # what DeepSpeed steps (the ZeRO wrapper forwards its inner AdamW's)
    assert groups and any(p.numel() for g in groups for p in g["params"])
    for group in groups:
        assert (group["lr"], group["weight_decay"], tuple(group["betas"]), group["eps"]) == (
            ADAM["lr"], ADAM["weight_decay"], tuple(ADAM["betas"]), ADAM["eps"])


# ------------------------------------------------------------------ micro_batch_size 2 + per_doc packing
SHORT_DOC_WORDS = (10, 20, 24, 30)  # 12-49 tokens, all under seq_len 64: every per_doc sample is padded


@pytest.fixture(scope="module")
def peaked_model_dir(tmp_path_factory, tiny_tokenizer):
    """The tiny Llama with larger weights (as in test_sp): per-token losses differ, so a dropped row or scored
    padding moves the mean by far more than the tolerance."""
    from conftest import build_tiny_model

    d = tmp_path_factory.mktemp("peaked-llama")
    build_tiny_model("llama", vocab_size=len(tiny_tokenizer), initializer_range=0.2).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


def test_first_loss_with_two_padded_per_doc_rows_is_transformers_loss(tmp_path, peaked_model_dir):
    import torch
    from conftest import synthetic_text
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from longext.data import build_train_data
    from longext.resolve import resolve
    from longext.train import MODEL_INPUTS

    corpus = tmp_path / "short"
    corpus.mkdir()
    for i, words in enumerate(SHORT_DOC_WORDS):
        (corpus / f"doc{i}.txt").write_text(synthetic_text(words, seed=10 + i))
    path = write_recipe(tmp_path, peaked_model_dir, corpus, name="perdoc", data={"seq_len": 64, "packing": "per_doc"},
                        train={"steps": 1, "micro_batch_size": 2})
    got = losses(train(path))[1]

    recipe = resolve(load_recipe(path)).recipe
    batch = build_train_data(recipe, AutoTokenizer.from_pretrained(peaked_model_dir)).micro_batch(0)
    real = batch["attention_mask"].sum(1)
    assert batch["input_ids"].shape == (2, 64)
    assert (real < 64).all() and (real > 8).all() and real[0] != real[1]  # both rows padded, by different amounts
    assert torch.equal(batch["labels"] == -100, batch["attention_mask"] == 0)

    config = AutoConfig.from_pretrained(peaked_model_dir)
    config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 1.0e4}  # target_len 256 / L0 128
    model = AutoModelForCausalLM.from_pretrained(peaked_model_dir, config=config, dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    with torch.no_grad():
        want = model(**{k: batch[k] for k in MODEL_INPUTS}).loss.item()
        first_row = model(**{k: batch[k][:1] for k in MODEL_INPUTS}).loss.item()
        padding_scored = model(**{**{k: batch[k] for k in MODEL_INPUTS}, "labels": batch["input_ids"]}).loss.item()
    assert got == pytest.approx(want, rel=1e-6)
    assert abs(first_row - want) > 1e-2 and abs(padding_scored - want) > 1e-2  # this batch tells those bugs apart
