"""Measure the step time of every trained row of the SmolLM2 campaign (longext/bench/smollm2.py) in bf16 and fp32,
and one SmolLM2 forward pass at 4k and 8k in both, on this machine; write bench/smollm2-step-times.json.

    python scripts/campaign_step_times.py [--rows yarn-lora,pose] [--out bench/smollm2-step-times.json]
                                          [--precisions fp32] [--no-forward] [--steps 8]

Each row trains --steps optimizer steps (8 by default; LongRecipe also 3 replay steps) with longext's own training
loop, in a process of its own. The figure the budget uses is the median wall time of the second half of the steps
(5-8 of 8; LongRecipe's replay: its 2nd and 3rd steps): fp32 steps on an AVX2-only EPYC kept warming up for ~5 steps
(2026-12-07, LongGen: 58.7, 53.8, 45.1, 42.6, then ~35 s), so the median of steps 2-4 of 4, this script's figure
until then, ran 28 % high and rows planned from it trained short. Run it on a quiet machine: it refuses to start at
a load average over MAX_LOAD. A shared machine stretches CPU time as well as wall time (2026-12-06: 38.7 CPU-s a
step at load 4-7 against 15.0 alone, OpenMP threads spinning while they wait for a core), so neither can be
corrected for load afterwards. The process's CPU time per step is kept beside the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(spec: dict) -> dict:
    """One measurement in this process: {"train": recipe} or {"forward": length, "dtype": ...}."""
    import torch

    from longext.models import quiet_libraries

    quiet_libraries()
    if "forward" in spec:
        return forward_seconds(spec["forward"], getattr(torch, spec["dtype"]))
    from longext import metrics
    from longext.recipe import validate_recipe
    from longext.train import run_training

    marks: list[tuple[float, float]] = []
    original = metrics.MetricsLog.step

    def step(self, *args, **kwargs):  # a clock on the training loop's own per-step call, nothing replaced
        marks.append((time.process_time(), time.perf_counter()))
        return original(self, *args, **kwargs)

    metrics.MetricsLog.step = step
    run_dir = run_training(validate_recipe(spec["train"], "<campaign step time>"))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    cpu = [b[0] - a[0] for a, b in zip(marks, marks[1:])]
    return {"cpu_step_s": cpu, "wall_step_s": [r["step_seconds"] for r in records], "threads": torch.get_num_threads(),
            "tokens": [r["tokens"] for r in records]}


def forward_seconds(length: int, dtype) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from longext.materials import smollm2_dir

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=dtype, attn_implementation="sdpa").eval()
    ids = torch.randint(0, 40_000, (1, length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids[:, :256])  # warm-up
        cpu, wall = time.process_time(), time.perf_counter()
        model(ids)
        return {"cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall,
                "threads": torch.get_num_threads()}


MAX_LOAD = 1.5  # 1-minute load average on the 2 cores before a measurement (a core and a half busy)


def run_child(spec: dict) -> dict:
    load = os.getloadavg()[0]
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        raise SystemExit(f"measurement failed: {spec.get('train', {}).get('name', spec)}\n{done.stderr[-3000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "load": [round(load, 2), round(os.getloadavg()[0], 2)]}


def measure_row(name: str, shipped: str | None, precision: str, folder: Path, steps: int) -> dict:
    from longext.bench.smollm2 import train_block, trained_recipe

    train = {**train_block(steps), "precision": precision, "warmup_steps": 1, "log_every": 1}
    recipe = trained_recipe(name, shipped, train, replay_steps=3 if name == "longrecipe" else 0)
    recipe["output"] = {"dir": str(folder / f"{name}-{precision}"), "overwrite": True}
    got = run_child({"train": recipe})
    wall = got["wall_step_s"]
    first = steps // 2  # the second half: warmed up
    out = {**got, "step_s": statistics.median(wall[first:steps]), "figure": f"median of steps {first + 1}-{steps}"}
    if len(wall) > steps:
        out["replay_step_s"] = statistics.median(wall[steps + 1:])  # replay steps 2-3 (the 1st starts the stage)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child")
    parser.add_argument("--rows", default="")
    parser.add_argument("--out", default=str(ROOT / "bench" / "smollm2-step-times.json"))
    parser.add_argument("--no-forward", action="store_true")
    parser.add_argument("--precisions", default="bf16,fp32",
                        help="which to measure (a CPU without native bf16 emulates it ~100x slower: fp32 only there)")
    parser.add_argument("--steps", type=int, default=8,
                        help="optimizer steps a row (>= 4); the figure is the median of the second half")
    args = parser.parse_args()
    if args.steps < 4:
        parser.error(f"--steps: {args.steps} is fewer than 4 (the second half must be past the warm-up)")
    if not args.precisions or set(args.precisions.split(",")) - {"bf16", "fp32"}:
        parser.error(f"--precisions: {args.precisions!r} is not a comma list of bf16, fp32")
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    sys.path.insert(0, str(ROOT))
    from longext.bench.run import machine, versions
    from longext.bench.smollm2 import TRAINED
    from longext.files import write_json

    if os.getloadavg()[0] > MAX_LOAD:
        raise SystemExit(f"load average {os.getloadavg()[0]:.2f} > {MAX_LOAD}: step times are wall times on a quiet "
                         f"machine (see the docstring); stop the other jobs first")
    wanted = [r for r in args.rows.split(",") if r]
    out_path = Path(args.out)
    doc = json.loads(out_path.read_text()) if out_path.is_file() else {"rows": {}, "forward": {}}
    doc.update(machine=machine(), versions=versions())
    with tempfile.TemporaryDirectory() as tmp:
        for name, _, shipped in TRAINED:
            if wanted and name not in wanted:
                continue
            for precision in args.precisions.split(","):
                row = measure_row(name, shipped, precision, Path(tmp), args.steps)
                doc["rows"].setdefault(name, {})[precision] = row
                print(f"{name} {precision}: {row['step_s']:.1f} s a step ({row['figure']}, wall), all "
                      f"{row['wall_step_s']}, load {row['load']}", flush=True)
                write_json(out_path, doc, indent=1)
    if not args.no_forward:
        for length in (4096, 8192):
            for dtype in [{"bf16": "bfloat16", "fp32": "float32"}[p] for p in args.precisions.split(",")]:
                doc["forward"].setdefault(str(length), {})[dtype] = got = run_child({"forward": length, "dtype": dtype})
                print(f"forward {length} {dtype}: CPU {got['cpu_s']:.1f} s, wall {got['wall_s']:.1f} s", flush=True)
                write_json(out_path, doc, indent=1)
    doc["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_json(out_path, doc, indent=1)


if __name__ == "__main__":
    main()
