"""Where commands write: checked before any work, published with the user's usual permissions.

Standard library only: `eval`, `export`, `analyze` and `bench` check their outputs here before torch is imported,
so a bad `--out` answers at once.
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

from longext.errors import LongextError


@functools.cache
def umask() -> int:
    """The process umask, read once (reading it means setting it, which is not thread-safe)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share_folder(path: Path) -> None:
    """mkdtemp makes 0700; give a published folder the permissions a plain mkdir would."""
    os.chmod(path, 0o777 & ~umask())


def check_writable(path: Path, flag: str, folder: bool = True) -> None:
    """Before any work: `path` (a folder, or a file when folder=False) can be created or replaced. Creates a probe
    in the nearest existing ancestor, so read-only mounts and pseudo file systems answer too.

    Raises:
        LongextError: the path is a file where a folder is wanted (or the reverse), or nothing can be written there.
    """
    path = Path(path)
    if path.exists() and folder and not path.is_dir():
        raise LongextError(f"{flag}: {path} is a file; give a folder")
    if path.is_dir() and not folder:
        raise LongextError(f"{flag}: {path} is a folder; give a file path")
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise LongextError(f"{flag}: {path}: {parent} is a file, not a folder")
    try:
        probe = tempfile.mkdtemp(dir=parent, prefix=".longext-probe-")
    except OSError as err:
        raise LongextError(f"{flag}: {path}: cannot write in {parent} ({err.strerror})") from None
    os.rmdir(probe)
