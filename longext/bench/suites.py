"""The benchmark suites as lists of cases (pure data: a case's JSON is part of its cache key).

- throughput: `throughput.run_case` measurements (train tokens/s engine vs plain, eval seconds);
- toy: the committed toy base (bench/toy-base, L0 = 128) extended to 8 x L0 = 1024;
- smollm2: the SmolLM2-135M campaign, 8k extended x2 to 16k (its cases: longext/bench/smollm2.py);
- longgen: LongGen against the same model with every layer full (longext/bench/longgen.py);
- memory: measured peak memory of a training step on CPU against `longext plan`'s estimate (bench/memory.py);
- data: the data pipeline at about 25M and 100M tokens: cold preparation, warm start, resume, 2 ranks (bench/data.py).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from longext.bench.smollm2 import SMOL_TARGET, smollm2_cases
from longext.errors import LongextError

SUITES = ("throughput", "toy", "smollm2", "longgen", "memory", "data")
ALLOWED = (*SUITES, "all")
TOY_DIR = Path(__file__).resolve().parents[2] / "bench" / "toy-base"
TOY_L0, TOY_TARGET = 128, 1024


def suite_cases(suite: str, quick: bool) -> list[dict]:
    if suite not in SUITES:
        raise LongextError(f"SUITE: unknown benchmark suite {suite!r} (allowed: {', '.join(ALLOWED)})")
    cases = {"throughput": throughput_cases, "toy": toy_cases, "smollm2": smollm2_cases, "longgen": longgen_cases,
             "memory": memory_cases, "data": data_cases}
    return cases[suite](quick)


# ------------------------------------------------------------------------------------ throughput
def throughput_cases(quick: bool) -> list[dict]:
    """Engine (DeepSpeed ZeRO-2) vs plain transformers + peft, same model, LoRA, batch and optimizer."""
    cases = []
    models, lengths = (("tiny",), (2048,)) if quick else (("tiny", "smollm2"), (2048, 8192))
    for model in models:
        for seq_len in lengths:
            steps = 2 if model == "smollm2" and seq_len > 2048 else 3  # SmolLM2 at 8k: ~2 min a step here
            for path in ("engine", "plain"):
                cases.append({"kind": "throughput", "name": f"train-{model}-{seq_len}-{path}",
                              "case": "train", "path": path, "model": model, "seq_len": seq_len, "steps": steps})
    for length in (2048, 4096) if quick else (2048, 4096, 8192, 12288, 16384):
        cases.append({"kind": "throughput", "name": f"eval-smollm2-{length}", "case": "eval", "model": "smollm2",
                      "length": length})
    return cases


# ------------------------------------------------------------------------------------------- toy
def toy_checksum(toy_dir: Path = TOY_DIR) -> str:
    sums = toy_dir / "SHA256SUMS"
    if not sums.is_file():
        raise LongextError(f"toy suite: no toy base at {toy_dir} (build it with `make toy-base`)")
    return hashlib.sha256(sums.read_bytes()).hexdigest()


# Passkey documents for a fine-tuning mix (longext/bench/retrieval.py; the LongGen passkey rows use it): 1500 docs
# of 120..1024 tokens, about 0.8M tokens next to the training books' 3.1M [choice]. The toy suite's rows train on
# books only: the mix did not bring passkey back past L0 (toy base of 2026-11-22, PI x8, 80 steps: 0/10 at 128; base
# of 2026-11-29, 160 steps: PI x8 0/10 at 128, 512 and 1024, E2-LLM 9/10 at 128 and 0/10 beyond; one run each;
# 2026-12-03, E2-LLM with 12000 docs of 112..128 tokens, a third of the tokens: 15/20 at 128, 0/20 from 256 on;
# PI x8 fine-tuned at 1024 with 6000 docs of 256..1024 tokens, more tokens than the books: 0/20 at every length).
# Why E2-LLM cannot retrieve past L0 here (2026-12-03, passkey with g forced, 20 trials, docs/methods/e2llm.md):
# the suite's row gets 19/20 at 128 with g = 1 but 0/20 at 128 with g = 2, 4 or 8 (positions it trained on); with
# the 12000 short docs and 8x the steps, g = 2 at 128 reaches 12/20, g = 4 and 8 stay 0/20; trained on g = 4 alone,
# 13/20 at 128, 3/20 at 256, 0/20 at 512 and 1024, and sharper attention (logits x1.2..2) does not help. The toy
# learns the scaled positions when drilled on them, but its copying does not carry to windows longer than it
# trained on, whatever the positions: a limit of the 1.2M-parameter base, not of E2-LLM's positions. Positive
# control: ABF 2e6 fine-tuned at 1024 on books + the 6000 docs of 256..1024 tokens for 1280 steps: 17/20 at 128,
# 7/20 at 256, 2/20 at 512, 0/20 at 1024.
TOY_RETRIEVAL_DOCS = 1500


def toy_train_texts(toy_dir: Path = TOY_DIR) -> list[str]:
    """data.train with retrieval practice: the training books plus passkey documents."""
    from longext.bench.retrieval import retrieval_docs_entry

    return ["books", retrieval_docs_entry(TOY_RETRIEVAL_DOCS, 120, TOY_TARGET)]


def toy_recipe(name: str, rope: dict, train: dict | None = None, toy_dir: Path = TOY_DIR) -> dict:
    """A longext recipe for the toy base; `train` = the fine-tuning settings (training-free rows keep steps 1)."""
    return {
        "name": name,
        "model": {"path": str(toy_dir), "original_context": TOY_L0},
        "method": {"kind": "standard", "target_len": TOY_TARGET},
        "rope": rope,
        # high rank on every linear layer of a 1M-parameter model: close to full fine-tuning
        "lora": {"r": 32, "alpha": 32.0, "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
        "data": {"train": ["books"], "seq_len": TOY_TARGET},
        "train": train or {"steps": 1},
    }


def toy_eval_settings(quick: bool, quick_windows: int = 8) -> dict:
    """Perplexity and passkey settings of every toy row, at L0, 2 L0, 4 L0 and the target."""
    lengths = [TOY_L0, 2 * TOY_L0, 4 * TOY_L0, TOY_TARGET]
    return {"ppl_lengths": lengths, "targets": 64, "windows": quick_windows if quick else 32,
            "passkey_lengths": lengths, "trials": 10 if quick else 20,
            "depths": [(i + 0.5) / 10 for i in range(10)], "filler_chars": 60_000, "seed": 0}


def toy_finetune(quick: bool) -> dict:
    """One optimizer and token budget for every fine-tuned toy row (schedules by steps)."""
    return {"steps": 20 if quick else 160, "micro_batch_size": 2, "lr": 2.0e-3, "warmup_steps": 10,
            "schedule": "cosine", "min_lr_ratio": 0.1, "zero_stage": 2, "precision": "auto", "seed": 0,
            "log_every": 10}


def toy_cases(quick: bool, toy_dir: Path = TOY_DIR) -> list[dict]:
    checksum = toy_checksum(toy_dir)
    settings, finetune = toy_eval_settings(quick), toy_finetune(quick)
    rows = [
        ("base", "no extension", {"kind": "none"}, False),
        ("pi", "PI x8, training-free", {"kind": "linear"}, False),
        ("ntk", "NTK x8, training-free", {"kind": "ntk"}, False),
        ("dynamic", "dynamic NTK x8, training-free", {"kind": "dynamic"}, False),
        ("yarn", "YaRN x8, training-free", {"kind": "yarn"}, False),
        ("pi-ft", "PI x8, fine-tuned at 1024", {"kind": "linear"}, True),
    ]
    cases = [
        {"kind": "model", "name": f"toy-{name}", "label": label, "train": train, "toy_base": checksum,
         "recipe": toy_recipe(f"toy-{name}", rope, finetune if train else None, toy_dir), "eval": settings}
        for name, label, rope, train in rows
    ]
    # the determinism check: the fine-tuned row again, same seed, run from scratch (last: the cheapest to lose)
    repeat = {**cases[-1], "name": "toy-pi-ft-repeat", "label": "PI x8, fine-tuned (repeat run)", "repeat_of": "toy-pi-ft"}
    methods = [] if quick else [
        {"kind": "model", "name": f"toy-{name}", "label": label, "train": True, "toy_base": checksum,
         "recipe": {**toy_recipe(f"toy-{name}", rope, finetune, toy_dir), **changes}, "eval": settings}
        for name, label, rope, changes in toy_method_rows(["books"], toy_theta(toy_dir))
    ]
    return [*cases, repeat, *methods]


def toy_theta(toy_dir: Path = TOY_DIR) -> float:
    """The toy base's RoPE base (config.json)."""
    from longext.rope import config_theta

    return config_theta(json.loads((toy_dir / "config.json").read_text()))


def toy_harpe_bases(theta: float) -> tuple[float, float]:
    """Base set for HARPE at 8 x L0 on the toy (4 heads) [choice]: b_max = 20 x the toy's base, b_min = b_max / 5
    as in the paper's 1M-5M range; the ABF baselines train at the largest and at the mean base."""
    return 4.0 * theta, 20.0 * theta


def toy_method_rows(texts: list[str], theta: float) -> list[tuple[str, str, dict, dict]]:
    """(name, label, rope, recipe changes) of the extension methods, same optimizer, steps and data as PI-FT."""
    standard = {"kind": "standard", "target_len": TOY_TARGET}
    short = {"seq_len": "auto"}  # R = L0: E2-LLM and PoSE train at the original window
    b_min, b_max = toy_harpe_bases(theta)
    longrecipe = {"kind": "longrecipe", "target_len": TOY_TARGET, "train_len_ratio": 0.3,
                  "selection": {"mode": "digits", "keep_other": 0.5},
                  "replay": {"steps": 8, "seq_len": TOY_L0}, "merge": {"weight_original": 0.5}}
    return [
        ("pi-ft-4x", "PI x4, fine-tuned at 512", {"kind": "linear"},
         {"method": {"kind": "standard", "target_len": 4 * TOY_L0}, "data": {"train": texts, "seq_len": 4 * TOY_L0}}),
        ("e2llm", "E2-LLM (g 1..8), trained at 128", {"kind": "none"},
         {"method": {"kind": "e2llm", "target_len": TOY_TARGET}, "data": {"train": texts, **short}}),
        ("pose", "PoSE (PI x8), trained at 128", {"kind": "linear"},
         {"method": {"kind": "pose", "target_len": TOY_TARGET}, "data": {"train": texts, **short}}),
        ("longrecipe", "LongRecipe (30 % length, digits, replay 8 + merge 0.5)", {"kind": "none"},
         {"method": longrecipe, "data": {"train": texts, **short}}),
        ("harpe", f"HARPE uniform {b_min:.0e}-{b_max:.0e}, fine-tuned at 1024", {"kind": "none"},
         {"method": {"kind": "harpe", "target_len": TOY_TARGET, "bases": {"kind": "uniform", "b_min": b_min, "b_max": b_max}}}),
        ("abf-max", f"ABF single base {b_max:.0e}, fine-tuned at 1024", {"kind": "none", "theta": b_max}, {"method": standard}),
        ("abf-mean", f"ABF single base {(b_min + b_max) / 2:.0e}, fine-tuned at 1024",
         {"kind": "none", "theta": (b_min + b_max) / 2}, {"method": standard}),
    ]


# ---------------------------------------------------------------------------------------- longgen
# Sparse settings per model [choice]: the toy sees a budget of L0 (4 sinks + 124), 1/8 of its 1024 target;
# SmolLM2 64 sinks + 960 = 1k, 1/16 of 16k (the paper keeps about 2k of 128k, 1/64; 1/16 gives its reported
# 62 % KV saving with a third of the layers full). Both: the middle third of the layers full.
TOY_SPARSE = {"type": "attn_sink", "sink_tokens": 4, "window": 124}
SMOL_SPARSE = {"type": "attn_sink", "sink_tokens": 64, "window": 960}
TOY_THETA = 2.0e5  # ABF for 128 -> 1024, both arms: 2 x the toy base (1e5; it was 20 x the first base)
ARMS = ("longgen", "full")


def longgen_cases(quick: bool) -> list[dict]:
    """LongGen against the same model with every layer full (longext/bench/longgen.py measures the efficiency cases)."""
    checksum = toy_checksum(TOY_DIR)
    cases = []
    settings = [("toy", TOY_TARGET, TOY_SPARSE, 3 if quick else 10)]
    if not quick:  # SmolLM2 at 16k: minutes per full-attention prefill and step on 2 cores
        settings.append(("smollm2", SMOL_TARGET, SMOL_SPARSE, 1))
    for model, length, sparse, repeats in settings:
        for measure in ("prefill", "train"):
            for arm in ARMS:
                case = {"kind": "longgen", "name": f"longgen-{model}-{measure}-{arm}", "measure": measure,
                        "model": model, "length": length, "arm": arm, "sparse": sparse, "repeats": repeats,
                        "gradient_checkpointing": model == "smollm2", "tiled_loss": model == "smollm2"}
                if model == "toy":
                    case["toy_base"] = checksum
                cases.append(case)
    return cases + passkey_cases(quick, checksum)


def passkey_cases(quick: bool, checksum: str) -> list[dict]:
    """LongGen vs all-full on the toy base, same recipe except the method block (same optimizer and budget)."""
    settings, train = toy_eval_settings(quick, quick_windows=4), toy_finetune(quick)
    rope = {"kind": "none", "theta": TOY_THETA}
    methods = {
        "longgen": ("LongGen (1 of 4 layers full, sinks 4 + window 124), ABF 2e5, fine-tuned at 1024",
                    {"kind": "longgen", "target_len": TOY_TARGET, "sparse": TOY_SPARSE}),
        "full": ("all layers full, ABF 2e5, fine-tuned at 1024", {"kind": "standard", "target_len": TOY_TARGET}),
    }
    return [
        {"kind": "model", "name": f"longgen-toy-passkey-{arm}", "label": label, "train": True, "arm": arm,
         "toy_base": checksum, "eval": settings,
         "recipe": with_retrieval_docs({**toy_recipe(f"longgen-toy-{arm}", rope, train, TOY_DIR), "method": method})}
        for arm, (label, method) in methods.items()
    ]


def with_retrieval_docs(recipe: dict) -> dict:
    """Both arms fine-tune on books plus passkey documents (bench/retrieval.py): on books alone every toy
    fine-tune lost retrieval, which would make the passkey comparison 0 against 0."""
    return {**recipe, "data": {**recipe["data"], "train": toy_train_texts(TOY_DIR)}}


# ---------------------------------------------------------------------------------------- memory
def memory_cases(quick: bool) -> list[dict]:
    """Peak memory of one training step (LoRA r8 q/k/v/o, fp32, torch AdamW, DeepSpeed engine) across ZeRO stages,
    lengths and gradient checkpointing; the tiny model also with the tiled loss and TiledMLP, both models with the
    fused norm. SmolLM2 steps once (a 4k step takes minutes here; its AdamW state is 7 MB), the tiny model twice
    (the second step runs with the optimizer state allocated)."""
    rows = [("tiny", 1024, 0, False), ("tiny", 1024, 2, False), ("tiny", 1024, 3, False),
            ("tiny", 2048, 2, False), ("tiny", 2048, 2, True), ("tiny", 4096, 0, False), ("tiny", 4096, 2, False),
            ("tiny", 4096, 3, False), ("tiny", 4096, 2, True), ("tiny", 4096, 3, True),
            ("smollm2", 2048, 0, False), ("smollm2", 2048, 2, False), ("smollm2", 2048, 3, False),
            ("smollm2", 2048, 2, True), ("smollm2", 4096, 2, False), ("smollm2", 4096, 2, True)]
    if quick:
        rows = [r for r in rows if r[0] == "tiny" and r[1] <= 2048]
    cases = [{"kind": "memory", "name": f"mem-{m}-{L // 1024}k-z{z}{'-gc' if gc else ''}", "model": m, "seq_len": L,
              "zero_stage": z, "gradient_checkpointing": gc, "steps": 2 if m == "tiny" and L <= 2048 else 1}
             for m, L, z, gc in rows]
    if not quick:
        cases.append({"kind": "memory", "name": "mem-tiny-4k-z2-tiled", "model": "tiny", "seq_len": 4096,
                      "zero_stage": 2, "gradient_checkpointing": False, "steps": 1, "tiled_loss": True,
                      "tiled_mlp": True})
        # the fused RMSNorm (longext.savers.RMSNormFunction): its own saved tensors and row-chunked backward
        cases += [{"kind": "memory", "name": f"mem-{m}-4k-z2-gc-fused", "model": m, "seq_len": 4096, "zero_stage": 2,
                   "gradient_checkpointing": True, "steps": 1, "fused_norm": True} for m in ("tiny", "smollm2")]
        # the same steps with RSS following the live tensors (no glibc retention): the formulas alone
        cases += [{**c, "name": c["name"] + "-live", "live_peak": True} for c in cases
                  if c["name"] in ("mem-tiny-2k-z2", "mem-smollm2-2k-z0")]
        cases += moe_memory_cases()
    return cases


def moe_memory_cases() -> list[dict]:
    """The tiny model as a mixture of experts (8 experts, top 2; longext.bench.memory's tiny-moe): LoRA on the
    attention (the default) at 2k and 4k, with checkpointing, on the experts too, and one with RSS following the live
    tensors. Its MoE blocks keep 2 x (3 intermediates + the expert output) per token where a dense MLP keeps 3."""
    base = {"kind": "memory", "model": "tiny-moe", "steps": 2, "gradient_checkpointing": False}
    return [{**base, "name": "mem-tiny-moe-2k-z2", "seq_len": 2048, "zero_stage": 2},
            {**base, "name": "mem-tiny-moe-2k-z2-live", "seq_len": 2048, "zero_stage": 2, "live_peak": True},
            {**base, "name": "mem-tiny-moe-4k-z0", "seq_len": 4096, "zero_stage": 0, "steps": 1},
            {**base, "name": "mem-tiny-moe-4k-z2-gc", "seq_len": 4096, "zero_stage": 2, "steps": 1,
             "gradient_checkpointing": True},
            {**base, "name": "mem-tiny-moe-2k-z2-experts", "seq_len": 2048, "zero_stage": 2, "lora_experts": True}]


# ------------------------------------------------------------------------------------------ data
DATA_SIZES = {"25M": 25_000_000, "100M": 100_000_000}
DATA_QUICK = {"1M": 1_000_000}  # checks the suite end to end in minutes; its figures say little


def data_cases(quick: bool) -> list[dict]:
    """Per corpus size: cold preparation, warm start and resume to the first optimizer step; 2 ranks against 1 at
    the smaller size (bench/data.py)."""
    sizes = DATA_QUICK if quick else DATA_SIZES
    cases = [{"kind": "data", "name": f"data-{size}-{what}", "size": size, "tokens": tokens, "measure": what,
              "seq_len": 1024} for size, tokens in sizes.items() for what in ("cold", "warm", "resume")]
    first, tokens = next(iter(sizes.items()))
    return cases + [{"kind": "data", "name": f"data-{first}-ranks", "size": first, "tokens": tokens,
                     "measure": "ranks", "seq_len": 1024}]
