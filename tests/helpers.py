"""Recipe builders shared by tests (kept apart from conftest so tests can import them by name)."""

from __future__ import annotations

from pathlib import Path

import yaml


def write_recipe(tmp_path: Path, model_dir: Path, corpus: Path, name: str = "t", **sections) -> Path:
    """A small, valid training recipe for a tiny model; `sections` override top-level sections (dicts merge)."""
    recipe = {
        "name": name,
        "model": {"path": str(model_dir)},
        "method": {"kind": "standard", "target_len": 256},
        "rope": {"kind": "linear"},
        "lora": {"r": 4, "alpha": 8.0},
        "data": {"train": [str(corpus)], "seq_len": 64},
        "train": {"steps": 4, "lr": 1.0e-3, "precision": "fp32", "zero_stage": 0, "seed": 7},
        "output": {"dir": str(tmp_path / "runs" / name)},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def losses(run_dir: Path) -> dict[int, float]:
    import json

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def tokens(n: int, rows: int = 2, seed: int = 0):
    """[rows, n] token ids below the tiny models' vocabulary (400), seeded."""
    import torch

    return torch.randint(0, 400, (rows, n), generator=torch.Generator().manual_seed(seed))


def bad_input(capsys, *argv) -> list[str]:
    """The bad-input contract of `longext ARGV`: exit code 2, only `error:` lines, no traceback; the lines."""
    from longext.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err and code == 2, err
    lines = err.splitlines()
    assert lines and all(line.startswith("error: ") for line in lines), err
    return lines


# A script run by run_fresh() starts with this: only site-packages on the path (longext must not import), then
# `folder` (a saved model), `out` (where the script saves its results) and `ids` (a saved tensor of token ids),
# and `refused`: what loading `folder` without trust_remote_code raised (None if it loaded).
FRESH_PRELUDE = r"""
import json, sys
sys.path.append(sys.argv[1])  # site-packages only: no cwd, no editable finder, no PYTHONPATH
try:
    import longext
except ImportError:
    pass
else:
    raise SystemExit("longext is importable in the fresh process")
import torch
from transformers import AutoModelForCausalLM
folder, out, ids = sys.argv[2], sys.argv[3], torch.load(sys.argv[4])
try:
    AutoModelForCausalLM.from_pretrained(folder)
except Exception as err:
    refused = f"{type(err).__name__}: {err}"
else:
    refused = None
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
"""


def run_fresh(tmp_path: Path, body: str, folder: Path, ids) -> dict:
    """FRESH_PRELUDE + body in `python -I -S` (no longext importable); returns what the script saved to `out`."""
    import subprocess
    import sys
    import sysconfig

    import torch

    torch.save(ids, tmp_path / "ids.pt")
    script = tmp_path / "fresh.py"
    script.write_text(FRESH_PRELUDE + body)
    site = sysconfig.get_paths()["purelib"]
    proc = subprocess.run(
        [sys.executable, "-I", "-S", str(script), site, str(folder), str(tmp_path / "got.pt"), str(tmp_path / "ids.pt")],
        cwd=tmp_path, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(tmp_path / "got.pt")
