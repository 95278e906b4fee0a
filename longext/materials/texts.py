"""The texts a recipe names: `books` (a split of the prepared books), files, or folders of them."""

from __future__ import annotations

import json
from pathlib import Path

from longext.errors import LongextError
from longext.files import expand_path
from longext.materials.cache import BOOKS_SPEC, books_dir, is_complete

TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
SPLITS = ("train", "eval", "all")
NOT_PREPARED = "books are not prepared; run `longext models prepare books` (or `make materials`)"


def manifest() -> dict:
    if not is_complete(books_dir(), BOOKS_SPEC):
        raise LongextError(NOT_PREPARED)
    return json.loads((books_dir() / "manifest.json").read_text(encoding="utf-8"))


def book_files(split: str) -> list[Path]:
    """The prepared books of `split` ("train", "eval" or "all"), sorted by file name.

    Raises:
        LongextError: unknown split, or the books are not prepared.
    """
    if split not in SPLITS:
        raise LongextError(f"unknown book split {split!r}; choose one of: {', '.join(SPLITS)}")
    books = manifest()["books"]
    return sorted(books_dir() / b["file"] for b in books if split == "all" or b["split"] == split)


def resolve_texts(entries: list[str], split: str, field: str) -> list[Path]:
    """Expand a recipe's text list into files, in order, without duplicates.

    `books` means book_files(split); a .txt/.jsonl/.json/.parquet file means itself; a folder means
    its files with those suffixes (recursive, sorted, hidden ones skipped). `field` is the recipe
    field path (e.g. "data.train") that every error message starts with.
    """
    paths: list[Path] = []
    for entry in entries:
        path = Path(expand_path(entry))
        if entry == "books":
            try:
                paths += book_files(split)
            except LongextError as exc:
                raise LongextError(f"{field}: {exc}") from None
        elif path.is_file() and path.suffix.lower() in TEXT_SUFFIXES:
            paths.append(path)
        elif path.is_file():
            raise LongextError(f"{field}: {entry!r} is not a .txt, .jsonl, .json or .parquet file")
        elif path.is_dir():
            paths += _folder_texts(path, entry, field)
        else:
            raise LongextError(
                f"{field}: no such file or folder: {entry!r} "
                "(expected .txt, .jsonl, .json or .parquet files, folders of them, or `books`)"
            )
    return list(dict.fromkeys(paths))


def _folder_texts(folder: Path, entry: str, field: str) -> list[Path]:
    found = sorted(
        p for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )  # fmt: skip
    if not found:
        raise LongextError(f"{field}: folder {entry!r} has no .txt, .jsonl, .json or .parquet files")
    return found
