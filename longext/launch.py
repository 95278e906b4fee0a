"""Before `longext train` starts: the checks made once, in the process the user started (`preflight`), and for
`--nproc N` / `--hostfile F` the same command run again under a launcher (`relaunch`).

One node: torchrun (`python -m torch.distributed.run`), which sets RANK/WORLD_SIZE/LOCAL_RANK; several
nodes: the DeepSpeed launcher with the hostfile (pdsh/ssh). Either way every rank runs the ordinary
`longext train` code path, which notices the launcher's environment and joins the process group.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from longext.errors import LongextError, Problems


def is_launched_rank() -> bool:
    """This process is a rank a launcher started (its checks were made before the launch)."""
    return os.environ.get("WORLD_SIZE", "1") != "1"


def preflight(recipe, nproc: int, hostfile: Path | None, resume: bool):
    """(Resolved, warnings to print) for `longext train`. In the process the user started, once: the ranks the
    launch will have, the memory estimate against this machine, and, when it relaunches, every check a rank would
    make (one clear line instead of N ranks' tracebacks). A launched rank only resolves."""
    from longext.resolve import resolve

    if is_launched_rank():
        return resolve(recipe), []
    if not hostfile:  # a hostfile's rank count is known only to the launcher; the ranks check it there
        from longext.sp import world_problems

        problems = world_problems(recipe.train.sequence_parallel, nproc)
        if problems:
            raise Problems(problems)
    resolved = resolve(recipe)
    warnings = memory_check(resolved, nproc)
    if nproc > 1 or hostfile:
        from longext.rundir import check_start

        check_start(recipe.run_dir, resolved.recipe, resume)
    return resolved, warnings


def memory_check(resolved, ranks: int) -> list[str]:
    """`longext plan`'s estimate against this machine (GPU memory, or available RAM shared by the ranks): raises
    LongextError (train.memory_check: refuse) or returns the warning (warn) when it does not fit."""
    if resolved.recipe.train.memory_check == "off":
        return []
    from longext.plan import budget_problem, device_budget, plan_resolved

    device, budget = device_budget(ranks)
    problem = budget_problem(*plan_resolved(resolved, gpus=ranks, budget=budget, device=device))
    if problem and resolved.recipe.train.memory_check == "refuse":
        raise LongextError(problem)
    return [f"warning: {problem}"] if problem else []


def strip_launch_flags(argv: list[str]) -> list[str]:
    """argv without --nproc/--hostfile (and their values), so ranks do not relaunch themselves."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--nproc", "--hostfile"):
            skip = True
            continue
        if arg.startswith(("--nproc=", "--hostfile=")):
            continue
        out.append(arg)
    return out


def launch_command(argv: list[str], nproc: int, hostfile: Path | None, port: int) -> list[str]:
    rest = ["-m", "longext", *strip_launch_flags(argv)]
    if hostfile:
        if not hostfile.is_file():
            raise LongextError(f"--hostfile: no such file: {str(hostfile)!r}")
        return [
            sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--num_gpus", str(nproc),
            "--master_port", str(port), "--no_local_rank", "--module", "longext", *strip_launch_flags(argv),
        ]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port), *rest]


def relaunch(argv: list[str], nproc: int, hostfile: Path | None) -> int:
    """Run `longext <argv>` as `nproc` ranks; returns the launcher's exit code."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:  # ranks share the cores instead of oversubscribing them
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    return subprocess.call(launch_command(argv, nproc, hostfile, port), env=env)
