"""The run directory: one recipe, one folder. Everything written here is atomic (temp + rename), so
an interrupted run leaves either the old file or the new one, and checkpoints `--resume` can use.

    recipe.yaml     the resolved recipe (every `auto` filled in)
    rope.json       the RoPE state the trained model needs (also written into exported configs)
    status.json     running | interrupted | failed | finished, with the step (and, for multi-stage methods,
                    which stages are done: LongRecipe's extension / replay / merge)
    metrics.jsonl   one line per logged optimizer step; tb/ the same for tensorboard
    checkpoints/    DeepSpeed checkpoints (step-000010/ with its manifest.json, latest): trainable weights, optimizer,
                    scheduler, RNG and data position; written and verified by longext.checkpoints
    adapter/        the final peft adapter (adapter_config.json + adapter_model.safetensors)
    adapter-tuned/  LongRecipe with a merge: the adapter before the merge with the original weights
    model/          instead of adapter/ for train.full_finetune: the whole trained model (save_pretrained, safetensors)
    model-tuned/    LongRecipe full fine-tune with a merge: the model before the merge
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import time
from pathlib import Path

import torch

from longext import checkpoints
from longext.checkpoints import ResumePoint, check_resumable
from longext.errors import LongextError, TrainingStopped, WriteFailed, warn
from longext.files import check_writable, publish_folder, staging_folder, write_atomic, write_json
from longext.recipe import load_yaml
from longext.recipe import Recipe, dump_recipe, load_recipe

# Fields a resumed run may change without invalidating its checkpoints.
RESUMABLE_CHANGES = ("train.steps", "train.save_every", "train.log_every", "train.keep_checkpoints", "eval", "output", "description")


def is_run_dir(path: Path) -> bool:
    return (path / "recipe.yaml").is_file() and (path / "rope.json").is_file()


def load_run_recipe(run_dir: Path) -> Recipe:
    return load_recipe(run_dir / "recipe.yaml")


def _holds_a_run(path: Path) -> bool:
    """Written by `longext train` (finished or not): a run folder that output.overwrite may replace."""
    return (path / "recipe.yaml").is_file() or (path / "status.json").is_file()


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def check_start(run_dir: Path, recipe: Recipe, resume: bool) -> ResumePoint | None:
    """Refuse to overwrite or to resume what cannot be resumed; clear the folder for overwrite. With `resume`, the
    checkpoint to resume from: the newest that verifies (checkpoints.check_resumable)."""
    check_writable(run_dir, "output.dir")
    has_content = run_dir.is_dir() and any(run_dir.iterdir())
    if resume:
        point = check_resumable(run_dir / "checkpoints")
        if not (run_dir / "recipe.yaml").is_file():
            raise LongextError(f"--resume: {run_dir} has checkpoints but no recipe.yaml, so they cannot be checked "
                               f"against the recipe (start without --resume in another --out)")
        _check_same_recipe(run_dir, recipe)
        return point
    if not has_content:
        return None
    if not _holds_a_run(run_dir):
        found = sorted(p.name for p in run_dir.iterdir())
        raise LongextError(
            f"output.dir: {run_dir} is not empty and is not a longext run (holds {', '.join(found[:3])}"
            f"{', ...' if len(found) > 3 else ''}); output.overwrite only replaces runs: choose another --out"
        )
    if not recipe.output.overwrite:
        what = "a finished run" if read_status(run_dir).get("state") == "finished" else "an unfinished run"
        raise LongextError(
            f"output.dir: {run_dir} already holds {what} (continue it with --resume, set output.overwrite: true, "
            f"or choose another --out)"
        )
    if _rank() == 0:
        shutil.rmtree(run_dir)
    return None


def _check_same_recipe(run_dir: Path, recipe: Recipe) -> None:
    stored = load_yaml((run_dir / "recipe.yaml").read_text())
    now = load_yaml(dump_recipe(recipe))  # as written to recipe.yaml (a full fine-tune has no lora section)
    changed = [p for p in _diff(stored, now) if not p.startswith(RESUMABLE_CHANGES)]
    if (stored.get("method") or {}).get("replay") and stored["train"]["steps"] != now["train"]["steps"]:
        raise LongextError(
            f"--resume: train.steps ends the extension stage of this run; it cannot change on resume "
            f"(was {stored['train']['steps']}, got {now['train']['steps']})"
        )
    if changed:
        raise LongextError(
            f"--resume: the recipe differs from {run_dir}/recipe.yaml in {', '.join(changed)} "
            f"(only {', '.join(RESUMABLE_CHANGES)} may change on resume)"
        )


def _diff(stored, now, prefix: str = "") -> list[str]:
    """Paths where `now` differs from `stored`. A key the stored recipe lacks is a field added after the run started
    (e.g. data.document_mask): it took its default then, so it is no change."""
    if isinstance(stored, dict) and isinstance(now, dict):
        return [p for k in sorted(stored) for p in _diff(stored[k], now.get(k), f"{prefix}{k}.")]
    return [] if stored == now else [prefix.rstrip(".")]


def read_status(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint that verifies against its manifest (`checkpoints/latest` is only a hint)."""
    return checkpoints.resume_point(run_dir / "checkpoints").path


def stopped_writing(run_dir: Path, err: WriteFailed) -> TrainingStopped:
    """A write to the run directory failed mid-run: say which, and that the last good checkpoint is intact (exit 2)."""
    last = latest_checkpoint(run_dir)
    kept = f"the last good checkpoint, {last}, is intact" if last else "no checkpoint had been written yet"
    try:  # often impossible (the folder is read-only): status.json then still says running
        _merge_status(run_dir, state="failed", reason=f"cannot write {err.path} ({err.reason})")
    except OSError:
        pass
    return TrainingStopped(f"{err}: training stopped and {kept}; make room or make the folder writable",
                           exit_code=2, resumable=last is not None)


def _merge_status(run_dir: Path, **fields) -> None:
    if _rank() == 0:
        write_json(run_dir / "status.json", {**read_status(run_dir), **fields,
                                             "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


class Run:
    """A run directory while it trains: status.json (written by rank 0, from here only), the checkpoints, and what
    training produced. `stages(step, finished)` says which stages of a multi-stage method are done (None for one)."""

    def __init__(self, run_dir: Path, rank: int, total: int, stages=lambda step, finished=False: None):
        self.dir, self.rank, self.total, self.stages = Path(run_dir), rank, total, stages

    def start(self, recipe: Recipe, rope, step: int) -> None:
        """The resolved recipe and the RoPE state the trained model needs, then status running (rank 0)."""
        if self.rank == 0:
            write_atomic(self.dir / "recipe.yaml", dump_recipe(recipe))
            write_json(self.dir / "rope.json", rope.to_json())
        self.status("running", step)

    def status(self, state: str, step: int, finished: bool = False) -> None:
        """running | interrupted | finished at optimizer step `step` of all stages."""
        self._write_status(state, step, self.total, stages=self.stages(step, finished))

    def fail(self, step: int, reason: str) -> None:
        self._write_status("failed", step, None, reason=reason)

    def _write_status(self, state: str, step: int, steps: int | None, reason: str | None = None,
                      stages: dict | None = None) -> None:
        if self.rank != 0:
            return
        status = {"state": state, "step": step, "steps": steps, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if reason:
            status["reason"] = reason
        if stages:
            status["stages"] = stages  # each stage: done | running | pending
        try:
            write_json(self.dir / "status.json", status)
        except OSError as err:
            raise WriteFailed(self.dir / "status.json", err.strerror or type(err).__name__) from None

    def save_checkpoint(self, engine, step: int, keep: int) -> None:
        """Trainable weights, optimizer, scheduler, RNG and the data position, published whole (checkpoints.save):
        a crash or a failed write mid-save keeps the previous checkpoint."""
        client_state = {"step": step, "torch_rng": torch.get_rng_state()}
        checkpoints.save(engine, self.dir / "checkpoints", step, client_state, keep, self.rank)

    def load_checkpoint(self, engine, point: ResumePoint) -> int:
        """Restore the checkpoint check_start chose (rank 0 warns about the newer ones it passed over); returns the
        optimizer step to continue from."""
        path = point.path
        if self.rank == 0 and point.warning:
            warn(point.warning)
        _check_world_size(engine, path)
        try:
            _, client_state = engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=False)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
            older = [f.name for _, f in checkpoints.step_folders(path.parent) if f.name < path.name]
            raise LongextError(
                f"--resume: checkpoint {path} passed its manifest check but could not be loaded "
                f"({type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}); nothing was deleted"
                + (f"; to resume from {older[-1]}, move {path.name} out of {path.parent}" if older else "")
            ) from None
        if client_state is None:
            raise LongextError(f"--resume: checkpoint {path} could not be read (it may be from another DeepSpeed layout)")
        torch.set_rng_state(client_state["torch_rng"])
        _lr_from_schedule(engine.lr_scheduler)
        return int(client_state["step"])

    def save_trained(self, engine, full: bool = False) -> Path:
        """What training produced, gathered from ZeRO-3 partitions and written atomically: the peft adapter to
        adapter/, or for a full fine-tune (`full`) the whole model to model/ (config + safetensors)."""
        from longext.engine import gathered

        module = engine.module
        params = [p for p in module.parameters() if full or p.requires_grad]
        final = self.dir / ("model" if full else "adapter")
        with gathered(engine, params):
            if self.rank == 0:
                try:
                    with staging_folder(final) as tmp:
                        module.save_pretrained(tmp)
                        publish_folder(tmp, final)
                except OSError as err:
                    raise WriteFailed(err.filename or final, err.strerror or type(err).__name__) from None
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        return final


def _check_world_size(engine, path: Path) -> None:
    """ZeRO partitions the optimizer state over the ranks: DeepSpeed cannot load it into another number of them."""
    saved = checkpoints.manifest_of(path).get("world_size")
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    stage = engine.zero_optimization_stage()
    if saved and saved != world and stage > 0:
        raise LongextError(
            f"--resume: checkpoint {path} was written by {saved} ranks and ZeRO stage {stage} splits its optimizer "
            f"state over them; resume with the same number of ranks (--nproc {saved}), not {world}"
        )


def _lr_from_schedule(scheduler) -> None:
    """The learning rate of the next step from the schedule of *this* recipe. The checkpoint brings back the
    optimizer's lr of the old one, which differs when train.steps changed on resume (the LambdaLR factors are
    functions of the total steps); the scheduler would only correct it after the first resumed step."""
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if not lambdas:
        return
    groups = scheduler.optimizer.param_groups
    for group, base, factor in zip(groups, scheduler.base_lrs, lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in groups]
