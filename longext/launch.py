"""Before `longext train` starts: the checks made once, in the process the user started (`preflight`), and for
`--nproc N` / `--hostfile F` the same command run again under a launcher (`relaunch`).

One node: torchrun (`python -m torch.distributed.run`), which sets RANK/WORLD_SIZE/LOCAL_RANK; several
nodes: the DeepSpeed launcher with the hostfile (pdsh/ssh). Either way every rank runs the ordinary
`longext train` code path, which notices the launcher's environment and joins the process group.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

from longext.errors import LongextError, Problems

HOST_LINE = re.compile(r"(?P<host>[^\s=#]+)\s+slots=(?P<slots>[1-9][0-9]*)")  # as DeepSpeed reads it


def is_launched_rank() -> bool:
    """This process is a rank a launcher started (its checks were made before the launch)."""
    return os.environ.get("WORLD_SIZE", "1") != "1"


def preflight(recipe, nproc: int, hostfile: Path | None, resume: bool, dry_run: bool = False):
    """(Resolved, warnings to print) for `longext train`. In the process the user started, once: the hostfile, the
    ranks the launch will have, every file the run will read (model folder, data, the method's files), the memory
    estimate against this machine, and, when it relaunches, every check a rank would make (one clear line instead of
    N ranks' tracebacks). All problems at once, before anything loads. A launched rank only resolves. A dry run
    skips the run directory's check (it would clear the folder for output.overwrite)."""
    from longext.resolve import resolve
    from longext.sp import world_problems

    if is_launched_rank():
        return resolve(recipe), []
    world = nproc * len(read_hostfile(hostfile, nproc)) if hostfile else nproc
    problems = world_problems(recipe.train.sequence_parallel, world)
    if problems:
        raise Problems(problems)
    resolved = resolve(recipe)
    problems = input_problems(resolved)
    try:
        warnings = memory_check(resolved, nproc)
    except LongextError as err:
        problems, warnings = problems + err.lines(), []
    if problems:
        raise Problems(problems)
    if (nproc > 1 or hostfile) and not dry_run:
        from longext.rundir import check_start

        check_start(recipe.run_dir, resolved.recipe, resume)
    return resolved, warnings


def input_problems(resolved) -> list[str]:
    """One line per file the run needs that is missing or damaged: the model folder (config.json, tokenizer files,
    complete weights; a hub name is checked by its download), the texts of data.train and the method's own files."""
    from longext.data.sources import resolve_sources
    from longext.methods import method_for
    from longext.modeldir import model_problems

    recipe = resolved.recipe
    problems = model_problems(resolved.model_dir, "model.path") if Path(resolved.model_dir).is_dir() else []
    try:
        resolve_sources(list(recipe.data.train), recipe.data.text_field, {})  # files, globs, saved folders, hub
    except LongextError as err:
        problems += err.lines()
    return problems + method_for(recipe.method.kind).input_problems(recipe)


def read_hostfile(path: Path, nproc: int) -> dict[str, int]:
    """host -> slots of a DeepSpeed hostfile (`hostname slots=N` lines, `#` comments, blank lines), read before the
    launcher is started: every bad line named by its number, one error line each."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise LongextError(f"--hostfile: no such file: {str(path)!r}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise LongextError(f"--hostfile: cannot read {path} ({getattr(err, 'strerror', None) or err})") from None
    hosts, problems = {}, []
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        match = HOST_LINE.fullmatch(text)
        where = f"--hostfile: {path}:{number}"
        if match is None:
            problems.append(f"{where}: expected `hostname slots=N`, e.g. `worker-1 slots=8` (got {text!r})")
        elif match["host"] in hosts:
            problems.append(f"{where}: {match['host']} is listed twice (first on line {hosts[match['host']][1]})")
        elif int(match["slots"]) < nproc:
            problems.append(f"{where}: {match['host']} has slots={match['slots']}, fewer than the --nproc {nproc} "
                            f"processes each host runs")
        else:
            hosts[match["host"]] = (int(match["slots"]), number)
    if not problems and not hosts:
        problems.append(f"--hostfile: {path} lists no hosts (expected lines like `worker-1 slots=8`)")
    if problems:
        raise Problems(problems)
    return {host: slots for host, (slots, _) in hosts.items()}


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
