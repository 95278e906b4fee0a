"""The RULER part of the eval report: a task x length table per model (scores in percent, as RULER prints them,
with 95 % intervals), the average per length, ruler.png (average against length) and ruler-tasks.png (the task x
length heatmap), and the terminal table.

Results layout (per model, next to "passkey"): "ruler": {L: {"score", "ci95", "samples", "seconds",
"tasks": {task: {"score", "ci95", "samples", "correct", "seconds", "records": [...]}}}}; scores in [0, 1].
"""

from __future__ import annotations

from pathlib import Path

from longext.evaluate.stats import format_interval
from longext.lengths import format_length


def _by_length(section: dict | None) -> dict[int, dict]:
    return {int(k): v for k, v in sorted((section or {}).items(), key=lambda kv: int(kv[0]))}


def task_names(model: dict) -> list[str]:
    """Tasks in the order they ran (the first length's)."""
    rows = _by_length(model.get("ruler"))
    return list(next(iter(rows.values()))["tasks"]) if rows else []


def score_cell(row: dict | None, interval: bool = True) -> str:
    """'62.5 (31–86 %)': the score in percent, then its 95 % interval."""
    if not row:
        return "–"
    text = f"{100 * row['score']:.1f}"
    return f"{text} ({format_interval(*row['ci95'])})" if interval else text


def markdown(results: dict) -> list[str]:
    """The RULER section of eval.md (empty when RULER did not run)."""
    models = [m for m in results["models"] if m.get("ruler")]
    if not models:
        return []
    ruler = results.get("settings", {}).get("ruler", {})
    lines = [
        "## RULER", "",
        f"Score = RULER's string match (all references for every task, any for qa), mean over "
        f"{ruler.get('samples')} samples per task and length, in percent; (a–b %) = 95 % Wilson interval. "
        f"Length = prompt + generation budget, as RULER counts it. Haystack: {ruler.get('haystack')} "
        f"(RULER: Paul Graham's essays); template: {'chat' if ruler.get('chat') else 'base'}.", "",
    ]
    for model in models:
        rows = _by_length(model["ruler"])
        header = ["task", *(format_length(L) for L in rows)]
        table = [[name, *(score_cell(r["tasks"].get(name)) for r in rows.values())] for name in task_names(model)]
        table.append(["**average**", *(f"**{score_cell(r)}**" for r in rows.values())])
        lines += [f"### {model['name']}", ""] + _md_table(header, table) + [""]
    lines += ["![RULER average against length](ruler.png) ![RULER score per task and length](ruler-tasks.png)", ""]
    return lines


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def rich_table(results: dict):
    """Terminal table: rows = tasks (then the average), one column per model and length; None without RULER."""
    from rich.table import Table

    models = [m for m in results["models"] if m.get("ruler")]
    if not models:
        return None
    table = Table(title="RULER (score %, 95 % interval)")
    table.add_column("task")
    columns = [(m, L) for m in models for L in _by_length(m["ruler"])]
    for m, L in columns:
        table.add_column(f"{m['name']} {format_length(L)}" if len(models) > 1 else format_length(L), justify="right")
    for name in task_names(models[0]):
        table.add_row(name, *(score_cell(_by_length(m["ruler"])[L]["tasks"].get(name)) for m, L in columns))
    table.add_row("average", *(score_cell(_by_length(m["ruler"])[L]) for m, L in columns), style="bold")
    return table


def plots(results: dict, out_dir: Path) -> list[str]:
    """ruler.png (average score against length, with the interval as error bars) and ruler-tasks.png."""
    import matplotlib.pyplot as plt

    models = [m for m in results["models"] if m.get("ruler")]
    if not models:
        return []
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for m in models:
        rows = _by_length(m["ruler"])
        ys = [100 * r["score"] for r in rows.values()]
        errors = [[y - 100 * r["ci95"][0] for y, r in zip(ys, rows.values())],
                  [100 * r["ci95"][1] - y for y, r in zip(ys, rows.values())]]
        ax.errorbar(list(rows), ys, yerr=errors, marker="o", capsize=3, label=m["name"])
    lengths = sorted({L for m in models for L in _by_length(m["ruler"])})
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [format_length(L) for L in lengths], rotation=45)
    ax.minorticks_off()
    ax.set_ylim(-3, 103)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("RULER average score (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "ruler.png", dpi=120)
    plt.close(fig)
    return ["ruler.png", heatmap(models, out_dir)]


def heatmap(models: list[dict], out_dir: Path) -> str:
    """ruler-tasks.png: score per (task, length) cell, one panel per model, each cell labelled with its percent."""
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = task_names(models[0])
    fig, axes = plt.subplots(1, len(models), squeeze=False,
                             figsize=(len(models) * (2.6 + 0.9 * max(len(m["ruler"]) for m in models)) + 1.2,
                                      1.2 + 0.36 * (len(tasks) + 1)))
    image = None
    for ax, model in zip(axes[0], models):
        rows = _by_length(model["ruler"])
        grid = np.array([[100 * r["tasks"][t]["score"] for r in rows.values()] for t in tasks]
                        + [[100 * r["score"] for r in rows.values()]])
        image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=100.0, aspect="auto")
        for (i, j), value in np.ndenumerate(grid):
            ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if not 20 < value < 80 else "black")
        ax.set_xticks(range(len(rows)), [format_length(L) for L in rows], rotation=45)
        ax.set_yticks(range(len(tasks) + 1), [*tasks, "average"])
        ax.axhline(len(tasks) - 0.5, color="black", linewidth=1)
        ax.set_xlabel("context length (tokens)")
        ax.set_title(model["name"], fontsize=9)
    fig.colorbar(image, ax=list(axes[0]), fraction=0.05, label="score (%)")
    fig.suptitle("RULER score per task and length", fontsize=10, y=1.02)
    fig.savefig(out_dir / "ruler-tasks.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return "ruler-tasks.png"
