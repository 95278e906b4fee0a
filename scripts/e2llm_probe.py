"""Probe where E2-LLM's retrieval breaks on the toy base: passkey with the PI scale g forced, per window length.

Trains the toy suite's E2-LLM row (same recipe, optimizer and evaluation settings as `longext bench toy`), with
optional changes, then scores passkey retrieval at each length L for each g with g * L0 >= L / 2, instead of the
eval rule's single g = ceil(L / L0). Separates the two ways the row can fail past L0:

- positions: retrieval at L = L0 with g > 1 (positions the row trained on, window the base knows);
- window: retrieval at L > L0 with the g the row trained on (positions in range, more tokens than ever seen).

`--temperature` also scores each (L, g) with the attention logits multiplied by the given factors (sharper
attention against the longer window's dilution). Results go to --out/probe.json and a markdown table on stdout.

`--control` trains the positive control instead: can the toy retrieve at the target at all when trained there?
ABF (RoPE base 2e6, nothing compressed) fine-tuned at 1024 on the books plus 6000 passkey documents of 256-1024
tokens, evaluated with the toy suite's settings (perplexity and passkey at 128-1024).

    python scripts/e2llm_probe.py --out bench-runs/e2llm-probe/default
    python scripts/e2llm_probe.py --out bench-runs/e2llm-probe/g4 --docs 12000 --steps 1280 --scales 4 --temperature 1.2 1.4 2
    python scripts/e2llm_probe.py --out bench-runs/e2llm-probe/control --control --steps 1280
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

LENGTHS = (128, 256, 512, 1024)
SCALES = (1, 2, 4, 8)


def build_case(args) -> dict:
    from longext.bench import suites
    from longext.bench.retrieval import retrieval_docs_entry

    rows = {row[0]: row for row in suites.toy_method_rows(["books"], suites.toy_theta())}
    _, _, rope, changes = rows["e2llm"]
    finetune = {**suites.toy_finetune(False), "steps": args.steps}
    recipe = {**suites.toy_recipe("e2llm-probe", rope, finetune), **changes}
    if args.docs:
        recipe["data"] = {**recipe["data"], "train": ["books", retrieval_docs_entry(args.docs, 112, suites.TOY_L0)]}
    if args.scales:
        recipe["method"] = {**recipe["method"], "scales": [float(g) for g in args.scales]}
    return {"name": "e2llm-probe", "train": True, "recipe": recipe}


def control_case(args) -> dict:
    from longext.bench import suites
    from longext.bench.retrieval import retrieval_docs_entry

    finetune = {**suites.toy_finetune(False), "steps": args.steps}
    recipe = suites.toy_recipe("abf-control", {"kind": "none", "theta": 2.0e6}, finetune)
    recipe["data"] = {**recipe["data"], "train": ["books", retrieval_docs_entry(6000, 256, suites.TOY_TARGET)]}
    return {"name": "abf-control", "train": True, "recipe": recipe}


def run_control(args) -> int:
    from longext.bench.cases import evaluate, load_case_model
    from longext.bench.retrieval import ensure_retrieval_docs
    from longext.bench.suites import TOY_DIR, toy_eval_settings

    began = time.perf_counter()
    case = control_case(args)
    ensure_retrieval_docs(case["recipe"]["data"]["train"], TOY_DIR)
    loaded, _ = load_case_model(case, args.out)
    result = evaluate(loaded, toy_eval_settings(False))
    write_doc(args.out, {"argv": sys.argv[1:], "recipe": case["recipe"], "result": result,
                         "seconds": time.perf_counter() - began})
    print("| L | ppl | passkey |\n|---|---|---|")
    for length, row in result["passkey"].items():
        print(f"| {length} | {result['perplexity'][length]['ppl']:.2f} | {row['correct']}/{row['trials']} |")
    return 0


def write_doc(out: Path, doc: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "probe.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, out / "probe.json")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="run folder (the trained run goes to OUT/run)")
    p.add_argument("--steps", type=int, default=160, help="training steps (the toy suite's: 160)")
    p.add_argument("--docs", type=int, default=0,
                   help="add this many passkey documents of 112-128 tokens to the training books (0: books only)")
    p.add_argument("--scales", type=int, nargs="+", help="E2-LLM scale set G (default: the suite's 1..8)")
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--temperature", type=float, nargs="*", default=[], help="extra attention-logit factors to score")
    p.add_argument("--control", action="store_true", help="train and score the ABF positive control instead")
    args = p.parse_args(argv)
    if args.control:
        return run_control(args)

    from longext.bench.cases import load_case_model
    from longext.bench.retrieval import ensure_retrieval_docs
    from longext.bench.suites import TOY_DIR, TOY_L0
    from longext.evaluate.passkey import passkey_at_lengths
    from longext.materials import book_files
    from longext.recipe import PasskeySpec
    from longext.rotary import set_rope_scale

    began = time.perf_counter()
    case = build_case(args)
    ensure_retrieval_docs(case["recipe"]["data"]["train"], TOY_DIR)
    loaded, _ = load_case_model(case, args.out)
    model = loaded.model
    filler = "\n".join(f.read_text(encoding="utf-8") for f in book_files("eval"))[:60_000]
    spec = PasskeySpec(trials=args.trials, depths=[(i + 0.5) / 10 for i in range(10)])
    attention = [m for name, m in model.named_modules() if name.endswith("self_attn")]
    scaling = [m.scaling for m in attention]
    rows = []
    for length in LENGTHS:
        for g in SCALES:
            if g * TOY_L0 < length // 2:
                continue
            for temp in (1.0, *args.temperature):
                for module, s in zip(attention, scaling):
                    module.scaling = s * temp
                row = passkey_at_lengths(model, loaded.tokenizer, [length], spec, 0, filler=filler,
                                         set_length=lambda _length, g=g: set_rope_scale(model, float(g)))[length]
                rows.append({"length": length, "g": g, "temperature": temp, "correct": row["correct"],
                             "trials": row["trials"]})
                print(json.dumps(rows[-1]), flush=True)
    for module, s in zip(attention, scaling):
        module.scaling = s
    write_doc(args.out, {"argv": sys.argv[1:] if argv is None else argv, "recipe": case["recipe"], "rows": rows,
                         "seconds": time.perf_counter() - began})
    temps = (1.0, *args.temperature)
    print("\n| L | " + " | ".join(f"g={g}" + (f" x{t}" if t != 1.0 else "") for g in SCALES for t in temps) + " |")
    print("|---" * (1 + len(SCALES) * len(temps)) + "|")
    for length in LENGTHS:
        cells = []
        for g in SCALES:
            for t in temps:
                hit = [r for r in rows if r["length"] == length and r["g"] == g and r["temperature"] == t]
                cells.append(f"{hit[0]['correct']}/{hit[0]['trials']}" if hit else "–")
        print(f"| {length} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
