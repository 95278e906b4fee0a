"""Every benchmark measurement runs in a fresh Python process: its peak memory is its own, and no distributed state,
registered attention function or patched torch function of one case leaks into the next.

    parent:  run_fresh("longext.bench.memory", case)   ->  python -m longext.bench.memory '<case json>' RESULT.json
    child:   if __name__ == "__main__": fresh.main(measure)   (writes measure(case, folder) to RESULT.json, and the
             longext source files it imported: the code the result depends on, bench/results.py)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

# A case is one process, never a rank of the launch it may have been started from.
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class Measured:
    """One case's figures, the wall seconds of its process (start-up included) and the code it ran."""

    result: dict
    seconds: float
    code: dict[str, str] = field(default_factory=dict)  # longext source file -> sha256 (bench/results.py)


def run_fresh(module: str, case: dict, folder: Path, timeout: int, env: dict[str, str] | None = None,
              log: bool = False) -> Measured:
    """What `module` measured for `case`, in a process of its own. The result file goes to `folder`
    (removed after reading); with `log`, the process's output goes to folder/case.log (else it is kept in memory
    for the error message). `env` adds to this process's environment, launcher variables removed."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    result_file = folder / "result.tmp.json"
    child_env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS} | (env or {})
    command = [sys.executable, "-m", module, json.dumps(case), str(result_file)]
    began = time.perf_counter()
    if log:
        with open(folder / "case.log", "w") as out:
            done = subprocess.run(command, env=child_env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
        output = (folder / "case.log").read_text(errors="replace")
    else:
        done = subprocess.run(command, env=child_env, capture_output=True, text=True, timeout=timeout)
        output = done.stdout + done.stderr
    seconds = time.perf_counter() - began
    if done.returncode != 0:
        where = f" (log: {folder / 'case.log'})" if log else ""
        raise RuntimeError(f"benchmark case {case.get('name', case)} failed{where}:\n{output[-3000:]}")
    written = json.loads(result_file.read_text())
    result_file.unlink()
    return Measured(written["result"], seconds, written["code"])


def main(measure: Callable[[dict, Path], dict], default: Callable = float) -> None:
    """The child's side: torch threads as the parent's OMP_NUM_THREADS says, then measure(case, folder) written as
    JSON (`default` converts what json cannot) with the longext files the process imported."""
    import torch

    from longext.bench.results import loaded_code

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    case, result_file = json.loads(sys.argv[1]), Path(sys.argv[2])
    result = measure(case, result_file.parent)
    result_file.write_text(json.dumps({"result": result, "code": loaded_code()}, default=default))


def timed(step: Callable[[], object], repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls of `step`, after one untimed warm-up call (allocator, first-call kernels)."""
    step()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        step()
        times.append(time.perf_counter() - began)
    return times
