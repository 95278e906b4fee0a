"""The checks made through the CLI in subprocesses, exactly as users run it: a tiny model's train -> eval -> export
round trip in bf16, an eval forward of the step model at a long length, and the `gpu` test tier (pytest)."""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from longext.doctor import commands
from longext.doctor.material import TINY_CONFIG, save_model, write_recipe
from longext.doctor.report import Check, failed, passed, skipped

ROUND_TRIP_STEPS = 4
TINY_EVAL = ("-s", "perplexity.targets=128", "-s", "perplexity.windows=1")  # 128 scored tokens fit the 256 window


@dataclass
class Context:
    """What the checks share: the work folder (deleted at the end), doctor.log, the synthetic texts and tokenizer."""

    work: Path
    log: Path
    texts: Path
    tokenizer: object
    gpu: bool


def round_trip(ctx: Context, timeout: float) -> list[Check]:
    """`longext train` (bf16, ZeRO-2, LoRA) -> `longext eval` -> `longext export --dtype bfloat16`."""
    model = save_model(ctx.work / "tiny-model", {**TINY_CONFIG, "vocab_size": len(ctx.tokenizer)}, ctx.tokenizer)
    run_dir = ctx.work / "runs" / "tiny"
    recipe = write_recipe(ctx.work / "tiny.yaml", "doctor-tiny", model, ctx.texts, run_dir, seq_len=256, target_len=512,
                          train={"steps": ROUND_TRIP_STEPS, "precision": "bf16", "zero_stage": 2, "lr": 1e-3,
                                 "save_every": 2}, rope="linear", lora_r=4)
    train = _train(ctx, recipe, run_dir, timeout)
    if train.status != "pass":
        return [train, skipped("tiny eval", "train failed"), skipped("tiny export", "train failed")]
    evaluated, _ = _eval(ctx, "tiny eval", run_dir, ctx.work / "eval-tiny", "256,512", timeout, TINY_EVAL)
    return [train, evaluated, _export(ctx, run_dir, timeout)]


def _train(ctx: Context, recipe: Path, run_dir: Path, timeout: float) -> Check:
    done = commands.run(commands.longext("train", recipe), ctx.log, "tiny train", timeout)
    if not done.ok:
        return _timed(failed("tiny train", f"longext train: {done.problem(timeout)}"), done)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    losses = [r["loss"] for r in records]
    rate = records[-1]["tokens_per_s"] if records else None
    figures = {"steps": len(records), "losses": losses, "tokens_per_s": rate}
    if len(records) != ROUND_TRIP_STEPS or not all(map(math.isfinite, losses)):
        problem = f"expected {ROUND_TRIP_STEPS} finite losses in metrics.jsonl"
        return _timed(failed("tiny train", problem, **figures), done)
    if not (run_dir / "adapter" / "adapter_config.json").is_file():
        return _timed(failed("tiny train", "no adapter/ in the run directory", **figures), done)
    return _timed(passed("tiny train", "bf16, ZeRO-2, LoRA r4", **figures), done)


def _eval(ctx: Context, name: str, target: Path, out: Path, lengths: str, timeout: float,
          extra: tuple[str, ...] = ()) -> tuple[Check, dict]:
    """`longext eval TARGET --lengths ... --no-passkey` on the doctor's texts; (check, {length: ppl})."""
    argv = commands.longext("eval", target, "--lengths", lengths, "--no-passkey", "--no-niah", "--texts", ctx.texts,
                            "--out", out, *extra)
    done = commands.run(argv, ctx.log, name, timeout)
    if not done.ok:
        return _timed(failed(name, f"longext eval: {done.problem(timeout)}"), done), {}
    rows = json.loads((out / "eval.json").read_text())["models"][0]["perplexity"]
    ppl = {int(k): v["ppl"] for k, v in rows.items()}
    longest = max(ppl)
    figures = {"ppl": ppl[longest], "length": longest, "tokens_per_s": rows[str(longest)]["tokens_per_s"],
               "ppl_by_length": ppl}
    if not all(map(math.isfinite, ppl.values())):
        return _timed(failed(name, "non-finite perplexity", **figures), done), ppl
    return _timed(passed(name, **figures), done), ppl


def _export(ctx: Context, run_dir: Path, timeout: float) -> Check:
    """`longext export --dtype bfloat16`: it reloads the merged model with plain transformers and refuses (exit 2)
    when its logits leave the bound for the dtype against the unmerged in-tool model; the difference is a figure."""
    out = ctx.work / "export-tiny"
    done = commands.run(commands.longext("export", run_dir, "--out", out, "--dtype", "bfloat16"), ctx.log,
                        "tiny export", timeout)
    if not done.ok:
        return _timed(failed("tiny export", f"longext export: {done.problem(timeout)}"), done)
    found = re.search(r"max \|Δlogit\| vs in-tool model: ([0-9.e+-]+)", done.output)
    figures = {"max_abs_diff": float(found.group(1)) if found else None}
    return _timed(passed("tiny export", "bf16 weights, reloaded with plain transformers: logits as in the run's model",
                         **figures), done)


def eval_forward(ctx: Context, model: Path, length: int, timeout: float) -> Check:
    """One fixed-target perplexity window at `length` through `longext eval` (bf16 on a bf16 GPU, fp32 on CPU)."""
    label = f"{length // 1024}k" if length % 1024 == 0 else str(length)
    dtype = "bf16" if ctx.gpu else "fp32"
    check, _ = _eval(ctx, f"eval forward {label} {dtype}", model, ctx.work / "eval-step", str(length), timeout,
                     ("-s", "perplexity.windows=1", "-s", "perplexity.targets=512"))
    check.figures["dtype"] = dtype
    return check


def gpu_tests(ctx: Context, repo: Path, timeout: float) -> Check:
    """pytest -m gpu on tests/gpu (CUDA paths against CPU/fp32 references), with a time limit."""
    name = "gpu tests"
    folder = repo / "tests" / "gpu"
    if not ctx.gpu:
        return skipped(name, "no CUDA device (tests/gpu skip themselves without one; `make test-gpu` on a GPU)")
    if not folder.is_dir():
        return skipped(name, f"{folder} not found (longext installed without its source tree)")
    argv = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", str(folder)]
    done = commands.run(argv, ctx.log, name, timeout, cwd=repo)
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?)", done.output)}
    figures = {kind: counts.get(kind, 0) for kind in ("passed", "failed", "skipped")}
    figures["errors"] = counts.get("error", 0) + counts.get("errors", 0)
    if done.code is None:
        return _timed(failed(name, f"did not finish within {timeout:.0f} s", **figures), done)
    if done.code != 0 or figures["failed"] or figures["errors"]:
        return _timed(failed(name, f"pytest exit {done.code}: {commands.error_line(done.output)}", **figures), done)
    if not figures["passed"]:
        return _timed(skipped(name, "every gpu test skipped itself", **figures), done)
    return _timed(passed(name, **figures), done)


def _timed(check: Check, done: commands.Done) -> Check:
    check.seconds = done.seconds
    return check
