"""`longext train`: recipe in, run directory out. The loop is on one screen; the set-up above it reads top to
bottom, and what happens around it (status, checkpoints, the stages of multi-stage methods) is named below it."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import torch

from longext.data.masks import DOCUMENT_KEY, FLASH_KEYS, model_inputs
from longext.engine import init_distributed, make_engine, release_zero3_linear
from longext.errors import TrainingStopped, WriteFailed
from longext.methods import method_for
from longext.metrics import MetricsLog, StepProgress
from longext.models import add_lora, apply_full_finetune, build_model, load_tokenizer, quiet_libraries
from longext.recipe import Recipe
from longext.resolve import Resolved, resolve
from longext.run_data import training_data
from longext.rundir import Run, check_start, latest_checkpoint, stopped_writing
from longext.savers import activation_offload, apply_fused_norm, apply_tiled_mlp
from longext.sp import apply_sequence_parallel, layout, micro_batch_loss, shard_batch

MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "position_ids")


def run_training(recipe: Recipe, resume: bool = False, resolved: Resolved | None = None) -> Path:
    """Train `recipe` into its run directory. `resolved`: the recipe already resolved in this process (the CLI's
    pre-flight does it), else it is resolved here, from config.json only: it fails fast, before any weights load."""
    quiet_libraries()
    try:
        return _run_training(resolved or resolve(recipe), resume)
    except WriteFailed as err:  # a read-only or full run folder mid-run: one line, the last checkpoint intact
        raise stopped_writing(recipe.run_dir, err) from None
    finally:
        release_zero3_linear()


def _run_training(resolved: Resolved, resume: bool) -> Path:
    recipe, t = resolved.recipe, resolved.recipe.train  # every `auto` filled in
    resume_point = check_start(recipe.run_dir, recipe, resume)
    rank, world = init_distributed()
    lay = layout(rank, world, t.sequence_parallel)  # sp ranks share a sample: world / sp data groups
    torch.manual_seed(t.seed)

    method = method_for(recipe.method.kind).setup(recipe, resolved.rope)
    tokenizer = load_tokenizer(resolved.model_dir)
    group = t.micro_batch_size * t.grad_accum * lay.dp if method.per_step else 1
    data, extra_data = training_data(recipe, tokenizer, method, group)
    model, lay = trainable_model(resolved, method, lay)
    extra = method.extra_stage
    engine = make_engine(model, t, lay.dp, lay.mpu, then_lr=extra.lr if extra else None)
    stages = _Stages(method, t.steps, data, extra_data)
    run = Run(recipe.run_dir, rank, stages.total, stages.status)
    start = run.load_checkpoint(engine, resume_point) if resume else 0
    run.start(recipe, resolved.rope, start)
    log = MetricsLog(run.dir, enabled=rank == 0, resume_from=start)
    progress = StepProgress(recipe.model_copy(update={"train": t.model_copy(update={"steps": stages.total})}), lay.dp,
                            enabled=rank == 0, start=start)
    stop = _StopFlag()

    engine.train()
    for step in range(start, stages.total):
        began, loss_sum, tokens = time.perf_counter(), torch.zeros(()), 0
        lr = float(engine.get_lr()[0])  # the rate this step's update uses (the scheduler moves on after it)
        stage_data, first = stages.data_at(step)
        for micro in range(t.grad_accum):
            batch = stage_data.micro_batch((step - first) * t.grad_accum + micro, lay.dp_rank, lay.dp)
            method.before_forward(engine.module, batch)
            loss, logged = _forward(engine, batch, lay, t)
            if not _all_finite(loss):
                _stop_nonfinite(run, step, loss)
            engine.backward(loss)
            engine.step()  # the optimizer steps at the accumulation boundary only
            loss_sum += logged
            tokens += int(batch["attention_mask"].sum()) * lay.dp
        record = log.step(step + 1, _mean_over_ranks(loss_sum / t.grad_accum), lr, engine, tokens, time.perf_counter() - began)
        progress.update(record)
        stage_end = stages.is_boundary(step + 1)
        stopping = stop.requested()  # read once: a signal between two reads would stop without the checkpoint
        if _due(step + 1, t.save_every) or stopping or stage_end:
            run.save_checkpoint(engine, step + 1, t.keep_checkpoints)
        if stage_end:
            run.status("running", step + 1)
        if stopping:
            progress.close()
            run.status("interrupted", step + 1)
            raise TrainingStopped(
                f"interrupted by {stop.name} at step {step + 1}/{stages.total}; "
                f"checkpoint saved in {run.dir}/checkpoints",
                exit_code=128 + stop.signum, resumable=True,
            )

    progress.close()
    _finish(run, engine, method, t, start)
    log.close()
    return run.dir


def trainable_model(resolved: Resolved, method, lay):
    """(model, layout): the base model with the resolved RoPE state, the method's patches (before LoRA: peft wraps
    the patched modules), LoRA or every weight trainable, Ulysses attention and the memory savers."""
    t = resolved.recipe.train
    model = build_model(resolved)
    method.apply(model)
    if t.full_finetune:
        apply_full_finetune(model, t.gradient_checkpointing)
    else:
        model = add_lora(model, resolved.recipe.lora, t.gradient_checkpointing)
    lay = apply_sequence_parallel(model, lay, t.micro_batch_size)
    if t.tiled_mlp:
        apply_tiled_mlp(model)
    if t.fused_norm:
        apply_fused_norm(model)
    return model, lay


def _finish(run: Run, engine, method, t, start: int) -> None:
    """The last checkpoint, the trained weights, the method's finish step (LongRecipe's merge), status finished."""
    if start < run.total and not _due(run.total, t.save_every):
        run.save_checkpoint(engine, run.total, t.keep_checkpoints)
    run.save_trained(engine, full=t.full_finetune)
    if method.finish is not None:
        run.status("running", run.total)
        method.finish(engine, run.dir, run.rank)
    run.status("finished", run.total, finished=True)


class _Stages:
    """The main stage, then the method's extra stage (LongRecipe's replay) in the same engine, and its finish step
    (a merge). Which stage a step belongs to follows from the step alone, so --resume continues in the right one.
    The learning rate of each stage is the engine's schedule (engine.lr_lambda)."""

    def __init__(self, method, steps: int, data, extra_data):
        self.method, self.steps, self.data, self.extra_data = method, steps, data, extra_data
        self.total = steps + (method.extra_stage.steps if method.extra_stage else 0)

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
    inputs = {**batch, **model_inputs(batch, module.config._attn_implementation, module.dtype, lay.sp)}
    with activation_offload(t):
        if lay.sp == 1 and not t.tiled_loss:
            wanted = {k: _to(v, engine.device) for k, v in inputs.items() if k in (*MODEL_INPUTS, *FLASH_KEYS, DOCUMENT_KEY)}
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


def _stop_nonfinite(run: Run, step: int, loss: torch.Tensor) -> None:
    last = latest_checkpoint(run.dir)
    run.fail(step, reason=f"non-finite loss {loss.item()}")
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
