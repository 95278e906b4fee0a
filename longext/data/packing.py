"""From cached documents to training rows, lazily: which documents are used (holdout, max_docs, length filters,
mixture weights) and an index from row number to the spans of documents it holds. Only that index lives in memory
(O(documents)); a row's tokens are read from the memory-mapped token files when the row is asked for.

concat   the used documents, each followed by EOS, form one stream cut into seq_len rows (the remainder is
         dropped); row r is stream[r*L:(r+1)*L], found by a binary search over the documents' stream ends. Each
         document piece in a row gets a segment number, for the document mask (longext.data.masks).
per_doc  row r is document r: its first seq_len - 1 tokens and EOS, padded with EOS marked not real.

Mixture weights: weight w uses every document floor(w) times, plus a subset of round(frac(w) * n) documents picked
by a hash of (train.seed, source, document): the same seed picks the same documents on every rank and resume.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from longext.errors import LongextError


@dataclass
class SourceUse:
    """What one source gives the run, in documents and tokens (EOS separators not counted)."""

    label: str
    read_documents: int
    read_tokens: int
    bad_rows: int
    held_out: int = 0  # documents outside data.holdout_docs / data.max_docs
    filtered: int = 0  # documents outside [min_tokens, max_tokens]
    filtered_tokens: int = 0
    weight: float = 1.0
    documents: int = 0  # used, counting repeats
    tokens: int = 0


@dataclass
class Selection:
    source: np.ndarray  # int32 [used documents]: index into the caches
    document: np.ndarray  # int64 [used documents]: document index within its source
    uses: list[SourceUse]


# ------------------------------------------------------------------------------------------ selection
def select_documents(caches, data, seed: int) -> Selection:
    """The used documents in order: sources in data.train order, each source's documents in file order, repeats
    after the first pass. `data` is the recipe's DataSpec."""
    kept = _kept_counts([c.documents for c in caches], data.holdout_docs, data.max_docs)
    sources, documents, uses = [], [], []
    for i, (cache, keep) in enumerate(zip(caches, kept)):
        spec, lengths = cache.source.spec, cache.lengths
        use = SourceUse(cache.source.label, cache.documents, int(cache.offsets[-1]), cache.bad_rows,
                        held_out=cache.documents - keep, weight=spec.weight)
        index = np.arange(keep, dtype=np.int64)
        ok = np.ones(keep, dtype=bool)
        if spec.min_tokens:
            ok &= lengths[:keep] >= spec.min_tokens
        if spec.max_tokens:
            ok &= lengths[:keep] <= spec.max_tokens
        use.filtered, use.filtered_tokens = int((~ok).sum()), int(lengths[:keep][~ok].sum())
        chosen = _weighted(index[ok], spec.weight, seed, i)
        use.documents, use.tokens = len(chosen), int(lengths[chosen].sum())
        sources.append(np.full(len(chosen), i, dtype=np.int32))
        documents.append(chosen)
        uses.append(use)
    selection = Selection(np.concatenate(sources), np.concatenate(documents), uses)
    if len(selection.document) == 0:
        raise LongextError("data.train: no documents left to train on (check data.max_docs, data.holdout_docs and "
                           "the sources' min_tokens / max_tokens)")
    return selection


def _kept_counts(counts: list[int], holdout: int, max_docs: int | None) -> list[int]:
    """Documents kept from the start of each source: the last `holdout` of all documents are held out, then at
    most `max_docs` are used (max_docs never reaches into the held-out ones)."""
    total = max(0, sum(counts) - holdout)
    if max_docs:
        total = min(total, max_docs)
    kept = []
    for n in counts:
        kept.append(min(n, total))
        total -= kept[-1]
    return kept


def _weighted(index: np.ndarray, weight: float, seed: int, source: int) -> np.ndarray:
    whole, frac = int(weight), weight - int(weight)
    parts = [index] * whole
    extra = round(frac * len(index))
    if extra:
        scores = _mix(np.uint64(seed & 0xFFFFFFFF) * np.uint64(1_000_003) + np.uint64(source), index)
        parts.append(np.sort(index[np.argsort(scores, kind="stable")[:extra]]))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _mix(salt: np.uint64, index: np.ndarray) -> np.ndarray:
    """splitmix64 of (salt, index): a fixed pseudo-random score per document, the same with every numpy version."""
    with np.errstate(over="ignore"):
        z = index.astype(np.uint64) + salt * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


# ------------------------------------------------------------------------------------------------ rows
class PackedRows:
    """Rows of seq_len tokens over the selected documents, read from the memory-mapped caches on demand."""

    def __init__(self, caches, selection: Selection, seq_len: int, eos_id: int, mode: str = "concat"):
        self.caches, self.seq_len, self.eos, self.mode = caches, seq_len, eos_id, mode
        self.src, self.doc = selection.source, selection.document
        self.lengths = self._gather_lengths()  # int64 [used documents]
        if mode == "concat":
            self.ends = np.cumsum(self.lengths + 1)  # stream end (exclusive) of each document with its EOS
            self.n_rows = int(self.ends[-1]) // seq_len
            if self.n_rows == 0:
                raise LongextError(f"data.train: {int(self.ends[-1])} tokens in all, fewer than one sample of "
                                   f"data.seq_len {seq_len}")
        else:
            self.n_rows = len(self.doc)

    def _gather_lengths(self) -> np.ndarray:
        out = np.empty(len(self.doc), dtype=np.int64)
        for s, cache in enumerate(self.caches):
            mine = self.src == s
            out[mine] = cache.lengths[self.doc[mine]]
        return out

    def __len__(self) -> int:
        return self.n_rows

    def dropped_tokens(self) -> int:
        """Tokens of the used documents that no row holds: concat's last partial row, per_doc's truncations."""
        if self.mode == "concat":
            return int(self.ends[-1]) - self.n_rows * self.seq_len
        return int(np.maximum(self.lengths - (self.seq_len - 1), 0).sum())

    def rows(self, indices) -> dict[str, np.ndarray]:
        """input_ids int64, real bool, learn bool, segments int32, all [len(indices), seq_len]."""
        n, L = len(indices), self.seq_len
        out = {"input_ids": np.full((n, L), self.eos, dtype=np.int64), "real": np.zeros((n, L), dtype=bool),
               "learn": np.zeros((n, L), dtype=bool), "segments": np.zeros((n, L), dtype=np.int32)}
        for j, r in enumerate(indices):
            if self.mode == "concat":
                pieces = self._concat_pieces(int(r))
            else:  # the document's first L - 1 tokens and its EOS
                pieces = [(int(r), 0, min(int(self.lengths[r]), L - 1) + 1)]
            at = 0
            for segment, (k, lo, hi) in enumerate(pieces):
                ids, learn = self._piece(k, lo, hi)
                out["input_ids"][j, at:at + len(ids)] = ids
                out["learn"][j, at:at + len(ids)] = learn
                out["segments"][j, at:at + len(ids)] = segment
                at += len(ids)
            out["real"][j, :at] = True
            out["segments"][j, at:] = len(pieces)  # per_doc padding: a segment of its own
        return out

    def _concat_pieces(self, r: int) -> list[tuple[int, int, int]]:
        """(selected document, first, end) positions of each document piece in row r; position `length` is EOS."""
        a, b = r * self.seq_len, (r + 1) * self.seq_len
        k = int(np.searchsorted(self.ends, a, side="right"))
        pieces = []
        while k < len(self.ends):
            begin = int(self.ends[k] - self.lengths[k] - 1)
            if begin >= b:
                break
            pieces.append((k, max(a, begin) - begin, min(b, int(self.ends[k])) - begin))
            k += 1
        return pieces

    def _piece(self, k: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and learned flags of positions lo..hi-1 of selected document k (position `length`: EOS, learned
        when the document's last token is; per_doc's truncated documents end in EOS too)."""
        cache, d, length = self.caches[self.src[k]], int(self.doc[k]), int(self.lengths[k])
        start = int(cache.offsets[d])
        body_hi = min(hi, length) if self.mode == "concat" else hi - 1
        ids = np.asarray(cache.tokens[start + lo:start + body_hi], dtype=np.int64)
        learn = (np.ones(len(ids), dtype=bool) if cache.loss is None else
                 np.asarray(cache.loss[start + lo:start + body_hi], dtype=bool))
        if hi > body_hi:  # this piece ends with the document's EOS
            last = True if cache.loss is None else bool(cache.loss[start + length - 1])
            ids, learn = np.append(ids, self.eos), np.append(learn, last)
        return ids, learn
