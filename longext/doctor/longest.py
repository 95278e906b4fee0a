"""`longext doctor --longest`: one LoRA step at the longest length `longext plan` says fits this GPU (ZeRO-3, gradient
checkpointing, tiled loss, TiledMLP, checkpoint offload; the fused RMSNorm by its `auto`), its measured peak against
the plan.

Attention makes a step's cost grow with the square of the length: SmolLM2 at a million tokens is about 1e17 FLOPs,
minutes even on an H100. When one step at the plan's longest length would take more than LONGEST_SECONDS at the rate
the 32k steps reached, the step runs at the longest length that takes about that long (the row gives both lengths).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from longext.doctor import commands
from longext.doctor.report import Check, failed
from longext.doctor.steps import GiB, compare, label, plan_bytes, step_recipe

LONGEST_TRAIN = {"zero_stage": 3, "gradient_checkpointing": True, "tiled_loss": True, "tiled_mlp": True,
                 "checkpoint_offload": True}
ROUND_TO = 1024  # the lengths tried are multiples of this
MAX_PLAN_CALLS = 8
START = 65536
LONGEST_SECONDS = 240  # aim for one step at most this long (estimated from the plan's FLOPs and the measured rate)


class Planner:
    """`longext plan --json` of one recipe at any length (data.seq_len and method.target_len), each length once;
    `gpu_memory` bytes as the budget (None: the plan's default, this GPU's memory)."""

    def __init__(self, recipe: Path, log: Path, gpu_memory: int | None = None):
        self.recipe, self.log, self.gpu_memory, self.cache = recipe, log, gpu_memory, {}

    def __call__(self, n: int) -> dict:
        if n not in self.cache:
            overrides = [f"data.seq_len={n}", f"method.target_len={n}"]
            self.cache[n] = commands.plan_json(self.recipe, overrides, False, self.log, gpu_memory=self.gpu_memory)
        return self.cache[n]

    def fits(self, n: int) -> bool:
        return self(n)["total_bytes"] <= self(n)["budget_bytes"]


def longest_length(plan: Planner, start: int | None = None, stop: int = 2**24) -> int | None:
    """The longest multiple of ROUND_TO in [start, stop] that the plan fits on this GPU, in at most MAX_PLAN_CALLS
    more calls: the estimate is nearly linear in the length, so each probe is where the line through the start and
    the last probe meets the budget, kept inside the bracket found so far. None when not even `start` (default
    START) fits."""
    start = start or START
    if not plan.fits(start):
        return None
    lo, hi, probe = start, None, 4 * start
    for _ in range(MAX_PLAN_CALLS):
        probe = min(probe, stop) // ROUND_TO * ROUND_TO
        if hi is None:
            probe = max(probe, lo + lo // 8)  # a curving estimate can put the line below a length that fits
        elif not lo < probe < hi:
            probe = (lo + hi) // 2 // ROUND_TO * ROUND_TO
        if probe <= lo:
            break
        if plan.fits(probe):
            lo = probe
        else:
            hi = probe
        if lo >= stop or (hi is not None and hi - lo <= ROUND_TO):
            break
        probe = _budget_crossing(start, plan(start), probe, plan(probe))
    return lo


def _budget_crossing(a: int, pa: dict, b: int, pb: dict) -> int:
    """Where the line through (a, total at a) and (b, total at b) meets the budget (4b when it is flat)."""
    if b == a or pb["total_bytes"] == pa["total_bytes"]:
        return 4 * b
    slope = (pb["total_bytes"] - pa["total_bytes"]) / (b - a)
    return int(a + (pa["budget_bytes"] - pa["total_bytes"]) / slope)


def time_capped_length(n1: int, flops1: float, n2: int, flops2: float, rate: float, seconds: float) -> int:
    """The length whose step costs `rate * seconds` FLOPs, with the step's FLOPs f(n) = a n + b n^2 (weights, then
    attention) fitted through (n1, flops1) and (n2, flops2); a multiple of ROUND_TO."""
    b = (flops2 / n2 - flops1 / n1) / (n2 - n1)
    a = flops1 / n1 - b * n1
    budget = rate * seconds
    n = (-a + math.sqrt(a * a + 4 * b * budget)) / (2 * b) if b > 0 else budget / a
    return int(n) // ROUND_TO * ROUND_TO


def free_gpu_memory() -> int | None:
    """Bytes free on the GPU now: what this process (its CUDA context) and any other already hold is not the step's.
    The plan's own fixed term covers the step process's context."""
    import torch

    if not torch.cuda.is_available():
        return None
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info()[0]


def longest_step(ctx, model: Path, train: dict, peak_flops: float | None, flops_rate: float | None,
                 timeout: float) -> Check:
    """flops_rate: FLOP/s (recompute included) the measured steps reached, for the time cap; None: no cap."""
    recipe = step_recipe(ctx, model, 3, START, START, {**train, **LONGEST_TRAIN}, "doctor-longest")
    plan = Planner(recipe, ctx.log, free_gpu_memory())
    try:
        fitting = longest_length(plan)
        if fitting is None:
            return failed("longest step", f"`longext plan` says not even {label(START)} tokens fit "
                                          f"({plan(START)['total_bytes'] / GiB:.1f} GiB)")
        length = fitting
        if flops_rate and fitting > START:
            capped = time_capped_length(START, plan(START)["flops_per_step"], fitting, plan(fitting)["flops_per_step"],
                                        flops_rate, LONGEST_SECONDS)
            length = max(START, min(fitting, capped))
        estimate = plan(length)
    except RuntimeError as err:
        return failed("longest step", str(err))
    figures = {"length": length, "plan_longest": fitting, "budget_gib": estimate["budget_bytes"] / GiB,
               "expected_seconds": estimate["flops_per_step"] / flops_rate if flops_rate else None}
    name = f"longest step {label(length)}"
    request = {"recipe": str(recipe), "lengths": [length], "timed_steps": 0,
               "overrides": [f"method.target_len={length}"]}
    done = commands.run([sys.executable, "-m", "longext.doctor.step", json.dumps(request)], ctx.log, name, timeout,
                        capture=True)
    if not done.ok:
        return failed(name, f"measuring process: {done.problem(timeout)}", plan_gib=plan_bytes(estimate)[0] / GiB,
                      **figures)
    check = compare(name, commands.last_json(done.stdout)["results"][0], estimate, peak_flops, ctx.gpu)
    check.figures.update(figures)
    if check.status == "pass":
        check.reason = ("the longest length `longext plan` fits here" if length == fitting else
                        f"the plan fits {fitting:,} tokens here; run at the length one step takes ~{LONGEST_SECONDS} s")
        check.reason += " (ZeRO-3, checkpointing + offload, tiled loss, TiledMLP)"
    return check
