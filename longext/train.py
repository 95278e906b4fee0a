"""`longext train`: recipe in, run directory out. The loop is on one screen; the steps around it
(run directory, checkpoints, metrics) are named helpers below it."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import torch

from longext import rundir
from longext.data.masks import FLASH_KEYS, model_inputs
from longext.data.prepare import build_train_data
from longext.engine import init_distributed, lr_lambda, make_engine, release_zero3_linear
from longext.errors import TrainingStopped
from longext.methods import plan_method
from longext.metrics import MetricsLog, StepProgress
from longext.models import add_lora, apply_full_finetune, build_model, load_tokenizer, quiet_libraries
from longext.plan import resolve
from longext.recipe import Recipe
from longext.sp import (
    activation_offload, apply_fused_norm, apply_sequence_parallel, apply_tiled_mlp, layout, micro_batch_loss,
    shard_batch,
)

MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "position_ids")


def run_training(recipe: Recipe, resume: bool = False) -> Path:
    try:
        return _run_training(recipe, resume)
    finally:
        release_zero3_linear()


def _run_training(recipe: Recipe, resume: bool) -> Path:
    quiet_libraries()
    run_dir = recipe.run_dir
    resolved = resolve(recipe)  # reads config.json only: fails fast, before any weights load
    recipe = resolved.recipe  # every `auto` filled in from here on
    rundir.check_start(run_dir, recipe, resume)
    rank, world = init_distributed()
    lay = layout(rank, world, recipe.train.sequence_parallel)  # sp ranks share a sample: world / sp data groups
    torch.manual_seed(recipe.train.seed)

    method = plan_method(recipe, resolved.model_config)
    t = recipe.train
    group = t.micro_batch_size * t.grad_accum * lay.dp if method.per_step else 1
    tokenizer = load_tokenizer(recipe.model.path)
    if method.build_data is not None:
        data = method.build_data(recipe, tokenizer)
    else:
        data = build_train_data(recipe, tokenizer, method.positions, group)
    model, _ = build_model(recipe)
    method.apply(model)  # before LoRA: peft wraps the patched modules
    if t.full_finetune:
        apply_full_finetune(model, t.gradient_checkpointing)
    else:
        model = add_lora(model, recipe.lora, t.gradient_checkpointing)
    lay = apply_sequence_parallel(model, lay, t.micro_batch_size)
    if t.tiled_mlp:
        apply_tiled_mlp(model)
    if t.fused_norm:
        apply_fused_norm(model)
    engine = make_engine(model, recipe.train, lay.dp, lay.mpu)
    stages = _Stages(method, t.steps, data, tokenizer, recipe, engine)
    total = stages.total

    start = rundir.load_checkpoint(engine, run_dir) if resume else 0
    if rank == 0:
        rundir.write_start(run_dir, recipe, resolved.rope, start, total, stages.status(start))
    log = MetricsLog(run_dir, enabled=rank == 0, resume_from=start)
    progress = StepProgress(recipe.model_copy(update={"train": t.model_copy(update={"steps": total})}), lay.dp,
                            enabled=rank == 0, start=start)
    stop = _StopFlag()

    engine.train()
    for step in range(start, total):
        began, loss_sum, tokens = time.perf_counter(), torch.zeros(()), 0
        lr = float(engine.get_lr()[0])  # the rate this step's update uses (the scheduler moves on after it)
        stage_data, first = stages.data_at(step)
        for micro in range(t.grad_accum):
            batch = stage_data.micro_batch((step - first) * t.grad_accum + micro, lay.dp_rank, lay.dp)
            method.before_forward(engine.module, batch)
            loss, logged = _forward(engine, batch, lay, t)
            if not _all_finite(loss):
                _stop_nonfinite(run_dir, step, loss, rank)
            engine.backward(loss)
            engine.step()  # the optimizer steps at the accumulation boundary only
            loss_sum += logged
            tokens += int(batch["attention_mask"].sum()) * lay.dp
        record = log.step(step + 1, _mean_over_ranks(loss_sum / t.grad_accum), lr, engine, tokens, time.perf_counter() - began)
        progress.update(record)
        stage_end = stages.is_boundary(step + 1)
        if _due(step + 1, t.save_every) or stop.requested() or stage_end:
            rundir.save_checkpoint(engine, run_dir, step + 1, t.keep_checkpoints)
        if stage_end:
            rundir.write_status(run_dir, "running", step + 1, total, rank, stages=stages.status(step + 1))
        if stop.requested():
            progress.close()
            rundir.write_status(run_dir, "interrupted", step + 1, total, rank, stages=stages.status(step + 1))
            raise TrainingStopped(
                f"interrupted by {stop.name} at step {step + 1}/{total}; checkpoint saved in {run_dir}/checkpoints; "
                f"continue with `longext train <recipe> --resume`",
                exit_code=128 + stop.signum,
            )

    progress.close()
    if start < total and not _due(total, t.save_every):
        rundir.save_checkpoint(engine, run_dir, total, t.keep_checkpoints)
    rundir.save_trained(engine, run_dir, rank, full=t.full_finetune)
    if method.finish is not None:
        rundir.write_status(run_dir, "running", total, total, rank, stages=stages.status(total))
        method.finish(engine, run_dir, rank)
    rundir.write_status(run_dir, "finished", total, total, rank, stages=stages.status(total, finished=True))
    log.close()
    return run_dir


class _Stages:
    """The main stage, then the method's extra stage (LongRecipe's replay) in the same engine, and its finish step
    (a merge). Which stage a step belongs to follows from the step alone, so --resume continues in the right one."""

    def __init__(self, method, steps: int, data, tokenizer, recipe: Recipe, engine):
        self.method, self.steps, self.data = method, steps, data
        extra = method.extra_stage
        self.total = steps + (extra.steps if extra else 0)
        self.extra_data = extra.build_data(recipe, tokenizer) if extra else None
        if extra:  # the main schedule, then a constant lr (a multiplier of train.lr, like every LambdaLR factor)
            main, ratio = lr_lambda(recipe.train), extra.lr / recipe.train.lr
            engine.lr_scheduler.lr_lambdas = [lambda step: main(step) if step < steps else ratio]

    def data_at(self, step: int):
        """(TrainData, first step of its stage) for optimizer step `step` (0-based)."""
        return (self.data, 0) if step < self.steps else (self.extra_data, self.steps)

    def is_boundary(self, step: int) -> bool:
        return self.method.extra_stage is not None and step == self.steps

    def status(self, step: int, finished: bool = False) -> dict[str, str] | None:
        """Every stage: done, running or pending, for status.json (None for single-stage runs)."""
        m = self.method
        if m.extra_stage is None and m.finish is None:
            return None
        out = {m.stage_name: "done" if step >= self.steps else "running"}
        if m.extra_stage:
            out[m.extra_stage.name] = "done" if step >= self.total else "running" if step >= self.steps else "pending"
        if m.finish:
            out[m.finish_name] = "done" if finished else "pending"
        return out


def _forward(engine, batch: dict, lay, t) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss for engine.backward, the micro-batch's mean token loss): transformers' own loss on the whole sequence,
    or longext.sp's on this rank's shard of it (sequence parallelism, tiled loss). Packed rows with a document mask
    get the mask their attention kernel needs (longext.data.masks)."""
    module = engine.module
    inputs = {**batch, **model_inputs(batch, module.config._attn_implementation, module.dtype)}
    with activation_offload(t):
        if lay.sp == 1 and not t.tiled_loss:
            wanted = {k: _to(v, engine.device) for k, v in inputs.items() if k in (*MODEL_INPUTS, *FLASH_KEYS)}
            loss = engine(**wanted).loss
            return loss, loss.detach().float()
        return micro_batch_loss(engine, shard_batch(inputs, lay), lay, t.tiled_loss)


def _to(value, device):
    return value.to(device) if isinstance(value, torch.Tensor) else value


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

