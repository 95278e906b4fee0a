"""Minimal stdlib reader for R serialized data (XDR format), as found in R package data.

It exists so the public-domain books shipped in Debian's R data packages (janeaustenr, tokenizers,
tidytext) can be read without R. It handles lazy-load databases (`data/Rdata.rdx` + `.rdb`),
`.rda`/`.RData` and `.rds` files, gzip/bzip2/xz compression, and only the object types those
packages use: character vectors, lists, data frames, and the pairlists/environments around them.
Not a general R reader: closures and byte code are parsed only far enough to skip them.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from pathlib import Path
from typing import Any

# SEXP type codes (R Internals, "Serialization Formats").
_SYMSXP, _LISTSXP, _CLOSXP, _ENVSXP, _PROMSXP, _LANGSXP = 1, 2, 3, 4, 5, 6
_CHARSXP, _LGLSXP, _INTSXP, _REALSXP, _CPLXSXP, _STRSXP = 9, 10, 13, 14, 15, 16
_DOTSXP, _VECSXP, _EXPRSXP, _RAWSXP, _S4SXP = 17, 19, 20, 24, 25
_ALTREP, _ATTRLANGSXP, _ATTRLISTSXP = 238, 239, 240
_PERSIST, _PACKAGE, _NAMESPACE, _REFSXP, _NILVALUE = 247, 248, 249, 255, 254
_SPECIALS = (253, 252, 251, 250, 242, 241)  # empty env, base env, global env, unbound, missing, base namespace
_PAIRLIKE = (_LISTSXP, _CLOSXP, _PROMSXP, _LANGSXP, _DOTSXP, _ATTRLANGSXP, _ATTRLISTSXP)
_HAS_ATTR, _HAS_TAG = 1 << 9, 1 << 10


class RSymbol(str):
    """An R symbol (a name), kept distinct from a plain string value."""


class RObj:
    """One R object: `kind` ("str", "int", "real", "list", "pairlist", ...), its `value`, its attributes.

    A character vector's value is a list of `str | None` (None is NA); a pairlist's value is a list
    of `(tag, value)` pairs; attributes map names (e.g. "names", "class") to RObj values.
    """

    def __init__(self, kind: str, value: Any, attrs: dict[str, Any] | None = None):
        self.kind, self.value, self.attrs = kind, value, attrs or {}

    def __repr__(self) -> str:
        size = len(self.value) if hasattr(self.value, "__len__") else "?"
        return f"RObj({self.kind}, len={size}, attrs={list(self.attrs)})"


class _Reader:
    """Cursor over one serialized stream; `refs` holds the objects later REFSXP items point back to."""

    def __init__(self, data: bytes):
        self.data, self.pos, self.refs = data, 0, []

    def int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def bytes(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError(f"R data truncated: need {n} bytes at offset {self.pos}, have {len(self.data) - self.pos}")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def length(self) -> int:
        """Vector length; -1 announces a long vector whose length follows as two ints."""
        n = self.int()
        if n == -1:
            hi, lo = self.int(), self.int()
            n = (hi << 32) + lo
        return n

    def numbers(self, fmt: str, n: int, width: int) -> list:
        values = list(struct.unpack_from(f">{n}{fmt}", self.data, self.pos))
        self.pos += width * n
        return values

    def header(self) -> None:
        fmt = self.bytes(2)
        if fmt != b"X\n":
            raise ValueError(f"only XDR serialization is supported, got format {fmt!r}")
        version = self.int()
        self.int()  # R version that wrote it
        self.int()  # minimal R version to read it
        if version == 3:
            self.bytes(self.int())  # native encoding name

    def item(self) -> Any:
        flags = self.int()
        sexp = flags & 0xFF
        has_attr, has_tag = bool(flags & _HAS_ATTR), bool(flags & _HAS_TAG)
        if sexp == _NILVALUE:
            return None
        if sexp in _SPECIALS:
            return RObj("special", sexp)
        if sexp == _REFSXP:
            index = flags >> 8 or self.int()
            return self.refs[index - 1]
        if sexp in (_PERSIST, _PACKAGE, _NAMESPACE):
            return self._persistent()
        if sexp == _SYMSXP:
            symbol = RSymbol(self.item())
            self.refs.append(symbol)
            return symbol
        if sexp in _PAIRLIKE:
            return self._pairlist(has_attr, has_tag)
        if sexp == _ENVSXP:
            return self._environment()
        if sexp == _CHARSXP:
            n = self.int()
            return None if n == -1 else self.bytes(n).decode("utf-8", "replace")
        if sexp == _ALTREP:
            return self._altrep()
        obj = self._vector(sexp)
        if has_attr:
            attrs = self.item()
            obj.attrs = {str(k): v for k, v in attrs.value} if isinstance(attrs, RObj) else {}
        return obj

    def _persistent(self) -> RObj:
        self.int()  # always 0: the name is stored as a STRSXP without its flags word
        n = self.int()
        obj = RObj("persist", [self.item() for _ in range(n)])
        self.refs.append(obj)
        return obj

    def _pairlist(self, has_attr: bool, has_tag: bool) -> RObj:
        """Read a pairlist iteratively (R writes the CDR chain recursively; books have long ones)."""
        items = []
        while True:
            if has_attr:
                self.item()  # pairlist-node attributes: unused by data packages
            tag = self.item() if has_tag else None
            items.append((tag, self.item()))
            (next_flags,) = struct.unpack_from(">i", self.data, self.pos)
            if next_flags & 0xFF in (_LISTSXP, _ATTRLISTSXP):
                self.pos += 4
                has_attr, has_tag = bool(next_flags & _HAS_ATTR), bool(next_flags & _HAS_TAG)
                continue
            tail = self.item()
            if tail is not None:
                items.append((None, tail))
            return RObj("pairlist", items)

    def _environment(self) -> RObj:
        env = RObj("env", None)
        self.refs.append(env)  # registered before its contents, which may refer back to it
        self.int()  # locked flag
        env.value = (self.item(), self.item(), self.item(), self.item())  # enclos, frame, hashtab, attrs
        return env

    def _altrep(self) -> Any:
        """Compact ALTREP vectors (R >= 3.5): expand the few classes data packages contain."""
        info, state, _attrs = self.item(), self.item(), self.item()
        cls = str(info.value[0][1]) if isinstance(info, RObj) else "?"
        if cls == "compact_intseq":
            n, start, step = state.value
            return RObj("int", [int(start + i * step) for i in range(int(n))])
        if cls.startswith("wrap_"):
            return state.value[0][1] if isinstance(state, RObj) and state.kind == "pairlist" else state.value[0]
        if cls == "deferred_string":
            arg = state.value[0][1] if state.kind == "pairlist" else state
            return RObj("str", [str(x) for x in arg.value])
        return RObj("altrep:" + cls, state)

    def _vector(self, sexp: int) -> RObj:
        if sexp in (_LGLSXP, _INTSXP):
            return RObj("int" if sexp == _INTSXP else "lgl", self.numbers("i", self.length(), 4))
        if sexp == _REALSXP:
            return RObj("real", self.numbers("d", self.length(), 8))
        if sexp == _CPLXSXP:
            return RObj("cplx", self.numbers("d", 2 * self.length(), 8))
        if sexp == _STRSXP:
            return RObj("str", [self.item() for _ in range(self.length())])
        if sexp in (_VECSXP, _EXPRSXP):
            return RObj("list", [self.item() for _ in range(self.length())])
        if sexp == _RAWSXP:
            return RObj("raw", self.bytes(self.length()))
        if sexp == _S4SXP:
            return RObj("s4", None)
        raise ValueError(f"unsupported R object type {sexp} at offset {self.pos}")


def unserialize(data: bytes) -> Any:
    """Decode one uncompressed XDR stream (starting `X\\n`) into RObj / str / None values."""
    reader = _Reader(data)
    reader.header()
    return reader.item()


def _decompress(raw: bytes) -> bytes:
    """R writes .rds/.rda with gzip (default), bzip2 or xz; sniff the magic bytes."""
    if raw[:2] == b"\x1f\x8b":
        return gzip.decompress(raw)
    if raw[:3] == b"BZh":
        return bz2.decompress(raw)
    if raw[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(raw)
    return raw


def read_rds(path: str | Path) -> Any:
    """One object saved with `saveRDS`."""
    return unserialize(_decompress(Path(path).read_bytes()))


def read_rda(path: str | Path) -> dict[str, Any]:
    """Objects saved with `save()` (.rda/.RData), as {name: object}."""
    raw = _decompress(Path(path).read_bytes())
    if not raw.startswith(b"RDX"):
        raise ValueError(f"{path}: not an R data file (no RDX header)")
    obj = unserialize(raw[raw.index(b"\n") + 1 :])
    return {str(tag): value for tag, value in obj.value}


def read_lazyload(prefix: str | Path) -> dict[str, Any]:
    """An R package's lazy-load database, as {name: object}.

    Args:
        prefix: path without the extension, e.g. ".../janeaustenr/data/Rdata"; the index is
            `prefix.rdx` and the compressed blobs are in `prefix.rdb`.
    """
    prefix = str(prefix)
    index = read_rds(prefix + ".rdx")
    entries = dict(zip(index.attrs["names"].value, index.value))
    variables = entries["variables"]
    blob = Path(prefix + ".rdb").read_bytes()
    out = {}
    for name, where in zip(variables.attrs["names"].value, variables.value):
        offset, size = int(where.value[0]), int(where.value[1])
        out[name] = unserialize(_lazyload_chunk(blob[offset : offset + size], name))
    return out


def _lazyload_chunk(chunk: bytes, name: str) -> bytes:
    """One .rdb record (R's connections.c, R_compress1/2/3): 4-byte big-endian uncompressed length, then a zlib
    stream (compress = 1), or a type byte and the data: '2' bzip2, 'Z' a raw LZMA2 stream (xz without its
    container, preset 6), '1' zlib, '0' stored."""
    (expected,) = struct.unpack(">I", chunk[:4])
    body = chunk[4:]
    kind = body[:1]
    if kind == b"2":
        data = bz2.decompress(body[1:])
    elif kind == b"Z":  # the decoder's dictionary must be at least the encoder's: preset 9's 64 MiB covers R's 6
        data = lzma.decompress(body[1:], format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": 9}])
    elif kind == b"1":
        data = zlib.decompress(body[1:])
    elif kind == b"0":
        data = body[1:]
    else:
        data = zlib.decompress(body)
    if len(data) != expected:
        raise ValueError(f"lazy-load record {name!r}: expected {expected} bytes, got {len(data)}")
    return data
