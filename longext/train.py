"""`longext train`: recipe in, run directory out. The loop is on one screen; the steps around it
(run directory, checkpoints, metrics) are named helpers below it."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import torch

from longext import rundir
from longext.data import build_train_data
from longext.engine import init_distributed, make_engine
from longext.errors import TrainingStopped
from longext.methods import plan_method
from longext.metrics import MetricsLog, StepProgress
from longext.models import add_lora, build_model, load_tokenizer, quiet_libraries
from longext.plan import resolve
from longext.recipe import Recipe

MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "position_ids")


def run_training(recipe: Recipe, resume: bool = False) -> Path:
    quiet_libraries()
    run_dir = recipe.run_dir
    resolved = resolve(recipe)  # reads config.json only: fails fast, before any weights load
    recipe = resolved.recipe  # every `auto` filled in from here on
    rundir.check_start(run_dir, recipe, resume)
    rank, world = init_distributed()
    torch.manual_seed(recipe.train.seed)

    method = plan_method(recipe, resolved.model_config)
    t = recipe.train
    group = t.micro_batch_size * t.grad_accum * world if method.per_step else 1
    data = build_train_data(recipe, load_tokenizer(recipe.model.path), method.positions, group)
    model, _ = build_model(recipe)
    method.apply(model)
    model = add_lora(model, recipe.lora, recipe.train.gradient_checkpointing)
    engine = make_engine(model, recipe.train, world)

    start = rundir.load_checkpoint(engine, run_dir) if resume else 0
    if rank == 0:
        rundir.write_start(run_dir, recipe, resolved.rope, start)
    log = MetricsLog(run_dir, enabled=rank == 0, resume_from=start)
    progress = StepProgress(recipe, world, enabled=rank == 0, start=start)
    stop = _StopFlag()

    engine.train()
    for step in range(start, t.steps):
        began, loss_sum, tokens = time.perf_counter(), torch.zeros(()), 0
        for micro in range(t.grad_accum):
            batch = data.micro_batch(step * t.grad_accum + micro, rank, world)
            method.before_forward(engine.module, batch)
            loss = engine(**{k: batch[k].to(engine.device) for k in MODEL_INPUTS}).loss
            if not _all_finite(loss):
                _stop_nonfinite(run_dir, step, loss, rank)
            engine.backward(loss)
            engine.step()  # the optimizer steps at the accumulation boundary only
            loss_sum += loss.detach().float()
            tokens += int(batch["attention_mask"].sum()) * world
        record = log.step(step + 1, _mean_over_ranks(loss_sum / t.grad_accum), engine, tokens, time.perf_counter() - began)
        progress.update(record)
        if _due(step + 1, t.save_every) or stop.requested():
            rundir.save_checkpoint(engine, run_dir, step + 1, t.keep_checkpoints)
        if stop.requested():
            progress.close()
            rundir.write_status(run_dir, "interrupted", step + 1, t.steps, rank)
            raise TrainingStopped(
                f"interrupted by {stop.name} at step {step + 1}/{t.steps}; checkpoint saved in {run_dir}/checkpoints; "
                f"continue with `longext train <recipe> --resume`",
                exit_code=128 + stop.signum,
            )

    progress.close()
    if start < t.steps and not _due(t.steps, t.save_every):
        rundir.save_checkpoint(engine, run_dir, t.steps, t.keep_checkpoints)
    rundir.save_adapter(engine, run_dir, rank)
    rundir.write_status(run_dir, "finished", t.steps, t.steps, rank)
    log.close()
    return run_dir


def _due(step: int, every: int | None) -> bool:
    return bool(every) and step % every == 0


def _all_finite(loss: torch.Tensor) -> bool:
    flag = torch.tensor([float(torch.isfinite(loss.detach()).all())])
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def _mean_over_ranks(value: torch.Tensor) -> float:
    value = value.detach().float().reshape(1).cpu()
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(value)
        value /= torch.distributed.get_world_size()
    return float(value.item())


def _stop_nonfinite(run_dir: Path, step: int, loss: torch.Tensor, rank: int) -> None:
    last = rundir.latest_checkpoint(run_dir)
    rundir.write_status(run_dir, "failed", step, None, rank, reason=f"non-finite loss {loss.item()}")
    kept = f"the last good checkpoint is {last}" if last else "no checkpoint had been written yet"
    raise TrainingStopped(
        f"non-finite loss ({loss.item()}) at step {step + 1}; training stopped and {kept} "
        f"(lower train.lr, raise train.warmup_steps, or check the data)"
    )


class _StopFlag:
    """SIGTERM/SIGINT ask for a checkpoint and a clean exit at the next optimizer step (agreed by all ranks)."""

    def __init__(self):
        self.signum = 0
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some notebook runners): keep default handling
                pass

    def _handle(self, signum, frame):
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def requested(self) -> bool:
        flag = torch.tensor([float(self.signum)])
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        self.signum = int(flag.item())
        return self.signum != 0

