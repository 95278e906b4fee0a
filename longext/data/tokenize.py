"""The one-time build of a source's token files, streaming: rows are read one at a time, tokenized in batches by
the fast (Rust) tokenizer, and appended to flat files, so memory holds one batch whatever the corpus size.

Files written into the build folder (see longext.data.cache for the manifest that makes them trusted):
    tokens.u32  every document's token ids, no special tokens added, one after another (uint32)
    docs.i64    document offsets into tokens.u32, [documents + 1] (int64)
    loss.u8     only for sources with chat rows and data.loss_on assistant: 1 where a token is learned (uint8)
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from longext.data.chat import ChatProblem, chat_text, loss_mask, require_chat_template
from longext.data.checks import BadRow, bad_rows_error, document_of
from longext.data.pieces import encode_texts
from longext.data.sources import Source, read_rows

TOKENS, DOCS, LOSS = "tokens.u32", "docs.i64", "loss.u8"
BATCH_CHARS = 1 << 21  # characters per tokenizer call (~0.5M tokens): big enough for the Rust threads, small in RAM
BATCH_DOCS = 2048
KEPT_BAD_ROWS = 20  # bad rows remembered by name (the manifest and the error); the rest are counted

Progress = Callable[[int, int, int, bool], None]  # (bytes read, tokens written, documents written, finished)


@dataclass
class BuildResult:
    documents: int = 0
    tokens: int = 0
    chat_documents: int = 0
    has_loss_mask: bool = False
    bad_rows: int = 0
    bad_examples: list[BadRow] = field(default_factory=list)


class _TokenFiles:
    """Appends documents to tokens.u32 (and loss.u8 once a chat document with a mask arrives)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.tokens = open(folder / TOKENS, "wb")
        self.loss = None
        self.lengths: list[int] = []
        self.n_tokens = 0

    def write(self, docs: list[np.ndarray], masks: list[np.ndarray | None]) -> None:
        if any(m is not None for m in masks) and self.loss is None:
            self.loss = open(self.folder / LOSS, "wb")
            _write_ones(self.loss, self.n_tokens)  # text documents before the first chat one: every token learned
        if docs:
            np.concatenate(docs).tofile(self.tokens)
        if self.loss is not None and docs:
            learned = [m if m is not None else np.ones(len(d), np.uint8) for d, m in zip(docs, masks)]
            np.concatenate(learned).tofile(self.loss)
        self.lengths += [len(d) for d in docs]
        self.n_tokens += sum(len(d) for d in docs)

    def close(self) -> None:
        for f in (self.tokens, self.loss):
            if f is not None:
                f.flush()
                os.fsync(f.fileno())
                f.close()
        offsets = np.zeros(len(self.lengths) + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=offsets[1:])
        offsets.tofile(self.folder / DOCS)


def _write_ones(f, count: int, chunk: int = 1 << 24) -> None:
    while count > 0:
        np.ones(min(chunk, count), dtype=np.uint8).tofile(f)
        count -= chunk


def build_token_files(source: Source, tokenizer, folder: Path, loss_on: str, bad_budget: int,
                      progress: Progress = lambda *a: None, model_path: str = "") -> BuildResult:
    """Tokenize every row of `source` into `folder`. Bad rows are skipped and counted; once there are more than
    `bad_budget`, tokenizing stops but reading goes on (to name them all) and bad_rows_error is raised."""
    out, files = BuildResult(), _TokenFiles(folder)
    rows = _Rows(source, tokenizer, loss_on, model_path)
    pending: list[tuple[str, str, list | None]] = []  # (kind, text, loss spans or None) in row order
    chars = 0
    try:
        for row, done in read_rows(source):
            doc = rows.document(row)
            if isinstance(doc, str):
                _count_bad(out, BadRow(row.where, doc))
                continue
            if out.bad_rows > bad_budget:
                continue  # over the limit: only checking the rest now
            pending.append(doc)
            chars += len(doc[1])
            if chars >= BATCH_CHARS or len(pending) >= BATCH_DOCS:
                _flush(pending, tokenizer, files, out)
                pending, chars = [], 0
                progress(done, files.n_tokens, len(files.lengths), False)
        if out.bad_rows > bad_budget:
            raise bad_rows_error(out.bad_examples, out.bad_rows, bad_budget, source.field)
        _flush(pending, tokenizer, files, out)
    finally:
        files.close()
    progress(source.total_bytes() or 0, files.n_tokens, len(files.lengths), True)
    out.documents, out.tokens, out.has_loss_mask = len(files.lengths), files.n_tokens, files.loss is not None
    return out


class _Rows:
    """A raw row as a document to tokenize: ("text", text, None) or ("chat", text, learned spans or None), or the
    reason it is a bad row."""

    def __init__(self, source: Source, tokenizer, loss_on: str, model_path: str):
        self.source, self.tokenizer, self.loss_on, self.model_path = source, tokenizer, loss_on, model_path
        self.template_checked = False

    def document(self, row) -> tuple[str, str, list | None] | str:
        if row.problem is not None:
            return row.problem
        doc = document_of(row.value, self.source.text_field, self.source.settings["messages_field"])
        if isinstance(doc, str) or doc[0] == "text":
            return doc if isinstance(doc, str) else ("text", doc[1], None)
        if not self.template_checked:  # a tokenizer without a template is one error for the source, not a bad row
            require_chat_template(self.tokenizer, self.source.field, self.model_path)
            self.template_checked = True
        try:
            text, spans = chat_text(self.tokenizer, doc[1], self.loss_on)
        except ChatProblem as problem:
            return str(problem)
        return "chat", text, spans if self.loss_on == "assistant" else None


def _count_bad(out: BuildResult, bad: BadRow) -> None:
    out.bad_rows += 1
    if len(out.bad_examples) < KEPT_BAD_ROWS:
        out.bad_examples.append(bad)


def _flush(pending: list, tokenizer, files: _TokenFiles, out: BuildResult) -> None:
    """Tokenize a batch (plain text without offsets, the fast path; chats with offsets for their masks)."""
    if not pending:
        return
    backend = tokenizer.backend_tokenizer
    plain = [text for kind, text, spans in pending if spans is None]
    chats = [(text, spans) for kind, text, spans in pending if spans is not None]
    with tokenizer_threads():
        plain_ids = iter(encode_texts(backend, plain))  # long texts in pieces (bounded tokenizer memory)
        chat_enc = iter(backend.encode_batch([t for t, _ in chats], add_special_tokens=False)) if chats else iter(())
    docs, masks, spans_left = [], [], iter(chats)
    for kind, _, spans in pending:
        if spans is None:
            docs.append(np.asarray(next(plain_ids), dtype=np.uint32))
            masks.append(None)
        else:
            enc, (_, spans) = next(chat_enc), next(spans_left)
            docs.append(np.asarray(enc.ids, dtype=np.uint32))
            masks.append(loss_mask(enc.offsets, spans))
        out.chat_documents += kind == "chat"
    files.write(docs, masks)


@contextmanager
def tokenizer_threads():
    """The Rust tokenizer's threads for one batch. TOKENIZERS_PARALLELISM=false, which the Makefile and many users
    set to silence the warning tokenizers prints when a process forks after using threads, is restored right after:
    nothing forks inside the build, and only one process per node builds."""
    key = "TOKENIZERS_PARALLELISM"
    before = os.environ.get(key)
    os.environ[key] = "true"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before
