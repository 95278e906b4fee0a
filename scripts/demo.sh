#!/usr/bin/env bash
# `make demo`: the whole path on the built-in default, offline, on a CPU.
#   train recipes/demo.yaml -> eval (base and extended, same report) -> export -> eval the export.
# Needs `longext models prepare all` first (the Makefile's `demo` target does it).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=runs/demo
OUT=models/demo-16k
started=$(date +%s)

# Bold step titles on a terminal (or with FORCE_COLOR); plain text in a redirected log.
if [[ -t 1 || -n "${FORCE_COLOR:-}" ]]; then bold=$'\033[1m' plain=$'\033[0m'; else bold='' plain=''; fi
step() { printf '\n%s== %s%s\n' "$bold" "$*" "$plain"; }

step "1/4 train: SmolLM2-135M (8k window) -> 16k with YaRN x2 and a short LoRA run at 2k"
longext train recipes/demo.yaml --set output.overwrite=true

step "2/4 eval: the base model and the extended one at 4k and 12k (12k is past the 8k window)"
longext eval "$RUN" --baseline

step "3/4 export: merge the adapter, write a config any transformers user can load, check the logits"
longext export "$RUN" --out "$OUT" --force

step "4/4 eval the exported model with plain transformers loading"
longext eval "$OUT" --lengths 4k,12k --no-passkey --set perplexity.windows=1  # same settings as the run's eval

step "summary"
python - "$RUN/eval/eval.json" "evals/$(basename "$OUT")/eval.json" <<'PY'
import json, sys
run, exported = (json.load(open(p)) for p in sys.argv[1:])
def ppl(model, length):
    return model["perplexity"][str(length)]["ppl"]
short, long = 4096, 12288
rows = [(m["name"] + (" (untuned base)" if m.get("baseline") else " (extended)"), m) for m in run["models"]]
rows.append(("exported, reloaded with plain transformers", exported["models"][0]))
print(f"{'model':<45} {'ppl@4k':>8} {'ppl@12k':>8} {'12k/4k':>7}")
for name, m in rows:
    a, b = ppl(m, short), ppl(m, long)
    print(f"{name:<45} {a:8.2f} {b:8.2f} {b / a:7.2f}")
base = next(m for m in run["models"] if m.get("baseline"))
ext = next(m for m in run["models"] if not m.get("baseline"))
print()
print(f"base:     ppl(12k)/ppl(4k) = {ppl(base, long) / ppl(base, short):.2f}  (past its 8k window it collapses; > 2 expected)")
print(f"extended: ppl(12k)/ppl(4k) = {ppl(ext, long) / ppl(ext, short):.2f}  (within 20% of its own 4k figure expected)")
PY
echo
echo "reports: $RUN/eval/eval.md (ppl.png), evals/$(basename "$OUT")/eval.md; model: $OUT"
echo "demo took $(( $(date +%s) - started )) s"
