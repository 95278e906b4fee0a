"""LongRecipe's selected sentences, cached on disk next to the token caches and read lazily like them.

The selection (methods.md §4.1.1-4.1.2) runs once over the prepared corpus (longext.data.prepare: every source's
token cache, the used documents after holdout, max_docs, filters and mixture weights), one document at a time:
each document and its EOS is split into sentences, the kept sentences' tokens are appended to a flat file, and the
offsets where kept sentences and documents begin are recorded. Rows are then cut from that stream like the old
in-memory samples (a sentence that does not fit continues in the next row, as a piece of its own there).

    <data cache>/longrecipe-<hash>/
        tokens.u32      the kept tokens, one document's kept sentences after another
        sentences.i64   where each kept sentence begins, and the stream's end
        documents.i64   where each document with a kept sentence begins, and the stream's end
        manifest.json   written last: format, key, counts, sizes, what was kept

The key hashes what the kept stream depends on: the token caches' keys (files, tokenizer, fields), which documents
are used in which order, train.seed (the draws), method.selection (mode, keep_other, top_fraction, the analysis
file's identity) and the format. A build holds the same lock as a token cache build: one process per node builds,
the others wait and read what it published.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from longext.data.cache import CacheDamaged, cache_root, exclusive, map_file
from longext.files import fsync_path, remove_abandoned
from longext.errors import LongextError
from longext.files import staging_folder, publish_folder

FORMAT = 1
TOKENS, SENTENCES, DOCUMENTS, MANIFEST = "tokens.u32", "sentences.i64", "documents.i64", "manifest.json"
FLUSH_TOKENS = 1 << 22  # kept tokens buffered before they are appended to the file


@dataclass
class SentenceRows:
    """Rows of seq_len tokens over the kept stream, read from the memory-mapped files on demand."""

    tokens: np.ndarray  # uint32, memory-mapped
    sentences: np.ndarray  # int64 [kept sentences + 1]
    documents: np.ndarray  # int64 [documents + 1]
    seq_len: int
    manifest: dict

    def __len__(self) -> int:
        return len(self.tokens) // self.seq_len

    def rows(self, indices) -> dict[str, np.ndarray]:
        """input_ids int64, real bool, segments (document piece number) and sentences (sentence piece number) int32,
        all [len(indices), seq_len]."""
        n, L = len(indices), self.seq_len
        out = {"input_ids": np.empty((n, L), dtype=np.int64), "real": np.ones((n, L), dtype=bool),
               "segments": np.empty((n, L), dtype=np.int32), "sentences": np.empty((n, L), dtype=np.int32)}
        for j, r in enumerate(indices):
            at = np.arange(int(r) * L, (int(r) + 1) * L)
            out["input_ids"][j] = self.tokens[at[0]:at[-1] + 1]
            for key, starts in (("segments", self.documents), ("sentences", self.sentences)):
                number = np.searchsorted(starts, at, side="right")
                out[key][j] = number - number[0]
        return out


# --------------------------------------------------------------------------------------------- build
def selected_rows(corpus, tokenizer, selection, seed: int, seq_len: int, cache_dir: str | None,
                  say=lambda line: None) -> SentenceRows:
    """The kept sentences of `corpus` (longext.data.prepare.Corpus) as rows: reused from the cache, or selected
    once (other processes wait on the lock). `selection` is the recipe's method.selection."""
    root = cache_root(cache_dir)
    key = selection_key(corpus, selection, seed, tokenizer.eos_token_id)
    target = root / key
    with exclusive(root / f".{key}.lock", lambda: say(f"waiting for another process to select sentences in {target}")):
        if target.exists():
            try:
                return open_selection(target, key, seq_len)
            except CacheDamaged as err:
                say(f"warning: the sentence cache {target} is damaged ({err}); rebuilding it")
        remove_abandoned(root)
        with staging_folder(target, prefix=f".tmp-{os.getpid()}-{key}-") as tmp:
            _build(corpus, tokenizer, selection, seed, tmp, key)
            publish_folder(tmp, target)
            fsync_path(root)
    rows = open_selection(target, key, seq_len)
    m = rows.manifest
    say(f"data: LongRecipe selection kept {m['tokens']:,} of {m['read_tokens']:,} tokens "
        f"({m['tokens'] / max(1, m['read_tokens']):.0%}) in {m['sentences']:,} sentences")
    return rows


def selection_key(corpus, selection, seed: int, eos: int) -> str:
    used = hashlib.sha256(corpus.selection.source.tobytes() + corpus.selection.document.tobytes()).hexdigest()
    described = {"format": FORMAT, "sources": [c.manifest["key"] for c in corpus.caches], "used": used, "seed": seed,
                 "eos": eos, "selection": selection.model_dump(mode="json"), "analysis": _analysis_identity(selection)}
    return "longrecipe-" + hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:20]


def _analysis_identity(selection) -> list | None:
    if selection.mode != "logit_change" or selection.analysis is None:
        return None
    from longext.files import expand_path

    path = Path(expand_path(selection.analysis))
    try:
        stat = path.stat()
    except OSError:
        return [str(path)]  # the build names the problem (load_impactful)
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def _build(corpus, tokenizer, selection, seed: int, folder: Path, key: str) -> None:
    from longext.methods.longrecipe.selection import impactful_ids, sentence_end_ids, token_texts

    texts = token_texts(tokenizer)
    eos = tokenizer.eos_token_id
    ends = np.array(sorted(sentence_end_ids(texts) | {eos}), dtype=np.uint32)
    impactful = impactful_ids(selection, texts)
    marked = None if impactful is None else np.array(sorted(impactful), dtype=np.uint32)
    gen = torch.Generator().manual_seed(seed)
    writer = _StreamWriter(folder)
    read = 0
    for s, d in zip(corpus.selection.source.tolist(), corpus.selection.document.tolist()):
        cache = corpus.caches[s]
        doc = np.append(np.asarray(cache.tokens[cache.offsets[d]:cache.offsets[d + 1]]), np.uint32(eos))
        read += len(doc)
        starts = sentence_starts(doc, ends)
        keep = kept_sentences(doc, starts, marked, selection.keep_other, gen)
        writer.add(doc, starts, keep)
    writer.close(key, read)


def sentence_starts(doc: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Where each sentence of `doc` begins: at 0 and after every sentence-end token (the end token included in its
    sentence), methods.md §4.1.1."""
    after = np.flatnonzero(np.isin(doc, ends)) + 1
    return np.concatenate([[0], after[after < len(doc)]]).astype(np.int64)


def kept_sentences(doc: np.ndarray, starts: np.ndarray, marked: np.ndarray | None, keep_other: float,
                   gen) -> np.ndarray:
    """Per sentence: kept when it holds an impactful token, or by a draw u < keep_other (one draw per sentence, in
    order, from one generator over the whole corpus); every sentence when there is no selection (mode none)."""
    if marked is None:
        return np.ones(len(starts), dtype=bool)
    draws = torch.rand(len(starts), generator=gen).numpy()
    holds = np.add.reduceat(np.isin(doc, marked).astype(np.int64), starts) > 0
    return (draws < keep_other) | holds


class _StreamWriter:
    """Appends kept sentences to tokens.u32 and records sentence and document starts."""

    def __init__(self, folder: Path):
        self.folder, self.file = folder, open(folder / TOKENS, "wb")
        self.pending: list[np.ndarray] = []
        self.sentences, self.documents = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        self.buffered = self.written = 0

    def add(self, doc: np.ndarray, starts: np.ndarray, keep: np.ndarray) -> None:
        if not keep.any():
            return
        lengths = np.diff(np.append(starts, len(doc)))
        kept = doc[np.repeat(keep, lengths)]
        at = self.written + self.buffered
        self.documents.append(np.array([at], np.int64))
        self.sentences.append(at + np.concatenate([[0], np.cumsum(lengths[keep])[:-1]]))
        self.pending.append(kept)
        self.buffered += len(kept)
        if self.buffered >= FLUSH_TOKENS:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            np.concatenate(self.pending).tofile(self.file)
        self.written += self.buffered
        self.pending, self.buffered = [], 0

    def close(self, key: str, read_tokens: int) -> None:
        self._flush()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        sentences = np.append(np.concatenate(self.sentences), self.written)
        documents = np.append(np.concatenate(self.documents), self.written)
        sentences.tofile(self.folder / SENTENCES)
        documents.tofile(self.folder / DOCUMENTS)
        manifest = {"format": FORMAT, "key": key, "tokens": self.written, "read_tokens": read_tokens,
                    "sentences": len(sentences) - 1, "documents": len(documents) - 1, "complete": True}
        with open(self.folder / MANIFEST, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------- open
def open_selection(folder: Path, key: str, seq_len: int) -> SentenceRows:
    """The cached selection in `folder`, checked against its manifest (CacheDamaged says what is wrong)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        if manifest.get("format") != FORMAT or manifest.get("key") != key or manifest.get("complete") is not True:
            raise CacheDamaged(f"manifest of another format or key, or incomplete ({folder / MANIFEST})")
        sizes = {TOKENS: 4 * manifest["tokens"], SENTENCES: 8 * (manifest["sentences"] + 1),
                 DOCUMENTS: 8 * (manifest["documents"] + 1)}
        for name, size in sizes.items():
            if (folder / name).stat().st_size != size:
                raise CacheDamaged(f"{name} has {(folder / name).stat().st_size} bytes, the manifest says {size}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CacheDamaged(f"unreadable ({type(err).__name__}: {err})") from None
    sentences = np.fromfile(folder / SENTENCES, dtype=np.int64)
    documents = np.fromfile(folder / DOCUMENTS, dtype=np.int64)
    rows = SentenceRows(map_file(folder / TOKENS, np.uint32, manifest["tokens"]), sentences, documents, seq_len,
                        manifest)
    if len(rows) == 0:
        raise LongextError(f"data.train: {manifest['tokens']} tokens left after method.selection, fewer than one "
                           f"sample of data.seq_len {seq_len}")
    return rows
