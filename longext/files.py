"""Where longext reads and writes: recipe paths (`~`, `$LONGEXT_CACHE`), the cache folder, output checks made before
any work, and the one way every file and folder is written: to a temporary name beside the target, then renamed,
so an interrupted write leaves the old version or the new one, never half of one.

Standard library only: `eval`, `export`, `analyze` and `bench` check their outputs here before torch is imported,
so a bad `--out` answers at once.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from longext.errors import LongextError


# ------------------------------------------------------------------------------------------ paths
def cache_dir() -> Path:
    """`$LONGEXT_CACHE` if set, else `~/.cache/longext`."""
    return Path(os.environ.get("LONGEXT_CACHE") or Path.home() / ".cache" / "longext").expanduser().absolute()


def expand_path(path: str) -> str:
    """`~` and environment variables in a recipe path; `$LONGEXT_CACHE` defaults to cache_dir()."""
    for token in ("${LONGEXT_CACHE}", "$LONGEXT_CACHE"):
        path = path.replace(token, str(cache_dir()))
    return os.path.expanduser(os.path.expandvars(path))


# ------------------------------------------------------------------------------------ permissions
@functools.cache
def umask() -> int:
    """The process umask, read once (reading it means setting it, which is not thread-safe)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share_folder(path: Path) -> None:
    """mkdtemp makes 0700; give a published folder the permissions a plain mkdir would."""
    os.chmod(path, 0o777 & ~umask())


def share_tree(root: Path) -> None:
    """Every folder and file under `root` (and `root`) gets the permissions a plain mkdir or open would give: some
    writers make their files private (safetensors' weight files come out 0600) while the rest of a published folder
    follows the umask. A file with an execute bit keeps it (0777 & ~umask)."""
    share_folder(root)
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            mode = os.lstat(path).st_mode  # links are left alone: chmod would change what they point at
            if stat.S_ISDIR(mode) or stat.S_ISREG(mode):
                os.chmod(path, (0o777 if stat.S_ISDIR(mode) or mode & 0o111 else 0o666) & ~umask())


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


# --------------------------------------------------------------------------------- atomic writes
def write_atomic(path: Path, data: str | bytes) -> None:
    """Write `data` (text as UTF-8, or bytes) to `path`: a temp file beside it, then a rename. The file gets the
    permissions of any other file the user writes (mkstemp would leave it 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, doc: Any, indent: int = 2, default=None) -> None:
    """`doc` as indented JSON with a final newline, written atomically."""
    write_atomic(path, json.dumps(doc, indent=indent, default=default) + "\n")


@contextmanager
def staging_folder(final: Path, prefix: str | None = None) -> Iterator[Path]:
    """A new empty folder beside `final` (the same file system, so publish_folder's rename is atomic) with a plain
    mkdir's permissions; whatever is left of it is removed on the way out (nothing, once it is published)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=prefix or f".{final.name}.tmp-"))
    share_folder(tmp)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_folder(built: Path, final: Path, previous: Path | None = None) -> bool:
    """Rename the finished folder `built` to `final`. A folder already at `final` is moved aside first (a rename
    cannot replace a non-empty folder) and put back if the rename fails; afterwards it becomes `previous` (replacing
    what was there) or is deleted. Everything inside gets the umask's permissions first (share_tree). Returns whether
    `final` existed."""
    built, final = Path(built), Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if built.is_dir():  # (a missing one fails at the rename below, which rolls back)
        share_tree(built)
    if not final.exists():
        os.rename(built, final)
        return False
    aside = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.old-"))
    os.rename(final, aside / "old")
    try:
        os.rename(built, final)
    except OSError:
        os.rename(aside / "old", final)
        shutil.rmtree(aside, ignore_errors=True)
        raise
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
        os.rename(aside / "old", previous)
    shutil.rmtree(aside, ignore_errors=True)
    return True


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's entry to disk (a folder: the names created or renamed in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_of(path: Path) -> str:
    """The file's SHA-256, read 1 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def remove_abandoned(root: Path) -> None:
    """Delete the staging folders `.tmp-<pid>-...` under `root` of processes that no longer run (killed, power
    loss): a killed model conversion or cache build leaves hundreds of MB."""
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
