"""Output that survives redirection (issue 15): with stdout not a terminal and COLUMNS=40, every line that carries a
path or a figure is whole and free of ANSI codes. One tiny run goes through the CLI (train, eval, export, plan) with
its output captured; the same run, damaged, shows that eval and export name a truncated adapter in one line."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import bad_input, write_recipe
from longext.cli import main

ROOT = Path(__file__).resolve().parent.parent
FLOAT = r"\d\.\d\de[-+]\d\d"


@contextlib.contextmanager
def narrow_pipe(**env):
    """stdout and stderr redirected to buffers (not terminals), COLUMNS=40 and `env` set; yields the buffers."""
    saved = {k: os.environ.get(k) for k in ("COLUMNS", "FORCE_COLOR", *env)}
    os.environ.update(COLUMNS="40", **env)
    if "FORCE_COLOR" not in env:
        os.environ.pop("FORCE_COLOR", None)
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield out, err
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def session(tmp_path_factory, tiny_model_dir, corpus_dir):
    """(folder, {command: stdout + stderr}) of train -> eval -> export -> plan, all at COLUMNS=40, not a terminal.
    The folder names are long, so every path is wider than the 40 columns."""
    base = tmp_path_factory.mktemp("output") / ("a-folder-name-long-enough-to-be-wrapped-" * 2).rstrip("-")
    base.mkdir()
    recipe = write_recipe(base, tiny_model_dir, corpus_dir, name="narrow", train={"steps": 2},
                          eval={"lengths": [128],
                                "perplexity": {"targets": 32, "windows": 1, "texts": [str(corpus_dir)]},
                                "passkey": {"enabled": False}})
    run, model = base / "runs" / "narrow", base / "exported-model"
    outputs = {}
    for name, argv in (("train", ["train", recipe]), ("eval", ["eval", run]),
                       ("export", ["export", run, "--out", model]), ("plan", ["plan", recipe, "--gpu-memory", "80GB"]),
                       ("recipes", ["recipes", "list"])):
        with narrow_pipe() as (out, err):
            code = main([str(a) for a in argv])
        outputs[name] = out.getvalue() + err.getvalue()
        assert code == 0, outputs[name]
    return base, outputs


def test_lines_with_paths_and_figures_are_whole_at_40_columns(session):
    base, outputs = session
    run, model = base / "runs" / "narrow", base / "exported-model"
    assert f"run directory: {run}\n" in outputs["train"]
    assert len(re.findall(r"^step +\d+/2  loss \d+\.\d{4}  lr \S+  [\d,]+ tok/s  step [\d.]+s  ETA [\d,]+s$",
                          outputs["train"], flags=re.M)) == 2, outputs["train"]
    assert f"report: {run / 'eval'}\n" in outputs["eval"]
    assert f"longext eval: {run}\n" in outputs["eval"]  # the table's title, with the path whole
    assert re.search(rf"^exported to {re.escape(str(model))}  \(max \|Δlogit\| vs in-tool model: {FLOAT}, bound "
                     rf"{FLOAT} for float32\)$", outputs["export"], flags=re.M), outputs["export"]
    assert re.search(r"^total [\d.]+ GiB of 74\.51 GiB per device \(\d+%\): fits$", outputs["plan"], flags=re.M)
    from longext.catalog import RECIPES_DIR

    assert f"recipes in {RECIPES_DIR}\n" in outputs["recipes"]
    assert "llama3-8b-128k" in outputs["recipes"] and "meta-llama/Meta-Llama-3-8B" in outputs["recipes"]


def test_nothing_but_text_when_not_a_terminal(session):
    _, outputs = session
    for name, text in outputs.items():
        assert "\x1b" not in text, name


def test_force_color_brings_ansi_codes_back(session):
    base, _ = session
    with narrow_pipe(FORCE_COLOR="1") as (out, _):
        assert main(["plan", str(base / "narrow.yaml"), "--gpu-memory", "80GB"]) == 0
    assert "\x1b[" in out.getvalue()


def test_a_truncated_adapter_is_named_by_eval_and_export(session, tmp_path, capsys):
    base, _ = session
    run = Path(shutil.copytree(base / "runs" / "narrow", tmp_path / "run"))
    weights = run / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    want = f"error: TARGET: {weights} is truncated or not a safetensors file (100 bytes, no complete header)"
    assert bad_input(capsys, "eval", run) == [want]
    assert bad_input(capsys, "export", run, "--out", tmp_path / "m") == [want]
    assert not (tmp_path / "m").exists()


def test_demo_script_writes_ansi_codes_only_to_a_terminal(tmp_path):
    """scripts/demo.sh up to its first command, with a `longext` on PATH that stops it there."""
    stub = tmp_path / "bin" / "longext"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 7\n")
    stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{stub.parent}:{os.environ['PATH']}"}
    env.pop("FORCE_COLOR", None)
    plain = subprocess.run(["bash", "scripts/demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    forced = subprocess.run(["bash", "scripts/demo.sh"], cwd=ROOT, env={**env, "FORCE_COLOR": "1"},
                            capture_output=True, text=True)
    assert plain.returncode == forced.returncode == 7
    assert plain.stdout == "\n== 1/4 train: SmolLM2-135M (8k window) -> 16k with YaRN x2 and a short LoRA run at 2k\n"
    assert forced.stdout == "\n\x1b[1m" + plain.stdout.strip("\n") + "\x1b[0m\n"


def test_analyze_prints_one_line(session, tmp_path, tiny_model_dir, corpus_dir):
    """No weight-loading bars or library warnings around its line (a fresh process: real stderr, real warnings)."""
    result = subprocess.run(
        [sys.executable, "-m", "longext", "analyze", str(tiny_model_dir), str(tiny_model_dir), "--texts",
         str(corpus_dir), "--length", "128", "--samples", "1", "--out", str(tmp_path / "a.json")],
        cwd=ROOT, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == (f"token ranking written to {tmp_path / 'a.json'}  (use it as "
                                             "method.selection.analysis)\n")


def test_a_runs_damaged_base_model_is_named_as_the_runs_model_path(session, tmp_path, tiny_model_dir, capsys):
    import yaml

    base, _ = session
    run = Path(shutil.copytree(base / "runs" / "narrow", tmp_path / "run"))
    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "base"))
    (model / "tokenizer.json").unlink()
    (model / "tokenizer_config.json").unlink()
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["model"]["path"] = str(model)
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    want = (f"error: model.path (the base model of {run}/recipe.yaml): {model} has no tokenizer files (tokenizer.json, "
            "tokenizer.model, or vocab.json + merges.txt); copy them from the model the weights came from")
    assert bad_input(capsys, "eval", run, "--baseline") == [want]
    assert bad_input(capsys, "export", run, "--out", tmp_path / "m") == [want]
