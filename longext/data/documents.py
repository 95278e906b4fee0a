"""Whole documents in memory, for what needs the text itself rather than the token cache: evaluation texts and
`longext analyze` (a few documents at a time). Training reads the token caches (longext.data.prepare)."""

from __future__ import annotations

from pathlib import Path

from longext.errors import LongextError

SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def load_documents(paths: list[Path], text_field: str = "text") -> list[str]:
    """Texts of the given files through `datasets` (.txt: one document per file)."""
    from datasets import Dataset, load_dataset

    docs: list[str] = []
    for path in paths:
        kind = SUFFIXES.get(path.suffix)
        if kind is None:
            raise LongextError(f"data.train: unsupported file type {path.suffix!r}: {path} (allowed: {', '.join(SUFFIXES)})")
        if kind == "text":
            table = Dataset.from_dict({text_field: [path.read_text(encoding="utf-8", errors="replace")]})
        else:
            try:
                table = load_dataset(kind, data_files=str(path), split="train")
            except Exception as err:  # datasets raises many types for malformed files
                raise LongextError(f"data.train: cannot read {path}: {str(err).splitlines()[0]}") from None
        if text_field not in table.column_names:
            raise LongextError(
                f"data.text_field: column {text_field!r} not in {path} (columns: {', '.join(table.column_names)})"
            )
        docs.extend(t for t in table[text_field] if t)
    return docs


def tokenize_documents(docs: list[str], tokenizer) -> list[list[int]]:
    """Token ids of each document, no special tokens (EOS separators are added when packing)."""
    from datasets import Dataset

    table = Dataset.from_dict({"text": docs})
    table = table.map(
        lambda batch: {"ids": tokenizer(batch["text"], add_special_tokens=False)["input_ids"]},
        batched=True, remove_columns=["text"], desc=None,
    )
    return table["ids"]
