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
