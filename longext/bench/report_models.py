"""The model suites' sections of the benchmarks page (toy, SmolLM2, LongGen): perplexity and passkey tables, the
cost table with its compute formula, and the acceptance lines computed from the rows."""

from __future__ import annotations

from pathlib import Path

from longext.bench.markdown import case_rows, header, mb, minutes, num, pct, ppl_cell, row_label, table
from longext.evaluate.stats import format_rate
from longext.lengths import format_length

COMPUTE_FORMULA = (
    "Training compute per token is taken as FLOPs ∝ N + n_layers · seq_len · d (N = non-embedding parameters, "
    "d = hidden size: the dense part plus attention over the sequence, Kaplan et al. 2020); the ratio compares a "
    "row's training (tokens × that cost at its training length) with the same tokens at the target length."
)


def token_cost(result: dict, length: int) -> float:
    """Training FLOPs per token at `length`, up to a constant: N + n_layers * length * d (COMPUTE_FORMULA)."""
    return result["params_nonembed"] + result["layers"] * length * result["hidden"]


def compute_ratio(result: dict, target: int) -> float:
    """Training compute of the row relative to the same tokens at the target length (0 = training-free)."""
    if not result.get("train_tokens"):
        return 0.0
    return token_cost(result, result["train_seq_len"]) / token_cost(result, target)


def train_compute(result: dict) -> float | None:
    """A row's training compute, up to the same constant: tokens x token_cost summed over its stages (a LongRecipe
    replay at its own length); None when the row has no per-length token counts (training-free)."""
    by_length = result.get("train_tokens_by_length")
    if not by_length:
        return None
    return float(sum(tokens * token_cost(result, int(L)) for L, tokens in by_length.items()))


def measured_lengths(doc: dict, key: str) -> list[int]:
    found = {int(L) for c in case_rows(doc) for L in c["result"].get(key, {})}
    return sorted(found)


def model_tables(doc: dict, target: int) -> list[str]:
    cases = case_rows(doc)
    ppl_lengths, pk_lengths = measured_lengths(doc, "perplexity"), measured_lengths(doc, "passkey")
    lines = []
    if ppl_lengths:
        rows = [[row_label(c), *(ppl_cell(c["result"]["perplexity"].get(str(L), {}).get("ppl")) for L in ppl_lengths)]
                for c in cases]
        lines += ["Perplexity (fixed targets: the same final tokens of each window, eval books; lower is better):", ""]
        lines += table(["method", *(format_length(L) for L in ppl_lengths)], rows) + [""]
    if pk_lengths:
        def cell(c, L):
            row = c["result"].get("passkey", {}).get(str(L))
            return "–" if row is None else format_rate(row["correct"], row["trials"])

        rows = [[row_label(c), *(cell(c, L) for L in pk_lengths)] for c in cases]
        lines += ["Passkey retrieval (greedy, 5 digits, eval-book filler, depths spread; correct/trials and the 95 % "
                  "Wilson interval of the rate):", ""]
        lines += table(["method", *(format_length(L) for L in pk_lengths)], rows) + [""]
    rows = []
    for c in cases:
        r = c["result"]
        ppl = r.get("perplexity", {})
        longest = str(max(map(int, ppl))) if ppl else None
        rows.append([row_label(c), num(r.get("train_tokens_per_s"), 0),
                     format_length(r["train_seq_len"]) if r.get("train_seq_len") else "–",
                     num(r.get("train_peak_rss_mb"), 0), num(r.get("train_tokens"), 0),
                     num(compute_ratio(r, target), 2), num(ppl[longest]["tokens_per_s"], 0) if longest else "–",
                     num(r.get("peak_rss_mb"), 0), num(r.get("seconds", 0) / 60, 1)])
    lines += [f"Cost (measured in the same run). {COMPUTE_FORMULA}", ""]
    lines += table(["method", "train tok/s", "train len", "train peak RSS MB", "train tokens", "compute vs full-length",
                     "eval tok/s (longest ppl length)", "case peak RSS MB", "case minutes"], rows)
    return lines


def toy_section(doc: dict) -> str:
    from longext.bench.suites import TOY_L0, TOY_TARGET

    base = doc.get("toy_base", {})
    gate = base.get("gate", {})
    lines = [f"## Toy scale: project-pretrained Llama, L0 = {TOY_L0} → {TOY_TARGET}", "", *header(doc)]
    lines += [
        f"Base: `bench/toy-base` ({num(base.get('params'), 0)} parameters, vocab {base.get('vocab', '?')}, "
        f"{num(base.get('tokens_trained'), 0)} pretraining tokens in {minutes(base.get('train_seconds'))}, "
        f"built by `scripts/toy_base.py`). Retrieval gate (passkey at L0, ≥ 90 %): "
        f"{gate.get('correct', '?')}/{gate.get('trials', '?')} — "
        f"**{'met' if gate.get('passed') else 'NOT met'}**.",
        "",
    ]
    lines += attempt_lines(doc.get("toy_attempts", []))
    lines += model_tables(doc, TOY_TARGET)
    lines += ["", *acceptance_lines(doc, TOY_L0, TOY_TARGET)]
    lines += ["", "![perplexity](bench/toy-ppl.png) ![passkey](bench/toy-passkey.png)"]
    return "\n".join(lines)


def attempt_lines(attempts: list[dict]) -> list[str]:
    """What was tried to pretrain the toy base (bench/toy-base-attempts.jsonl, one line per attempt)."""
    if not attempts:
        return []
    rows = []
    for i, a in enumerate(attempts, 1):
        last, gate = a.get("last_log") or {}, a.get("gate") or {}
        rows.append([str(i), "`" + " ".join(a.get("argv", [])) + "`", num(a.get("params"), 0),
                     num(a.get("tokens_trained"), 0), minutes(a.get("train_seconds")),
                     num(last.get("loss"), 3), num(last.get("answer_acc"), 2),
                     f"{gate.get('correct', '?')}/{gate.get('trials', '?')}" if gate else "–",
                     num((a.get("extrapolation") or {}).get("ratio"), 2), a.get("note", "")])
    return ["Pretraining attempts (`scripts/toy_base.py`; answer acc = share of training passkey documents whose "
            "5 digits are all predicted, over the last logging interval):", "",
            *table(["#", "arguments", "parameters", "tokens", "wall", "last loss", "answer acc", "gate @ L0",
                      "ppl(8 L0) / ppl(L0)", "note"], rows), ""]


def acceptance_lines(doc: dict, L0: int, target: int) -> list[str]:
    by = {c["case"]["name"]: c["result"] for c in case_rows(doc)}

    def ppl(name, L):
        return by.get(name, {}).get("perplexity", {}).get(str(L), {}).get("ppl")

    lines = ["Acceptance checks (computed from the rows above):", ""]
    b0, b8, ft8 = ppl("toy-base", L0), ppl("toy-base", target), ppl("toy-pi-ft", target)
    if b0 and b8:
        lines.append(f"- base ppl({format_length(target)}) / ppl({L0}) = {b8 / b0:.2f} (needs ≥ 2): "
                     f"{'holds' if b8 / b0 >= 2 else 'fails'}")
    if b0 and ft8:
        lines.append(f"- PI fine-tuned ppl({format_length(target)}) / base ppl({L0}) = {ft8 / b0:.2f} (needs ≤ 1.1): "
                     f"{'holds' if ft8 / b0 <= 1.1 else 'fails'}")
    lr, pi = train_compute(by.get("toy-longrecipe", {})), train_compute(by.get("toy-pi-ft", {}))
    if lr and pi:
        ratio = lr / pi
        lines.append(f"- LongRecipe training compute / PI fine-tuned at {format_length(target)} (same steps; replay "
                     f"included) = {ratio:.2f} (target ≤ 0.35): {'holds' if ratio <= 0.35 else 'fails'}")
    for c in case_rows(doc):
        original = c["case"].get("repeat_of")
        if original in by:
            lines.append(f"- determinism ({c['case']['name']} vs {original}, same seed, from scratch): "
                         + determinism(by[original], c["result"]))
    return lines


def determinism(a: dict, b: dict) -> str:
    """Same passkey answers and perplexities within 1 %?"""
    diffs = [abs(a["perplexity"][L]["ppl"] - b["perplexity"][L]["ppl"]) / a["perplexity"][L]["ppl"]
             for L in a.get("perplexity", {}) if L in b.get("perplexity", {})]
    acc_a = {L: r["correct"] for L, r in a.get("passkey", {}).items()}
    acc_b = {L: r["correct"] for L, r in b.get("passkey", {}).items()}
    worst = max(diffs, default=0.0)
    same = acc_a == acc_b
    verdict = "holds" if same and worst <= 0.01 else "fails"
    return (f"largest perplexity difference {worst:.2%}, passkey counts {'identical' if same else 'different'} "
            f"(needs ≤ 1 % and identical): {verdict}")


def smollm2_section(doc: dict, plots: bool = True) -> str:
    from longext.bench.suites import SMOL_TARGET

    quick = " (reduced run)" if doc.get("quick") else ""
    lines = [f"## SmolLM2-135M: 8k → {format_length(SMOL_TARGET)}{quick}", "", *header(doc)]
    if doc.get("quick"):
        lines += ["**Reduced run** (`--quick`): fewer lengths, one short target window, few passkey trials and no "
                  "fine-tuned row.", ""]
    lines += model_tables(doc, SMOL_TARGET)
    if plots:
        lines += ["", "![perplexity](bench/smollm2-ppl.png) ![passkey](bench/smollm2-passkey.png)"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- longgen
# issue 6's bars, as ratios against the all-full model of the same run
LONGGEN_KV_SAVING, LONGGEN_PREFILL, LONGGEN_TRAIN, LONGGEN_PASSKEY_POINTS = 0.55, 1.5, 1.3, 10


def longgen_section(doc: dict) -> str:
    """KV bytes, prefill and training step of LongGen vs all-full per model, then the toy passkey rows."""
    lines = ["## LongGen: hybrid full/sparse attention vs all layers full", "", *header(doc)]
    by = {c["case"]["name"]: c for c in case_rows(doc)}
    rows, checks = [], []
    for setting in dict.fromkeys((c["case"]["model"], c["case"]["length"]) for c in case_rows(doc)
                                 if c["case"].get("kind") == "longgen"):
        model, length = setting
        get = lambda measure, arm: by.get(f"longgen-{model}-{measure}-{arm}", {}).get("result")  # noqa: E731
        pre_lg, pre_full, tr_lg, tr_full = get("prefill", "longgen"), get("prefill", "full"), get("train", "longgen"), get("train", "full")
        saving = 1 - pre_lg["kv_bytes"] / pre_full["kv_bytes"] if pre_lg and pre_full else None
        formula = None
        if pre_lg:  # methods.md §6.1: KV relative to full = k/N + (N-k)/N * budget/S
            k, n = len(pre_lg["full_layers"]), pre_lg["layers"]
            formula = 1 - (k / n + (n - k) / n * min(pre_lg["budget"], length) / length)
        prefill = pre_full["prefill_seconds"] / pre_lg["prefill_seconds"] if pre_lg and pre_full else None
        train = tr_full["step_seconds"] / tr_lg["step_seconds"] if tr_lg and tr_full else None
        case = next(c["case"] for c in case_rows(doc) if c["case"].get("model") == model)
        sparse = case["sparse"]
        flops = _longgen_flop_ratios(model, sparse, pre_lg, length, case.get("gradient_checkpointing", False))
        rows.append([model, format_length(length),
                     f"{pre_lg['full_layers']} of {pre_lg['layers']}" if pre_lg else "–",
                     f"sinks {sparse.get('sink_tokens')} + window {sparse.get('window')}",
                     mb(pre_full, "kv_bytes"), mb(pre_lg, "kv_bytes"), pct(saving), pct(formula),
                     num((pre_full or {}).get("prefill_seconds"), 2), num((pre_lg or {}).get("prefill_seconds"), 2),
                     num(prefill, 2), num(flops.get("prefill"), 2), num((tr_full or {}).get("step_seconds"), 2),
                     num((tr_lg or {}).get("step_seconds"), 2), num(train, 2), num(flops.get("train"), 2)])
        for what, value, bar, ceiling, fmt in (
                ("KV saving", saving, LONGGEN_KV_SAVING, None, pct),
                ("prefill speed-up", prefill, LONGGEN_PREFILL, flops.get("prefill"), lambda v: f"{v:.2f}x"),
                ("training-step speed-up", train, LONGGEN_TRAIN, flops.get("train"), lambda v: f"{v:.2f}x")):
            if value is not None:
                reach = (f"; the FLOP ratio is {ceiling:.2f}x, so no kernel reaches the bar on this model and length"
                         if ceiling is not None and value < bar and ceiling < bar else "")
                checks.append(f"- {model} at {format_length(length)}: {what} {fmt(value)} (needs ≥ {fmt(bar)}): "
                              f"{'holds' if value >= bar else 'fails'}{reach}")
    if rows:
        lines += ["Efficiency, batch 1 at the target length, fp32, each figure in its own process. KV = bytes held by "
                  "the cache after the prefill (LongGenCache for the hybrid, DynamicCache for all-full); prefill = median "
                  "seconds of the forward pass that fills it; train step = median seconds of forward + backward + AdamW "
                  "with LoRA r8 on q/k/v/o in longext's DeepSpeed ZeRO-2 engine. formula = 1 − (k/N + (N−k)/N · budget/S). "
                  "FLOP ratio = full-attention FLOPs / LongGen FLOPs from the model's dimensions (longext.bench.longgen."
                  "flop_ratios): the speed-up if time followed FLOPs.", ""]
        lines += table(["model", "length", "full layers", "sparse layers", "KV MB full", "KV MB LongGen", "KV saving",
                         "formula", "prefill s full", "prefill s LongGen", "prefill speed-up", "prefill FLOP ratio",
                         "train step s full", "train step s LongGen", "train speed-up", "train FLOP ratio"], rows) + [""]
    passkey = {**doc, "cases": [c for c in doc.get("cases", []) if c["case"].get("kind") == "model"]}
    if case_rows(passkey):
        from longext.bench.suites import TOY_TARGET

        lines += ["Quality on the toy base (L0 = 128 → 1024): the LongGen run and the all-full run use the same recipe, "
                  "optimizer, steps and tokens; only the method block differs.", ""]
        lines += model_tables(passkey, TOY_TARGET) + [""]
        results = {c["case"].get("arm"): c["result"] for c in case_rows(passkey)}
        acc = {arm: r.get("passkey", {}).get(str(TOY_TARGET), {}).get("accuracy") for arm, r in results.items()}
        if acc.get("longgen") is not None and acc.get("full") is not None:
            gap = 100 * (acc["full"] - acc["longgen"])
            checks.append(f"- toy passkey at {format_length(TOY_TARGET)}: LongGen {100 * acc['longgen']:.0f} %, all-full "
                          f"{100 * acc['full']:.0f} %, gap {gap:.0f} points (needs ≤ {LONGGEN_PASSKEY_POINTS}): "
                          f"{'holds' if gap <= LONGGEN_PASSKEY_POINTS else 'fails'}")
        lines += ["![perplexity](bench/longgen-ppl.png) ![passkey](bench/longgen-passkey.png)", ""]
    if checks:
        lines += ["Acceptance checks (issue 6, computed from the rows above):", "", *checks]
    return "\n".join(lines)


def _longgen_flop_ratios(model: str, sparse: dict, pre_lg: dict | None, length: int, checkpointing: bool) -> dict:
    """longext.bench.longgen.flop_ratios for a bench model, from its config.json ({} when the model is not here)."""
    import json

    from longext.bench.longgen import flop_ratios
    from longext.bench.suites import TOY_DIR
    from longext.materials import smollm2_dir

    config = (Path(TOY_DIR) if model == "toy" else smollm2_dir()) / "config.json"
    if pre_lg is None or sparse.get("type", "attn_sink") != "attn_sink" or not config.is_file():
        return {}
    return flop_ratios(json.loads(config.read_text()), sparse, len(pre_lg["full_layers"]), length, checkpointing)
