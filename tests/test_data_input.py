"""Bad input and damaged state in the data pipeline: bad rows named by file:line, text that is not text refused,
a damaged or foreign cache rebuilt (never used), an interrupted build never trusted, one builder at a time."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import bad_input, write_recipe

from longext.data.prepare import prepare_corpus
from longext.recipe.data import DataSpec
from longext.errors import LongextError

REPO = Path(__file__).resolve().parent.parent
GOOD = {"text": "The captain walked to the house by the river and saw the ship in the morning light."}


def jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def prepare(tmp_path, tiny_model_dir, corpus, capsys, *sets) -> list[str]:
    """The error lines of `data prepare`, without the recipe location every line starts with (checked here)."""
    recipe = write_recipe(tmp_path, tiny_model_dir, corpus, data={"seq_len": 16})
    return unlocated(bad_input(capsys, "data", "prepare", recipe, *[a for s in sets for a in ("-s", s)]), recipe)


def unlocated(lines: list[str], recipe: Path) -> list[str]:
    """`error: recipe.yaml:N data.x: ...` -> `error: data.x: ...`, checking that lines naming a recipe field from
    the file point at the file and a line."""
    out = []
    for line in lines:
        where = f"error: {recipe}:"
        if line.startswith(where):
            line = "error: " + line[len(where):].split(" ", 1)[1]
        else:
            assert not line.startswith("error: data.train."), line  # data.train entries are in the file
        out.append(line)
    return out


# ------------------------------------------------------------------------------------------ bad rows
def test_each_bad_row_is_named_with_file_line_and_what_is_allowed(tmp_path, tiny_model_dir, capsys):
    path = jsonl(tmp_path / "rows.jsonl", [GOOD, "{not json", {"body": "x"}, {"text": 42}, {"text": ""}, GOOD,
                                           [1, 2], {"text": "   "}, {"text": None}])
    lines = prepare(tmp_path, tiny_model_dir, path, capsys)
    assert lines == [
        f"error: data.train.0: {path}:2: invalid JSON (Expecting property name enclosed in double quotes at column 2)",
        f"error: data.train.0: {path}:3: no field 'text' (data.text_field) or 'messages' (data.messages_field); "
        f"fields: body",
        f"error: data.train.0: {path}:4: field 'text' is a number (got 42); expected text",
        f"error: data.train.0: {path}:5: field 'text': empty text",
        f"error: data.train.0: {path}:7: expected a JSON object, got an array",
        f"error: data.train.0: {path}:8: field 'text': text is only whitespace",
        f"error: data.train.0: {path}:9: field 'text' is null (got None); expected text",
        "error: data.max_bad_rows: 7 bad rows, more than the 0 allowed (fix them, or raise data.max_bad_rows to skip "
        "them)",
    ]


def test_max_bad_rows_skips_them_and_the_summary_counts_them(tmp_path, tiny_model_dir, capsys):
    from longext.cli import main

    path = jsonl(tmp_path / "rows.jsonl", [GOOD] * 6 + [{"text": 42}, "{oops"] + [GOOD] * 6)
    recipe = write_recipe(tmp_path, tiny_model_dir, path, data={"seq_len": 16, "max_bad_rows": 2})
    assert main(["data", "prepare", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "dropped:" in out and ", 2 bad rows," in out
    bad_input(capsys, "data", "prepare", recipe, "-s", "data.max_bad_rows=1")  # the cache remembers them


def test_a_bad_row_file_stops_train_with_the_same_lines(tmp_path, tiny_model_dir, capsys):
    path = jsonl(tmp_path / "rows.jsonl", [GOOD, {"text": 7}])
    recipe = write_recipe(tmp_path, tiny_model_dir, path, data={"seq_len": 16})
    lines = unlocated(bad_input(capsys, "train", recipe), recipe)
    assert lines[0] == f"error: data.train.0: {path}:2: field 'text' is a number (got 7); expected text"


def test_a_jsonl_line_that_is_not_utf8_is_a_bad_row(tmp_path, tiny_model_dir, capsys):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"text": "caf\xe9"}\n')
    lines = prepare(tmp_path, tiny_model_dir, path, capsys)
    assert lines[0] == (f"error: data.train.0: {path}:2: not UTF-8 (byte 0xe9 at offset 13 of the line; "
                        f"data.encoding_errors: strict)")


# ------------------------------------------------------------------------------------ text that is not text
@pytest.fixture
def random_txt(tmp_path) -> Path:
    path = tmp_path / "noise" / "random.txt"
    path.parent.mkdir()
    path.write_bytes(random.Random(0).randbytes(20_000))
    return path


def test_random_bytes_named_txt_are_refused_with_a_byte_offset(tmp_path, tiny_model_dir, capsys, random_txt):
    data = random_txt.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        offset, byte = err.start, data[err.start]
    assert prepare(tmp_path, tiny_model_dir, random_txt.parent, capsys) == [
        f"error: data.train.0: {random_txt}: not UTF-8 text (byte {byte:#04x} at offset {offset}); "
        f"data.encoding_errors: strict refuses it (replace substitutes U+FFFD)"]


def test_random_bytes_are_refused_with_replace_too(tmp_path, tiny_model_dir, capsys, random_txt):
    (line,) = prepare(tmp_path, tiny_model_dir, random_txt, capsys, "data.encoding_errors=replace")
    assert line.startswith(f"error: data.train.0: {random_txt}: mostly non-printable (")
    assert "control or replacement characters, the first at byte offset 0; at most 10% allowed); not a text file?" in line


def test_random_bytes_never_train(tmp_path, tiny_model_dir, capsys, random_txt):
    (line,) = bad_input(capsys, "train", write_recipe(tmp_path, tiny_model_dir, random_txt, data={"seq_len": 16}))
    assert f"data.train.0: {random_txt}: not UTF-8 text" in line


def test_a_target_len_below_the_models_window_names_both(tmp_path, tiny_model_dir, capsys):
    recipe = write_recipe(tmp_path, tiny_model_dir, tmp_path, method={"kind": "standard", "target_len": 64},
                          data={"seq_len": 64})
    (line,) = bad_input(capsys, "train", recipe, "--dry-run")
    assert line.endswith("method.target_len: 64 is below the model's own window L0 128 (from the model's "
                         "config.json); set a target_len of at least 128")


def test_replace_keeps_a_text_with_a_few_bad_bytes(tmp_path, tiny_tokenizer):
    path = tmp_path / "latin1.txt"
    path.write_bytes(("The caf\xe9 by the river. " * 40).encode("latin-1"))
    with pytest.raises(LongextError, match="not UTF-8 text"):
        prepare_corpus(DataSpec(train=[str(path)]), tiny_tokenizer, 16, 0)
    (cache,) = prepare_corpus(DataSpec(train=[str(path)], encoding_errors="replace"), tiny_tokenizer, 16, 0).caches
    assert cache.tokens.tolist() == tiny_tokenizer(path.read_bytes().decode("utf-8", "replace"),
                                                   add_special_tokens=False)["input_ids"]


def test_a_parquet_without_the_text_column_names_its_columns(tmp_path, tiny_model_dir, capsys):
    import datasets

    datasets.Dataset.from_dict({"content": ["a b c"]}).to_parquet(str(tmp_path / "x.parquet"))
    assert prepare(tmp_path, tiny_model_dir, tmp_path / "x.parquet", capsys) == [
        f"error: data.text_field: column 'text' not in {tmp_path / 'x.parquet'} (columns: content; chat rows use "
        f"data.messages_field 'messages')"]


def test_recipe_problems_of_data_entries(tmp_path, tiny_model_dir, capsys):
    recipe = write_recipe(tmp_path, tiny_model_dir, tmp_path, data={
        "train": [{"path": "a.jsonl", "hub": "x/y"}, {"weight": 2.0}, {"path": "b", "min_tokens": 9, "max_tokens": 3},
                  {"path": "c", "split": "test"}, 5],
        "document_mask": True, "packing": "per_doc"})
    lines = bad_input(capsys, "recipes", "validate", recipe)
    assert any("data.train.4: expected a path (file, folder, glob or `books`) or a mapping with `path` or `hub`" in x
               for x in lines)
    recipe = write_recipe(tmp_path, tiny_model_dir, tmp_path, data={
        "train": [{"path": "a.jsonl", "hub": "x/y"}, {"weight": 2.0}, {"path": "b", "min_tokens": 9, "max_tokens": 3},
                  {"path": "c", "split": "test"}], "document_mask": True, "packing": "per_doc"})
    lines = [x.split(" ", 2)[2] for x in bad_input(capsys, "recipes", "validate", recipe)]
    assert lines == [
        "data.document_mask: applies to concat packing; per_doc rows hold one document already (set data.packing: "
        "concat or remove document_mask)",
        "data.train.0: give exactly one of path or hub (got both)",
        "data.train.1: give exactly one of path or hub (got neither)",
        "data.train.2.max_tokens: must be at least min_tokens 9 (got 3)",
        "data.train.3.split: is for hub sources; a path source has none",
    ]


def test_a_hub_name_offline_is_one_line(tmp_path, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = write_recipe(tmp_path, tiny_model_dir, tmp_path, data={"train": [{"hub": "someone/corpus"}]})
    (line,) = bad_input(capsys, "data", "prepare", recipe)
    assert line.startswith(f"error: {recipe}:")
    assert line.endswith("data.train.0.hub: 'someone/corpus' is a hub dataset and HF_HUB_OFFLINE is set, so it "
                         "cannot be streamed; unset it, or download the dataset and give its folder as path")


# ---------------------------------------------------------------------------------------- damaged caches
def _damage(folder: Path, how: str) -> str:
    manifest = json.loads((folder / "manifest.json").read_text())
    if how == "truncated tokens":
        with open(folder / "tokens.u32", "r+b") as f:
            f.truncate(f.seek(0, 2) // 2)
        return "tokens.u32 has"
    if how == "no manifest":
        (folder / "manifest.json").unlink()
        return "no manifest.json"
    if how == "torn manifest":
        (folder / "manifest.json").write_text((folder / "manifest.json").read_text()[:40])
        return "manifest.json is not readable JSON"
    if how == "foreign":
        manifest["key"] = "another-0123"
    elif how == "old format":
        manifest["format"] = 0
    elif how == "flipped offsets":
        data = bytearray((folder / "docs.i64").read_bytes())
        data[9] ^= 0xFF
        (folder / "docs.i64").write_bytes(bytes(data))
        return "docs.i64 does not match its checksum"
    elif how == "wrong type":
        manifest["tokens"] = None
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return {"foreign": "it belongs to another source or tokenizer", "old format": "manifest format 0",
            "wrong type": "manifest.json has unexpected contents"}[how]


@pytest.mark.parametrize("how", ["truncated tokens", "no manifest", "torn manifest", "foreign", "old format",
                                 "flipped offsets", "wrong type"])
def test_a_damaged_cache_is_named_and_rebuilt_never_used(tmp_path, tiny_tokenizer, how):
    path = jsonl(tmp_path / "rows.jsonl", [GOOD] * 5)
    data = DataSpec(train=[str(path)], cache_dir=str(tmp_path / "cache"))
    first = prepare_corpus(data, tiny_tokenizer, 16, 0).caches[0]
    want = first.tokens.tolist()
    reason = _damage(first.folder, how)
    said = []
    again = prepare_corpus(data, tiny_tokenizer, 16, 0, say=said.append).caches[0]
    assert again.status == "rebuilt" and again.tokens.tolist() == want
    assert len(said) == 1 and said[0].startswith(f"warning: the data cache {first.folder} is damaged (")
    assert reason in said[0] and said[0].endswith("); rebuilding it")
    assert prepare_corpus(data, tiny_tokenizer, 16, 0).caches[0].status == "reused"


def test_a_failed_build_publishes_nothing(tmp_path, tiny_tokenizer, monkeypatch):
    import longext.data.tokenize as tokenize

    path = jsonl(tmp_path / "rows.jsonl", [GOOD] * 5)
    data = DataSpec(train=[str(path)], cache_dir=str(tmp_path / "cache"))
    monkeypatch.setattr(tokenize, "_flush", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        prepare_corpus(data, tiny_tokenizer, 16, 0)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")) == []


def _prepare_cmd(recipe: Path) -> list[str]:
    return [sys.executable, "-m", "longext", "data", "prepare", str(recipe)]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return env


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory) -> Path:
    """~4 MB of text: a build of a few seconds, long enough to be interrupted or raced."""
    from conftest import synthetic_text

    path = tmp_path_factory.mktemp("big") / "big.jsonl"
    with open(path, "w") as f:
        for i in range(400):
            f.write(json.dumps({"text": synthetic_text(1500, seed=i)}) + "\n")
    return path


def test_a_killed_build_leaves_nothing_trusted_and_the_next_one_cleans_up(tmp_path, tiny_model_dir, big_corpus):
    cache = tmp_path / "cache"
    recipe = write_recipe(tmp_path, tiny_model_dir, big_corpus, data={"seq_len": 16, "cache_dir": str(cache)})
    proc = subprocess.Popen(_prepare_cmd(recipe), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not any(cache.glob(".tmp-*/tokens.u32")) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [p.name.split("-")[1] for p in cache.glob(".tmp-*")] == [str(proc.pid)]  # its half build, unpublished
    assert not [p for p in cache.iterdir() if not p.name.startswith(".")]
    done = subprocess.run(_prepare_cmd(recipe), env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "cache built:" in done.stdout and not list(cache.glob(".tmp-*"))


def test_two_processes_build_a_source_once(tmp_path, tiny_model_dir, big_corpus):
    cache = tmp_path / "cache"
    recipe = write_recipe(tmp_path, tiny_model_dir, big_corpus, data={"seq_len": 16, "cache_dir": str(cache)})
    procs = [subprocess.Popen(_prepare_cmd(recipe), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sorted("cache built:" in o for o in outs) == [False, True]
    assert sum("cache reused:" in o for o in outs) == 1
    assert [p.name for p in cache.iterdir() if not p.name.startswith(".")] != []


def test_document_mask_auto_and_true_weigh_the_mask_of_sdpa(tmp_path, tiny_model_dir, corpus_dir, capsys):
    """auto: on while sdpa's [b, 1, L, L] mask stays within 1 GiB; true: refused beyond 4 GiB (flash needs none)."""
    import yaml

    from longext.cli import main

    def resolved_mask(*sets) -> bool:
        recipe = write_recipe(tmp_path, tiny_model_dir, corpus_dir, model={"path": str(tiny_model_dir),
                                                                        "attn_implementation": "sdpa"})
        ranks = [s.split("=")[1] for s in sets if s.startswith("train.sequence_parallel=")]  # the ranks sp needs
        argv = ["train", str(recipe), "--dry-run", *[a for s in sets for a in ("-s", s)], "--nproc", (ranks or ["1"])[0]]
        assert main(argv) == 0
        text = capsys.readouterr().out.split("# RoPE state")[0].removeprefix("# resolved recipe")
        return yaml.safe_load(text)["data"]["document_mask"]

    assert resolved_mask() is True  # 64 tokens
    assert resolved_mask("method.target_len=32k", "data.seq_len=32k") is True  # 1 GiB
    assert resolved_mask("method.target_len=64k", "data.seq_len=32k", "train.micro_batch_size=2") is False
    assert resolved_mask("method.target_len=64k", "data.seq_len=64k", "data.document_mask=true") is True  # 4 GiB
    assert resolved_mask("data.packing=per_doc") is False
    assert resolved_mask("method.kind=pose") is True  # every method masks documents, at any sp degree
    assert resolved_mask("method.kind=e2llm", "rope.kind=none", "data.document_mask=true") is True
    assert resolved_mask("train.sequence_parallel=2") is True
    recipe = write_recipe(tmp_path, tiny_model_dir, corpus_dir, model={"path": str(tiny_model_dir),
                                                                      "attn_implementation": "eager"})
    (line,) = bad_input(capsys, "train", recipe, "--dry-run", "-s", "method.target_len=64k", "-s", "data.seq_len=64k",
                        "-s", "data.document_mask=true")
    assert line.endswith("data.document_mask: with attention eager the mask is a [batch, 1, 65536, 65536] tensor of "
                         "16 GiB per micro-batch; install flash-attn (model.attn_implementation flash_attention_2 "
                         "needs none) or set document_mask: false [from --set]")
