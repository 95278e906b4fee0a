"""`longext export`: merged weights and both RoPE key styles, reloaded by plain transformers with the
logits of the unmerged in-tool model; refusals, --force, and nothing half-written on failure."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from longext.cli import main
from longext.errors import LongextError
from longext.export import run_export
from longext.export_check import FP32_RTOL, LOW_PRECISION_RTOL, build_probes
from longext.rope import RopeState

L0, TARGET = 128, 256  # the tiny model's window (conftest) and the recipes' method.target_len
ROPES = {
    "linear": {"kind": "linear"},
    "yarn": {"kind": "yarn"},
    "dynamic": {"kind": "dynamic"},
    "llama3": {"kind": "llama3"},
    "ntk": {"kind": "ntk"},
    "none": {"kind": "none", "theta": 50000.0},
}
# What older consumers must read, written out by hand (factor auto = 256 / 128 = 2).
LEGACY = {
    "linear": (10000.0, {"rope_type": "linear", "type": "linear", "factor": 2.0}),
    "yarn": (
        10000.0,
        {"rope_type": "yarn", "type": "yarn", "factor": 2.0, "original_max_position_embeddings": L0,
         "beta_fast": 32.0, "beta_slow": 1.0},
    ),
    "dynamic": (10000.0, {"rope_type": "dynamic", "type": "dynamic", "factor": 2.0}),
    "llama3": (
        10000.0,
        {"rope_type": "llama3", "type": "llama3", "factor": 2.0, "original_max_position_embeddings": L0,
         "low_freq_factor": 1.0, "high_freq_factor": 4.0},
    ),
    # static NTK is a new base, b * s^(d / (d - 2)) with head_dim d = 64 / 4 = 16, and no scaling block
    "ntk": (10000.0 * 2.0 ** (16 / 14), None),
    "none": (50000.0, None),
}


def train_run(folder: Path, model_dir: Path, corpus: Path, kind: str) -> Path:
    from longext.recipe import load_recipe
    from longext.train import run_training

    recipe = {
        "name": f"exp-{kind}",
        "model": {"path": str(model_dir)},
        "method": {"kind": "standard", "target_len": TARGET},
        "rope": ROPES[kind],
        "data": {"train": [str(corpus)], "seq_len": 128},
        "train": {"steps": 3, "lr": 1.0e-2, "precision": "fp32", "zero_stage": 0},
        "output": {"dir": str(folder / "run")},
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return run_training(load_recipe(path))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, corpus_dir):
    """kind -> run directory; each rope kind is trained once per module."""
    runs: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in runs:
            runs[kind] = train_run(tmp_path_factory.mktemp(f"run-{kind}"), tiny_model_dir, corpus_dir, kind)
        return runs[kind]

    return get


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """kind -> (run directory, ExportResult) of a default (`--dtype auto`) export."""
    results: dict = {}

    def get(kind: str):
        if kind not in results:
            run = trained(kind)
            results[kind] = run, run_export(run, tmp_path_factory.mktemp(f"out-{kind}") / "model")
        return results[kind]

    return get


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def in_tool_and_plain(run: Path, out: Path):
    """The unmerged model built by hand (base + rope.json + peft adapter) and the export through plain transformers."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    state = json.loads((run / "rope.json").read_text())
    config = AutoConfig.from_pretrained(recipe["model"]["path"])
    config.rope_parameters = dict(state["parameters"])
    config.max_position_embeddings = state["max_position_embeddings"]
    base = AutoModelForCausalLM.from_pretrained(recipe["model"]["path"], config=config, dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, run / "adapter").eval()
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    return peft, plain


@torch.no_grad()
def logits_on(model, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    return [model(input_ids=ids, use_cache=False).logits for ids in batches]


# ------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("kind", list(ROPES))
def test_plain_transformers_reload_matches_the_in_tool_model(exported, kind):
    run, result = exported(kind)
    assert result.dtype == "float32"  # auto = the tiny base's saved dtype
    assert result.bound == pytest.approx(FP32_RTOL * max(1.0, result.logit_scale))
    assert 0 <= result.max_abs_diff < 1e-4  # float32 merge on a tiny model: summation order only
    assert result.merge_diff < 1e-4 and result.artifact_diff < 1e-4
    peft, plain = in_tool_and_plain(run, result.out_dir)
    gen, vocab = torch.Generator().manual_seed(123), plain.config.vocab_size
    # 2x64 tokens inside L0, then 2x200 tokens: longer than the base's 128-token window.
    batches = [torch.randint(0, vocab, (2, 64), generator=gen), torch.randint(0, vocab, (2, 200), generator=gen)]
    want, got = logits_on(peft, batches), logits_on(plain, batches)
    diff = max(float((a - b).abs().max()) for a, b in zip(want, got))
    assert diff < 1e-4
    # The adapter is really merged: the export is not the base model with the RoPE setting.
    with peft.disable_adapter():
        unadapted = logits_on(peft, batches)
    assert max(float((a - b).abs().max()) for a, b in zip(unadapted, got)) > 100 * diff


@pytest.mark.parametrize("kind", list(ROPES))
def test_probes_see_the_rope_setting(exported, kind, tmp_path):
    """The exported weights with the base's own RoPE give other logits on the probes, beyond the
    check's bound: the parity check would catch a config that lost the scaling (or the new theta)."""
    from transformers import AutoModelForCausalLM

    from longext.export_check import probe_logits

    run, result = exported(kind)
    stripped = tmp_path / "stripped"
    shutil.copytree(result.out_dir, stripped)
    config = json.loads((stripped / "config.json").read_text())
    config.update(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rope_scaling=None,
                  rope_theta=10000.0, max_position_embeddings=L0)
    (stripped / "config.json").write_text(json.dumps(config))
    state = RopeState.from_json(json.loads((run / "rope.json").read_text()))
    probes = build_probes(config["vocab_size"], state)
    good = probe_logits(AutoModelForCausalLM.from_pretrained(result.out_dir, dtype=torch.float32), probes)
    bad = probe_logits(AutoModelForCausalLM.from_pretrained(stripped, dtype=torch.float32), probes)
    assert max(float((a - b).abs().max()) for a, b in zip(good, bad)) > 2 * result.bound


def test_probes_reach_past_the_original_window():
    state = RopeState(kind="linear", parameters={}, max_position_embeddings=TARGET, original_context=L0, target_len=TARGET)
    probes = build_probes(400, state, num_params=10**5)
    assert max(int(p.position_ids.max()) for p in probes) == TARGET - 1
    assert any(p.input_ids.shape[1] > L0 and bool((p.position_ids.diff(dim=1) == 1).all()) for p in probes)
    again = build_probes(400, state, num_params=10**5)
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(probes, again))


# ------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("kind", list(ROPES))
def test_config_has_both_key_styles_and_the_right_window(exported, kind):
    from transformers import AutoConfig

    run, result = exported(kind)
    params = json.loads((run / "rope.json").read_text())["parameters"]
    config = json.loads((result.out_dir / "config.json").read_text())
    assert config["rope_parameters"] == params
    theta, scaling = LEGACY[kind]
    assert config["rope_theta"] == theta and config["rope_scaling"] == scaling
    # dynamic measures growth against max_position_embeddings: it must stay L0 (design.md §4).
    assert config["max_position_embeddings"] == (L0 if kind == "dynamic" else TARGET)
    assert config["longext"] == {
        "version": "0.1.0", "run": f"exp-{kind}", "method": "standard", "rope_kind": kind,
        "original_context": L0, "target_len": TARGET,
    }
    reloaded = AutoConfig.from_pretrained(result.out_dir)
    # transformers 5 reads the legacy rope_scaling first and keeps its `type` alias.
    assert reloaded.rope_parameters == (params if scaling is None else {**params, "type": params["rope_type"]})
    assert reloaded.max_position_embeddings == config["max_position_embeddings"]
    names = {p.name for p in result.out_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names


def test_weight_files_of_a_run_and_an_export_follow_the_umask(exported):
    # safetensors writes 0600; the published adapter/ and export read like the rest (0644 under umask 022)
    import stat

    from longext.files import umask

    run, result = exported("linear")
    files = [*(run / "adapter").iterdir(), *result.out_dir.iterdir()]
    assert {p.name for p in files} >= {"adapter_model.safetensors", "model.safetensors", "config.json"}
    assert [(p, stat.S_IMODE(p.stat().st_mode)) for p in files if p.is_file()] == [
        (p, 0o666 & ~umask()) for p in files if p.is_file()]


def test_bfloat16_export_is_checked_against_the_looser_bound(trained, tmp_path):
    from safetensors.torch import load_file

    result = run_export(trained("linear"), tmp_path / "bf16", dtype="bfloat16")
    assert result.dtype == "bfloat16"
    assert {t.dtype for t in load_file(result.out_dir / "model.safetensors").values()} == {torch.bfloat16}
    assert json.loads((result.out_dir / "config.json").read_text())["dtype"] == "bfloat16"
    assert result.bound == pytest.approx(LOW_PRECISION_RTOL * max(1.0, result.logit_scale))
    assert 1e-4 < result.max_abs_diff < result.bound  # bf16 rounding is visible, and within the bound
    assert result.artifact_diff < 1e-6  # the file holds exactly the rounded merged model


# ---------------------------------------------------------------------------- output folder
def test_refuses_to_overwrite_without_force_and_replaces_with_it(trained, tmp_path):
    run, out = trained("linear"), tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(LongextError, match=r"^--out: .*model exists; pass --force to replace it$"):
        run_export(run, out)
    assert (out / "keep.txt").read_text() == "mine"
    result = run_export(run, out, force=True)
    assert result.replaced and not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert leftovers(tmp_path) == []


def test_an_empty_out_folder_is_used_without_force(trained, tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_export(trained("linear"), tmp_path / "empty")
    assert not result.replaced and (tmp_path / "empty" / "config.json").is_file()


def _wrong_rope(state, config):
    return {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "rope_theta": 10000.0,
            "rope_scaling": None, "max_position_embeddings": state.max_position_embeddings}


def _damaged_weights(original):
    def write(merged, folder, state):
        from safetensors.torch import load_file, save_file

        original(merged, folder, state)
        weights = load_file(folder / "model.safetensors")
        name = next(k for k in weights if "q_proj" in k)
        weights[name] = weights[name] * 1.5
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})

    return write


@pytest.mark.parametrize(
    "damage, message",
    [
        ("config", r"^export check failed: the written config reloads as rope_parameters=.*'rope_type': 'default'"),
        ("weights", r"^export check failed: the reloaded export and the merged model differ by max \|Δlogit\| "),
    ],
)
def test_failed_check_publishes_nothing_and_keeps_the_old_out(trained, tmp_path, monkeypatch, damage, message):
    import longext.export as export

    run, out = trained("linear"), tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    if damage == "config":
        monkeypatch.setattr(export, "export_config_keys", _wrong_rope)
    else:
        monkeypatch.setattr(export, "write_export", _damaged_weights(export.write_export))
    with pytest.raises(LongextError, match=message):
        run_export(run, out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert leftovers(tmp_path) == []
    with pytest.raises(LongextError, match=r"\(nothing was published\)$"):
        run_export(run, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists() and leftovers(tmp_path) == []


def test_merge_check_refuses_before_writing(trained, tmp_path, monkeypatch):
    monkeypatch.setattr("longext.export.FP32_RTOL", 0.0)
    with pytest.raises(LongextError, match=r"^merge check failed: .* \(nothing was written\)$"):
        run_export(trained("linear"), tmp_path / "model")
    assert not (tmp_path / "model").exists() and leftovers(tmp_path) == []


def test_corrupt_adapter_config_leaves_nothing_behind(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained("linear"), run)
    (run / "adapter" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ')
    with pytest.raises(LongextError, match=r"^RUN: .*adapter_config.json is not valid JSON \(.*\); resume training"):
        run_export(run, tmp_path / "out" / "model")
    assert not (tmp_path / "out" / "model").exists()
    assert not (tmp_path / "out").exists() or leftovers(tmp_path / "out") == []


def test_nan_in_the_adapter_is_refused_before_writing(trained, tmp_path):
    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    shutil.copytree(trained("linear"), run)
    path = run / "adapter" / "adapter_model.safetensors"
    weights = load_file(path)
    name = next(k for k in weights if "lora_B" in k)
    weights[name][0, 0] = float("nan")
    save_file(weights, path)
    with pytest.raises(LongextError, match=r"^RUN: .*(NaN|nan)"):
        run_export(run, tmp_path / "model")
    assert not (tmp_path / "model").exists() and leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------- CLI
def test_bad_dtype_is_refused_by_the_library_too(trained, tmp_path):
    with pytest.raises(LongextError, match=r"^--dtype: got 'float16' \(allowed: auto, float32, bfloat16\)$"):
        run_export(trained("linear"), tmp_path / "m", dtype="float16")
    assert not (tmp_path / "m").exists()


def test_cli_exports_and_prints_the_difference_and_its_bound(trained, tmp_path, capsys):
    import re

    assert main(["export", str(trained("linear")), "--out", str(tmp_path / "m"), "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out  # the module's training run may print before
    match = re.search(rf"^exported to {re.escape(str(tmp_path / 'm'))}  \(max \|Δlogit\| vs in-tool model: (\S+), "
                      r"bound (\S+) for bfloat16\)$", out, flags=re.M)
    assert match, out
    assert float(match[1]) < float(match[2]) and float(match[2]) >= 0.25  # bf16: 0.25 x the logit scale (>= 1)


@pytest.mark.parametrize(
    "case, message",
    [
        ("not_a_run", r"^error: RUN: .*plain is not a run directory \(no recipe.yaml/rope.json\)$"),
        ("no_adapter", r"^error: RUN: .*noadapter has no adapter yet; finish or resume training first$"),
        ("bad_dtype", r"^error: .*--dtype.*'float16'.*bfloat16"),  # the CLI's choice check, or ours
        ("out_is_run", r"^error: --out: .* is the run directory or contains it; choose another directory$"),
        ("out_in_adapter", r"^error: --out: .*/adapter/m is inside the run's adapter/ folder; choose another directory$"),
        ("no_force", r"^error: --out: .*full exists; pass --force to replace it$"),
    ],
)
def test_cli_refusals_are_one_line_with_exit_code_2(trained, tmp_path, capsys, case, message):
    run = trained("linear")
    args = {
        "not_a_run": [str(tmp_path / "plain"), "--out", str(tmp_path / "m")],
        "no_adapter": [str(tmp_path / "noadapter"), "--out", str(tmp_path / "m")],
        "bad_dtype": [str(run), "--out", str(tmp_path / "m"), "--dtype", "float16"],
        "out_is_run": [str(run), "--out", str(run)],
        "out_in_adapter": [str(run), "--out", str(run / "adapter" / "m")],
        "no_force": [str(run), "--out", str(tmp_path / "full")],
    }[case]
    (tmp_path / "plain").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    shutil.copytree(run, tmp_path / "noadapter", ignore=shutil.ignore_patterns("adapter"))
    assert main(["export", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(message, err[0]), err
    assert not (tmp_path / "m").exists() and not (run / "adapter" / "m").exists()
