"""Markdown pieces of the benchmarks page: tables, number formats, the run header every suite section starts with."""

from __future__ import annotations


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def num(value, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and value == float("inf"):
        return "inf"
    return f"{value:,.{digits}f}"


def ppl_cell(value) -> str:
    return "–" if value is None else "inf" if value == float("inf") else f"{value:.3g}" if value >= 100 else f"{value:.2f}"


def header(doc: dict) -> list[str]:
    m, v = doc.get("machine", {}), doc.get("versions", {})
    flags = ", ".join(f"{k} {'yes' if on else 'no'}" for k, on in m.get("flags", {}).items())
    lines = [
        f"Run started {doc.get('started', '?')}, {'last updated' if doc.get('complete') is False else 'finished'} "
        f"{doc.get('finished', '?')} ({'--quick' if doc.get('quick') else 'full'}), "
        f"wall time {minutes(doc.get('wall_seconds'))} ({doc.get('cached_cases', 0)} of {len(doc.get('cases', []))} "
        f"cases were current in bench/results and not re-run; their own measured time is in their JSON).",
        "",
        *([f"**Incomplete**: no current result yet (not run, left out by --only, or stopped) for: "
           f"{', '.join(doc['pending'])}.", ""]
          if doc.get("complete") is False else []),
        *provenance(doc),
        f"Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, {m.get('ram_gb', '?')} GB RAM"
        + (f"; {flags}" if flags else "") + f"; load average at start {m.get('load_start', '?')}.",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        "",
    ]
    return lines


def load_cell(case_doc: dict | None) -> str:
    load = (case_doc or {}).get("load")
    return "–" if not load else f"{load[0]:.1f} → {load[1]:.1f}"


def minutes(seconds) -> str:
    return "–" if seconds is None else f"{seconds / 60:.1f} min"


def case_rows(doc: dict) -> list[dict]:
    return [c for c in doc.get("cases", []) if c.get("result")]


def mb(result: dict | None, key: str) -> str:
    return "–" if not result else f"{result[key] / 2**20:,.2f}"


def pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def provenance(doc: dict) -> list[str]:
    """Which commits the rows were measured at, and which rows ran code that has changed since (stale)."""
    commits: dict[str, int] = {}
    for c in doc.get("cases", []):
        commit = str(c.get("commit") or "unknown")[:10] + (" (uncommitted changes)" if c.get("dirty") else "")
        commits[commit] = commits.get(commit, 0) + 1
    counted = ", ".join(f"{k} ({n} case{'' if n == 1 else 's'})" for k, n in commits.items())
    lines = [f"Measured at commit {counted}."] if commits else []
    stale = [c["case"]["name"] for c in doc.get("cases", []) if c.get("stale")]
    if stale:
        lines.append(f"**Stale rows** (marked *stale*: the code they ran has changed since they were measured; "
                     f"`longext bench {doc.get('suite', 'SUITE')}` re-runs only them): {', '.join(stale)}.")
    return [*lines, ""] if lines else []


def row_label(case_doc: dict) -> str:
    """A row's label on the page; *stale* when the code it ran has changed since."""
    return case_doc["case"]["label"] + (" *stale*" if case_doc.get("stale") else "")
