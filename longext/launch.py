"""`longext train --nproc N` / `--hostfile F`: run the same command under a launcher.

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

from longext.errors import LongextError


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
