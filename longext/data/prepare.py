"""The data pipeline for a recipe: sources → token caches (reused or built once) → selected documents → packed rows
→ TrainData, with a progress bar while a cache is built.

`prepare_corpus` is what every rank calls; the first process to reach a source's lock builds it while the others
wait (longext.data.cache). `train --nproc` calls it once in the launching process before starting the ranks
(longext.run_data), after which every rank finds its caches ready.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

from longext.data.cache import SourceCache, cache_root, load_or_build, tokenizer_fingerprint
from longext.data.checks import bad_rows_error
from longext.data.packing import PackedRows, Selection, select_documents
from longext.data.sources import Source, resolve_sources


@dataclass
class Corpus:
    caches: list[SourceCache]
    selection: Selection
    rows: PackedRows
    seconds: float  # preparing (reading or building the caches, selecting, indexing)


def key_settings(data) -> dict:
    """What, besides the files and the tokenizer, changes a source's tokens (part of its cache key)."""
    return {"messages_field": data.messages_field, "loss_on": data.loss_on, "encoding_errors": data.encoding_errors}


def prepare_corpus(data, tokenizer, seq_len: int, seed: int, model_path: str = "", *,
                   progress: Callable[[Source], Callable] | None = None,
                   say: Callable[[str], None] = lambda line: None) -> Corpus:
    """Every source of `data` (the recipe's DataSpec) cached and validated, the used documents selected, and the
    row index built. Raises Problems for bad input (unreadable sources, more bad rows than data.max_bad_rows)."""
    began = time.perf_counter()
    settings = key_settings(data)
    sources = resolve_sources(data.train, data.text_field, settings)
    root, caches, bad = cache_root(data.cache_dir), [], 0
    fingerprint = tokenizer_fingerprint(tokenizer)  # once, not once per source
    for source in sources:
        cache = load_or_build(source, tokenizer, root, settings, data.max_bad_rows - bad, progress=progress, say=say,
                              model_path=model_path, fingerprint=fingerprint)
        caches.append(cache)
        bad += cache.bad_rows
        if bad > data.max_bad_rows:
            examples = [b for c in caches for b in c.bad_examples]
            raise bad_rows_error(examples, bad, data.max_bad_rows, "data.train")
    selection = select_documents(caches, data, seed)
    rows = PackedRows(caches, selection, seq_len, tokenizer.eos_token_id, data.packing)
    return Corpus(caches, selection, rows, time.perf_counter() - began)


def build_train_data(recipe, tokenizer, positions=None, draw_group: int = 1):
    """TrainData for a (resolved) recipe: rows packed lazily from the token caches."""
    from longext.data.batches import TrainData, contiguous_positions

    with build_progress(sys.stderr.isatty()) as (progress, say):
        corpus = prepare_corpus(recipe.data, tokenizer, recipe.seq_len, recipe.train.seed, recipe.model.path,
                                progress=progress, say=say)
        if os.environ.get("RANK", "0") == "0":
            say(f"data: {len(corpus.rows):,} rows of {recipe.seq_len} tokens ready in {corpus.seconds:.2f} s")
    return TrainData(corpus.rows, recipe.train.micro_batch_size, recipe.train.seed, positions or contiguous_positions,
                     draw_group, document_mask=recipe.data.document_mask is True)


# -------------------------------------------------------------------------------------------- progress
@contextmanager
def build_progress(live: bool = True, console=None) -> Iterator[tuple[Callable, Callable]]:
    """(progress factory, say) printing to stderr: a bar per source being built (bytes read, tokens, tokens/s,
    ETA) when `live`, and a line when each build ends."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    console = console or Console(stderr=True, highlight=False, soft_wrap=True)
    bar = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                   TextColumn("{task.fields[tokens]} tokens, {task.fields[rate]} tokens/s"), TimeRemainingColumn(),
                   console=console, disable=not live)

    def progress(source: Source) -> Callable[[int, int, int, bool], None]:
        task = bar.add_task(f"tokenizing {source.label}", total=source.total_bytes(), tokens="0", rate="-")
        began = time.perf_counter()

        def update(done: int, tokens: int, documents: int, finished: bool) -> None:
            seconds = time.perf_counter() - began
            bar.update(task, completed=done, tokens=f"{tokens:,}", rate=f"{tokens / max(seconds, 1e-9):,.0f}")
            if finished:
                console.print(f"data: tokenized {source.label}: {documents:,} documents, {tokens:,} tokens in "
                              f"{seconds:.1f} s ({tokens / max(seconds, 1e-9):,.0f} tokens/s)", markup=False)
        return update

    def say(line: str) -> None:
        console.print(line, markup=False)

    with bar:
        yield progress, say
