"""The eval report: eval.json (everything), eval.md (tables), PNG plots and a rich table.

Plots: ppl.png, passkey.png and niah.png against length; passkey-depth.png and niah-depth.png, accuracy per
(length, depth) cell, one panel per model (the needle-in-a-haystack picture); with RULER, ruler.png and
ruler-tasks.png (ruler/report.py). Rates are printed with their 95 % Wilson interval (stats.py).

`results` layout (what run.py builds; per-length maps are keyed by the length, str or int):

    {"target": str, "created": iso date, "machine": {...}, "lengths": [int],
     "original_context": int, "target_context": int | None, "reference_length": int,
     "settings": EvalSpec as JSON, "texts": {...},
     "models": [{"name": str, "baseline": bool, "rope": {...}, "original_context": int,
                 "target_context": int | None, "perplexity": {L: {...}}, "passkey": {L: {...}},
                 "niah": {L: {...}}, "ruler": {L: {...}} (ruler/report.py), "lm_eval": {...} (lmeval.py)}]}
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
from pathlib import Path

from longext.errors import LongextError
from longext.evaluate import lmeval
from longext.evaluate.ruler import report as ruler_report
from longext.evaluate.stats import format_rate
from longext.files import publish_folder, staging_folder
from longext.lengths import format_length

log = logging.getLogger(__name__)
RETRIEVAL = (("passkey", "passkey", "passkey retrieval"), ("niah", "needle", "needle in a haystack (multi-key)"))


# ------------------------------------------------------------------------------------- helpers
def by_length(section: dict | None) -> dict[int, dict]:
    """A per-length map with int keys, sorted (JSON turns them into strings)."""
    return {int(k): v for k, v in sorted((section or {}).items(), key=lambda kv: int(kv[0]))}


def reference_length(lengths: list[int], original_context: int | None) -> int:
    """The length ratios are taken against: the longest one within L0, else the shortest."""
    inside = [L for L in lengths if original_context and L <= original_context]
    return max(inside) if inside else min(lengths)


def machine_info() -> dict:
    """Versions, CPU/GPU and date, for comparing reports across machines."""
    import torch
    import transformers

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpus": gpus,
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _length_label(length: int, results: dict) -> str:
    marks = [m for m, at in (("L0", results.get("original_context")), ("target", results.get("target_context")))
             if at == length]
    return format_length(length) + (f" ({', '.join(marks)})" if marks else "")


def _ppl_cells(model: dict, length: int, ref: int) -> tuple[str, str]:
    ppl = by_length(model.get("perplexity"))
    if length not in ppl:
        return "–", "–"
    value, base = ppl[length]["ppl"], ppl.get(ref, {}).get("ppl")
    return f"{value:.2f}", (f"{value / base:.2f}" if base else "–")


def _retrieval_cell(model: dict, length: int, part: str = "passkey") -> str:
    row = by_length(model.get(part)).get(length)
    return format_rate(row["correct"], row["trials"]) if row else "–"


def depth_grid(section: dict | None) -> tuple[list[int], list[float], dict[tuple[int, float], tuple[int, int]]]:
    """(lengths, depths, {(length, depth): (correct, trials)}) from a passkey or niah section's trial records."""
    cells: dict[tuple[int, float], list[int]] = {}
    for length, row in by_length(section).items():
        for record in row.get("records", []):
            cell = cells.setdefault((length, record["depth"]), [0, 0])
            cell[0] += bool(record["correct"])
            cell[1] += 1
    lengths = sorted({L for L, _ in cells})
    depths = sorted({d for _, d in cells})
    return lengths, depths, {k: (v[0], v[1]) for k, v in cells.items()}


# -------------------------------------------------------------------------------------- tables
def markdown(results: dict) -> str:
    """eval.md: settings, then one table per measure with rows = lengths and columns per model."""
    models, lengths = results["models"], results["lengths"]
    ref = results.get("reference_length") or reference_length(lengths, results.get("original_context"))
    settings, machine = results.get("settings", {}), results.get("machine", {})
    ppl, key, niah = settings.get("perplexity", {}), settings.get("passkey", {}), settings.get("niah", {})
    lines = [
        f"# Evaluation of `{results.get('target', '?')}`", "",
        f"- models: {', '.join(m['name'] for m in models)}",
        f"- L0 (original window): {results.get('original_context')}; target window: {results.get('target_context')}",
        *([f"- perplexity: {ppl.get('mode')} mode, {ppl.get('targets')} scored tokens x {ppl.get('windows')} windows "
           f"(sliding stride {ppl.get('stride')}); texts: {', '.join(ppl.get('texts', []))}"]
          if any(m.get("perplexity") for m in models) else []),
        *([f"- passkey: {key.get('trials')} trials per length, depths {key.get('depths')}, {key.get('digits')} digits; "
           f"haystack: {settings.get('filler', 'classic')}"] if any(m.get("passkey") for m in models) else []),
        *([f"- needle in a haystack: {niah.get('trials')} trials per length, {niah.get('needles')} needles "
           f"({niah.get('digits')}-digit numbers), asked-for needle at depths {niah.get('depths')}"]
          if any(m.get("niah") for m in models) else []),
        f"- machine: {machine.get('cpu')}, gpus: {machine.get('gpus') or 'none'}, torch {machine.get('torch')}, "
        f"transformers {machine.get('transformers')}, {machine.get('date')}", "",
    ]
    if any(m.get("perplexity") for m in models):
        lines += ["## Perplexity", "", f"x{format_length(ref)} = ppl(L) / ppl({format_length(ref)}).", ""]
        header = ["length"] + [f"{m['name']} {c}" for m in models for c in ("ppl", f"x{format_length(ref)}")]
        rows = [[_length_label(L, results)] + [c for m in models for c in _ppl_cells(m, L, ref)] for L in lengths]
        lines += _md_table(header, rows) + ["", "![perplexity against length](ppl.png)", ""]
    for part, short, title in RETRIEVAL:
        if not any(m.get(part) for m in models):
            continue
        header = ["length"] + [f"{m['name']} {short}" for m in models]
        rows = [[_length_label(L, results)] + [_retrieval_cell(m, L, part) for m in models] for L in lengths]
        lines += [f"## {title[0].upper()}{title[1:]}", "", "correct/trials (95 % Wilson interval of the rate).", ""]
        lines += _md_table(header, rows)
        if part == "niah":
            wrong = [f"{m['name']} {sum(r.get('distractor_answers', 0) for r in by_length(m.get(part)).values())}"
                     for m in models if m.get(part)]
            lines += ["", f"Answers that gave a distractor needle's number: {', '.join(wrong)}."]
        lines += ["", f"![{short} accuracy against length]({part}.png) ![{short} accuracy by depth]({part}-depth.png)", ""]
    lines += ruler_report.markdown(results) + lmeval.markdown(results)
    lines += ["## Time (seconds)", ""] + _md_table(*_time_table(results))
    return "\n".join(lines) + "\n"


def _time_table(results: dict) -> tuple[list[str], list[list[str]]]:
    models = results["models"]
    parts = [p for p in ("perplexity", "passkey", "niah", "ruler") if any(m.get(p) for m in models)]
    short = {"perplexity": "ppl", "passkey": "passkey", "niah": "needle", "ruler": "ruler"}
    header = ["length"] + [f"{m['name']} {short[part]}" for m in models for part in parts]
    rows = []
    for L in results["lengths"]:
        cells = [_length_label(L, results)]
        for m in models:
            for part in parts:
                row = by_length(m.get(part)).get(L)
                cells.append(f"{row['seconds']:.1f}" if row else "–")
        rows.append(cells)
    return header, rows


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def rich_table(results: dict):
    """The terminal summary: rows = lengths; per model ppl, ratio to the reference length, passkey."""
    from rich.table import Table

    lengths, models = results["lengths"], results["models"]
    ref = results.get("reference_length") or reference_length(lengths, results.get("original_context"))
    table = Table(title=f"longext eval: {results.get('target', '')}")
    table.add_column("length")
    niah, ruler = any(m.get("niah") for m in models), any(m.get("ruler") for m in models)
    for m in models:
        table.add_column(f"{m['name']} ppl", justify="right")
        table.add_column(f"x{format_length(ref)}", justify="right")
        table.add_column("passkey", justify="right")
        if niah:
            table.add_column("needle", justify="right")
        if ruler:
            table.add_column("RULER %", justify="right")
    for L in lengths:
        cells = [_length_label(L, results)]
        for m in models:
            cells += [*_ppl_cells(m, L, ref), _retrieval_cell(m, L)]
            cells += [_retrieval_cell(m, L, "niah")] if niah else []
            cells += [ruler_report.score_cell(by_length(m.get("ruler")).get(L))] if ruler else []
        table.add_row(*cells)
    return table


# --------------------------------------------------------------------------------------- plots
def plot(results: dict, out_dir: Path) -> list[str]:
    """ppl.png (log y), passkey.png and niah.png against length (log2 x), dashed lines at L0 and the target; then
    the depth heatmaps (`depth_plot`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for part, name, ylabel in (("perplexity", "ppl.png", "perplexity"), ("passkey", "passkey.png", "passkey accuracy"),
                               ("niah", "niah.png", "needle accuracy (multi-key)")):
        series = [(m["name"], by_length(m.get(part))) for m in results["models"] if m.get(part)]
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for label, rows in series:
            ys = [r["ppl"] if part == "perplexity" else r["accuracy"] for r in rows.values()]
            ax.plot(list(rows), ys, marker="o", label=label)
        _decorate(ax, results, log_y=part == "perplexity")
        ax.set_ylabel(ylabel)
        if part != "perplexity":
            ax.set_ylim(-0.05, 1.05)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=120)
        plt.close(fig)
        written.append(name)
    for part, _, title in RETRIEVAL:
        written += depth_plot(results, part, title, out_dir)
    return written + ruler_report.plots(results, out_dir)


def depth_plot(results: dict, part: str, title: str, out_dir: Path) -> list[str]:
    """<part>-depth.png: accuracy per (length, depth) cell, green = found, red = missed, one panel per model,
    each cell labelled correct/trials."""
    import matplotlib.pyplot as plt
    import numpy as np

    panels = [(m["name"], depth_grid(m.get(part))) for m in results["models"] if m.get(part)]
    panels = [(name, grid) for name, grid in panels if grid[2]]  # sections without trial records: nothing to draw
    if not panels:
        return []
    columns = max(len(grid[0]) for _, grid in panels)
    rows = max(len(grid[1]) for _, grid in panels)
    fig, axes = plt.subplots(1, len(panels), squeeze=False,
                             figsize=(len(panels) * (1.8 + 0.85 * columns) + 1.2, 1.6 + 0.45 * rows))
    image = None
    for ax, (name, (lengths, depths, cells)) in zip(axes[0], panels):
        grid = np.full((len(depths), len(lengths)), np.nan)
        for (L, d), (correct, trials) in cells.items():
            grid[depths.index(d), lengths.index(L)] = correct / trials
        image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
        for (L, d), (correct, trials) in cells.items():
            dark = not 0.2 < correct / trials < 0.8  # the colour map's ends are dark: white labels there
            ax.text(lengths.index(L), depths.index(d), f"{correct}/{trials}", ha="center", va="center", fontsize=7,
                    color="white" if dark else "black")
        ax.set_xticks(range(len(lengths)), [format_length(L) for L in lengths], rotation=45)
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_title(name, fontsize=9)
    axes[0][0].set_ylabel("depth of the asked-for key")
    fig.colorbar(image, ax=list(axes[0]), fraction=0.05, label="accuracy")
    fig.suptitle(title, fontsize=10, y=1.04)  # above the panel titles
    name = f"{part}-depth.png"
    fig.savefig(out_dir / name, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return [name]


def _decorate(ax, results: dict, log_y: bool) -> None:
    lengths = results["lengths"]
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [format_length(L) for L in lengths], rotation=45)
    ax.minorticks_off()
    if log_y:
        _log_y(ax)
    original, target = results.get("original_context"), results.get("target_context")
    for at, label, colour in ((original, "L0", "grey"), (target if target != original else None, "target", "black")):
        if at and min(lengths) / 2 <= at <= max(lengths) * 2:  # far-off lines would squash the curves
            ax.axvline(at, linestyle="--", color=colour, linewidth=1, label=f"{label} = {format_length(at)}")
    ax.set_xlabel("context length (tokens)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)


def _log_y(ax) -> None:
    """Log y with plain numbers: 20, 50, 100, 200 ...; every minor tick when the curves span under a decade."""
    import math

    from matplotlib.ticker import FuncFormatter

    ax.set_yscale("log")
    low, high = ax.dataLim.intervaly
    narrow = high < 10 * low

    def label(value: float, _pos) -> str:
        mantissa = round(value / 10 ** math.floor(math.log10(value)), 6)
        return f"{value:.4g}" if narrow or mantissa in (1, 2, 5) else ""

    ax.yaxis.set_major_formatter(FuncFormatter(label))
    ax.yaxis.set_minor_formatter(FuncFormatter(label))


# -------------------------------------------------------------------------------------- writing
def write_report(out_dir: Path, results: dict) -> Path:
    """Write eval.json, eval.md and the plots into out_dir, replacing an older report atomically.

    Raises:
        LongextError: out_dir exists and holds something other than a longext report.
    """
    out_dir = Path(out_dir)
    if not replaceable(out_dir):
        raise LongextError(f"--out: {out_dir} exists and is not a longext eval report; choose another directory")
    results = {**results, "machine": results.get("machine") or machine_info()}
    with staging_folder(out_dir) as tmp:
        (tmp / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
        (tmp / "eval.md").write_text(markdown(results))
        try:
            plot(results, tmp)
        except ImportError:  # matplotlib is an extra; the tables are still complete
            log.warning("matplotlib is not installed: no PNG plots")
        publish_folder(tmp, out_dir)
    return out_dir


def replaceable(path: Path) -> bool:
    """True when path is free for a report: missing, empty, or an older report."""
    if not path.exists():
        return True
    return path.is_dir() and (not any(path.iterdir()) or (path / "eval.json").is_file())
