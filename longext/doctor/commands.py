"""Subprocesses of `longext doctor`: the real CLI (`python -m longext ...`), pytest and the measuring process, each
with a time limit, its output appended to doctor.log under a header, and its failure reduced to one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_LOG_LOCK = threading.Lock()


@dataclass
class Done:
    argv: list[str]
    code: int | None  # None: killed at the time limit
    seconds: float
    stdout: str  # captured only with capture=True (else in the log)
    output: str  # stdout and stderr as logged (without capture), or stderr (with capture)

    @property
    def ok(self) -> bool:
        return self.code == 0

    def problem(self, limit: float | None = None) -> str:
        """One line saying how it failed: the timeout, else its last `error:` line or exception line."""
        if self.code is None:
            return f"did not finish within {limit or 0:.0f} s"
        return f"exit code {self.code}: {error_line(self.output + self.stdout)}"


def longext(*args: str) -> list[str]:
    """argv of the CLI as users run it, in this interpreter (`python -m longext` is `longext`)."""
    return [sys.executable, "-m", "longext", *map(str, args)]


def child_env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env.update(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", **(extra or {}))
    return env


def run(argv: list[str], log: Path, title: str, timeout: float, capture: bool = False, cwd: Path | None = None,
        env: dict | None = None) -> Done:
    """Run argv; its output goes to `log` under `== title ==`. Without capture it is streamed there as it comes (the
    long CLI runs); with capture, stdout is returned apart and both streams are logged as one block when the process
    ends, so captured runs may go on in several threads at once."""
    if capture:
        return _run_captured(argv, log, title, timeout, cwd, env)
    with open(log, "a") as f:
        f.write(f"\n== {title} ==\n$ {' '.join(argv)}\n")
        f.flush()
        start = f.tell()
        code, seconds, _, _ = _wait(argv, timeout, cwd, env, stdout=f, stderr=f)
        f.write(_footer(code, seconds))
    with open(log) as f:
        f.seek(start)
        return Done(argv, code, seconds, "", f.read())


def _run_captured(argv, log, title, timeout, cwd, env) -> Done:
    code, seconds, stdout, stderr = _wait(argv, timeout, cwd, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    block = f"\n== {title} ==\n$ {' '.join(argv)}\n{stderr}{stdout}"
    with _LOG_LOCK, open(log, "a") as f:
        f.write(block + ("" if block.endswith("\n") else "\n") + _footer(code, seconds))
    return Done(argv, code, seconds, stdout, stderr)


def _wait(argv, timeout, cwd, env, stdout, stderr) -> tuple[int | None, float, str, str]:
    """(exit code or None when killed at the time limit, seconds, captured stdout, captured stderr)."""
    began = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL, cwd=cwd,
                            env=env or child_env(), text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the process and whatever it started
        out, err = proc.communicate()
        code = None
    return code, time.perf_counter() - began, out or "", err or ""


def _footer(code: int | None, seconds: float) -> str:
    return f"-- exit {code if code is not None else 'killed (time limit)'} after {seconds:.1f} s\n"


def error_line(text: str) -> str:
    """The line that says what went wrong: longext's last `error:` line, else the last exception line, else the last
    non-empty line."""
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith(("-- exit", "$ "))]
    for line in reversed(lines):
        if line.startswith("error:"):
            return line
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if head.endswith(("Error", "Exception")) or head in ("AssertionError", "KeyboardInterrupt"):
            return line[:400]
    return lines[-1][:400] if lines else "no output"


def last_json(text: str) -> dict:
    """The last line of `text` that is a JSON object (the measuring process prints its result last)."""
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON result in the output")


def plan_json(recipe: Path, overrides: list[str], cpu: bool, log: Path, timeout: float = 120,
              gpu_memory: int | None = None) -> dict:
    """`longext plan RECIPE --json [--cpu] [--gpu-memory BYTES] -s ...` as a user runs it; raises RuntimeError with its
    error line."""
    flags = (["--cpu"] if cpu else []) + (["--gpu-memory", str(gpu_memory)] if gpu_memory else [])
    argv = longext("plan", recipe, "--json", *flags, *[x for o in overrides for x in ("-s", o)])
    done = run(argv, log, f"plan {' '.join(overrides)}", timeout, capture=True)
    if not done.ok:
        raise RuntimeError(f"longext plan failed, {done.problem(timeout)}")
    return json.loads(done.stdout)
