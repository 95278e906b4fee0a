"""Training metrics: JSONL + tensorboard on disk, a rich progress line (loss, lr, tokens/s, ETA) on screen."""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

from longext.errors import WriteFailed, warn
from longext.files import write_atomic
from longext.recipe import Recipe


class MetricsLog:
    """Appends one JSON line per optimizer step to metrics.jsonl (and tensorboard, when installed). Each line is one
    write(2) on an O_APPEND descriptor, so a crash leaves whole lines and at most a torn last one, which the next
    resume drops with a warning."""

    def __init__(self, run_dir: Path, enabled: bool, resume_from: int = 0):
        self.enabled, self.path = enabled, run_dir / "metrics.jsonl"
        self.started, self.tokens, self.writer = time.perf_counter(), 0, None
        if not enabled:
            return
        try:
            self._truncate_after(resume_from)
        except OSError as err:
            raise WriteFailed(self.path, err.strerror or type(err).__name__) from None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=resume_from + 1 if resume_from else None)
        except ImportError:  # tensorboard is optional; JSONL always works
            self.writer = None

    def _truncate_after(self, step: int) -> None:
        """On resume, forget steps the checkpoint does not contain (they will be redone), and lines that are not a
        whole record (a write torn by a crash or a full disk), with a warning."""
        if not self.path.exists():
            return
        kept, torn = [], []
        for number, line in enumerate(self.path.read_bytes().decode("utf-8", "replace").splitlines(), 1):
            record = _record(line) if line.strip() else {"step": -1}  # a blank line: nothing to keep or report
            if record is None:
                torn.append(number)
            elif 0 <= record["step"] <= step:
                kept.append(line)
        if torn:
            which = f"line {torn[0]}" if len(torn) == 1 else f"lines {', '.join(map(str, torn))}"
            warn(f"{self.path}: dropped {which}: not a whole JSON record (a write cut short by a crash or a full disk)")
        write_atomic(self.path, "".join(line + "\n" for line in kept))

    def step(self, step: int, loss: float, lr: float, engine, tokens: int, seconds: float) -> dict:
        self.tokens += tokens
        grad_norm = engine.get_global_grad_norm()
        record = {
            "step": step,
            "loss": loss,
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens": tokens,
            "tokens_per_s": tokens / seconds if seconds > 0 else None,
            "step_seconds": seconds,
            "elapsed": time.perf_counter() - self.started,
        }
        if self.enabled:
            self._append((json.dumps(record) + "\n").encode())
            if self.writer:
                self._tensorboard(record, step)
        return record

    def _append(self, line: bytes) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                if os.write(fd, line) != len(line):
                    raise OSError(errno.ENOSPC, "short write: the disk is full")
            finally:
                os.close(fd)
        except OSError as err:
            raise WriteFailed(self.path, err.strerror or type(err).__name__) from None

    def _tensorboard(self, record: dict, step: int) -> None:
        try:
            for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
                if record[key] is not None:
                    self.writer.add_scalar(f"train/{key}", record[key], step)
        except OSError as err:  # a side channel: metrics.jsonl goes on (and fails itself if the disk is full)
            self.writer = None
            warn(f"tensorboard: stopped writing {self.path.parent / 'tb'} ({err.strerror or err}); "
                 f"metrics.jsonl goes on")

    def close(self) -> None:
        if self.writer:
            self.writer.close()


def _record(line: str) -> dict | None:
    """The record of one metrics.jsonl line, or None when the line is not a whole one."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


class StepProgress:
    """A rich progress bar over optimizer steps plus one printed line per `log_every` steps."""

    def __init__(self, recipe: Recipe, world: int, enabled: bool, start: int = 0):
        self.enabled, self.every, self.total = enabled, recipe.train.log_every, recipe.train.steps
        self.tokens_per_step = recipe.train.micro_batch_size * recipe.train.grad_accum * recipe.seq_len * world
        self.bar = None
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        from longext.console import console

        self.bar = Progress(
            TextColumn("[bold]train[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console(),  # step lines never cut
        )
        self.task = self.bar.add_task("train", total=self.total, completed=start, status="starting")
        self.bar.start()

    def update(self, record: dict) -> None:
        if not self.bar:
            return
        rate = record["tokens_per_s"] or 0.0
        status = f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  {rate:,.0f} tok/s"
        self.bar.update(self.task, completed=record["step"], status=status)
        if record["step"] % self.every == 0 or record["step"] == self.total:
            remaining = (self.total - record["step"]) * record["step_seconds"]
            self.bar.console.print(
                f"step {record['step']:>5}/{self.total}  {status}  step {record['step_seconds']:.2f}s  ETA {remaining:,.0f}s",
                highlight=False,
            )

    def close(self) -> None:
        if self.bar:
            self.bar.stop()
            self.bar = None
