"""What `longext doctor` reports: one `Check` per row, kept in DIR/doctor.json (rewritten after every row, so a run
cut short still leaves its finished rows), DIR/doctor.md (the table as markdown) and DIR/doctor.log (the output of
every subprocess, for bug reports)."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from longext.errors import LongextError

STATUSES = ("pass", "fail", "skip")
STYLE = {"pass": "green", "fail": "bold red", "skip": "yellow"}
REPORT_FILES = ("doctor.json", "doctor.md", "doctor.log")


@dataclass
class Check:
    """One row: `reason` says why a row failed or was skipped (and may qualify a pass); `figures` are its numbers."""

    name: str
    status: str
    reason: str = ""
    seconds: float = 0.0
    figures: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")


def passed(name: str, reason: str = "", **figures) -> Check:
    return Check(name, "pass", reason, figures=figures)


def failed(name: str, reason: str, **figures) -> Check:
    return Check(name, "fail", reason, figures=figures)


def skipped(name: str, reason: str, **figures) -> Check:
    return Check(name, "skip", reason, figures=figures)


def check_out_dir(out: Path) -> None:
    """Before any work: DIR is missing, empty, or an older doctor report (which is replaced); anything else is refused."""
    from longext.files import check_writable

    check_writable(out, "--out")
    if out.is_dir() and any(out.iterdir()) and not (out / "doctor.json").is_file():
        raise LongextError(f"--out: {out} exists and is not a doctor report; choose another directory")


class Report:
    """The rows so far, written to DIR after each one; `log` is the open doctor.log."""

    def __init__(self, out: Path, meta: dict):
        self.out, self.meta, self.checks = out, meta, []
        self.started = time.perf_counter()
        out.mkdir(parents=True, exist_ok=True)
        for name in REPORT_FILES:
            (out / name).unlink(missing_ok=True)
        self.log_path = out / "doctor.log"

    def add(self, check: Check) -> Check:
        self.checks.append(check)
        self.write(finished=False)
        return check

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.status == "fail"]

    def to_json(self, finished: bool) -> dict:
        counts = {s: sum(c.status == s for c in self.checks) for s in STATUSES}
        return {**self.meta, "finished": finished, "seconds": round(time.perf_counter() - self.started, 1),
                "counts": counts, "checks": [_clean(asdict(c)) for c in self.checks]}

    def write(self, finished: bool) -> None:
        _atomic_write(self.out / "doctor.json", json.dumps(self.to_json(finished), indent=1) + "\n")
        _atomic_write(self.out / "doctor.md", markdown(self.checks, self.meta))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _clean(value):
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


# ------------------------------------------------------------------------------------------ rendering
def summary(check: Check) -> str:
    """The figures worth a glance, then the reason."""
    f = check.figures
    shown = [_figure_text(key, f) for key in _FIGURE_KEYS if _has(f, key)]
    return "  ".join(filter(None, ["  ".join(shown), check.reason]))


def _has(figures: dict, key: str) -> bool:
    return all(figures.get(k) is not None for k in key.split("+"))


def _figure_text(key: str, f: dict) -> str:
    value = f[key.split("+")[0]]
    if key == "model+memory_gib":
        return f"{value}, {f['memory_gib']:.0f} GiB"
    if key == "torch+transformers+deepspeed":
        cuda = f.get("torch_cuda") or "-"
        return f"torch {value} (CUDA {cuda}), transformers {f['transformers']}, deepspeed {f['deepspeed']}"
    if key == "peak_gib+plan_gib+ratio":
        return f"peak {value:.2f} GiB / plan {f['plan_gib']:.2f} GiB = {f['ratio']:.2f}x"
    if key == "passed+failed+skipped":
        return f"{value} passed, {f['failed']} failed, {f['skipped']} skipped"
    return dict(_FORMATS)[key](value)


_FORMATS = (
    ("tokens_per_s", lambda v: f"{v:,.0f} tok/s" if v >= 100 else f"{v:.3g} tok/s"),
    ("mfu", lambda v: f"MFU {v:.1%}"),
    ("tflops", lambda v: f"{v:,.1f} TFLOP/s" if v >= 1 else f"{v * 1000:.0f} GFLOP/s"),
    ("ppl", lambda v: f"ppl {v:.4g}"),
    ("max_abs_diff", lambda v: f"max abs diff {v:.1e}"),
    ("relative_difference", lambda v: f"relative diff {v:.1e}"),
    ("build_seconds", lambda v: f"built in {v:.0f} s"),
    ("precision_auto", lambda v: f"precision auto = {v}"),
)
# a "+" key is shown when all its figures are there, as one phrase
_FIGURE_KEYS = ("model+memory_gib", "torch+transformers+deepspeed", "tokens_per_s", "mfu", "peak_gib+plan_gib+ratio",
                "passed+failed+skipped", *(k for k, _ in _FORMATS if k not in ("tokens_per_s", "mfu")))


def table(checks: list[Check], title: str):
    from rich.table import Table

    out = Table(title=title, title_justify="left")
    out.add_column("check", style="bold")
    out.add_column("status")
    out.add_column("s", justify="right")
    out.add_column("figures / reason", overflow="fold")
    for c in checks:
        out.add_row(c.name, f"[{STYLE[c.status]}]{c.status}[/]", f"{c.seconds:,.1f}", summary(c))
    return out


def markdown(checks: list[Check], meta: dict) -> str:
    device = meta.get("device", "?")
    lines = [f"`longext doctor` on {device} ({meta.get('mode', '?')} checks), {meta.get('date', '')}", "",
             "| check | status | seconds | figures / reason |", "|---|---|---|---|"]
    for c in checks:
        lines.append(f"| {c.name} | {c.status} | {c.seconds:,.1f} | {summary(c).replace('|', '/')} |")
    return "\n".join(lines) + "\n"
