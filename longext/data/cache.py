"""The token cache of one source: its key, its manifest, one builder at a time, atomic publication, validation.

    $LONGEXT_CACHE/data/<name>-<hash>/     (or data.cache_dir, or $LONGEXT_DATA_CACHE)
        tokens.u32 docs.i64 [loss.u8]      see longext.data.tokenize
        manifest.json                      written last: format, key, what was read, counts, file sizes, checksums

The key hashes everything the token files depend on: the data files' identity (resolved path, size, mtime in ns;
a hub dataset's name, split and commit), the tokenizer (a hash of its serialized state and chat template), the
text and messages fields, data.loss_on, data.encoding_errors, and the format version. Filters, weights and packing
are applied when reading (longext.data.packing), so changing them never re-tokenizes.

A build runs in `.tmp-<pid>-…` next to its target, under an exclusive file lock (`.<key>.lock`): ranks started by
torchrun or DeepSpeed wait while one process builds, then read what it published. The manifest is written last and
the folder renamed into place, so an interrupted build leaves only a temp folder (removed by the next build once its
process is gone). A cache whose manifest is missing, unreadable, of another format or key, or whose files do not
have the sizes and checksums it records, is named in a warning and rebuilt, never used.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from longext.data.checks import BadRow
from longext.data.sources import Source
from longext.data.tokenize import DOCS, LOSS, TOKENS, BuildResult, build_token_files
from longext.files import fsync_path, publish_folder, remove_abandoned, sha256_of, staging_folder

FORMAT = 1  # bump when the files or their meaning change: older caches then count as foreign and are rebuilt
MANIFEST = "manifest.json"


class CacheDamaged(Exception):
    """A cache folder that must not be used; the message says why."""


@dataclass
class SourceCache:
    source: Source
    folder: Path
    manifest: dict
    tokens: np.ndarray  # uint32 [tokens], memory-mapped
    offsets: np.ndarray  # int64 [documents + 1], in memory (O(documents))
    loss: np.ndarray | None  # uint8 [tokens], memory-mapped, or None when every token is learned
    status: str = "reused"  # reused | built | rebuilt

    @property
    def documents(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def bad_rows(self) -> int:
        return self.manifest["bad_rows"]

    @property
    def bad_examples(self) -> list[BadRow]:
        return [BadRow(w, p) for w, p in self.manifest["bad_examples"]]


# --------------------------------------------------------------------------------------------- keys
def cache_root(cache_dir: str | None) -> Path:
    """data.cache_dir, else $LONGEXT_DATA_CACHE, else $LONGEXT_CACHE/data."""
    from longext.files import cache_dir as default_cache, expand_path

    chosen = cache_dir or os.environ.get("LONGEXT_DATA_CACHE")
    return Path(expand_path(chosen)).absolute() if chosen else default_cache() / "data"


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what tokenizes: the backend's serialized state (vocabulary, merges, normalizer, added tokens) and
    the chat template."""
    digest = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode())
    digest.update(repr(getattr(tokenizer, "chat_template", None)).encode())
    return digest.hexdigest()


def source_key(source: Source, fingerprint: str, settings: dict) -> str:
    """`<readable name>-<hash>`: the name is for people listing the folder, the hash decides."""
    described = {"format": FORMAT, "identity": source.identity(), "tokenizer": fingerprint,
                 "text_field": source.text_field, **settings}
    digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:20]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(source.label.rstrip("/")).name)[:40].strip("._") or "source"
    return f"{name}-{digest}"


# ----------------------------------------------------------------------------------- load or build
def load_or_build(source: Source, tokenizer, root: Path, settings: dict, bad_budget: int, *,
                  progress: Callable[[Source], Callable] | None = None,
                  say: Callable[[str], None] = lambda line: None, model_path: str = "",
                  fingerprint: str | None = None) -> SourceCache:
    """The source's valid cache: reused, or built (once per node: other processes wait on the lock). `fingerprint`:
    tokenizer_fingerprint(tokenizer), when the caller has it (it serializes the whole vocabulary)."""
    root.mkdir(parents=True, exist_ok=True)
    key = source_key(source, fingerprint or tokenizer_fingerprint(tokenizer), settings)
    target = root / key
    with exclusive(root / f".{key}.lock", lambda: say(f"waiting for another process to build the data cache {target}")):
        status = "built"
        if target.exists():
            try:
                return open_cache(target, key, source)
            except CacheDamaged as err:
                say(f"warning: the data cache {target} is damaged ({err}); rebuilding it")
                status = "rebuilt"
        remove_abandoned(root)
        with staging_folder(target, prefix=f".tmp-{os.getpid()}-{key}-") as tmp:
            began = time.perf_counter()
            result = build_token_files(source, tokenizer, tmp, settings["loss_on"], bad_budget,
                                       progress(source) if progress else lambda *a: None, model_path)
            _write_manifest(tmp, key, source, settings, result, time.perf_counter() - began)
            publish_folder(tmp, target)  # a damaged folder there is moved aside and deleted
            fsync_path(root)
    cache = open_cache(target, key, source)
    cache.status = status
    return cache


@contextmanager
def exclusive(lock_path: Path, on_wait: Callable[[], None]) -> Iterator[None]:
    with open(lock_path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            on_wait()
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------- manifest
def _write_manifest(folder: Path, key: str, source: Source, settings: dict, result: BuildResult, seconds: float) -> None:
    files = [TOKENS, DOCS] + ([LOSS] if result.has_loss_mask else [])
    manifest = {
        "format": FORMAT, "key": key, "source": source.label, "identity": source.identity(), "settings": settings,
        "text_field": source.text_field, "documents": result.documents, "tokens": result.tokens,
        "chat_documents": result.chat_documents, "has_loss_mask": result.has_loss_mask,
        "bad_rows": result.bad_rows, "bad_examples": [[b.where, b.problem] for b in result.bad_examples],
        "files": {name: (folder / name).stat().st_size for name in files},
        "sha256": {DOCS: sha256_of(folder / DOCS)},  # the small file; the big ones are checked by size
        "build_seconds": round(seconds, 3), "complete": True,
    }
    path = folder / MANIFEST
    with open(path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def open_cache(folder: Path, key: str, source: Source) -> SourceCache:
    """The cache in `folder`, checked against its manifest; CacheDamaged says what is wrong."""
    try:
        return _open_checked(folder, key, source)
    except (KeyError, TypeError, ValueError, AttributeError) as err:  # a manifest with values of the wrong type
        raise CacheDamaged(f"manifest.json has unexpected contents ({type(err).__name__}: {err})") from None


def _open_checked(folder: Path, key: str, source: Source) -> SourceCache:
    manifest = _read_manifest(folder, key)
    expected = {TOKENS: 4 * manifest["tokens"], DOCS: 8 * (manifest["documents"] + 1)}
    if manifest["has_loss_mask"]:
        expected[LOSS] = manifest["tokens"]
    for name, size in expected.items():
        path = folder / name
        if manifest["files"].get(name) != size:
            raise CacheDamaged(f"the manifest's size of {name} does not match its counts")
        if not path.is_file():
            raise CacheDamaged(f"{name} is missing")
        if path.stat().st_size != size:
            raise CacheDamaged(f"{name} has {path.stat().st_size} bytes, the manifest says {size}")
    if sha256_of(folder / DOCS) != manifest["sha256"][DOCS]:
        raise CacheDamaged(f"{DOCS} does not match its checksum")
    offsets = np.fromfile(folder / DOCS, dtype=np.int64)
    if offsets[0] != 0 or offsets[-1] != manifest["tokens"] or (np.diff(offsets) < 0).any():
        raise CacheDamaged(f"{DOCS} does not describe {manifest['tokens']} tokens")
    tokens = map_file(folder / TOKENS, np.uint32, manifest["tokens"])
    loss = map_file(folder / LOSS, np.uint8, manifest["tokens"]) if manifest["has_loss_mask"] else None
    return SourceCache(source, folder, manifest, tokens, offsets, loss)


def _read_manifest(folder: Path, key: str) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise CacheDamaged("no manifest.json: an interrupted or foreign build")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CacheDamaged(f"manifest.json is not readable JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise CacheDamaged(f"manifest format {found!r}, this longext reads format {FORMAT}")
    if manifest.get("key") != key:
        raise CacheDamaged(f"it belongs to another source or tokenizer (key {manifest.get('key')!r})")
    needed = ("complete", "tokens", "documents", "has_loss_mask", "files", "sha256", "bad_rows", "bad_examples")
    missing = [k for k in needed if k not in manifest]
    if missing or manifest["complete"] is not True:
        raise CacheDamaged(f"incomplete manifest (missing {', '.join(missing) or 'the complete marker'})")
    return manifest


def map_file(path: Path, dtype, count: int) -> np.ndarray:
    if count == 0:  # numpy cannot map an empty file
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))
