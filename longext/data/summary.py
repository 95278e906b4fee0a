"""What `longext data prepare` prints: per source what was read, skipped and used (the realized mixture, in tokens),
a histogram of document lengths, what packing drops, and where each cache is."""

from __future__ import annotations

import numpy as np

from longext.lengths import format_length

BINS = (0, 256, 1024, 4096, 16384, 65536, 262144, 1 << 62)  # document length bins, in tokens


def _bin_name(lo: int, hi: int) -> str:
    if hi >= 1 << 62:
        return f">= {format_length(lo)}"
    return f"< {format_length(hi)}" if lo == 0 else f"{format_length(lo)} - {format_length(hi)}"


def length_histogram(lengths: np.ndarray) -> list[tuple[str, int, int]]:
    """(bin, documents, tokens) over BINS for the used documents (repeats counted)."""
    which = np.searchsorted(np.array(BINS[1:]), lengths, side="right")
    return [(_bin_name(BINS[i], BINS[i + 1]), int((which == i).sum()), int(lengths[which == i].sum()))
            for i in range(len(BINS) - 1)]


def render_summary(corpus, recipe) -> list:
    """rich renderables for the console."""
    from rich import box
    from rich.table import Table

    rows = corpus.rows
    used_tokens = sum(u.tokens for u in corpus.selection.uses)
    mix = Table(title="sources: documents read, skipped and used; the realized mixture in tokens",
                title_justify="left", box=box.SIMPLE_HEAD)
    mix.add_column("source", overflow="fold", min_width=12)
    for name in ("read", "bad", "held out", "filtered", "weight", "used", "tokens", "share"):
        mix.add_column(name, justify="right", no_wrap=True)
    for u in corpus.selection.uses:
        mix.add_row(u.label, f"{u.read_documents:,}", f"{u.bad_rows:,}", f"{u.held_out:,}", f"{u.filtered:,}",
                    f"{u.weight:g}", f"{u.documents:,}", f"{u.tokens:,}", f"{u.tokens / max(used_tokens, 1):.1%}")
    hist = Table(title="document lengths (used documents, in tokens)", title_justify="left", box=box.SIMPLE_HEAD)
    for name in ("length", "documents", "tokens", ""):
        hist.add_column(name, justify="right" if name in ("documents", "tokens") else "left")
    buckets = length_histogram(rows.lengths)
    top = max(d for _, d, _ in buckets) or 1
    for name, docs, tokens in buckets:
        hist.add_row(name, f"{docs:,}", f"{tokens:,}", "#" * round(30 * docs / top))
    return [mix, hist, *_totals(corpus, recipe, used_tokens), *_caches(corpus)]


def _totals(corpus, recipe, used_tokens: int) -> list[str]:
    rows, data, t = corpus.rows, recipe.data, recipe.train
    longer = int((rows.lengths > rows.seq_len).sum())
    per_step = t.micro_batch_size * t.grad_accum
    need = t.steps * per_step
    cut = "the last partial row (concat)" if data.packing == "concat" else "truncation to seq_len (per_doc)"
    mask = {True: "on", False: "off"}.get(data.document_mask, data.document_mask)
    return [
        f"used: {len(rows.lengths):,} documents, {used_tokens:,} tokens; {longer:,} longer than seq_len "
        f"{rows.seq_len:,}",
        f"rows: {len(rows):,} of {rows.seq_len:,} tokens ({data.packing} packing, document mask {mask}); train.steps "
        f"{t.steps} x {per_step} rows per data-parallel rank = {need / len(rows):.2f} epochs on one rank",
        f"dropped: {rows.dropped_tokens():,} tokens by {cut}, "
        f"{sum(u.filtered_tokens for u in corpus.selection.uses):,} tokens by min_tokens/max_tokens, "
        f"{sum(u.bad_rows for u in corpus.selection.uses):,} bad rows, "
        f"{sum(u.held_out for u in corpus.selection.uses):,} documents held out (holdout_docs/max_docs)",
    ]


def _caches(corpus) -> list[str]:
    out = []
    for cache in corpus.caches:
        m = cache.manifest
        speed = f", built in {m['build_seconds']:.1f} s ({m['tokens'] / max(m['build_seconds'], 1e-9):,.0f} " \
                f"tokens/s)" if cache.status != "reused" else ""
        out.append(f"cache {cache.status}: {cache.folder} ({m['documents']:,} documents, {m['tokens']:,} tokens"
                   f"{', ' + format(m['chat_documents'], ',') + ' chats' if m['chat_documents'] else ''}{speed})")
    return out
