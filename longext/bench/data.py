"""`longext bench data` (issue 17): the data pipeline on corpora cut from the offline books, at about 25M and 100M
tokens, with SmolLM2's tokenizer and a tiny 2-layer Llama (the model side costs next to nothing).

A data case is a JSON-able dict:

    {"kind": "data", "name": "data-25M-cold", "size": "25M", "tokens": 25000000, "measure": "cold", "seq_len": 1024}

measure:
    cold    `longext data prepare` with an empty cache folder: seconds, tokens/s (whole command, and the build
            alone from the cache manifest), peak RSS: the data side's memory
    warm    `longext train` (2 steps) with the cache present: seconds to the first optimizer step (metrics.jsonl's
            first line), to the data being ready (the `data: ... ready in` line), the whole run, peak RSS; and the
            start-up broken down (python -X importtime's imports of the process)
    resume  `longext train --resume` one step further, from the warm run's last checkpoint: the same figures
    ranks   cold preparation of `train --nproc 2` (the launching process builds, the two ranks open) against a cold
            one-rank `train`: data seconds of each, and their ratio

Each command runs in a fresh process whose peak RSS is read with wait4 (the case's own process only starts and
watches them). The corpus (documents of 2k-60k characters cut at whitespace from the training books, shuffled,
cut again with other seeds until the size is reached) and the tiny model are built once under the suite's run
folder and shared by its cases; they are not measured.

    python -m longext.bench.data '<case json>' RESULT.json     (bench/fresh.py)
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from longext.bench.fresh import Measured, main, run_fresh

DOC_CHARS = (2_000, 60_000)
STEPS = 2
READY = re.compile(r"data: [\d,]+ rows of \d+ tokens ready in ([\d.]+) s")


def run_case(case: dict, case_dir: Path) -> Measured:
    return run_fresh("longext.bench.data", case, case_dir, timeout=6 * 3600, log=True)


def measure(case: dict, folder: Path) -> dict:
    shared = folder.parent.parent / "shared"  # <runs>/data[-quick]/shared: the corpus and model of every case
    model = tiny_model(shared / "tiny-smollm2-vocab")
    corpus = corpus_file(shared, case["size"], case["tokens"], model)
    what = case["measure"]
    result = {"corpus": json.loads(corpus.with_suffix(".json").read_text())}
    if what == "cold":
        result.update(cold(folder, corpus, model, case["seq_len"]))
    elif what in ("warm", "resume"):
        result.update(warm(shared, folder, corpus, model, case, resume=what == "resume"))
    else:
        result.update(ranks(folder, corpus, model, case["seq_len"]))
    _import_measured_code()
    return result


# --------------------------------------------------------------------------------------- the cases
def cold(folder: Path, corpus: Path, model: Path, seq_len: int) -> dict:
    cache = folder / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    recipe = write_recipe(folder, "cold", corpus, model, cache, seq_len)
    run, _ = command(["data", "prepare", str(recipe)])
    manifest = _manifest(cache)
    return {**run, "tokens": manifest["tokens"], "documents": manifest["documents"],
            "tokens_per_s": manifest["tokens"] / run["seconds"],
            "build_tokens_per_s": manifest["tokens"] / manifest["build_seconds"]}


def warm(shared: Path, folder: Path, corpus: Path, model: Path, case: dict, resume: bool) -> dict:
    """The cache of this corpus is shared by the warm and resume cases; it is built first when missing."""
    cache = shared / f"cache-{case['size']}"
    recipe = write_recipe(folder, "warm", corpus, model, cache, case["seq_len"])
    if not list(cache.glob("*/manifest.json")):
        command(["data", "prepare", str(recipe)])  # not measured: the cold case measures it
    metrics = folder / "runs" / "warm" / "metrics.jsonl"
    shutil.rmtree(folder / "runs", ignore_errors=True)
    if resume:
        command(["train", str(recipe)])  # the run to resume (not measured)
        run, log = command(["train", str(recipe), "--resume", "-s", f"train.steps={STEPS + 1}"], watch=metrics,
                           lines=STEPS + 1)
    else:
        run, log = command(["train", str(recipe)], watch=metrics, lines=1, importtime=True)
    return {**run, "tokens": _manifest(cache)["tokens"], "data_seconds": _ready(log)}


def ranks(folder: Path, corpus: Path, model: Path, seq_len: int) -> dict:
    """Cold preparation time of one rank against `--nproc 2` (separate empty caches)."""
    out = {}
    for n in (1, 2):
        cache = folder / f"cache-{n}"
        shutil.rmtree(cache, ignore_errors=True)
        recipe = write_recipe(folder, f"ranks-{n}", corpus, model, cache, seq_len)
        run, log = command(["train", str(recipe), "-s", "train.steps=1", *(["--nproc", "2"] if n == 2 else [])])
        # the `ready` lines: one rank's, or the launching process's and rank 0's (the other ranks print none)
        out[f"rank{'s' if n > 1 else ''}_{n}"] = {**run, "data_seconds": sum(map(float, READY.findall(log)))}
    out["ratio"] = out["ranks_2"]["data_seconds"] / out["rank_1"]["data_seconds"]
    return out


# ------------------------------------------------------------------------------------ measuring
def command(args: list[str], watch: Path | None = None, lines: int = 1, importtime: bool = False) -> tuple[dict, str]:
    """`longext ARGS` in a fresh process: (figures, its output). Figures: wall seconds, peak RSS (MB, wait4), with
    `watch` the seconds until that file has `lines` lines (metrics.jsonl: optimizer steps), with `importtime` the
    seconds its imports took (python -X importtime: total, and the largest top-level packages)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["HF_HUB_OFFLINE"] = "1"
    argv = [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "longext", *args]
    load = os.getloadavg()[0]
    began, first = time.perf_counter(), None
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output: list[str] = []
    reader = _drain(proc, output)
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if watch is not None and first is None and watch.is_file() and _lines(watch) >= lines:
            first = time.perf_counter() - began
        time.sleep(0.02)
    wall = time.perf_counter() - began
    reader.join(timeout=30)
    log = "".join(output)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"longext {' '.join(args)} failed:\n{log[-4000:]}")
    out = {"seconds": wall, "peak_rss_mb": usage.ru_maxrss / 1024, "first_step_seconds": first,
           "load": [round(load, 2), round(os.getloadavg()[0], 2)]}
    if importtime:
        out["imports"] = import_seconds(log)
        log = "\n".join(line for line in log.splitlines() if not line.startswith("import time:"))
    return out, log


def _drain(proc, output: list[str]):
    """Read the process's output in a thread (a full pipe would block it); returns the thread."""
    import threading

    def read():
        for line in iter(proc.stdout.readline, b""):
            output.append(line.decode(errors="replace"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return reader


def import_seconds(log: str, top: int = 6) -> dict:
    """python -X importtime's report: total seconds of top-level imports, and the largest packages."""
    by_package: dict[str, float] = {}
    for line in log.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\S.*)$", line)
        if m and not m.group(2).startswith(" "):  # a top-level import: its cumulative time includes its children
            name = m.group(2).strip().split(".")[0]
            by_package[name] = by_package.get(name, 0.0) + int(m.group(1)) / 1e6
    largest = dict(sorted(by_package.items(), key=lambda kv: -kv[1])[:top])
    return {"total": sum(by_package.values()), "largest": largest}


def _lines(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip())


def _ready(log: str) -> float:
    found = READY.findall(log)
    if not found:
        raise RuntimeError(f"no 'data: ... ready in' line in the output:\n{log[-3000:]}")
    return float(found[-1])


def _manifest(cache: Path) -> dict:
    (path,) = [p for p in cache.glob("*/manifest.json")]
    return json.loads(path.read_text())


def _import_measured_code() -> None:
    """The code the measured commands run, imported here so the case's result records its hash (bench/fresh.py)."""
    import longext.data.prepare  # noqa: F401
    import longext.launch  # noqa: F401
    import longext.run_data  # noqa: F401
    import longext.train  # noqa: F401


# ---------------------------------------------------------------------------------- corpus, model
def write_recipe(folder: Path, name: str, corpus: Path, model: Path, cache: Path, seq_len: int) -> Path:
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    recipe = {
        "name": name, "model": {"path": str(model)}, "method": {"kind": "standard", "target_len": seq_len},
        "rope": {"kind": "none"}, "data": {"train": [str(corpus)], "seq_len": seq_len, "cache_dir": str(cache)},
        "train": {"steps": STEPS, "lr": 1.0e-4, "zero_stage": 0, "memory_check": "off", "save_every": 1},
        "output": {"dir": str(folder / "runs" / name), "overwrite": True},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def tiny_model(folder: Path) -> Path:
    """A 2-layer Llama with SmolLM2's vocabulary and tokenizer."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from longext.materials.cache import smollm2_dir

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(0)
    tmp = folder.with_name(folder.name + ".tmp")
    LlamaForCausalLM(config).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, folder)
    return folder


def corpus_file(shared: Path, size: str, tokens: int, model: Path) -> Path:
    """shared/corpus-<size>.jsonl with about `tokens` tokens, and its description (.json), built once."""
    path = shared / f"corpus-{size}.jsonl"
    meta = path.with_suffix(".json")
    if not (path.is_file() and meta.is_file()):
        from transformers import AutoTokenizer

        shared.mkdir(parents=True, exist_ok=True)
        meta.write_text(json.dumps(build_corpus(path, tokens, AutoTokenizer.from_pretrained(model))))
    return path


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


if __name__ == "__main__":
    main(measure)
