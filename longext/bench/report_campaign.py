"""The SmolLM2 campaign's section of the benchmarks page (longext/bench/smollm2.py): one generated verdict sentence,
every row of the campaign with its status (current, stale, pending) and training budget, perplexity, RULER and
passkey with intervals, the YaRN + LoRA dose-response and the cost table. Rows without a current result are never
filled in: they are listed as pending or stale, and the verdict says it is not known yet while a row it needs is."""

from __future__ import annotations

import re

from longext.bench.markdown import header, minutes, num, ppl_cell, table
from longext.bench.report_models import model_tables
from longext.evaluate.stats import format_interval
from longext.lengths import format_length

TARGET = 16384
YARN = "smollm2-yarn"


def campaign_rows(doc: dict | None, cases: list[dict]) -> list[dict]:
    """Per campaign case (in suite order): {"case", "stored" (its result document or None), "status"}: current,
    stale (the code it ran changed), superseded (measured for other settings: not shown) or pending."""
    from longext.bench.results import portable

    stored = {c["case"]["name"]: c for c in (doc or {}).get("cases", []) if c.get("result") is not None}
    rows = []
    for case in cases:
        found = stored.get(case["name"])
        if found is None:
            status = "pending"
        elif found["case"] != portable(case):
            status = "superseded"
        else:
            status = "stale" if found.get("stale") else "current"
        rows.append({"case": case, "stored": found if status in ("current", "stale") else None, "status": status})
    return rows


def at_target(result: dict) -> tuple[float | None, dict | None]:
    """(ppl, RULER row) of a result at 16k."""
    ppl = result.get("perplexity", {}).get(str(TARGET), {}).get("ppl")
    return ppl, result.get("ruler", {}).get(str(TARGET))


def verdict(rows: list[dict]) -> str:
    """The page's one sentence: does the best trained row beat training-free YaRN at 16k in perplexity AND the RULER
    subset? Unknown while YaRN or a trained row has no current result."""
    main = [r for r in rows if not r["case"].get("checkpoint")]
    needed = [r for r in main if r["case"]["name"] == YARN or r["case"]["train"]]
    missing = [f"{r['case']['name']} ({r['status']})" for r in needed if r["status"] != "current"]
    question = "whether the best trained row beats training-free YaRN at 16k in both perplexity and the RULER subset"
    if missing:
        return f"**Not known yet** {question}: rows without a current result: {', '.join(missing)}."
    yarn_ppl, yarn_ruler = at_target(next(r for r in needed if r["case"]["name"] == YARN)["stored"]["result"])
    trained = [(r["case"], *at_target(r["stored"]["result"])) for r in needed if r["case"]["train"]]
    both = [t for t in trained if t[1] < yarn_ppl and t[2]["score"] > yarn_ruler["score"]]
    case, ppl, ruler = min(both or trained, key=lambda t: t[1])
    overlap = ruler["ci95"][0] <= yarn_ruler["ci95"][1] and yarn_ruler["ci95"][0] <= ruler["ci95"][1]
    figures = (f"perplexity {ppl:.2f} against {yarn_ppl:.2f}, RULER subset {100 * ruler['score']:.0f} % "
               f"({format_interval(*ruler['ci95'])}) against {100 * yarn_ruler['score']:.0f} % "
               f"({format_interval(*yarn_ruler['ci95'])})" + ("; the RULER intervals overlap" if overlap else ""))
    if both:
        return f"**Yes**: {case['label']} beats training-free YaRN at 16k in both ({figures})."
    fails = [what for what, lost in (("perplexity", ppl >= yarn_ppl), ("RULER", ruler["score"] <= yarn_ruler["score"]))
             if lost]
    return (f"**No**: no trained row beats training-free YaRN at 16k in both; the best by perplexity, {case['label']}, "
            f"does not in {' and '.join(fails)} ({figures})." + dose_clause(rows))


def dose_clause(rows: list[dict]) -> str:
    """What more training did, for the "no" verdict: the dose-response at 16k (empty while a point has no current
    result)."""
    points = dose_points(rows)
    if not points or any(r["status"] != "current" for _, _, r in points):
        return ""
    ppls, rulers = zip(*(at_target(r["stored"]["result"]) for _, _, r in points))
    ppl_path = " → ".join(f"{p:.2f}" for p in ppls)
    ruler_path = " → ".join(f"{100 * r['score']:.0f}" for r in rulers)
    trend = "still falls" if ppls[-1] < ppls[-2] else "no longer falls"
    return (f" More training: {points[-1][2]['case']['label']} goes {ppl_path} in perplexity at 16k after "
            f"{', '.join(share for share, _, _ in points[:-1])} and all of its budget (it {trend} at the end), "
            f"{ruler_path} % on the RULER subset.")


def dose_points(rows: list[dict]) -> list[tuple[str, int, dict]]:
    """(share of the budget, step, row) for each checkpoint the dose cases evaluate, then the trained row itself at
    all of it; empty without dose cases or their trained row."""
    doses = sorted((r for r in rows if r["case"].get("checkpoint")), key=lambda r: r["case"]["checkpoint"]["step"])
    if not doses:
        return []
    final = next((r for r in rows if r["case"]["name"] == doses[0]["case"]["checkpoint"]["of"]), None)
    if final is None:
        return []
    points = [(f"{r['case']['checkpoint']['fraction'][0]}/{r['case']['checkpoint']['fraction'][1]}",
               r["case"]["checkpoint"]["step"], r) for r in doses]
    return [*points, ("all", final["case"]["budget"]["steps"], final)]


def status_table(rows: list[dict]) -> list[str]:
    """Every row: status, commit, training budget (steps x length, planned and measured minutes)."""
    out = []
    for r in rows:
        case, stored = r["case"], r["stored"]
        result = (stored or {}).get("result", {})
        budget = case.get("budget")
        if budget:
            steps = f"{budget['steps']} × {format_length(budget['seq_len'])}" + (
                f" + {budget['replay_steps']} replay" if budget["replay_steps"] else "")
            trained = (f"{steps}; {budget['planned_minutes']:.0f} min planned ({budget['step_seconds']:.1f} s a step in "
                       f"{case['recipe']['train']['precision']}), "
                       f"{minutes(result.get('train_seconds'))} measured")
        elif case.get("checkpoint"):
            k, n = case["checkpoint"]["fraction"]
            trained = f"checkpoint step {case['checkpoint']['step']} of {case['checkpoint']['of']} ({k}/{n})"
        else:
            trained = "training-free"
        commit = "–" if not stored else str(stored.get("commit") or "?")[:10] + (
            " (dirty)" if stored.get("dirty") else "")
        status = {"stale": "**stale** (its code changed since)", "superseded": "pending (stored result is for other "
                  "settings)", "pending": "pending"}.get(r["status"], "current")
        out.append([case["label"], status, trained, commit, cpu_cell(stored)])
    return table(["row", "status", "training", "commit", "CPU"], out)


def cpu_cell(stored: dict | None) -> str:
    """The CPU a row was measured on, short: the project's machine is not the same CPU every sitting, and a row's
    minutes and tokens/s depend on it (its figures do not: the eval is float32)."""
    if not stored:
        return "–"
    m = stored.get("machine") or {}
    flags = m.get("flags") or {}
    kind = "avx512_bf16" if flags.get("avx512_bf16") else "AMX" if flags.get("amx_bf16") else (
        "avx512, no bf16" if flags.get("avx512f") else "AVX2 only")
    return f"{m.get('cpu', '?')} ({kind})"


def budget_line(rows: list[dict]) -> list[str]:
    """How the measured training minutes of the trained rows compare with the stated budget."""
    spent = [(r["case"]["label"], r["stored"]["result"]["train_seconds"] / 60, r["case"]["budget"]["minutes"])
             for r in rows if r["stored"] and r["case"].get("budget") and r["stored"]["result"].get("train_seconds")]
    if not spent:
        return []
    short = [f"{label} ({used:.0f} min)" for label, used, budget in spent if used < 0.9 * budget]
    low, high = min(u for _, u, _ in spent), max(u for _, u, _ in spent)
    return [f"Measured training time of the {len(spent)} trained rows: {low:.0f}-{high:.0f} min against the stated "
            f"{spent[0][2]} (sum of the step times in each run's metrics.jsonl)"
            + (f"; more than 10 % short: {', '.join(short)} (its steps came from a slower step time than this "
               f"machine's: re-measure with scripts/campaign_step_times.py)." if short else "."), ""]


def ruler_table(rows: list[dict], lengths: list[int]) -> list[str]:
    """The RULER subset's average per length, with its interval, for every measured row."""
    out = []
    for r in rows:
        ruler = r["stored"]["result"].get("ruler", {})
        cells = [ruler_cell(ruler.get(str(L))) for L in lengths]
        out.append([label(r), *cells])
    return table(["method", *(format_length(L) for L in lengths)], out)


def ruler_cell(row: dict | None) -> str:
    return "–" if row is None else f"{100 * row['score']:.0f} % ({format_interval(*row['ci95'])})"


def label(row: dict) -> str:
    return row["case"]["label"] + (" *stale*" if row["status"] == "stale" else "")


def dose_table(rows: list[dict]) -> list[str]:
    """The dose-response rows (`dose_points`): ppl and RULER at 16k after each share of the trained row's budget."""
    points = dose_points(rows)
    if not points:
        return []
    budget = points[-1][2]["case"]["budget"]
    out = []
    for share, step, r in points:
        ppl, ruler = at_target(r["stored"]["result"]) if r["stored"] else (None, None)
        state = "" if r["status"] == "current" else f" ({r['status']})"
        out.append([share + state, str(step), num(budget["planned_minutes"] * step / budget["steps"], 0),
                    ppl_cell(ppl), ruler_cell(ruler)])
    yarn = next((r for r in rows if r["case"]["name"] == YARN and r["stored"]), None)
    if yarn:
        ppl, ruler = at_target(yarn["stored"]["result"])
        out.append(["training-free YaRN (reference)", "0", "0", ppl_cell(ppl), ruler_cell(ruler)])
    return ["YaRN x2 + LoRA dose-response at 16k (its run's checkpoints, no retraining; minutes at the planned step "
            "time):", "", *table(["budget used", "step", "minutes", "ppl 16k", "RULER 16k"], out), ""]


def settings_lines(cases: list[dict]) -> list[str]:
    """The campaign's stated budget and eval settings, from the case JSONs."""
    trained = next(c for c in cases if c.get("budget"))
    e = next(c for c in cases if not c.get("checkpoint"))["eval"]
    ruler = e["ruler"]
    t = trained["recipe"]["train"]
    lengths = ", ".join(format_length(L) for L in e["ppl_lengths"])
    fp32 = [re.split(r" \(|,", c["label"])[0] for c in cases
            if c.get("budget") and c["recipe"]["train"]["precision"] == "fp32" != t["precision"]]
    where = (f"; {', '.join(fp32)} in fp32 on a 2-core CPU without native bf16 (AVX2 only: bf16 emulated, ~100x "
             f"slower), at fp32 step times measured there (bench/smollm2-step-times-avx2.json): the same minutes, "
             f"fewer tokens (an fp32 step is slower)" if fp32 else "")
    return [
        f"**Budget**: every trained row trains for {trained['budget']['minutes']} minutes, as whole optimizer steps at "
        f"the row's training length from its measured step time (equal minutes, not equal steps): in {t['precision']} "
        f"on a 2-core CPU with native bf16 (avx512_bf16; bench/smollm2-step-times.json){where}. LoRA r8, AdamW lr "
        f"{t['lr']:g}, 5 % warm-up, cosine to {t['min_lr_ratio']:g}, batch 1, seed {t['seed']}.",
        "",
        f"**Eval** at {lengths}: perplexity with fixed targets ({e['targets']} tokens × {e['windows']} window, eval "
        f"books); passkey {e['trials']} trials per length (one per depth, 0.05-0.95); RULER subset "
        f"{', '.join(ruler['tasks'])}, {ruler['samples']} sample per task and length (the average pools "
        f"{len(ruler['tasks']) * ruler['samples']} samples a length; RULER's string-match score, 95 % Wilson "
        f"interval; essay haystack: the eval books). Model weights in float32, as `longext eval` on a CPU. The "
        f"Machine line above is the last sitting's; each row's CPU is in the rows table (its minutes and tokens/s "
        f"depend on it, its figures do not).",
        "",
    ]


def campaign_section(doc: dict | None, cases: list[dict] | None = None, plots: bool = True) -> str:
    if cases is None:
        from longext.bench.suites import smollm2_cases

        cases = smollm2_cases(False)
    rows = campaign_rows(doc, cases)
    measured = [r for r in rows if r["stored"] and not r["case"].get("checkpoint")]
    lines = [f"## SmolLM2-135M campaign: 8k → {format_length(TARGET)}", "", verdict(rows), ""]
    lines += header(doc) if doc else ["No row measured yet (`longext bench smollm2`).", ""]
    lines += settings_lines(cases)
    lines += ["Rows (a pending or stale row is re-run by `longext bench smollm2`; `--only NAME` runs one):", "",
              *status_table(rows), "", *budget_line(rows)]
    if measured:
        shown = {**(doc or {}), "cases": [{**r["stored"], "stale": r["status"] == "stale"} for r in measured]}
        lengths = sorted({int(L) for r in measured for L in r["stored"]["result"].get("ruler", {})})
        if lengths:
            lines += ["RULER subset, average score per length (95 % interval):", "",
                      *ruler_table(measured, lengths), ""]
        lines += model_tables(shown, TARGET) + [""]
    lines += dose_table(rows)
    if plots and measured:
        lines += ["![perplexity](bench/smollm2-ppl.png) ![passkey](bench/smollm2-passkey.png)"]
    return "\n".join(lines)
