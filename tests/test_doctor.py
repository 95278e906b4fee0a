"""`longext doctor`: its flags, its report, its comparison with `longext plan`, the longest-length search, the
measuring process (against transformers' loss) and the models it makes. The whole CPU run is a `slow` test."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import bad_input
from longext.doctor import commands, longest, steps
from longext.doctor.material import SMOLLM2_CONFIG, TINY_CONFIG, build_tokenizer, save_model, step_model, synthetic_text
from longext.doctor.report import Check, Report, failed, passed, skipped

REPO = Path(__file__).resolve().parent.parent
GiB = 2**30


# ------------------------------------------------------------------------------------------- flags
def test_bad_flags_are_one_line_each_before_any_work(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    lines = bad_input(capsys, "doctor", "--model", tmp_path / "missing", "--out", tmp_path / "file")
    assert lines == [f"error: --model: {tmp_path / 'missing'} does not exist (give a transformers model folder, or "
                     f"one with its config.json only)", f"error: --out: {tmp_path / 'file'} is a file; give a folder"]
    assert not (tmp_path / "missing").exists()


def test_a_folder_that_is_not_a_report_is_refused(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    assert bad_input(capsys, "doctor", "--out", tmp_path) == [
        f"error: --out: {tmp_path} exists and is not a doctor report; choose another directory"]
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the answer without CUDA")
def test_gpu_flag_without_cuda_says_so(capsys, tmp_path):
    [line] = bad_input(capsys, "doctor", "--gpu", "--out", tmp_path / "r")
    assert line.startswith("error: --gpu: no CUDA device is visible (torch ") and "run without --gpu" in line


# ------------------------------------------------------------------------------------------ report
def test_report_is_rewritten_after_every_row_with_the_documented_fields(tmp_path):
    report = Report(tmp_path, {"mode": "cpu", "device": "test"})
    report.add(passed("a", tokens_per_s=12.5))
    first = json.loads((tmp_path / "doctor.json").read_text())
    assert first["finished"] is False and [c["name"] for c in first["checks"]] == ["a"]
    report.add(failed("b", "went wrong", ratio=float("nan")))
    report.add(skipped("c", "GPU only"))
    report.write(finished=True)
    data = json.loads((tmp_path / "doctor.json").read_text())
    assert data["finished"] is True and data["counts"] == {"pass": 1, "fail": 1, "skip": 1}
    assert [set(c) for c in data["checks"]] == [{"name", "status", "reason", "seconds", "figures"}] * 3
    assert data["checks"][1]["figures"]["ratio"] is None  # NaN is not JSON
    assert "| b | fail |" in (tmp_path / "doctor.md").read_text()
    with pytest.raises(ValueError):
        Check("d", "ok")


# ------------------------------------------------------------------------------ measured vs plan
def _plan(total: float, fixed: float, forward: float = 4e12, backward: float = 6e12, recompute: float = 0.0) -> dict:
    return {"total_bytes": total, "budget_bytes": 80 * GiB,
            "terms": [{"name": "weights", "bytes": total - fixed}, {"name": "fixed overhead", "bytes": fixed}],
            "flops_per_step": forward + backward + recompute,
            "flops_terms": {"forward": forward, "backward": backward, "recompute": recompute}}


def _measured(peak: float, seconds: float = 2.0, losses=(3.0, 2.9)) -> dict:
    return {"length": 8192, "peak_bytes": peak, "seconds_per_step": seconds, "tokens_per_s": 8192 / seconds,
            "losses": list(losses), "finite": all(map(math.isfinite, losses)), "switches": {}, "all_seconds": [seconds]}


def test_compare_holds_the_peak_against_the_plan_without_its_fixed_term():
    row = steps.compare("lora step", _measured(9 * GiB), _plan(11 * GiB, 1 * GiB, recompute=3e12), 1e15, gpu=True)
    assert row.status == "pass"
    assert row.figures["ratio"] == pytest.approx(0.9) and row.figures["plan_gib"] == pytest.approx(10)
    assert row.figures["mfu"] == pytest.approx(10e12 / 2.0 / 1e15)  # no recompute in MFU
    assert row.figures["hfu"] == pytest.approx(13e12 / 2.0 / 1e15)


@pytest.mark.parametrize("peak, word", [(12 * GiB, "underestimates"), (5 * GiB, "overestimates")])
def test_a_plan_far_from_the_measured_peak_fails_the_row(peak, word):
    row = steps.compare("lora step", _measured(peak), _plan(11 * GiB, 1 * GiB), None, gpu=True)
    assert row.status == "fail" and f"`longext plan` {word} here" in row.reason and row.figures["mfu"] is None


def test_a_non_finite_loss_fails_the_row():
    row = steps.compare("lora step", _measured(10 * GiB, losses=(3.0, float("nan"))), _plan(11 * GiB, GiB), 1e15, True)
    assert row.status == "fail" and "non-finite loss" in row.reason


# --------------------------------------------------------------------------------- longest search
@pytest.mark.parametrize("per_token, squared", [(60_000, 0.0), (31_337, 0.0), (20_000, 4e-3)])
def test_longest_length_finds_the_largest_fitting_length(monkeypatch, tmp_path, per_token, squared):
    """Against brute force over every multiple of 1024, for a linear estimate and one that curves upwards."""
    budget, fixed = 80 * 10**9, 3 * GiB
    total = lambda n: fixed + per_token * n + squared * n * n  # noqa: E731
    calls = []

    def fake_plan(recipe, overrides, cpu, log, timeout=120, gpu_memory=None):
        n = int(overrides[0].split("=")[1])
        assert overrides == [f"data.seq_len={n}", f"method.target_len={n}"] and not cpu
        calls.append(n)
        return {"total_bytes": total(n), "budget_bytes": budget}

    monkeypatch.setattr(commands, "plan_json", fake_plan)
    found = longest.longest_length(longest.Planner(tmp_path / "r.yaml", tmp_path / "log"))
    best = max(n for n in range(65536, 2**24 + 1, 1024) if total(n) <= budget)
    assert total(found) <= budget
    assert found == best if squared == 0 else found >= 0.98 * best
    assert len(calls) == len(set(calls)) <= longest.MAX_PLAN_CALLS + 1


def test_longest_length_says_when_nothing_long_fits(monkeypatch, tmp_path):
    monkeypatch.setattr(commands, "plan_json", lambda *a, **k: {"total_bytes": 90e9, "budget_bytes": 80e9})
    assert longest.longest_length(longest.Planner(tmp_path / "r.yaml", tmp_path / "log")) is None


@pytest.mark.parametrize("a, b", [(8e8, 1.7e5), (8e8, 0.0)])
def test_time_capped_length_solves_the_step_flops_for_the_time(a, b):
    """f(n) = a n + b n^2 from two plan points; the length whose FLOPs take `seconds` at `rate`."""
    flops = lambda n: a * n + b * n * n  # noqa: E731
    rate, seconds = 2e14, 240
    n = longest.time_capped_length(65536, flops(65536), 1 << 20, flops(1 << 20), rate, seconds)
    assert n % 1024 == 0 and flops(n) <= rate * seconds < flops(n + 1024)


# --------------------------------------------------------------------------------- subprocesses
def test_a_subprocess_over_its_limit_is_killed_and_named(tmp_path):
    done = commands.run([sys.executable, "-c", "import time; print('hi', flush=True); time.sleep(60)"],
                        tmp_path / "log", "sleeper", timeout=2)
    assert done.code is None and done.problem(2) == "did not finish within 2 s"
    assert "== sleeper ==" in (tmp_path / "log").read_text() and "hi" in done.output


@pytest.mark.parametrize("text, line", [
    ("working\nerror: data.seq_len: bad\nmore\n", "error: data.seq_len: bad"),
    ("Traceback (most recent call last):\n  File x\nRuntimeError: CUDA out of memory\n", "RuntimeError: CUDA out of memory"),
    ("just this\n\n", "just this"),
])
def test_the_error_line_is_the_one_that_says_what_went_wrong(text, line):
    assert commands.error_line(text) == line


# ---------------------------------------------------------------------------------------- models
def test_a_config_only_model_gets_random_weights_of_its_shape(tmp_path):
    tokenizer = build_tokenizer([synthetic_text(2000, 0)], 300)
    config = {**TINY_CONFIG, "vocab_size": 1000, "num_hidden_layers": 3}
    given = tmp_path / "given"
    given.mkdir()
    (given / "config.json").write_text(json.dumps({"model_type": "llama", **config}))
    path, source = step_model(given, tmp_path / "no-cache", tmp_path, tokenizer)
    saved = json.loads((path / "config.json").read_text())
    assert path != given and "random weights" in source
    assert {k: saved[k] for k in config} == config and (path / "tokenizer.json").is_file()


def test_a_model_with_weights_and_tokenizer_is_used_as_it_is(tmp_path):
    tokenizer = build_tokenizer([synthetic_text(2000, 0)], 300)
    model = save_model(tmp_path / "m", {**TINY_CONFIG, "vocab_size": len(tokenizer)}, tokenizer)
    assert step_model(model, tmp_path / "no-cache", tmp_path, tokenizer) == (model, str(model))
    assert step_model(None, model, tmp_path, tokenizer)[0] == model  # the prepared SmolLM2's place


def test_smollm2_shape_is_smollm2_135m():
    """134,515,008 parameters, as SmolLM2-135M's own weights (and `longext plan`) count them."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **SMOLLM2_CONFIG))
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


# ------------------------------------------------------------------------------ measuring process
def test_the_measuring_process_runs_train_steps_and_the_sp1_path_equals_transformers_loss(tmp_path):
    tokenizer = build_tokenizer([synthetic_text(3000, 0)], 300)
    model = save_model(tmp_path / "m", {**TINY_CONFIG, "vocab_size": len(tokenizer)}, tokenizer)
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text(synthetic_text(3000, 1))
    recipe = {"name": "t", "model": {"path": str(model)}, "method": {"kind": "standard", "target_len": 512},
              "rope": {"kind": "linear"}, "data": {"train": [str(tmp_path / "texts")], "seq_len": 256},
              "train": {"steps": 3, "precision": "fp32", "zero_stage": 2, "memory_check": "off"},
              "output": {"dir": str(tmp_path / "run")}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    request = {"recipe": str(tmp_path / "r.yaml"), "lengths": [128, 256], "timed_steps": 1, "sp_length": 128}
    env = {k: v for k, v in os.environ.items() if k not in commands.LAUNCHER_VARIABLES}
    done = subprocess.run([sys.executable, "-m", "longext.doctor.step", json.dumps(request)], capture_output=True,
                          text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = commands.last_json(done.stdout)
    assert [r["length"] for r in result["results"]] == [128, 256]
    for r in result["results"]:
        assert r["finite"] and len(r["losses"]) == 2 and r["peak_bytes"] > 0
        assert r["switches"]["zero_stage"] == 2 and r["switches"]["precision"] == "fp32"
    sp = result["sp_check"]
    assert sp["relative_difference"] < 1e-6 and math.isfinite(sp["reference_loss"])


# ------------------------------------------------------------------------------------- whole run
@pytest.mark.slow
def test_doctor_on_cpu_passes_or_says_why_each_row_is_skipped(tmp_path):
    """The acceptance run: `longext doctor --out DIR` on this CPU (several minutes on 2 cores)."""
    env = {k: v for k, v in os.environ.items() if k not in commands.LAUNCHER_VARIABLES}
    done = subprocess.run([sys.executable, "-m", "longext", "doctor", "--out", str(tmp_path / "doctor")],
                          capture_output=True, text=True, env=env, timeout=1800)
    report = json.loads((tmp_path / "doctor" / "doctor.json").read_text())
    problems = [f"{c['name']}: {c['reason']}" for c in report["checks"] if c["status"] == "fail"]
    assert done.returncode == 0 and not problems, problems or done.stderr[-3000:]
    assert all(c["reason"] for c in report["checks"] if c["status"] == "skip")
    names = {c["name"] for c in report["checks"]}
    assert {"versions", "tiny train", "tiny eval", "tiny export", "ulysses path SP=1", "lora step 1k ZeRO-2",
            "lora step 1k ZeRO-3", "eval forward 2k fp32", "gpu tests", "longest step"} <= names


@pytest.mark.slow
def test_the_wheelhouse_installs_offline_and_the_doctor_passes_there(tmp_path):
    """scripts/check_wheelhouse.sh: a wheelhouse for this Python, a fresh venv, --no-index, `longext doctor`."""
    done = subprocess.run(["bash", str(REPO / "scripts" / "check_wheelhouse.sh"), str(tmp_path)], capture_output=True,
                          text=True, timeout=3600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "doctor" / "doctor.json").read_text())
    assert report["counts"]["fail"] == 0 and report["counts"]["pass"] >= 10


@pytest.mark.slow
def test_longest_step_searches_the_plan_caps_by_time_and_measures(tmp_path, monkeypatch):
    """The --longest path on CPU with a tiny model: the GPU plan's search through the CLI, the time cap (a slow rate
    brings the length down to the start, 8k here), the step at that length in the measuring process, the figures."""
    from longext.doctor.cli_checks import Context
    from longext.doctor.material import write_texts

    tokenizer = build_tokenizer([synthetic_text(3000, 0)], 300)
    model = save_model(tmp_path / "m", {**TINY_CONFIG, "vocab_size": len(tokenizer)}, tokenizer)
    ctx = Context(work=tmp_path, log=tmp_path / "doctor.log", texts=write_texts(tmp_path / "texts", 1, 3000),
                  tokenizer=tokenizer, gpu=False)
    monkeypatch.setattr(longest, "START", 8192)
    row = longest.longest_step(ctx, model, {"precision": "fp32"}, None, flops_rate=1e6, timeout=900)
    f = row.figures
    assert row.name == "longest step 8k" and f["length"] == 8192, (row.reason, f)
    assert f["plan_longest"] > 8192 and f["plan_longest"] % 1024 == 0
    assert f["tokens_per_s"] > 0 and f["peak_gib"] > 0 and f["plan_gib"] > 0 and f["expected_seconds"] > 0
    assert row.status == "pass" or "`longext plan`" in row.reason  # a GPU plan against CPU memory may disagree
