"""Passkey documents mixed into the toy suite's fine-tuning data.

Fine-tuning on books alone teaches nothing about retrieval, and the toy runs showed it: every method
fine-tuned at 8 x L0 on books lost the base's passkey skill even at L0 (bench history in
docs/benchmarks.md). Each document here is a passkey prompt in the evaluator's exact format
(`longext.evaluate.passkey`) followed by its answer, with filler sentences from the *training* books
(the evaluator fills with the eval books) and keys from a seed space the evaluator never uses, at
lengths spread from L0/2 to the target. The file is derived from the books, so it lives in the
materials cache and is rebuilt on demand, never committed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path


VERSION = 1


def retrieval_docs_entry(docs: int, min_len: int, max_len: int, seed: int = 0) -> str:
    """The data.train entry of the passkey documents: a path under $LONGEXT_CACHE that names its settings. Pure
    data (a case's JSON is its cache key): the file is written by `ensure_retrieval_docs` when a case runs."""
    return f"$LONGEXT_CACHE/bench/toy-retrieval-v{VERSION}-{docs}x{min_len}-{max_len}-s{seed}.jsonl"


def ensure_retrieval_docs(texts: list[str], tokenizer_dir: Path) -> None:
    """Write every retrieval entry of a recipe's data.train that is not there yet (same name -> same bytes)."""
    import re

    from longext.files import expand_path
    from longext.materials import book_files

    for entry in texts:
        found = re.search(r"toy-retrieval-v(\d+)-(\d+)x(\d+)-(\d+)-s(\d+)\.jsonl$", entry)
        if found is None or int(found.group(1)) != VERSION:
            continue
        path = Path(expand_path(entry))
        if not path.is_file():
            docs, min_len, max_len, seed = (int(g) for g in found.groups()[1:])
            _write(path, tokenizer_dir, book_files("train"), docs, min_len, max_len, seed)


def _write(path: Path, tokenizer_dir: Path, books: list[Path], docs: int, min_len: int, max_len: int, seed: int) -> None:
    from transformers import AutoTokenizer

    from longext.evaluate.passkey import filler_sentences, passkey_prompt, prompt_text
    from longext.files import write_atomic

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    sentences = filler_sentences(" ".join(p.read_text()[:200_000] for p in books))
    rng = random.Random(f"train-retrieval:{seed}")
    lines = []
    for _ in range(docs):
        key = str(rng.randrange(10_000, 100_000))
        length, depth = rng.randint(min_len, max_len), rng.random()
        start = rng.randrange(len(sentences) - 80)
        window = sentences[start : start + 80]  # passkey_prompt tokenizes its whole sentence list once per call
        prompt = passkey_prompt(tokenizer, length - 4, key, depth, window)  # -4: room for the answer
        _, text = prompt_text(window, 0, prompt.sentences_before, prompt.sentences_after, key)
        lines.append(json.dumps({"text": f"{text} {key}."}))
    write_atomic(path, "\n".join(lines) + "\n")
