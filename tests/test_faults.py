"""Fault injection: what a crash, a damaged checkpoint, a torn metrics line, a read-only or full run folder leave
behind, and that `--resume` either continues exactly as the uninterrupted run would or says in one line why not.
Real runs (a tiny model in a real DeepSpeed engine, `longext train` in a subprocess for kill -9), real damage
(truncated files, SIGKILL, chmod, a file-size limit), and the uninterrupted run as the reference."""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import bad_input, losses, write_recipe
from longext.checkpoints import MANIFEST, check_resumable, resume_point, step_folders, verify
from longext.cli import main
from longext.errors import LongextError
from longext.recipe import load_recipe
from longext.train import run_training

REPO = Path(__file__).resolve().parent.parent
KILL_STEPS = 8  # the kill -9 runs: a checkpoint after every step, so a kill often lands mid-save


def train(path: Path, *overrides: str, resume: bool = False) -> Path:
    return run_training(load_recipe(path, list(overrides)), resume=resume)


def cli(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.Popen:
    """`longext ARGS` in a fresh process, one thread (as the in-process references below run)."""
    dist_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # this process is a rank of one
    env = {k: v for k, v in os.environ.items() if k not in dist_vars}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.Popen([*prefix, sys.executable, "-m", "longext", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.fixture
def one_thread():
    """In-process runs on one thread, so their losses are bit-for-bit those of a `cli` subprocess."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def metric_lines(run: Path) -> int:
    path = run / "metrics.jsonl"
    return len(path.read_bytes().splitlines()) if path.exists() else 0


def wait_for(proc: subprocess.Popen, ready, what: str, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not ready():
        assert proc.poll() is None, f"training ended before {what}:\n{proc.stdout.read()}"
        assert time.monotonic() < deadline, f"no {what} after {seconds} s"
        time.sleep(0.02)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).digest() for p in sorted(folder.rglob("*"))
            if p.is_file()}


# ----------------------------------------------------------------------------- checkpoints on disk
@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory, tiny_model_dir, corpus_dir) -> Path:
    """A finished 3-step ZeRO-2 run with a checkpoint after every step (model states + optimizer states files)."""
    folder = tmp_path_factory.mktemp("checkpointed")
    path = write_recipe(folder, tiny_model_dir, corpus_dir, name="ck", data={"seq_len": 32},
                        train={"steps": 3, "save_every": 1, "keep_checkpoints": 3, "zero_stage": 2})
    return train(path)


def copy_run(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    return copy


def truncate_half(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def test_a_checkpoint_is_published_whole_with_its_manifest(checkpointed):
    ckpt = checkpointed / "checkpoints"
    assert [s for s, _ in step_folders(ckpt)] == [1, 2, 3]
    assert (ckpt / "latest").read_text() == "step-000003"
    # (and DeepSpeed's zero_to_fp32.py, zero_to_torch.py, which read `latest`)
    assert sorted(p.name for p in ckpt.iterdir() if p.suffix != ".py") == [
        "latest", "step-000001", "step-000002", "step-000003"]
    for _, folder in step_folders(ckpt):
        manifest = json.loads((folder / MANIFEST).read_text())
        files = sorted(p.name for p in folder.iterdir() if p.name != MANIFEST)
        assert sorted(manifest["files"]) == files and len(files) == 2  # model states, ZeRO-2 optimizer states
        for name, entry in manifest["files"].items():
            data = (folder / name).read_bytes()
            assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        assert manifest["world_size"] == 1 and verify(folder) is None


def test_each_damaged_checkpoint_file_is_found_and_the_previous_checkpoint_used(checkpointed, tmp_path):
    names = sorted(p.name for p in (checkpointed / "checkpoints" / "step-000003").iterdir())
    assert MANIFEST in names and len(names) == 3
    for damage in ("truncate", "flip"):
        for name in names:
            run = copy_run(checkpointed, tmp_path / f"{damage}-{name}")
            target = run / "checkpoints" / "step-000003" / name
            if damage == "truncate":
                truncate_half(target)
            else:  # the same size, one byte changed
                data = bytearray(target.read_bytes())
                data[len(data) // 2] ^= 0xFF
                target.write_bytes(bytes(data))
            point = resume_point(run / "checkpoints")
            assert point.path == run / "checkpoints" / "step-000002", (damage, name)
            [passed] = point.passed_over
            assert passed.startswith(f"step-000003 is damaged: {name} ") or (
                name == MANIFEST and passed.startswith(f"step-000003 is damaged: {MANIFEST} is unreadable")), passed
            assert point.warning.endswith("resuming from step-000002, the newest checkpoint that verifies "
                                          "(nothing was deleted)")


def test_latest_naming_a_deleted_checkpoint_resumes_from_the_newest_good_one(checkpointed, tmp_path):
    from longext.rundir import check_start

    run = copy_run(checkpointed, tmp_path)
    shutil.rmtree(run / "checkpoints" / "step-000003")  # `latest` still names it
    point = check_start(run, load_recipe(run / "recipe.yaml"), resume=True)
    assert point.path == run / "checkpoints" / "step-000002"
    assert point.passed_over == ["checkpoints/latest names step-000003, which does not exist"]
    # an interrupted save (a staging folder, no rename) is named too, and is not a checkpoint
    (run / "checkpoints" / ".partial-step-000003").mkdir()
    assert resume_point(run / "checkpoints").passed_over[-1] == ".partial-step-000003 is incomplete (its save was " \
                                                                "interrupted)"


def test_resume_past_a_truncated_checkpoint_and_a_torn_metrics_line_warns_and_matches(
        checkpointed, tmp_path, capsys):
    run = copy_run(checkpointed, tmp_path)
    truncate_half(run / "checkpoints" / "step-000003" / "mp_rank_00_model_states.pt")  # the case
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 4, "loss": 5.93')  # a write cut short
    assert main(["train", str(run / "recipe.yaml"), "--out", str(run), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    name = "mp_rank_00_model_states.pt"
    size = json.loads((run / "checkpoints" / "step-000003" / MANIFEST).read_text())["files"][name]["bytes"]
    assert warnings == [
        f"warning: --resume: step-000003 is damaged: {name} has {size // 2:,} bytes, its manifest says {size:,} "
        "(truncated or replaced); resuming from step-000002, the newest checkpoint that verifies (nothing was deleted)",
        f"warning: {run / 'metrics.jsonl'}: dropped line 4: not a whole JSON record (a write cut short by a crash "
        "or a full disk)",
    ]
    assert losses(run) == losses(checkpointed)  # step 3 redone from step 2's checkpoint: bit for bit
    # the damaged folder was set aside when step 3 was saved again, not deleted
    assert verify(run / "checkpoints" / "step-000003") is None
    assert verify(run / "checkpoints" / "step-000003.damaged-1") is not None


def test_no_good_checkpoint_is_one_line_naming_each_and_deletes_nothing(checkpointed, tmp_path, capsys):
    run = copy_run(checkpointed, tmp_path)
    for _, folder in step_folders(run / "checkpoints"):
        truncate_half(folder / "mp_rank_00_model_states.pt")
    before = snapshot(run)
    [line] = bad_input(capsys, "train", run / "recipe.yaml", "--out", run, "--resume")
    assert line.startswith(f"error: --resume: no checkpoint in {run / 'checkpoints'} verifies: step-000003 is damaged: "
                           f"mp_rank_00_model_states.pt has ")
    assert "; step-000002 is damaged: " in line and "; step-000001 is damaged: " in line
    assert line.endswith("Nothing was deleted; to start again, train into another --out")
    assert snapshot(run) == before
    with pytest.raises(Exception, match="no checkpoint in .* verifies"):
        check_resumable(run / "checkpoints")


# --------------------------------------------------------------------------------------- metrics
def test_torn_metrics_lines_are_dropped_with_a_warning_and_whole_ones_kept(tmp_path, capsys):
    from longext.metrics import MetricsLog

    records = [json.dumps({"step": s, "loss": 6.0 - s / 10}) for s in (1, 2, 3)]
    path = tmp_path / "metrics.jsonl"
    path.write_text(records[0] + "\n" + '{"step": 2, "lo\n' + records[1] + "\n" + records[2] + "\n" + '{"step": 4')
    MetricsLog(tmp_path, enabled=True, resume_from=2).close()
    assert path.read_text() == records[0] + "\n" + records[1] + "\n"  # step 3 is redone; torn lines 2 and 5 gone
    err = capsys.readouterr().err
    assert err == (f"warning: {path}: dropped lines 2, 5: not a whole JSON record (a write cut short by a crash or a "
                   f"full disk)\n")


# --------------------------------------------------------------------------------------- kill -9
@pytest.fixture(scope="module")
def kill_reference(tmp_path_factory, tiny_model_dir, corpus_dir):
    """(recipe settings, losses) of the uninterrupted run the killed ones must reproduce."""
    import torch

    folder = tmp_path_factory.mktemp("kill-ref")
    sections = dict(data={"seq_len": 32}, train={"steps": KILL_STEPS, "save_every": 1, "keep_checkpoints": 2,
                                                 "lr": 3.0e-3, "warmup_steps": 2, "schedule": "cosine"})
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = train(write_recipe(folder, tiny_model_dir, corpus_dir, name="ref", **sections))
    finally:
        torch.set_num_threads(before)
    return sections, losses(run)


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow),
                                  pytest.param(3, marks=pytest.mark.slow)])
def test_kill_9_at_a_random_point_then_resume_reproduces_the_uninterrupted_losses(
        seed, kill_reference, tmp_path, tiny_model_dir, corpus_dir, one_thread):
    sections, want = kill_reference
    path = write_recipe(tmp_path, tiny_model_dir, corpus_dir, name="killed", **sections)
    run, rng = tmp_path / "runs" / "killed", random.Random(seed)
    after = rng.randint(2, KILL_STEPS - 3)  # step 1's checkpoint is complete once step 2 is logged
    proc = cli("train", str(path))
    wait_for(proc, lambda: metric_lines(run) >= after, f"{after} logged steps")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_bytes().splitlines()[:after]]
    interval = records[-1]["elapsed"] - records[-2]["elapsed"]  # a step and its checkpoint
    time.sleep(rng.uniform(0, 1.5 * interval))  # anywhere in the next step, its metrics line or its checkpoint
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    left = sorted(p.name for p in (run / "checkpoints").iterdir())
    resumed = train(path, resume=True)
    got = losses(resumed)
    assert got == want, f"killed after step {after} (left {left})"  # bit for bit, every step
    assert json.loads((resumed / "status.json").read_text())["state"] == "finished"
    assert not list((resumed / "checkpoints").glob(".partial-*"))


# ------------------------------------------------------------------ a read-only or full run folder
def drop_root_override() -> tuple[str, ...]:
    """Root ignores permission bits; without CAP_DAC_OVERRIDE it obeys them like any user."""
    if os.geteuid() != 0:
        return ()
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: a read-only folder cannot be made for root")
    return ("setpriv", "--bounding-set=-dac_override,-fowner", "--")


def started_run(tmp_path, tiny_model_dir, corpus_dir, prefix=()) -> tuple[subprocess.Popen, Path, Path]:
    """`longext train` in a subprocess, returned once step 2's checkpoint is published."""
    path = write_recipe(tmp_path, tiny_model_dir, corpus_dir, name="mid", data={"seq_len": 32},
                        train={"steps": 400, "save_every": 2, "keep_checkpoints": 1})
    run = tmp_path / "runs" / "mid"
    proc = cli("train", str(path), "-s", "train.log_every=50", prefix=prefix)
    wait_for(proc, lambda: (run / "checkpoints" / "step-000002" / MANIFEST).exists(), "checkpoint step-000002")
    return proc, path, run


def assert_stopped_in_one_line(proc: subprocess.Popen, path: Path) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, out
    assert "Traceback" not in out
    [line] = [line for line in out.splitlines() if line.startswith("error:")]
    assert ": training stopped and the last good checkpoint, " in line
    assert line.endswith(f"is intact; make room or make the folder writable; continue with "
                         f"`longext train {path} -s train.log_every=50 --resume`"), line
    return line


def test_a_run_folder_made_read_only_mid_run_stops_in_one_line_and_loses_nothing(tmp_path, tiny_model_dir, corpus_dir):
    proc, path, run = started_run(tmp_path, tiny_model_dir, corpus_dir, prefix=drop_root_override())
    for folder, dirs, files in os.walk(run):
        for name in [*dirs, *files, "."]:
            p = os.path.join(folder, name)
            os.chmod(p, os.stat(p).st_mode & ~0o222)
    frozen = snapshot(run)
    try:
        line = assert_stopped_in_one_line(proc, path)
        # the next write was a metrics line, or a checkpoint (if the chmod caught a save)
        assert line.startswith((f"error: cannot write {run / 'metrics.jsonl'} (Permission denied)",
                                f"error: cannot write {run / 'checkpoints'}")), line
        # nothing lost, nothing half-written; a save the chmod caught keeps writing its staging folder through the
        # files it had open (.partial-*: never read by --resume, removed by the next save), so that is left out
        published = lambda snap: {k: v for k, v in snap.items() if "/.partial-" not in f"/{k}"}  # noqa: E731
        assert published(snapshot(run)) == published(frozen)
    finally:
        for folder, dirs, files in os.walk(run):
            for name in [*dirs, *files, "."]:
                p = os.path.join(folder, name)
                os.chmod(p, os.stat(p).st_mode | 0o200)
    good = resume_point(run / "checkpoints").path
    assert good is not None and str(good) in line and verify(good) is None
    assert all(json.loads(rec) for rec in (run / "metrics.jsonl").read_text().splitlines())


@pytest.mark.slow
def test_a_full_disk_mid_run_stops_in_one_line_keeps_the_last_checkpoint_and_resumes(
        tmp_path, tiny_model_dir, corpus_dir):
    proc, path, run = started_run(tmp_path, tiny_model_dir, corpus_dir)
    checkpoint = next((run / "checkpoints" / "step-000002").glob("mp_rank_*"))
    limit = checkpoint.stat().st_size // 2  # a checkpoint file no longer fits; the metrics lines still do
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (limit, limit))
    line = assert_stopped_in_one_line(proc, path)
    assert line.startswith(f"error: cannot write {run / 'checkpoints'}/.partial-step-"), line
    assert "torch could not write the file" in line and "MiB free there" in line
    good = resume_point(run / "checkpoints")
    assert good.path is not None and good.passed_over == [] and str(good.path) in line
    assert not list((run / "checkpoints").glob(".partial-*"))  # the failed save's staging folder was removed
    step = int(good.path.name.removeprefix("step-"))
    resumed = train(path, f"train.steps={step + 1}", resume=True)
    assert sorted(losses(resumed)) == list(range(1, step + 2))


# ------------------------------------------------------------------------------ ranks and ZeRO stages
@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_two_ranks_resume_from_a_published_checkpoint_at_every_zero_stage(tmp_path, tiny_model_dir, corpus_dir, stage):
    # DeepSpeed wrote each rank's files under the staging tag; the checkpoint is loaded from the renamed folder
    path = write_recipe(tmp_path, tiny_model_dir, corpus_dir, name=f"r{stage}", data={"seq_len": 32},
                        train={"steps": 4, "save_every": 2, "keep_checkpoints": 2, "zero_stage": stage})
    full = tmp_path / "runs" / f"r{stage}"
    proc = cli("train", str(path), "--nproc", "2")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    manifest = json.loads((full / "checkpoints" / "step-000002" / MANIFEST).read_text())
    assert manifest["world_size"] == 2
    if stage:  # each rank's optimizer partition is in the checkpoint
        assert sum("optim_states" in name for name in manifest["files"]) == 2
    part = copy_run(full, tmp_path)
    shutil.rmtree(part / "checkpoints" / "step-000004")  # as a kill during step 3 or 4 leaves it
    proc = cli("train", str(path), "--out", str(part), "--nproc", "2", "--resume")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert "resuming from step-000002" in out and out.count("warning:") == 1, out
    want, got = losses(full), losses(part)
    assert sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7)
    if stage:  # one rank cannot take two ranks' optimizer partitions: one line instead of DeepSpeed's traceback
        with pytest.raises(LongextError, match=r"written by 2 ranks and ZeRO stage .* resume with the same number of "
                                               r"ranks \(--nproc 2\), not 1$"):
            train(path, f"output.dir={part}", resume=True)
