"""Checkpoints a resume can trust.

DeepSpeed writes each checkpoint into a staging tag, `checkpoints/.partial-step-000012/`. When every rank is done,
rank 0 adds `manifest.json` (every file's size, and the SHA-256 of each file up to CHECKSUM_LIMIT), flushes the
folder to disk and renames it to `step-000012/`, then points `latest` at it. A `step-*` folder is therefore complete
when it appears; `verify` checks it against its manifest again before a resume, so a file truncated or damaged
afterwards (a full disk, a killed copy, a power loss before the data reached the disk) is named instead of ending
in DeepSpeed's traceback. `latest` is only a hint (DeepSpeed's own tools read it): `--resume` takes the newest step
folder that verifies.

Nothing here deletes a checkpoint that verifies, except `train.keep_checkpoints` pruning the oldest ones once a
newer one is published. A damaged folder is never deleted: a later save of the same step sets it aside as
`step-000012.damaged-1/`. A staging folder left by an interrupted save is removed by the next save (it never was a
checkpoint).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from longext.errors import LongextError, WriteFailed
from longext.files import fsync_path, publish_folder, sha256_of, write_atomic, write_json

MANIFEST = "manifest.json"
FORMAT = "longext-checkpoint/1"
CHECKSUM_LIMIT = 64 * 2**20  # larger files (optimizer states of big models) are checked by size only
STAGING = ".partial-"
_STEP_FOLDER = re.compile(r"step-(\d{6,})")
# torch.save reports a failed write as a RuntimeError from its zip writer, without the OS's reason
_TORCH_WRITE_ERRORS = ("inline_container", "PytorchStreamWriter", "cannot be opened", "file write failed",
                       "Parent directory")  # DeepSpeed logs a failed makedirs of the tag folder and goes on


def tag(step: int) -> str:
    return f"step-{step:06d}"


def step_folders(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every published checkpoint folder, oldest first (set-aside and staging ones excluded)."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _STEP_FOLDER.fullmatch(p.name)) and p.is_dir()]
    return sorted(found)


# ------------------------------------------------------------------------------------------- verify
def verify(folder: Path) -> str | None:
    """None when `folder` holds every file its manifest lists, at the listed size and checksum; else what is wrong."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"] if manifest.get("format") == FORMAT else None
    except FileNotFoundError:
        return f"no {MANIFEST} (its save did not finish, or an older longext wrote it)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"{MANIFEST} is unreadable ({type(err).__name__})"
    if not isinstance(files, dict) or not files:
        return f"{MANIFEST} is not a longext checkpoint manifest"
    for name, want in files.items():
        problem = _file_problem(folder / name, want)
        if problem:
            return f"{name} {problem}"
    return None


def _file_problem(path: Path, want: dict) -> str | None:
    try:
        size = path.stat().st_size
    except OSError:
        return "is missing"
    if size != want["bytes"]:
        return f"has {size:,} bytes, its manifest says {want['bytes']:,} (truncated or replaced)"
    if "sha256" in want and sha256_of(path) != want["sha256"]:
        return "does not match its SHA-256 (damaged)"
    return None


@dataclass
class ResumePoint:
    """The checkpoint a resume starts from (None: there is none) and, newest first, why newer ones were passed over."""

    path: Path | None
    passed_over: list[str] = field(default_factory=list)

    @property
    def warning(self) -> str | None:
        if not self.passed_over or self.path is None:
            return None
        return (f"--resume: {'; '.join(self.passed_over)}; resuming from {self.path.name}, the newest checkpoint "
                f"that verifies (nothing was deleted)")


def resume_point(ckpt_dir: Path) -> ResumePoint:
    """The newest step folder that verifies. Staging folders newer than it (an interrupted save) and a `latest` that
    names a missing or damaged folder are reported in `passed_over`."""
    folders = step_folders(ckpt_dir)
    newest = folders[-1][0] if folders else -1
    passed = [f"{STAGING}{tag(s)} is incomplete (its save was interrupted)" for s in _staging_steps(ckpt_dir)
              if s > newest]
    hint = _latest_hint(ckpt_dir)
    for step, folder in reversed(folders):
        problem = verify(folder)
        if problem is None:
            if hint and hint != folder.name and not (ckpt_dir / hint).is_dir():
                passed.insert(0, f"checkpoints/latest names {hint}, which does not exist")
            return ResumePoint(folder, passed)
        passed.append(f"{folder.name} is damaged: {problem}")
    return ResumePoint(None, passed)


def check_resumable(ckpt_dir: Path) -> ResumePoint:
    """resume_point, or one line naming what is wrong when no checkpoint can be resumed from.

    Raises:
        LongextError: no checkpoint folder at all, or none that verifies (each damaged one named; nothing deleted).
    """
    point = resume_point(ckpt_dir)
    if point.path is not None:
        return point
    if not step_folders(ckpt_dir):
        why = f" ({'; '.join(point.passed_over)})" if point.passed_over else ""
        raise LongextError(f"--resume: no checkpoint in {ckpt_dir}{why} (start without --resume)")
    raise LongextError(
        f"--resume: no checkpoint in {ckpt_dir} verifies: {'; '.join(point.passed_over)}. Nothing was deleted; to "
        f"start again, train into another --out"
    )


def _latest_hint(ckpt_dir: Path) -> str | None:
    try:
        return (ckpt_dir / "latest").read_text().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def _staging_steps(ckpt_dir: Path) -> list[int]:
    if not ckpt_dir.is_dir():
        return []
    names = (p.name.removeprefix(STAGING) for p in ckpt_dir.glob(f"{STAGING}step-*"))
    return [int(m.group(1)) for n in names if (m := _STEP_FOLDER.fullmatch(n))]


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text())


# --------------------------------------------------------------------------------------------- save
def save(engine, ckpt_dir: Path, step: int, client_state: dict, keep: int, rank: int) -> Path:
    """Write checkpoint `step` (every rank calls this): staging tag, manifest, rename, `latest`, pruning.

    Raises:
        WriteFailed: the folder cannot be written or has no room (checked before DeepSpeed writes, so all ranks stop
            together), or a write failed; the staging folder is removed and the previous checkpoints are untouched.
    """
    staging, final = ckpt_dir / f"{STAGING}{tag(step)}", ckpt_dir / tag(step)
    _agree(_room_problem(ckpt_dir) if rank == 0 else None)
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=staging.name, client_state=client_state, save_latest=False,
                               exclude_frozen_parameters=True)
        _barrier()
        if rank == 0:
            _publish(staging, final, step, _world_size())
            write_atomic(ckpt_dir / "latest", final.name)
            _prune(ckpt_dir, step, keep)
    except (OSError, RuntimeError) as err:
        if isinstance(err, RuntimeError) and not any(s in str(err) for s in _TORCH_WRITE_ERRORS):
            raise
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        raise WriteFailed(getattr(err, "filename", None) or staging, _reason(err, ckpt_dir)) from None
    _barrier()
    return final


def _room_problem(ckpt_dir: Path) -> WriteFailed | None:
    """Before DeepSpeed writes: the folder takes new files and has room for one more checkpoint as large as the last
    one. Interrupted saves' staging folders are removed first (they never were checkpoints)."""
    probe = ckpt_dir / f".longext-probe-{os.getpid()}"
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_dir.glob(f"{STAGING}*"):
            shutil.rmtree(stale, ignore_errors=True)
        probe.mkdir()
        probe.rmdir()
    except OSError as err:
        return WriteFailed(ckpt_dir, err.strerror or type(err).__name__)
    folders = step_folders(ckpt_dir)
    try:
        need = sum(f["bytes"] for f in manifest_of(folders[-1][1])["files"].values()) if folders else 0
    except (OSError, ValueError, KeyError, TypeError):
        need = 0
    free = shutil.disk_usage(ckpt_dir).free
    if free < need:
        return WriteFailed(ckpt_dir, f"no room: {free / 2**20:,.0f} MiB free, the last checkpoint took "
                                     f"{need / 2**20:,.0f} MiB")
    return None


def _agree(problem: WriteFailed | None) -> None:
    """Every rank raises rank 0's problem, or none does (a rank alone in a failed save would wait forever)."""
    import torch

    flag = torch.tensor([1.0 if problem else 0.0])
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    if problem:
        raise problem
    if flag.item():
        raise WriteFailed(Path("checkpoints"), "rank 0 could not write the checkpoint")


def _publish(staging: Path, final: Path, step: int, world_size: int) -> None:
    """Manifest last, everything flushed to disk, then the rename that makes the checkpoint exist. A folder already
    at `final` (a damaged one a resume passed over) is set aside, not deleted."""
    files = {}
    for path in sorted(p for p in staging.rglob("*") if p.is_file()):
        size = path.stat().st_size
        entry = {"bytes": size, "sha256": sha256_of(path)} if size <= CHECKSUM_LIMIT else {"bytes": size}
        files[str(path.relative_to(staging))] = entry
        fsync_path(path)
    write_json(staging / MANIFEST, {"format": FORMAT, "step": step, "world_size": world_size, "files": files})
    fsync_path(staging / MANIFEST)
    fsync_path(staging)
    aside = None
    if final.exists():
        aside = next(final.with_name(f"{final.name}.damaged-{i}") for i in range(1, 10**6)
                     if not final.with_name(f"{final.name}.damaged-{i}").exists())
    publish_folder(staging, final, previous=aside)
    fsync_path(final.parent)


def _prune(ckpt_dir: Path, step: int, keep: int) -> None:
    """Keep the newest `keep` checkpoints up to `step`. Folders numbered after it are left alone: they are what a
    resume passed over as damaged, and the run will set each aside when it saves that step again."""
    mine = [folder for s, folder in step_folders(ckpt_dir) if s <= step]
    for old in mine[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _barrier() -> None:
    import torch

    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _world_size() -> int:
    import torch

    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def _reason(err: Exception, folder: Path) -> str:
    """The OS's reason, or for torch's zip writer (which drops it) the free space left, the usual cause."""
    if isinstance(err, OSError):
        return err.strerror or str(err)
    try:
        free = f"; {shutil.disk_usage(folder).free / 2**20:,.0f} MiB free there"
    except OSError:
        free = ""
    return f"torch could not write the file: {str(err).splitlines()[0][:100]}{free}"
