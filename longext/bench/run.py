"""`longext bench SUITE`: run a suite's cases (reusing cached results), then rewrite docs/benchmarks.md.

Layout under `out` (default bench-runs/):

    <suite>[-quick]/cases/<case name>/result.json   one case: {"key", "case", "result", "seconds", "finished"}
    <suite>[-quick]/cases/<case name>/case.log      its subprocess log (model cases: also the run dir)
    <suite>[-quick]/suite.json                      the last run: machine, versions, wall time, every case

A case's cache key is the hash of its JSON and of the longext source it runs (`source_hash`): a
finished result with the same key is reused unless `force`. Every file is written atomically.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable

from longext.bench.suites import ALLOWED, SUITES, suite_cases
from longext.errors import LongextError
from longext.files import check_writable, write_atomic, write_json

PACKAGE = Path(__file__).resolve().parents[1]
# Rendering and orchestration do not change a case's numbers; suites.py changes show up in the case JSON.
NOT_A_DEPENDENCY = {"bench/run.py", "bench/report.py", "bench/suites.py"}


# ------------------------------------------------------------------------------------------ cache
def source_hash(root: Path = PACKAGE) -> str:
    """sha256 over the longext source files a case's figures depend on (path + content, sorted)."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel in NOT_A_DEPENDENCY or "__pycache__" in rel:
            continue
        digest.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def case_key(case: dict, source: str) -> str:
    return hashlib.sha256(json.dumps({"case": case, "source": source}, sort_keys=True).encode()).hexdigest()[:16]


def cached_result(path: Path, key: str) -> dict | None:
    """The stored result document when it finished with this key, else None."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if doc.get("key") == key and doc.get("result") is not None else None


# ------------------------------------------------------------------------------------------- cases
def execute(case: dict, case_dir: Path) -> dict:
    """Measure one case in a subprocess: a throughput case or a model case."""
    if case["kind"] == "throughput":
        from longext.bench.throughput import run_case

        return run_case({k: v for k, v in case.items() if k not in ("kind", "name")}, case_dir)
    if case["kind"] == "memory":  # peak memory against the plan (longext/bench/memory.py)
        from longext.bench.memory import run_case as run_memory_case

        return run_memory_case(case, case_dir)
    if case["kind"] == "longgen":  # LongGen efficiency measurements (longext/bench/longgen.py)
        from longext.bench.longgen import run_case as run_longgen_case

        return run_longgen_case(case, case_dir)
    from longext.bench.cases import run_model_case
    from longext.bench.retrieval import ensure_retrieval_docs
    from longext.bench.suites import TOY_DIR

    ensure_retrieval_docs(case["recipe"]["data"]["train"], TOY_DIR)  # passkey documents, if the recipe uses them
    return run_model_case(case, case_dir)


def run_cases(cases: list[dict], folder: Path, force: bool, source: str,
              runner: Callable[[dict, Path], dict] = execute, log: Callable[[str], None] = print,
              progress: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Every case's result document, reusing cached ones; each is stored as soon as it finishes, and
    `progress(docs so far)` is called after each case."""
    docs: list[dict] = []
    for i, case in enumerate(cases, 1):
        if progress:
            progress(docs)
        key = case_key(case, source)
        path = folder / "cases" / case["name"] / "result.json"
        doc = None if force else cached_result(path, key)
        if doc is not None:
            log(f"[{i}/{len(cases)}] {case['name']}: cached")
            docs.append({**doc, "cached": True})
            continue
        log(f"[{i}/{len(cases)}] {case['name']}: running")
        began, load_before = time.perf_counter(), os.getloadavg()[0]
        result = runner(case, path.parent)
        # the machine may be shared: the 1-minute load average around the case says how much
        doc = {"key": key, "case": case, "result": result, "seconds": time.perf_counter() - began,
               "finished": _now(), "load": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
        write_json(path, doc, indent=1, default=float)
        log(f"[{i}/{len(cases)}] {case['name']}: done in {doc['seconds']:.0f}s")
        docs.append({**doc, "cached": False})
    return docs


# ------------------------------------------------------------------------------------------ suites
def run_suite(suite: str, quick: bool, force: bool, out: Path, runner=execute, log=print) -> dict:
    """Run one suite and write its suite.json; returns that document."""
    cases = suite_cases(suite, quick)
    folder = Path(out) / (suite + ("-quick" if quick else ""))
    began = time.perf_counter()
    doc = {"suite": suite, "quick": quick, "started": _now(), "machine": machine(), "versions": versions()}

    def save(case_docs: list[dict], complete: bool) -> None:
        # also while running: an interrupted suite still shows what finished, marked incomplete
        doc.update(cases=case_docs, cached_cases=sum(d["cached"] for d in case_docs), complete=complete,
                   pending=[c["name"] for c in cases[len(case_docs):]],
                   wall_seconds=time.perf_counter() - began, finished=_now())
        write_json(folder / "suite.json", doc, indent=1, default=float)

    if suite == "toy":
        doc.update(toy_info())
    case_docs = run_cases(cases, folder, force, source_hash(), runner, log, progress=lambda done: save(done, False))
    save(case_docs, True)
    return doc


def toy_info() -> dict:
    """The toy base's settings (without the training log) and every pretraining attempt."""
    from longext.bench.suites import TOY_DIR

    path = TOY_DIR / "settings.json"
    settings = json.loads(path.read_text()) if path.is_file() else {}
    out = {"toy_base": {k: v for k, v in settings.items() if k != "log"}}
    attempts = TOY_DIR.parent / "toy-base-attempts.jsonl"
    if attempts.is_file():
        out["toy_attempts"] = [json.loads(line) for line in attempts.read_text().splitlines() if line.strip()]
    return out


def load_suites(out: Path) -> dict[str, dict | None]:
    """The latest results of each suite: the full run if there is one, else the quick run, else None; and for
    the suites of report.EXTRA the quick run under its own key when the full one is there too."""
    from longext.bench.report import EXTRA

    found = {}
    for suite in SUITES:
        found[suite] = None
        for name in (suite, f"{suite}-quick"):
            path = Path(out) / name / "suite.json"
            if path.is_file():
                found[suite] = json.loads(path.read_text())
                break
        quick = Path(out) / f"{suite}-quick" / "suite.json"
        if suite in EXTRA and found[suite] is not None and not found[suite].get("quick") and quick.is_file():
            found[EXTRA[suite]] = json.loads(quick.read_text())
    return found


def write_doc(out: Path, doc_path: Path) -> Path:
    """Render docs/benchmarks.md and its plots (docs/bench/*.png) from every suite result under `out`."""
    from longext.bench.report import plot_suite, render

    doc_path = Path(doc_path)
    suites = load_suites(out)
    attempts = toy_info().get("toy_attempts")
    if suites["toy"] is not None and attempts:
        suites["toy"]["toy_attempts"] = attempts  # history, not a result of the run: always the current list
    old = doc_path.read_text() if doc_path.is_file() else ""
    for suite, doc in suites.items():
        if doc is not None and suite in SUITES and suite != "throughput":
            try:
                plot_suite(suite, doc, doc_path.parent / "bench")
            except ImportError:  # matplotlib is an extra; the tables do not need it
                pass
    write_atomic(doc_path, render(suites, old))
    return doc_path


def run_bench(suite: str, quick: bool = False, force: bool = False, out: Path = Path("bench-runs"),
              doc: Path = Path("docs/benchmarks.md")) -> Path:
    """Run `suite` (or all of them) and rewrite `doc`. Returns the doc path."""
    if suite not in ALLOWED:
        raise LongextError(f"SUITE: unknown benchmark suite {suite!r} (allowed: {', '.join(ALLOWED)})")
    check_writable(Path(out), "--out")
    check_writable(Path(doc), "--doc", folder=False)
    for name in SUITES if suite == "all" else (suite,):
        suite_cases(name, quick)  # fail fast (e.g. no toy base) before any case runs
    for name in SUITES if suite == "all" else (suite,):
        run_suite(name, quick, force, Path(out))
        write_doc(Path(out), Path(doc))  # after every suite: a later failure keeps what finished
    return Path(doc)


# ----------------------------------------------------------------------------------------- machine
def machine() -> dict:
    from longext.evaluate.report import cpu_name

    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    try:
        ram = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30)
    except (ValueError, OSError):
        ram = None
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "ram_gb": ram,
            "flags": {f: f in flags for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")},
            "load_start": round(os.getloadavg()[0], 2)}


def versions() -> dict:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("longext", "torch", "transformers", "peft", "deepspeed"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")
