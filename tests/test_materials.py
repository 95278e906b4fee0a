"""Offline materials: the R-data reader, text clean-up, recipe text lists and cache errors.

Nothing here downloads: the R payload is built by hand, and the cache is a tmp folder.
"""

from __future__ import annotations

import gzip
import json
import struct

import pytest

from longext import materials
from longext.errors import LongextError
from longext.materials import book_files, clean_text, plain_play, prepare, resolve_texts
from longext.materials.rdata import read_rds, unserialize

# ---------------------------------------------------------------------------------------- rser


def _xdr_header() -> bytes:
    """`X\\n`, format version 3, written by R 4.2.2, readable by R 3.5.0, native encoding UTF-8."""
    return b"X\n" + struct.pack(">iii", 3, 0x040202, 0x030500) + struct.pack(">i", 5) + b"UTF-8"


def _charsxp(s: str | None) -> bytes:
    if s is None:
        return struct.pack(">ii", 9, -1)  # NA_STRING
    data = s.encode("utf-8")
    return struct.pack(">ii", 9 | (1 << 15), len(data)) + data  # 1 << 15: UTF-8 encoding flag


def _strsxp(values: list[str | None], names: list[str] | None = None) -> bytes:
    """A character vector; with `names`, the attribute pairlist R writes for `c(a = "x", ...)`."""
    flags = 16 | ((1 << 9) if names else 0)
    out = struct.pack(">ii", flags, len(values)) + b"".join(_charsxp(v) for v in values)
    if names:
        tag = struct.pack(">i", 1) + _charsxp("names")  # SYMSXP "names"
        out += struct.pack(">i", 2 | (1 << 10)) + tag + _strsxp(names) + struct.pack(">i", 254)
    return out


def test_rser_reads_a_character_vector_with_na_and_utf8():
    obj = unserialize(_xdr_header() + _strsxp(["It is a truth", None, "Sōseki"]))
    assert obj.kind == "str"
    assert obj.value == ["It is a truth", None, "Sōseki"]


def test_rser_reads_names_attribute_and_gzip_rds(tmp_path):
    path = tmp_path / "x.rds"
    path.write_bytes(gzip.compress(_xdr_header() + _strsxp(["a", "b"], names=["first", "second"])))
    obj = read_rds(path)
    assert obj.value == ["a", "b"]
    assert obj.attrs["names"].value == ["first", "second"]


def test_rser_rejects_non_xdr_streams():
    with pytest.raises(ValueError, match="only XDR"):
        unserialize(b"A\n" + b"\0" * 12)


def test_rser_reports_truncated_data():
    payload = _xdr_header() + _strsxp(["a long line"])
    with pytest.raises(ValueError, match="truncated"):
        unserialize(payload[:-3])


# ------------------------------------------------------------------------------------ clean-up
PG_BOOK = (
    "\ufeffThe Project Gutenberg EBook of A Book\r\n\r\nLicence text.\r\n\r\n"
    "*** START OF THIS PROJECT GUTENBERG EBOOK A BOOK ***\r\n\r\n\r\n"
    "Produced by Someone Kind\r\n\r\n\r\n"
    "CHAPTER I\r\n\r\nThe story *** with stars.\r\n\r\n\r\n"
    "End of Project Gutenberg's A Book, by An Author\r\n\r\n"
    "*** END OF THIS PROJECT GUTENBERG EBOOK A BOOK ***\r\n\r\n"
    "*** START: FULL LICENSE ***\r\nMore licence.\r\n"
)


def test_gutenberg_header_footer_and_credits_are_stripped():
    assert clean_text(PG_BOOK) == "CHAPTER I\n\nThe story *** with stars.\n"


def test_text_without_markers_keeps_every_character_but_cr():
    text = "PRIDE AND PREJUDICE\n\n  By Jane Austen\n\n\n"
    assert clean_text(text) == text
    assert clean_text(text.replace("\n", "\r\n") + "\x1a") == text


def test_play_markdown_becomes_plain_text():
    md = "# Macbeth\n\n## ACT I\n\n_Thunder. Enter three\nWitches_\n\n**First Witch**  \nWhen shall we meet again  \n"
    assert plain_play(md) == "Macbeth\n\nACT I\n\nThunder. Enter three\nWitches\n\nFirst Witch\nWhen shall we meet again\n"


# ---------------------------------------------------------------------------- cache and books
@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGEXT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def prepared_books(cache):
    """A books folder as `prepare("books")` leaves it, with two tiny books."""
    books = materials.books_dir()
    books.mkdir(parents=True)
    entries = []
    for name, split in [("austen_persuasion", "eval"), ("botchan", "train")]:
        (books / f"{name}.txt").write_text("text\n")
        entries.append({"file": f"{name}.txt", "title": name, "source": "test", "characters": 5, "split": split})
    (books / "manifest.json").write_text(json.dumps({"books": entries}))
    (books / materials.MARKER).write_text(materials.BOOKS_SPEC + "\n")
    return books


def test_cache_dir_follows_longext_cache(cache):
    assert materials.cache_dir() == cache
    assert materials.smollm2_dir() == cache / "models" / "smollm2-135m"
    assert materials.books_dir() == cache / "books"


def test_book_files_without_prepared_books_says_how_to_prepare(cache):
    with pytest.raises(LongextError, match=r"books are not prepared; run `longext models prepare books`"):
        book_files("train")


def test_half_written_books_folder_counts_as_not_prepared(prepared_books):
    (prepared_books / materials.MARKER).unlink()
    with pytest.raises(LongextError, match="not prepared"):
        book_files("all")


def test_book_files_by_split(prepared_books):
    assert book_files("eval") == [prepared_books / "austen_persuasion.txt"]
    assert book_files("train") == [prepared_books / "botchan.txt"]
    assert book_files("all") == [prepared_books / "austen_persuasion.txt", prepared_books / "botchan.txt"]
    with pytest.raises(LongextError, match="unknown book split 'test'"):
        book_files("test")


def test_prepare_rejects_unknown_material_at_once(cache):
    with pytest.raises(LongextError, match="unknown material 'nonsense'; choose one of: smollm2, books, gemma3, all"):
        prepare("nonsense")
    assert not cache.exists()


def test_prepare_skips_complete_caches(prepared_books):
    model = materials.smollm2_dir()
    model.mkdir(parents=True)
    (model / materials.MARKER).write_text(materials.SMOLLM2_SPEC + "\n")
    lines = list(prepare("all"))
    assert lines == [f"smollm2: cached at {model}", f"books: cached at {prepared_books} (2 texts)"]
    assert "2 texts" in materials.describe_cache()


# ------------------------------------------------------------------------------- resolve_texts
def test_resolve_texts_expands_files_folders_and_books(tmp_path, prepared_books):
    (tmp_path / "a.txt").write_text("a")
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "b.jsonl").write_text("{}\n")
    (folder / "c.parquet").write_bytes(b"")
    (folder / "notes.md").write_text("skipped")
    (folder / ".hidden.txt").write_text("skipped")
    entries = [str(tmp_path / "a.txt"), str(folder), "books", str(tmp_path / "a.txt")]
    assert resolve_texts(entries, "eval", "data.train") == [
        tmp_path / "a.txt",
        folder / "c.parquet",
        folder / "sub" / "b.jsonl",
        prepared_books / "austen_persuasion.txt",
    ]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "missing.txt", "no such file or folder: '{}' (expected .txt, .jsonl, .json or .parquet"),
        (lambda p: (p / "r.csv").write_text("x") and p / "r.csv", "'{}' is not a .txt, .jsonl, .json or .parquet"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "folder '{}' has no .txt, .jsonl, .json or .parquet files"),
    ],
    ids=["missing", "wrong-suffix", "empty-folder"],
)
def test_resolve_texts_bad_entries_name_the_field(tmp_path, make, message):
    entry = str(make(tmp_path))
    with pytest.raises(LongextError) as info:
        resolve_texts([entry], "eval", "eval.perplexity.texts")
    assert str(info.value).startswith("eval.perplexity.texts: ")
    assert message.format(entry) in str(info.value)
    assert "\n" not in str(info.value)


def test_resolve_texts_books_before_prepare_is_an_error(cache):
    with pytest.raises(LongextError, match="^data.train: books are not prepared; run `longext models prepare books`"):
        resolve_texts(["books"], "train", "data.train")


# ------------------------------------------------------------------------ rser: .rda and lazy-load DBs
# An R object tree, written out the way R's serialize() does: a vector's attributes (a tagged pairlist) after its
# elements, and a symbol's every use after the first a back-reference (REFSXP) to it.
_NA_INT = -(2**31)


def _obj(kind: str, value, **attrs) -> tuple:
    return (kind, value, attrs)


def _xdr(node, symbols: list[str]) -> bytes:
    kind, value, attrs = node
    if kind == "pairlist":  # value: {tag: node}
        out = b""
        for tag, item in value.items():
            out += struct.pack(">i", 2 | (1 << 10)) + _sym(tag, symbols) + _xdr(item, symbols)
        return out + struct.pack(">i", 254)  # NILVALUE ends the CDR chain
    code = {"lgl": 10, "int": 13, "str": 16, "list": 19}[kind]
    flags = code | ((1 << 9) if attrs else 0) | ((1 << 8) if "class" in attrs else 0)  # has-attr, is-object
    out = struct.pack(">ii", flags, len(value))
    if kind == "str":
        out += b"".join(_charsxp(v) for v in value)
    elif kind == "list":
        out += b"".join(_xdr(v, symbols) for v in value)
    else:
        out += struct.pack(f">{len(value)}i", *value)
    if attrs:
        out += _xdr(_obj("pairlist", attrs), symbols)
    return out


def _sym(name: str, symbols: list[str]) -> bytes:
    if name in symbols:
        return struct.pack(">i", ((symbols.index(name) + 1) << 8) | 255)  # REFSXP, index packed in the flags
    symbols.append(name)
    return struct.pack(">i", 1) + _charsxp(name)


def _stream(node) -> bytes:
    return _xdr_header() + _xdr(node, [])


BOOKS_FRAME = _obj(  # tidytext's `books`: a data frame of lines, its columns named, compact row names
    "list",
    [_obj("int", [105, 105, 121]), _obj("str", ["Persuasion", "Persuasion", "Northanger Abbey"]),
     _obj("str", ["Chapter 1", None, "No one who had ever seen Catherine"])],
    names=_obj("str", ["gutenberg_id", "title", "text"]),
    **{"class": _obj("str", ["tbl_df", "tbl", "data.frame"]), "row.names": _obj("int", [_NA_INT, -3])},
)
NOTE = _obj("str", ["public domain", "Sōseki"], names=_obj("str", ["licence", "author"]))


def _xz(data: bytes) -> bytes:
    import lzma

    return lzma.compress(data)


def _bzip2(data: bytes) -> bytes:
    import bz2

    return bz2.compress(data)


COMPRESSORS = {"gzip": gzip.compress, "bzip2": _bzip2, "xz": _xz, "none": lambda data: data}  # save(compress = ...)


@pytest.mark.parametrize("compression", list(COMPRESSORS))
def test_read_rda_returns_each_saved_object_by_name(tmp_path, compression):
    # save(books, note, file = "x.rda"): "RDX3\n", then one stream holding a pairlist tagged with the names
    from longext.materials.rdata import read_rda

    path = tmp_path / "x.rda"
    saved = _obj("pairlist", {"books": BOOKS_FRAME, "note": NOTE})
    path.write_bytes(COMPRESSORS[compression](b"RDX3\n" + _stream(saved)))
    objects = read_rda(path)
    assert list(objects) == ["books", "note"]
    frame = objects["books"]
    assert frame.kind == "list"
    columns = dict(zip(frame.attrs["names"].value, frame.value))
    assert list(columns) == ["gutenberg_id", "title", "text"]
    assert columns["gutenberg_id"].value == [105, 105, 121]
    assert columns["title"].value == ["Persuasion", "Persuasion", "Northanger Abbey"]
    assert columns["text"].value == ["Chapter 1", None, "No one who had ever seen Catherine"]
    assert frame.attrs["class"].value == ["tbl_df", "tbl", "data.frame"]
    assert frame.attrs["row.names"].value == [_NA_INT, -3]
    note = objects["note"]  # its "names" tag is a back-reference to the symbol the frame introduced
    assert (note.value, note.attrs["names"].value) == (["public domain", "Sōseki"], ["licence", "author"])


def test_read_rda_rejects_a_file_without_the_rdx_header(tmp_path):
    from longext.materials.rdata import read_rda

    path = tmp_path / "x.rds"
    path.write_bytes(gzip.compress(_stream(NOTE)))
    with pytest.raises(ValueError, match="not an R data file"):
        read_rda(path)


def _rdb_record(data: bytes, compressed: int) -> bytes:
    """One record as R's lazyLoadDBinsertValue writes it (connections.c R_compress1/2/3): the uncompressed length
    big-endian, then zlib (1); or a type byte and the data: '2' bzip2 (2), 'Z' raw LZMA2 at preset 6 (3), '0' stored
    when compressing would not make it shorter (2 and 3)."""
    import bz2
    import lzma
    import zlib

    head = struct.pack(">I", len(data))
    if compressed == 1:
        return head + zlib.compress(data)
    if compressed == 2:
        packed = b"2" + bz2.compress(data, 9)
    else:
        packed = b"Z" + lzma.compress(data, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": 6}])
    return head + (packed if len(packed) - 1 <= len(data) else b"0" + data)


AUSTEN = {  # janeaustenr-like: one character vector per book, a line per element, NA for some blank lines
    "persuasion": _obj("str", ["PERSUASION", None, "Chapter 1"] + ["Sir Walter Elliot, of Kellynch Hall"] * 40),
    "emma": _obj("str", ["EMMA", "", "VOLUME I"] * 30),
    "tiny": _obj("str", ["x"]),  # so short that bzip2 / xz would grow it: R stores it ('0')
}


@pytest.mark.parametrize("compressed", [
    1, 2, 3,
], ids=["zlib", "bzip2", "xz"])
def test_read_lazyload_returns_each_variable_of_the_database(tmp_path, compressed):
    # makeLazyLoadDB: every object serialized (XDR) and compressed into Rdata.rdb, one record after another; Rdata.rdx
    # is saveRDS(list(variables = <name: c(offset, length)>, references = list(), compressed = ...)) (gzip)
    from longext.materials.rdata import read_lazyload

    blob, keys, kinds = b"", {}, set()
    for name, node in AUSTEN.items():
        record = _rdb_record(_stream(node), compressed)
        keys[name] = _obj("int", [len(blob), len(record)])
        blob += record
        kinds.add(record[4:5])
    if compressed != 1:  # both record kinds of this compression: packed, and stored ('0') for `tiny`
        assert kinds == {b"2" if compressed == 2 else b"Z", b"0"}
    flag = _obj("lgl", [1]) if compressed == 1 else _obj("int", [compressed])
    index = _obj("list", [_obj("list", list(keys.values()), names=_obj("str", list(keys))), _obj("list", []), flag],
                 names=_obj("str", ["variables", "references", "compressed"]))
    (tmp_path / "Rdata.rdb").write_bytes(blob)
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(_stream(index)))

    objects = read_lazyload(tmp_path / "Rdata")
    assert list(objects) == list(AUSTEN)
    for name, (_, lines, _) in AUSTEN.items():
        assert (objects[name].kind, objects[name].value) == ("str", lines)
