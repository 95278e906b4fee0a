"""`longext bench SUITE`: run a suite's cases, except those whose committed result is current, then rewrite
docs/benchmarks.md from the results.

    <results>/<suite>[-quick]/<case name>.json   one case's result, its code hash and commit (bench/results.py);
                                                 committed, so a suite can be finished over several sittings and
                                                 machines
    <results>/<suite>[-quick]/suite.json         the last sitting: machine, versions, wall time, case order
    <out>/<suite>[-quick]/cases/<case name>/     the case's process log (case.log) and, for model cases, its longext
                                                 run directory (run/); git-ignored (bench-runs/ by default)

Every file is written atomically; a case that fails leaves no result, so the next run retries it.
"""

from __future__ import annotations

import datetime
import fnmatch
import json
import os
import time
from pathlib import Path
from typing import Callable

from longext.bench.fresh import Measured
from longext.bench.results import (
    ROOT, case_key, code_hash, file_hashes, folder_name, git_commit, is_current, load_json, load_suite, portable,
)
from longext.bench.suites import ALLOWED, SUITES, TOY_DIR, suite_cases
from longext.errors import LongextError
from longext.files import check_writable, write_atomic, write_json

RESULTS = Path("bench/results")  # defaults, in the source checkout (checkout_path)
RUNS = Path("bench-runs")
DOC = Path("docs/benchmarks.md")
# Model cases also depend on code the parent runs for them: the passkey documents of their training data.
MODEL_CASE_CODE = ("longext/bench/retrieval.py",)


# ------------------------------------------------------------------------------------------- cases
def execute(case: dict, case_dir: Path) -> Measured:
    """Measure one case in a fresh process: a throughput, memory, data, LongGen efficiency, campaign or model case."""
    if case["kind"] == "throughput":
        from longext.bench.throughput import run_case

        return run_case({k: v for k, v in case.items() if k not in ("kind", "name")}, case_dir)
    if case["kind"] == "memory":  # peak memory against the plan (longext/bench/memory.py)
        from longext.bench.memory import run_case as run_memory_case

        return run_memory_case(case, case_dir)
    if case["kind"] == "data":  # the data pipeline (longext/bench/data.py)
        from longext.bench.data import run_case as run_data_case

        return run_data_case(case, case_dir)
    if case["kind"] == "longgen":  # LongGen efficiency measurements (longext/bench/longgen.py)
        from longext.bench.longgen import run_case as run_longgen_case

        return run_longgen_case(case, case_dir)
    if case["kind"] == "campaign":  # a SmolLM2 campaign row (longext/bench/campaign.py)
        from longext.bench.campaign import run_case as run_campaign_case

        return run_campaign_case(case, case_dir)
    from longext.bench.cases import run_model_case
    from longext.bench.retrieval import ensure_retrieval_docs

    ensure_retrieval_docs(case["recipe"]["data"]["train"], TOY_DIR)  # passkey documents, if the recipe uses them
    measured = run_model_case(case, case_dir)
    measured.code = {**measured.code, **file_hashes(MODEL_CASE_CODE)}
    return measured


def run_cases(cases: list[dict], results: Path, runs: Path, force: bool = False,
              runner: Callable[[dict, Path], Measured] = execute, log: Callable[[str], None] = print,
              progress: Callable[[list[dict]], None] | None = None, root: Path = ROOT) -> list[dict]:
    """Every case's result document: the stored one when it is current (bench/results.py), else measured now and
    stored as soon as it finishes; `progress(docs so far)` is called before each case."""
    docs: list[dict] = []
    stamp = None
    for i, case in enumerate(cases, 1):
        if progress:
            progress(docs)
        path = Path(results) / f"{case['name']}.json"
        doc = load_json(path)
        if not force and is_current(doc, case, root):
            log(f"[{i}/{len(cases)}] {case['name']}: current (measured at {str(doc.get('commit'))[:10]})")
            docs.append({**doc, "cached": True})
            continue
        log(f"[{i}/{len(cases)}] {case['name']}: running")
        stamp = stamp or measurement_stamp(root)
        began, load_before = time.perf_counter(), os.getloadavg()[0]
        measured = runner(case, Path(runs) / "cases" / case["name"])
        code, stored = code_hash(measured.code), portable(case, root)
        # the machine may be shared: the 1-minute load average around the case says how much
        doc = {"case": stored, "key": case_key(stored, code), "code": {"hash": code, "files": measured.code}, **stamp,
               "result": measured.result, "seconds": time.perf_counter() - began, "finished": _now(),
               "load": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
        write_json(path, doc, indent=1, default=float)
        log(f"[{i}/{len(cases)}] {case['name']}: done in {doc['seconds']:.0f}s")
        docs.append({**doc, "cached": False})
    return docs


def measurement_stamp(root: Path = ROOT) -> dict:
    """Where and at which commit a result is measured."""
    commit, dirty = git_commit(root)
    return {"commit": commit, "dirty": dirty, "machine": machine(), "versions": versions()}


# ------------------------------------------------------------------------------------------ suites
def run_suite(suite: str, quick: bool, force: bool, results: Path = RESULTS, runs: Path = RUNS, runner=execute,
              log=print, root: Path = ROOT, only: list[str] | None = None) -> dict:
    """Run one suite's cases that are not current and write its suite.json; returns that document. `only`: glob
    patterns of case names; the other cases are left as they are (their stored results still show on the page, and
    those without one are listed as pending)."""
    listed = suite_cases(suite, quick)
    cases = [c for c in listed if not only or any(fnmatch.fnmatchcase(c["name"], p) for p in only)]
    blocked = {c["name"]: why for c in cases if (why := cannot_run_here(c))  # pending, for a machine it fits
               and not is_current(load_json(Path(results) / folder_name(suite, quick) / f"{c['name']}.json"), c, root)}
    for case_name, why in blocked.items():
        log(f"{case_name}: not run on this machine: {why}")
    cases = [c for c in cases if c["name"] not in blocked]
    skipped = [c["name"] for c in listed if c not in cases]
    by_name = {c["name"]: c for c in listed}
    name = folder_name(suite, quick)
    began = time.perf_counter()
    doc = {"suite": suite, "quick": quick, "started": _now(), "machine": machine(), "versions": versions(),
           "order": [c["name"] for c in listed]}
    if suite == "toy":
        doc.update(toy_info())

    def save(case_docs: list[dict], complete: bool) -> None:
        # also while running: an interrupted suite still shows what finished, marked incomplete
        not_run = [n for n in skipped if not is_current(load_json(Path(results) / name / f"{n}.json"), by_name[n], root)]
        # current and not re-run: those this run found current, and those --only left out that are current
        cached = sum(d["cached"] for d in case_docs) + len(skipped) - len(not_run)
        doc.update(cached_cases=cached, complete=complete and not not_run,
                   pending=[c["name"] for c in cases[len(case_docs):]] + not_run,
                   wall_seconds=time.perf_counter() - began, finished=_now())
        write_json(Path(results) / name / "suite.json", doc, indent=1, default=float)

    case_docs = run_cases(cases, Path(results) / name, Path(runs) / name, force, runner, log,
                          progress=lambda done: save(done, False), root=root)
    save(case_docs, True)
    return {**doc, "cases": case_docs}


def toy_info() -> dict:
    """The toy base's settings (without the training log) and every pretraining attempt."""
    settings = load_json(TOY_DIR / "settings.json") or {}
    out = {"toy_base": {k: v for k, v in settings.items() if k != "log"}}
    attempts = TOY_DIR.parent / "toy-base-attempts.jsonl"
    if attempts.is_file():
        out["toy_attempts"] = [json.loads(line) for line in attempts.read_text().splitlines() if line.strip()]
    return out


def load_suites(results: Path = RESULTS, root: Path = ROOT) -> dict[str, dict | None]:
    """The latest results of each suite: the full run if there is one, else the quick run, else None; and for
    the suites of report.EXTRA the quick run under its own key when the full one is there too."""
    from longext.bench.report import EXTRA

    found: dict[str, dict | None] = {}
    for suite in SUITES:
        full, quick = (load_suite(Path(results) / folder_name(suite, q), root) for q in (False, True))
        found[suite] = full or quick
        if suite in EXTRA and full is not None and quick is not None:
            found[EXTRA[suite]] = quick
    return found


def write_doc(results: Path, doc_path: Path, root: Path = ROOT) -> Path:
    """Render docs/benchmarks.md and its plots (docs/bench/*.png) from every suite's results."""
    from longext.bench.report import plot_suite, render

    doc_path = Path(doc_path)
    suites = load_suites(results, root)
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


def run_bench(suite: str, quick: bool = False, force: bool = False, out: Path | None = None,
              doc: Path | None = None, results: Path | None = None, only: list[str] | None = None) -> Path:
    """Run `suite` (or all of them) and rewrite `doc`; `only`: glob patterns of the case names to run. Returns the
    doc path. Defaults (None) are the checkout's bench-runs/, docs/benchmarks.md and bench/results/, wherever the
    command runs."""
    if suite not in ALLOWED:
        raise LongextError(f"SUITE: unknown benchmark suite {suite!r} (allowed: {', '.join(ALLOWED)})")
    out, doc, results = (Path(given) if given is not None else checkout_path(default, flag)
                         for given, default, flag in ((out, RUNS, "--out"), (doc, DOC, "--doc"), (results, RESULTS, "--results")))
    check_writable(out, "--out")
    check_writable(results, "--results")
    check_writable(doc, "--doc", folder=False)
    check_page(doc)
    for name in SUITES if suite == "all" else (suite,):
        suite_cases(name, quick)  # fail fast (e.g. no toy base) before any case runs
    for name in SUITES if suite == "all" else (suite,):
        run_suite(name, quick, force, Path(results), Path(out), only=only)
        write_doc(Path(results), Path(doc))  # after every suite: a later failure keeps what finished
    return Path(doc)


def checkout_path(default: Path, flag: str, root: Path = ROOT) -> Path:
    """`default` (relative) in the source checkout longext runs from: the same page and results from any folder.
    An installed package has no checkout: the flag must be given."""
    if not (root / "docs").is_dir() or not (root / "bench").is_dir():
        raise LongextError(f"{flag}: longext runs from {root}, not a source checkout (no docs/ and bench/ there); "
                           f"give {flag} explicitly")
    return root / default


def check_page(doc: Path) -> None:
    """Refuse to overwrite a page the bench did not write (a user's own notes given as --doc)."""
    from longext.bench.report import is_bench_page

    try:
        text = doc.read_text(encoding="utf-8") if doc.is_file() else ""
    except (OSError, UnicodeDecodeError) as err:
        raise LongextError(f"--doc: cannot read {doc} ({err}); give another file") from None
    if text.strip() and not is_bench_page(text):
        raise LongextError(f"--doc: {doc} was not written by `longext bench` (no `# Benchmarks` title and "
                           f"`<!-- suite:NAME -->` markers); it is never overwritten: give a new file or a bench page")


# ----------------------------------------------------------------------------------------- machine
def cannot_run_here(case: dict) -> str | None:
    """Why a case must not run on this machine, or None. A case that trains in bf16 (the SmolLM2 campaign's rows,
    whose step budgets were measured on a CPU with avx512_bf16) where bf16 is only emulated would take ~100x its
    planned time (a 60-minute row: days)."""
    if not case.get("train", True) or ((case.get("recipe") or {}).get("train") or {}).get("precision") != "bf16":
        return None
    from longext.engine import native_bf16  # the check `train.precision: auto` makes

    if native_bf16():
        return None
    return ("it trains in bf16, which this CPU only emulates (no avx512_bf16 or amx_bf16; about 100x slower than "
            "fp32): run it on a CPU with avx512_bf16")


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
