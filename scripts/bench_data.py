"""Measure the data pipeline (issue 17): cold preparation speed and peak RSS, warm start to the first optimizer step,
and the in-memory path it replaces, on corpora cut from the offline books at several sizes.

    python scripts/bench_data.py --tokens 25M,100M --out bench-data [--legacy 25M] [--doc docs/data.md]

For each size it writes a jsonl corpus (the training books cut into documents of 2k-60k characters at whitespace,
shuffled, cut again with other seeds until the size is reached), a tiny Llama with SmolLM2's tokenizer, and a
recipe training 2 steps at 1024 tokens; then it runs, each in a fresh process whose peak RSS is read with wait4:
    cold      `longext data prepare` with an empty cache folder
    warm      `longext train` (2 steps) with the cache present: seconds to the first optimizer step, and in all
    legacy    (sizes listed in --legacy) the in-memory path train used before: load_documents + tokenize_documents +
              pack, as in longext.data.documents / batches
The machine is shared on CI-like hosts: every figure carries the 1-minute load average around it. Results go to
<out>/results.json and, with --doc, between the `<!-- bench:data -->` markers of that page. Phase 2 of issue 17
turns this into `longext bench data`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from longext.lengths import parse_length  # noqa: E402

DOC_CHARS = (2_000, 60_000)
MARKERS = ("<!-- bench:data -->", "<!-- /bench:data -->")


# ------------------------------------------------------------------------------------------ corpus
def build_corpus(path: Path, tokens: int, tokenizer) -> dict:
    """A jsonl of book pieces with about `tokens` tokens (estimated from the books' tokens per character)."""
    from longext.materials.texts import book_files

    books = [p.read_text(encoding="utf-8") for p in book_files("train")]
    sample = "".join(books)[:2_000_000]
    per_char = len(tokenizer(sample, add_special_tokens=False)["input_ids"]) / len(sample)
    want_chars, chars, docs, seed = int(tokens / per_char), 0, 0, 0
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        while chars < want_chars:
            pieces = [p for book in books for p in _cut(book, random.Random(f"{seed}:{len(book)}"))]
            random.Random(seed).shuffle(pieces)
            for piece in pieces:
                if chars >= want_chars:
                    break
                f.write(json.dumps({"text": piece}) + "\n")
                chars, docs = chars + len(piece), docs + 1
            seed += 1
    tmp.replace(path)
    return {"documents": docs, "characters": chars, "bytes": path.stat().st_size, "tokens_per_char": per_char}


def _cut(text: str, rng: random.Random) -> list[str]:
    out, at = [], 0
    while at < len(text):
        end = min(len(text), at + rng.randint(*DOC_CHARS))
        space = text.find(" ", end)
        end = len(text) if space < 0 or len(text) - space < DOC_CHARS[0] else space
        if text[at:end].strip():
            out.append(text[at:end])
        at = end
    return out


def build_tiny_model(folder: Path) -> None:
    """A 2-layer Llama with SmolLM2's vocabulary and tokenizer: the model side costs next to nothing."""
    if (folder / "config.json").is_file():
        return
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from longext.materials.cache import smollm2_dir

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def write_recipe(out: Path, name: str, corpus: Path, model: Path) -> Path:
    recipe = {
        "name": name,
        "model": {"path": str(model)},
        "method": {"kind": "standard", "target_len": 1024},
        "rope": {"kind": "none"},
        "data": {"train": [str(corpus)], "seq_len": 1024, "cache_dir": str(out / "cache" / name)},
        "train": {"steps": 2, "lr": 1.0e-4, "zero_stage": 0, "memory_check": "off"},
        "output": {"dir": str(out / "runs" / name), "overwrite": True},
    }
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


# ------------------------------------------------------------------------------------------ measuring
def measure(cmd: list[str], watch: Path | None = None) -> dict:
    """Run `cmd` in a fresh process: wall seconds, peak RSS (MB, from wait4), and with `watch` the seconds until
    that file first has a line (metrics.jsonl: the first optimizer step)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(Path(cmd[-1]).parent / "hf-datasets")}  # the in-memory path's Arrow files
    load = os.getloadavg()[0]
    began, first = time.perf_counter(), None
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if watch is not None and first is None and watch.is_file() and watch.read_text().strip():
            first = time.perf_counter() - began
        time.sleep(0.02)
    wall = time.perf_counter() - began
    output = proc.stdout.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{output}")
    return {"seconds": round(wall, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024), "first_step_seconds":
            round(first, 2) if first is not None else None, "load": [round(load, 2), round(os.getloadavg()[0], 2)]}


LEGACY = """
import sys, time
from transformers import AutoTokenizer
from longext.data.batches import pack
from longext.data.documents import load_documents, tokenize_documents
tokenizer = AutoTokenizer.from_pretrained(sys.argv[2])
ids = tokenize_documents(load_documents([__import__("pathlib").Path(sys.argv[1])]), tokenizer)
samples = pack(ids, 1024, tokenizer.eos_token_id)
print(len(samples))
"""


def run_size(out: Path, label: str, tokens: int, legacy: bool) -> dict:
    from transformers import AutoTokenizer

    model = out / "tiny-smollm2-vocab"
    build_tiny_model(model)
    corpus = out / f"corpus-{label}.jsonl"
    meta_path = corpus.with_suffix(".json")
    if not corpus.is_file() or not meta_path.is_file():
        meta_path.write_text(json.dumps(build_corpus(corpus, tokens, AutoTokenizer.from_pretrained(model))))
    result = {"size": label, "corpus": json.loads(meta_path.read_text())}
    recipe = write_recipe(out, f"data-{label}", corpus, model)
    cache = out / "cache" / f"data-{label}"
    subprocess.run(["rm", "-rf", str(cache)], check=True)
    longext = [sys.executable, "-m", "longext"]
    result["cold"] = measure([*longext, "data", "prepare", str(recipe)])
    (manifest,) = [json.loads(p.read_text()) for p in cache.glob("*/manifest.json")]
    result["tokens"] = manifest["tokens"]
    result["cold"]["tokens_per_s"] = round(manifest["tokens"] / result["cold"]["seconds"])
    result["cold"]["build_tokens_per_s"] = round(manifest["tokens"] / manifest["build_seconds"])
    metrics = out / "runs" / f"data-{label}" / "metrics.jsonl"
    result["warm"] = measure([*longext, "train", str(recipe)], watch=metrics)
    if legacy:
        result["legacy"] = measure([sys.executable, "-c", LEGACY, str(corpus), str(model)])
        result["legacy"]["tokens_per_s"] = round(manifest["tokens"] / result["legacy"]["seconds"])
    return result


# ----------------------------------------------------------------------------------------- reporting
def markdown(results: list[dict], machine: dict) -> str:
    lines = [
        f"Measured by `scripts/bench_data.py` on {machine['cpu']}, {machine['cores']} cores, {machine['ram_gb']} GB "
        f"RAM, shared with other jobs (1-minute load average before/after each figure in brackets). Tiny 2-layer "
        f"Llama with SmolLM2's tokenizer, seq_len 1024, `train` of 2 steps; every figure a fresh process.",
        "",
        "| corpus | tokens | cold `data prepare` | tokens/s | peak RSS | warm `train`: first step | whole run | "
        "peak RSS | in-memory path (before) | peak RSS |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        cold, warm, legacy = r["cold"], r["warm"], r.get("legacy")
        lines.append(
            f"| {r['size']} ({r['corpus']['bytes'] / 1e6:.0f} MB jsonl, {r['corpus']['documents']:,} docs) | "
            f"{r['tokens'] / 1e6:.1f}M | {cold['seconds']:.0f} s [{_load(cold)}] | {cold['tokens_per_s']:,} | "
            f"{cold['peak_rss_mb']:,} MB | {warm['first_step_seconds']:.1f} s [{_load(warm)}] | {warm['seconds']:.1f} s "
            f"| {warm['peak_rss_mb']:,} MB | "
            + (f"{legacy['seconds']:.0f} s, {legacy['tokens_per_s']:,} tokens/s [{_load(legacy)}] | "
               f"{legacy['peak_rss_mb']:,} MB |" if legacy else "not run | |"))
    return "\n".join(lines)


def _load(m: dict) -> str:
    return f"{m['load'][0]}/{m['load'][1]}"


def write_doc(doc: Path, text: str) -> None:
    page = doc.read_text(encoding="utf-8")
    start, end = MARKERS
    if start not in page or end not in page:
        raise SystemExit(f"{doc} has no {start} ... {end} section to replace")
    head, rest = page.split(start, 1)
    doc.write_text(head + start + "\n" + text + "\n" + end + rest.split(end, 1)[1], encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="25M,100M", help="corpus sizes, e.g. 25M,100M (M = 10^6 tokens)")
    parser.add_argument("--out", type=Path, default=Path("bench-data"))
    parser.add_argument("--legacy", default="", help="sizes at which to also run the in-memory path, e.g. 25M")
    parser.add_argument("--doc", type=Path, help="page with <!-- bench:data --> markers to write the table into")
    args = parser.parse_args()
    from longext.bench.run import machine

    args.out.mkdir(parents=True, exist_ok=True)
    sizes = [s.strip() for s in args.tokens.split(",") if s.strip()]
    legacy = {s.strip() for s in args.legacy.split(",") if s.strip()}
    results = []
    for label in sizes:
        tokens = int(float(label.rstrip("Mm")) * 1e6) if label[-1] in "Mm" else parse_length(label)
        results.append(run_size(args.out.absolute(), label, tokens, label in legacy))
        print(json.dumps(results[-1]), flush=True)
    info = machine()
    (args.out / "results.json").write_text(json.dumps({"machine": info, "results": results}, indent=1))
    table = markdown(results, info)
    print(table)
    if args.doc:
        write_doc(args.doc, table)


if __name__ == "__main__":
    main()
