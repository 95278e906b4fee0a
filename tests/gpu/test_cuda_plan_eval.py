"""The memory plan's GPU terms against torch.cuda.max_memory_allocated of a real step (measured by `longext doctor`'s
measuring process, through the engine as `longext train` builds it), and `longext eval` in bf16 on the GPU against
fp32 on the CPU, both through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .gpu_helpers import CUDA, tiny_config

pytestmark = pytest.mark.gpu

PLAN_BAND = (0.85, 1.15)
LAUNCHER = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # other tests' process group


def _env(**extra) -> dict:
    return {**{k: v for k, v in os.environ.items() if k not in LAUNCHER}, **extra}


def _cli(*args, env=None) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "longext", *map(str, args)], capture_output=True, text=True,
                          env=env or _env(), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A 4-layer Llama with a 32k vocabulary (the loss and the weights are sizeable terms) and a byte-level tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    from longext.doctor.material import build_tokenizer, synthetic_text

    folder = tmp_path_factory.mktemp("plan-model")
    torch.manual_seed(0)
    config = tiny_config(vocab_size=32768, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                         max_position_embeddings=4096)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    build_tokenizer([synthetic_text(4000, 0)], 400).save_pretrained(folder)
    (folder.parent / "texts").mkdir(exist_ok=True)
    (folder.parent / "texts" / "doc.txt").write_text(synthetic_text(20000, 1))
    return folder


def _recipe(folder: Path, train: dict) -> Path:
    recipe = {"name": "gpu-plan", "model": {"path": str(folder)}, "method": {"kind": "standard", "target_len": 4096},
              "rope": {"kind": "none"}, "data": {"train": [str(folder.parent / "texts")], "seq_len": 4096},
              "train": {"steps": 2, "memory_check": "off", **train}, "output": {"dir": str(folder.parent / "run")}}
    path = folder.parent / ("recipe-" + "-".join(f"{k}-{v}" for k, v in train.items()) + ".yaml")
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize("train", [
    {"zero_stage": 2},
    {"zero_stage": 3, "gradient_checkpointing": True, "tiled_loss": True},
], ids=["zero2", "zero3-checkpointing-tiled-loss"])
def test_plan_matches_the_measured_peak(model_dir, train):
    recipe = _recipe(model_dir, train)
    plan = json.loads(_cli("plan", recipe, "--json", *([] if CUDA else ["--cpu"])).stdout)
    fixed = sum(t["bytes"] for t in plan["terms"] if "fixed" in t["name"])
    request = {"recipe": str(recipe), "lengths": [4096], "timed_steps": 1}
    done = subprocess.run([sys.executable, "-m", "longext.doctor.step", json.dumps(request)], capture_output=True,
                          text=True, env=_env(), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])["results"][0]
    ratio = measured["peak_bytes"] / (plan["total_bytes"] - fixed)
    assert measured["finite"] and PLAN_BAND[0] <= ratio <= PLAN_BAND[1], (ratio, plan["terms"])


def test_bf16_eval_on_the_gpu_matches_fp32_on_the_cpu(model_dir, tmp_path):
    """`longext eval` picks bf16 on a bf16 GPU; its perplexity equals the CPU's fp32 one within bf16 rounding."""
    texts = model_dir.parent / "texts"
    args = ("eval", model_dir, "--lengths", "1024,2048", "--no-passkey", "--texts", texts)
    _cli(*args, "--out", tmp_path / "device")
    _cli(*args, "--out", tmp_path / "cpu", env=_env(CUDA_VISIBLE_DEVICES=""))
    got, want = ({int(k): v["ppl"] for k, v in json.loads((tmp_path / d / "eval.json").read_text())["models"][0]
                  ["perplexity"].items()} for d in ("device", "cpu"))
    assert set(got) == {1024, 2048}
    for length, ppl in want.items():
        assert got[length] == pytest.approx(ppl, rel=2e-2), length
