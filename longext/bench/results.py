"""Benchmark results that outlive one machine and one sitting: one JSON per case, committed with the code.

    bench/results/<suite>[-quick]/<case name>.json   {"case", "key", "code": {"hash", "files"}, "commit", "dirty",
                                                      "result", "seconds", "finished", "load", "machine", "versions"}
    bench/results/<suite>[-quick]/suite.json         the last sitting: started, finished, wall time, the case
                                                      order, which cases are still pending

A case's result is current while its case JSON is the suite's and every file of the code it ran still hashes as it
did (the case JSON as stored names the checkout `<checkout>`: the toy base's path, for one, is the same case in any
clone): `code.files` maps each longext source file the case process had imported (the child reports its sys.modules,
bench/fresh.py) to its sha256, so moving or editing a module the case never loads keeps its result, and editing one
it loads makes it stale. The renderer and the orchestration (NOT_A_DEPENDENCY) change a case only through its JSON.
Toy cases carry the toy base's checksum in their JSON.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]  # longext/
ROOT = PACKAGE.parent  # what `code.files` paths are relative to
NOT_A_DEPENDENCY = {"longext/bench/run.py", "longext/bench/results.py", "longext/bench/report.py",
                    "longext/bench/report_models.py", "longext/bench/markdown.py", "longext/bench/suites.py",
                    "longext/bench/smollm2.py", "longext/bench/report_campaign.py"}


# ------------------------------------------------------------------------------------------- code
def file_hashes(paths, root: Path = ROOT) -> dict[str, str]:
    """sha256 of each file, by its path relative to `root` ('longext/train.py')."""
    return {rel: hashlib.sha256((root / rel).read_bytes()).hexdigest() for rel in sorted(paths)}


def loaded_code(root: Path = ROOT, since: float | None = None) -> dict[str, str]:
    """The longext source files this process has imported (minus NOT_A_DEPENDENCY), with their sha256; the case's
    own module counts too, though `python -m` imports it as __main__.

    The hashes are taken now, at the end of the case, so a file edited while the case ran would be recorded as code
    it never ran (and its result would pass for current). A file modified after `since` (default: this process's
    start) is therefore refused with CodeChanged, naming the files."""
    package = root / "longext"
    files = set()
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if path and Path(path).resolve().is_relative_to(package):
            rel = Path(path).resolve().relative_to(root).as_posix()
            if rel not in NOT_A_DEPENDENCY:
                files.add(rel)
    since = process_start() if since is None else since
    changed = sorted(rel for rel in files if (root / rel).stat().st_mtime > since)
    if changed:
        raise CodeChanged(f"{len(changed)} source file(s) this case loaded changed while it ran ({', '.join(changed[:5])}"
                          f"{', ...' if len(changed) > 5 else ''}; process started {time.ctime(since)}): the result "
                          "would name code it did not run, so it is not stored; run the case again")
    return file_hashes(files, root)


class CodeChanged(RuntimeError):
    """A case's source changed under it (loaded_code)."""


def process_start() -> float:
    """This process's start, as a Unix time."""
    import psutil

    return psutil.Process().create_time()


def code_hash(files: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


CHECKOUT = "<checkout>"


def portable(case: dict, root: Path = ROOT) -> dict:
    """The case JSON as stored: this checkout's folder written as <checkout>, tuples as lists."""
    return json.loads(json.dumps(case).replace(json.dumps(str(root))[1:-1], CHECKOUT))


def case_key(case: dict, code: str) -> str:
    """What a result was measured for: the case JSON and the hash of the code it ran."""
    return hashlib.sha256(json.dumps({"case": case, "code": code}, sort_keys=True).encode()).hexdigest()[:16]


def code_changed(doc: dict, root: Path = ROOT) -> bool:
    """A file the case ran is gone or differs from when it was measured."""
    files = (doc.get("code") or {}).get("files")
    if not files:
        return True
    try:
        return file_hashes(files, root) != files
    except OSError:  # moved or deleted
        return True


def is_current(doc: dict | None, case: dict, root: Path = ROOT) -> bool:
    """A finished result for exactly this case, measured at the code as it is now."""
    same_case = bool(doc) and doc.get("case") == portable(case, root)
    return same_case and doc.get("result") is not None and not code_changed(doc, root)


def git_commit(root: Path = ROOT) -> tuple[str | None, bool]:
    """(HEAD commit, whether longext/ has uncommitted changes) of the checkout at `root`; (None, False) outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()

    try:
        return git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--", "longext"))
    except (OSError, subprocess.CalledProcessError):
        return None, False


# ------------------------------------------------------------------------------------------ store
def folder_name(suite: str, quick: bool) -> str:
    return suite + ("-quick" if quick else "")


def load_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def load_suite(folder: Path, root: Path = ROOT) -> dict | None:
    """A suite's document for the page: its last sitting's summary with the stored result of every case it lists,
    each marked `stale` when the code it ran has changed since; None when the suite has no results."""
    summary = load_json(Path(folder) / "suite.json")
    if summary is None:
        return None
    cases = []
    for name in summary.get("order", []):
        doc = load_json(Path(folder) / f"{name}.json")
        if doc is not None and doc.get("result") is not None:
            cases.append({**doc, "stale": code_changed(doc, root)})
    return {**summary, "cases": cases}
