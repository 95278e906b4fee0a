"""data.train entries → sources, and sources → raw rows, one at a time (memory: one row, or one file for .txt/.json).

A source is one entry: files (a file, a folder, a glob, `books`), a folder written by `datasets` save_to_disk, or a
hub dataset streamed by `datasets` (a local folder laid out like a hub repo reads the same way, offline). Each row
comes with where it was (`file:line`, `file row N`) so bad rows can be named; each source has an identity (paths,
sizes, mtimes; or hub name and revision) that keys its token cache.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from longext.data.checks import text_problem
from longext.recipe.data import SourceSpec
from longext.errors import LongextError

SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
SAVED_MARKERS = ("dataset_info.json", "state.json")  # Dataset.save_to_disk
SAVED_DICT_MARKER = "dataset_dict.json"  # DatasetDict.save_to_disk
TABLE_BATCH = 1024  # rows per Arrow batch read from parquet / datasets


@dataclass(frozen=True)
class Row:
    where: str  # "file:line" or "file row N" (1-based)
    value: Any = None  # a dict (jsonl/json/table rows) or a str (.txt: the whole file)
    problem: str | None = None  # the row could not be read (invalid JSON, not UTF-8, ...)


@dataclass(frozen=True)
class Source:
    index: int  # position in data.train
    spec: SourceSpec
    kind: str  # files | saved | hub
    files: tuple[Path, ...] = ()  # the data files (files), the folder's files (saved, local hub folder)
    text_field: str = "text"
    settings: dict = field(default_factory=dict)  # messages_field, encoding_errors: what reading depends on

    @property
    def field(self) -> str:
        return f"data.train.{self.index}"

    @property
    def label(self) -> str:
        return self.spec.label

    def total_bytes(self) -> int | None:
        """Progress total: bytes of the data files (None for a remote stream)."""
        return sum(p.stat().st_size for p in self.files) if self.files else None

    def identity(self) -> dict:
        """What the cache key takes from the data itself: each file's path, size and mtime (ns)."""
        out: dict = {"kind": self.kind, "files": [_file_identity(p) for p in self.files]}
        if self.kind == "hub":
            out.update(hub=self.spec.hub, subset=self.spec.subset, split=self.spec.split, revision=self.spec.revision)
            if not self.files:
                out["commit"] = _hub_commit(self.spec)
        return out


def _file_identity(path: Path) -> list:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


# ---------------------------------------------------------------------------------------- resolving
def resolve_sources(specs: list[SourceSpec], text_field: str, settings: dict, field: str = "data.train") -> list[Source]:
    """Every entry as a Source; one error line per entry that names nothing readable."""
    from longext.errors import Problems

    sources, problems = [], []
    for i, spec in enumerate(specs):
        try:
            sources.append(_resolve(i, spec, spec.text_field or text_field, settings, f"{field}.{i}"))
        except LongextError as err:
            problems += err.lines()
    if problems:
        raise Problems(problems)
    return sources


def _resolve(index: int, spec: SourceSpec, text_field: str, settings: dict, where: str) -> Source:
    from longext.files import expand_path
    from longext.materials.texts import resolve_texts

    if spec.hub is not None:
        return _resolve_hub(index, spec, text_field, settings, where)
    entry = spec.path
    path = Path(expand_path(entry))
    if entry != "books" and path.is_dir() and _saved_dataset(path):
        files = tuple(sorted(p for p in path.rglob("*") if p.is_file()))
        return Source(index, spec, "saved", files, text_field, settings)
    if entry != "books" and not path.exists() and glob.has_magic(entry):
        files = _glob_files(expand_path(entry), entry, where)
    else:
        files = tuple(resolve_texts([entry], "train", where))
    return Source(index, spec, "files", files, text_field, settings)


def _saved_dataset(folder: Path) -> bool:
    return all((folder / m).is_file() for m in SAVED_MARKERS) or (folder / SAVED_DICT_MARKER).is_file()


def _glob_files(pattern: str, entry: str, where: str) -> tuple[Path, ...]:
    found = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    files = tuple(p for p in found if p.suffix.lower() in SUFFIXES)
    if not files:
        others = f" ({len(found)} other files)" if found else ""
        raise LongextError(f"{where}: the glob {entry!r} matches no .txt, .jsonl, .json or .parquet file{others}")
    return files


def _resolve_hub(index: int, spec: SourceSpec, text_field: str, settings: dict, where: str) -> Source:
    from longext.files import expand_path

    local = Path(expand_path(spec.hub))
    if local.is_dir():  # a folder laid out like a hub dataset repo: read by `datasets` the same way, offline
        files = tuple(sorted(p for p in local.rglob("*") if p.is_file() and not _hidden(p, local)))
        return Source(index, spec, "hub", files, text_field, settings)
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise LongextError(f"{where}.hub: {spec.hub!r} is a hub dataset and HF_HUB_OFFLINE is set, so it cannot "
                           f"be streamed; unset it, or download the dataset and give its folder as path")
    return Source(index, spec, "hub", (), text_field, settings)


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _hub_commit(spec: SourceSpec) -> str:
    """The dataset's commit on the hub, so that a new upload gets a new cache."""
    from huggingface_hub import HfApi

    try:
        return HfApi().dataset_info(spec.hub, revision=spec.revision).sha
    except Exception as err:  # network, auth, not found: huggingface_hub raises many types
        raise LongextError(f"hub dataset {spec.hub!r}: {str(err).splitlines()[0]}") from None


# ------------------------------------------------------------------------------------------ reading
def read_rows(source: Source) -> Iterator[tuple[Row, int]]:
    """(row, bytes of the source consumed so far) for every row of the source, in order."""
    if source.kind == "files":
        done = 0
        for path in source.files:
            for row, at in _file_rows(path, source):
                yield row, done + at
            done += path.stat().st_size
    elif source.kind == "saved":
        yield from _table_rows(_load_saved(source), source)
    else:
        yield from _table_rows(_load_hub(source), source)


def _file_rows(path: Path, source: Source) -> Iterator[tuple[Row, int]]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        yield Row(str(path), read_text_file(path, source.settings["encoding_errors"], source.field)), path.stat().st_size
    elif suffix == ".jsonl":
        yield from _jsonl_rows(path, source.settings["encoding_errors"])
    elif suffix == ".json":
        yield from _json_rows(path, source)
    else:
        yield from _parquet_rows(path, source)


def read_text_file(path: Path, errors: str, field: str) -> str:
    """A .txt file as one document; refused (one line: file, byte offset) if it is not UTF-8 text."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as err:
        raise LongextError(
            f"{field}: {path}: not UTF-8 text (byte {data[err.start]:#04x} at offset {err.start}); "
            f"data.encoding_errors: strict refuses it (replace substitutes U+FFFD)"
        ) from None
    problem = text_problem(text)
    if problem:
        raise LongextError(f"{field}: {path}: {problem}; not a text file?")
    return text


def _jsonl_rows(path: Path, errors: str) -> Iterator[tuple[Row, int]]:
    done = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            done += len(raw)
            if not raw.strip():
                continue  # a blank line is not a row
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8", errors=errors)
            except UnicodeDecodeError as err:
                yield Row(where, problem=f"not UTF-8 (byte {raw[err.start]:#04x} at offset {err.start} of the line; "
                                        f"data.encoding_errors: strict)"), done
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                yield Row(where, problem=f"invalid JSON ({err.msg} at column {err.colno})"), done
                continue
            yield (Row(where, value) if isinstance(value, dict) else
                   Row(where, problem=f"expected a JSON object, got {_kind(value)}")), done


def _json_rows(path: Path, source: Source) -> Iterator[tuple[Row, int]]:
    text = read_text_file(path, source.settings["encoding_errors"], source.field)
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise LongextError(f"{source.field}: {path}:{err.lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(items, list):
        raise LongextError(f"{source.field}: {path}: expected a JSON array of rows (got {_kind(items)}); "
                           f"one object per line is a .jsonl file")
    size = path.stat().st_size
    for number, value in enumerate(items, 1):
        where = f"{path} item {number}"
        yield (Row(where, value) if isinstance(value, dict) else
               Row(where, problem=f"expected a JSON object, got {_kind(value)}")), size * number // len(items)


def _parquet_rows(path: Path, source: Source) -> Iterator[tuple[Row, int]]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError ...
        raise LongextError(f"{source.field}: {path}: not a readable parquet file ({str(err).splitlines()[0]})") from None
    columns = _columns(table.schema_arrow.names, source, str(path))
    size, total, number = path.stat().st_size, max(1, table.metadata.num_rows), 0
    for batch in table.iter_batches(batch_size=TABLE_BATCH, columns=columns):
        for value in batch.to_pylist():
            number += 1
            yield Row(f"{path} row {number}", value), size * number // total


def _columns(names: list[str], source: Source, where: str) -> list[str]:
    """The columns to read; a file with neither the text nor the messages column is refused as a whole."""
    wanted = [c for c in (source.text_field, source.settings["messages_field"]) if c in names]
    if not wanted:
        field = f"{source.field}.text_field" if source.spec.text_field else "data.text_field"
        raise LongextError(f"{field}: column {source.text_field!r} not in {where} "
                           f"(columns: {', '.join(names)}; chat rows use data.messages_field "
                           f"{source.settings['messages_field']!r})")
    return wanted


def _table_rows(table, source: Source) -> Iterator[tuple[Row, int]]:
    """Rows of a `datasets` Dataset or IterableDataset, in batches of Arrow rows."""
    names = table.column_names
    columns = _columns(names, source, source.label) if names is not None else None
    if columns is not None:
        table = table.select_columns(columns)
    size = source.total_bytes() or 0
    total = max(1, len(table)) if hasattr(table, "__len__") else None
    for number, value in enumerate(table, 1):
        yield Row(f"{source.label} row {number}", value), (size * number // total if total else 0)


def _load_saved(source: Source):
    from datasets import DatasetDict, load_from_disk

    from longext.files import expand_path

    folder = Path(expand_path(source.spec.path))
    data = load_from_disk(str(folder))
    if isinstance(data, DatasetDict):
        if "train" not in data:
            raise LongextError(f"{source.field}: {folder} holds the splits {', '.join(data)}; give the folder of "
                               f"one split ({folder}/<split>) as path")
        data = data["train"]
    return data


def _load_hub(source: Source):
    from datasets import load_dataset

    from longext.files import expand_path

    spec = source.spec
    name = expand_path(spec.hub) if source.files else spec.hub
    try:
        return load_dataset(name, spec.subset, split=spec.split, revision=spec.revision, streaming=True)
    except Exception as err:  # datasets raises many types for missing splits, files, configs
        raise LongextError(f"{source.field}.hub: cannot stream {spec.hub!r}: {str(err).splitlines()[0]}") from None


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "text", bool: "true/false", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)
