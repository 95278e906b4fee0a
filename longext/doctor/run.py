"""`longext doctor`: the checks in order, their sizes on a GPU and on a CPU, and the report.

Every check is timed and isolated: an exception in one becomes its `fail` row (traceback in doctor.log) and the
next one runs. Exit code 0 when nothing failed, 1 when a check failed, 2 for bad flags (before anything runs).
"""

from __future__ import annotations

import datetime
import os
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from longext.doctor.report import Check, Report, check_out_dir, failed, skipped, table
from longext.doctor.steps import StepPlan
from longext.errors import LongextError

REPO = Path(__file__).resolve().parents[2]  # tests/gpu lives here in a source checkout


@dataclass(frozen=True)
class Sizes:
    """How much each check does: on one GPU the whole run takes minutes; on a 2-core CPU too."""

    steps: tuple[StepPlan, ...]
    target_len: int  # method.target_len of the step recipes (YaRN to it from the model's window)
    timed_steps: int  # after one warm-up step (0: the one step is timed)
    eval_length: int
    limits: dict  # seconds per subprocess, by kind
    expected: str  # how long the whole run takes, said at the start


GPU_SIZES = Sizes(
    steps=(StepPlan(2, (8192, 16384, 32768), sp_length=8192), StepPlan(3, (8192, 16384, 32768))),
    target_len=32768, timed_steps=2, eval_length=16384,
    limits={"cli": 180, "steps": 300, "pytest": 240, "longest": 540},
    expected="about 6 minutes on one GPU (estimated; 5 more with --longest)",
)
# A 2-core CPU does a SmolLM2 LoRA step at 1k tokens in about 20 s (bf16; several times that when the machine is
# shared): two steps (the peak resident set settles in the second, as glibc keeps freed blocks), the SP=1 check at 512.
CPU_SIZES = Sizes(
    steps=(StepPlan(2, (1024,), sp_length=512), StepPlan(3, (1024,))),
    target_len=16384, timed_steps=1, eval_length=2048,
    limits={"cli": 300, "steps": 540, "pytest": 240, "longest": 0},
    expected="about 220 CPU-seconds: 2-3 minutes on an idle 2-core CPU, longer on a busy one",
)


def check_flags(gpu: bool, out: Path, model: Path | None) -> None:
    """Bad flags are one line each, exit 2, before any work."""
    from longext.errors import Problems

    problems = []
    if model is not None and not (model / "config.json").is_file():
        what = "has no config.json" if model.is_dir() else "is not a folder" if model.exists() else "does not exist"
        problems.append(f"--model: {model} {what} (give a transformers model folder, or one with its config.json only)")
    try:
        check_out_dir(out)
    except LongextError as err:
        problems.append(str(err))
    if problems:
        raise Problems(problems)
    import torch

    if gpu and not torch.cuda.is_available():
        raise LongextError(f"--gpu: no CUDA device is visible (torch {torch.__version__}, built for CUDA "
                           f"{torch.version.cuda or 'none'}); run without --gpu for the CPU checks")


def run_doctor(gpu: bool, longest: bool, out: Path, model: Path | None, console) -> int:
    check_flags(gpu, out, model)
    import torch

    from longext.doctor.probes import cpu_name

    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before anything imports deepspeed: no guess-and-warn
    _quiet_transformers()
    device = torch.cuda.get_device_name(0) if on_gpu else f"{cpu_name()}, {os.cpu_count()} cores"
    meta = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "mode": "gpu" if on_gpu else "cpu", "device": device, "load_average_start": os.getloadavg()[0],
            "longest": longest,
            "model": str(model) if model else None}
    report = Report(out, meta)
    work = Path(tempfile.mkdtemp(prefix="longext-doctor-"))
    sizes = GPU_SIZES if on_gpu else CPU_SIZES
    console.print(f"longext doctor: {meta['mode']} checks on {device}, {sizes.expected}; report in {out}")
    try:
        _run_checks(report, console, work, on_gpu, longest, model)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report.meta.update(load_average_end=os.getloadavg()[0], cpu_seconds=round(_cpu_seconds(), 1))
    report.write(finished=True)
    console.print(table(report.checks, f"longext doctor ({meta['mode']}, {device})"))
    summary = report.to_json(True)
    counts = summary["counts"]
    load = f"load average {meta['load_average_start']:.1f} -> {summary['load_average_end']:.1f} on {os.cpu_count()} cores"
    console.print(f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped in "
                  f"{summary['seconds']:.0f} s ({summary['cpu_seconds']:.0f} CPU-seconds; {load}); "
                  f"{out / 'doctor.json'}, subprocess output in {out / 'doctor.log'}")
    return 1 if report.failures else 0


def _run_checks(report: Report, console, work: Path, gpu: bool, longest: bool, model: Path | None) -> None:
    from longext.doctor import cli_checks, probes, steps
    from longext.doctor.longest import longest_step
    from longext.doctor.material import build_tokenizer, step_model, write_texts
    from longext.materials import smollm2_dir

    sizes = GPU_SIZES if gpu else CPU_SIZES
    run = _Runner(report, console)
    for probe in (probes.versions, probes.device, probes.bf16, probes.sdpa, probes.flash_attention):
        run(probe.__name__, lambda p=probe: [p()])
    peak = run("matmul peak", lambda: [probes.matmul_peak()])
    peak_flops = peak[0].figures["tflops"] * 1e12 if peak and peak[0].status == "pass" else None
    adam = run("deepspeed fused adam", lambda: [probes.fused_adam()])
    train = {"optimizer": "torch_adamw"} if adam and adam[0].status == "fail" else {}
    if gpu:  # the probes' tensors are gone; their cached blocks would be missing from the subprocesses' GPU memory
        import torch

        torch.cuda.empty_cache()

    texts = write_texts(work / "texts")
    tokenizer = build_tokenizer([p.read_text() for p in sorted(texts.glob("*.txt"))], vocab_size=512)
    ctx = cli_checks.Context(work=work, log=report.log_path, texts=texts, tokenizer=tokenizer, gpu=gpu)
    run("gpu tests", lambda: [cli_checks.gpu_tests(ctx, REPO, sizes.limits["pytest"])])
    run("tiny round trip", lambda: cli_checks.round_trip(ctx, sizes.limits["cli"]))
    where = run("step model", lambda: [_model_row(step_model(model, smollm2_dir(), work, tokenizer))])
    step_path = Path(where[0].figures["path"]) if where and where[0].status == "pass" else None
    measured = []
    for plan in sizes.steps:
        title = f"lora steps ZeRO-{plan.zero_stage}"
        measured += run(title, lambda p=plan, t=title: _or_skip(step_path, t, lambda: steps.measured_steps(
            ctx, step_path, p, sizes.target_len, train, peak_flops, sizes.timed_steps, sizes.limits["steps"])))
    run("eval forward", lambda: _or_skip(step_path, "eval forward", lambda: [cli_checks.eval_forward(
        ctx, step_path, sizes.eval_length, sizes.limits["cli"])]))
    if not gpu:
        report.add(skipped("longest step", "GPU only (the plan's longest length on a CPU takes hours per step)"))
    elif not longest:
        report.add(skipped("longest step", "run with --longest"))
    else:
        rate = next((r.figures["flops_per_s"] for r in reversed(measured) if r.status == "pass"
                     and r.figures.get("flops_per_s")), None)  # the longest measured step's, ZeRO-3
        run("longest step", lambda: _or_skip(step_path, "longest step", lambda: [longest_step(
            ctx, step_path, train, peak_flops, rate, sizes.limits["longest"])]))


def _cpu_seconds() -> float:
    """User + system CPU time of the doctor and every subprocess it waited for: its work, whatever else ran."""
    import resource

    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


def _quiet_transformers() -> None:
    """No progress bars or warnings from saving the generated models: the doctor's own lines stay readable."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _model_row(found: tuple[Path, str]) -> Check:
    path, source = found
    return Check("step model", "pass", source, figures={"path": str(path)})


def _or_skip(step_path: Path | None, name: str, make: Callable[[], list[Check]]) -> list[Check]:
    return make() if step_path is not None else [skipped(name, "no step model (see the `step model` row)")]


class _Runner:
    """Runs one group of checks: a live status line, its rows added to the report (and printed) as they finish; an
    exception becomes a `fail` row with its traceback in doctor.log."""

    def __init__(self, report: Report, console):
        self.report, self.console, self.began = report, console, time.perf_counter()

    def __call__(self, title: str, make: Callable[[], list[Check]]) -> list[Check]:
        began = time.perf_counter()
        elapsed = time.perf_counter() - self.began
        with self.console.status(f"{title} ...  ({elapsed:,.0f} s so far)"):
            try:
                rows = make()
            except Exception as err:  # a bug or a broken environment: one failed row, the run goes on
                with open(self.report.log_path, "a") as f:
                    f.write(f"\n== {title}: exception ==\n{traceback.format_exc()}")
                rows = [failed(title, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:400])]
        spent = time.perf_counter() - began
        for row in rows:
            if not row.seconds:
                row.seconds = spent / len(rows)
            self.report.add(row)
            self.console.print(f"{row.status:>4}  {row.name}  ({row.seconds:,.1f} s)  {row.reason}", markup=False)
        return rows
