"""Measured LoRA steps of the step model against `longext plan`: tokens/s, MFU against the matmul peak measured in the
same run, and the measured peak memory against the plan's estimate for the same recipe; and the Ulysses SP=1 check.

The recipe is written once per ZeRO stage; `longext plan --json -s data.seq_len=L` (through the CLI) and the
measuring process (longext/doctor/step.py) read the same file, so both see the same resolved settings."""

from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from longext.doctor import commands
from longext.doctor.material import write_recipe
from longext.doctor.report import Check, failed

GiB = 2**30
# measured peak / plan estimate outside this band fails the row: above, `longext plan` underestimates (a run it
# passes can run out of memory); far below, it refuses runs that would fit. The CPU estimate was within 0.94-1.15
# of `longext bench memory`'s 21 cases (docs/scaling.md).
PLAN_BAND = (0.75, 1.15)
SP_TOLERANCE = 1e-2  # SP=1 path vs transformers' loss, relative: the same sums in another order (bf16 logits)
SPARE_CPUS = (os.cpu_count() or 1) // 4  # `longext plan` calls beside the measured steps (a GPU node's cores)


@dataclass(frozen=True)
class StepPlan:
    """One measuring process: a recipe (one ZeRO stage) at several lengths."""

    zero_stage: int
    lengths: tuple[int, ...]
    sp_length: int | None = None  # the Ulysses SP=1 check at this length, in the same process


def label(length: int) -> str:
    return f"{length // 1024}k" if length % 1024 == 0 else f"{length:,}"


def step_recipe(ctx, model: Path, zero_stage: int, seq_len: int, target_len: int, train: dict, name: str) -> Path:
    return write_recipe(ctx.work / f"{name}.yaml", name, model, ctx.texts, ctx.work / "runs" / name, seq_len=seq_len,
                        target_len=target_len, train={"zero_stage": zero_stage, "steps": 3, "memory_check": "off",
                                                      **train})


def measured_steps(ctx, model: Path, plan: StepPlan, target_len: int, train: dict, peak_flops: float | None,
                   timed_steps: int, timeout: float) -> list[Check]:
    """Rows `lora step L ZeRO-z` for each length (and `ulysses path SP=1` when asked) from one measuring process."""
    z = plan.zero_stage
    names = [f"lora step {label(n)} ZeRO-{z}" for n in plan.lengths] + (["ulysses path SP=1"] if plan.sp_length else [])
    recipe = step_recipe(ctx, model, z, plan.lengths[0], target_len, train, f"doctor-steps-z{z}")
    with ThreadPoolExecutor(max_workers=max(1, SPARE_CPUS)) as pool:
        pending = {n: pool.submit(commands.plan_json, recipe, [f"data.seq_len={n}"], not ctx.gpu, ctx.log)
                   for n in plan.lengths}
        if SPARE_CPUS < 2:  # few cores: plan first, so that it does not slow the measured steps
            wait(pending.values())
        request = {"recipe": str(recipe), "lengths": list(plan.lengths), "timed_steps": timed_steps,
                   "sp_length": plan.sp_length}
        done = commands.run([sys.executable, "-m", "longext.doctor.step", json.dumps(request)], ctx.log,
                            f"measured steps ZeRO-{z}", timeout, capture=True)
    try:
        plans = {n: future.result() for n, future in pending.items()}
    except RuntimeError as err:
        return [failed(name, str(err)) for name in names]
    if not done.ok:
        return [failed(name, f"measuring process: {done.problem(timeout)}") for name in names]
    result = commands.last_json(done.stdout)
    rows = [compare(name, r, plans[r["length"]], peak_flops, ctx.gpu) for name, r in zip(names, result["results"])]
    if plan.sp_length:
        rows.append(sp_row(result["sp_check"]))
    return rows


def plan_bytes(plan: dict) -> tuple[int, int]:
    """(the plan's total without its fixed term, the fixed term): the fixed term (CUDA context, or the CPU process
    baseline) is what the measurement leaves out."""
    fixed = sum(t["bytes"] for t in plan["terms"] if "fixed" in t["name"])
    return plan["total_bytes"] - fixed, fixed


def compare(name: str, r: dict, plan: dict, peak_flops: float | None, gpu: bool) -> Check:
    """One measured length against its plan: memory ratio in PLAN_BAND, finite losses; tokens/s and MFU as figures."""
    estimate, fixed = plan_bytes(plan)
    ratio = r["peak_bytes"] / estimate
    model_flops = plan["flops_terms"]["forward"] + plan["flops_terms"]["backward"]  # MFU counts no recompute
    figures = {
        "tokens_per_s": r["tokens_per_s"], "seconds_per_step": r["seconds_per_step"],
        "mfu": model_flops / r["seconds_per_step"] / peak_flops if peak_flops else None,
        "hfu": plan["flops_per_step"] / r["seconds_per_step"] / peak_flops if peak_flops else None,
        "flops_per_s": plan["flops_per_step"] / r["seconds_per_step"],  # achieved, recompute included
        "peak_gib": r["peak_bytes"] / GiB, "plan_gib": estimate / GiB, "ratio": ratio, "plan_fixed_gib": fixed / GiB,
        "memory": "torch.cuda.max_memory_allocated" if gpu else "peak RSS - process baseline",
        "losses": r["losses"], "switches": r["switches"], "all_seconds": r["all_seconds"],
    }
    check = Check(name, "pass", seconds=sum(r["all_seconds"]), figures=figures)
    if not r["finite"]:
        check.status, check.reason = "fail", f"non-finite loss {r['losses']}"
    elif not PLAN_BAND[0] <= ratio <= PLAN_BAND[1]:
        way = "underestimates" if ratio > 1 else "overestimates"
        check.status = "fail"
        check.reason = (f"measured peak {r['peak_bytes'] / GiB:.2f} GiB is {ratio:.2f}x the plan's {estimate / GiB:.2f} "
                        f"GiB: `longext plan` {way} here (allowed {PLAN_BAND[0]}-{PLAN_BAND[1]}x)")
    return check


def sp_row(r: dict) -> Check:
    figures = {"tokens_per_s": r["tokens_per_s"], "loss": r["sp_loss"], "reference_loss": r["reference_loss"],
               "relative_difference": r["relative_difference"], "length": r["length"]}
    check = Check("ulysses path SP=1", "pass", "shard_batch + micro_batch_loss (tiled), as SP>1 runs; loss equals "
                  "transformers'", r["seconds"], figures)
    if not r["relative_difference"] <= SP_TOLERANCE:
        check.status = "fail"
        check.reason = (f"the SP path's loss {r['sp_loss']:.5f} differs from transformers' {r['reference_loss']:.5f} "
                        f"by {r['relative_difference']:.2e} (allowed {SP_TOLERANCE:g})")
    return check
