"""The token-cache pipeline against references: the in-memory packing it replaces (longext.data.batches.pack), the
tokenizer run on each text, and formulas for the mixture (weights, filters, holdout)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from longext.data.batches import TrainData, pack
from longext.data.documents import tokenize_documents
from longext.data.prepare import prepare_corpus
from longext.recipe.data import DataSpec, SourceSpec


@pytest.fixture(scope="module")
def texts():
    from conftest import synthetic_text

    return [synthetic_text(words, seed=50 + i) for i, words in enumerate((40, 300, 25, 800, 60, 120, 33, 500, 90))]


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory, texts):
    path = tmp_path_factory.mktemp("jsonl") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def corpus_of(entries, tokenizer, seq_len=64, seed=0, **data):
    return prepare_corpus(DataSpec(train=entries, **data), tokenizer, seq_len, seed)


def all_rows(rows) -> dict[str, np.ndarray]:
    return rows.rows(list(range(len(rows))))


# ------------------------------------------------------------------------------------- packing parity
@pytest.mark.parametrize("mode", ["concat", "per_doc"])
def test_rows_equal_the_in_memory_packing(jsonl, texts, tiny_tokenizer, mode):
    reference = pack(tokenize_documents(texts, tiny_tokenizer), 64, tiny_tokenizer.eos_token_id, mode)
    rows = corpus_of([str(jsonl)], tiny_tokenizer, packing=mode).rows
    got = all_rows(rows)
    assert np.array_equal(got["input_ids"], reference.input_ids.numpy())
    assert np.array_equal(got["real"], reference.real.numpy())
    assert got["learn"][got["real"]].all()


@pytest.mark.parametrize("mode", ["concat", "per_doc"])
def test_micro_batches_equal_the_in_memory_ones_for_every_rank(jsonl, texts, tiny_tokenizer, mode):
    reference = pack(tokenize_documents(texts, tiny_tokenizer), 64, tiny_tokenizer.eos_token_id, mode)
    rows = corpus_of([str(jsonl)], tiny_tokenizer, packing=mode).rows
    new, old = TrainData(rows, 2, seed=5), TrainData(reference, 2, seed=5)
    for index in range(len(rows)):  # more than an epoch: the second epoch's order too
        for rank in range(2):
            a, b = new.micro_batch(index, rank, 2), old.micro_batch(index, rank, 2)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_concat_rows_with_the_document_mask_carry_every_document_piece(jsonl, texts, tiny_tokenizer):
    """Segments follow the documents: re-joining each row's pieces gives the EOS-joined stream back."""
    rows = corpus_of([str(jsonl)], tiny_tokenizer).rows
    got = all_rows(rows)
    stream = [t for ids in tokenize_documents(texts, tiny_tokenizer) for t in (*ids, tiny_tokenizer.eos_token_id)]
    assert got["input_ids"].reshape(-1).tolist() == stream[: len(rows) * 64]
    eos = tiny_tokenizer.eos_token_id
    for ids, segments in zip(got["input_ids"], got["segments"]):
        changes = np.flatnonzero(np.diff(segments)) + 1
        assert all(ids[c - 1] == eos for c in changes)  # every piece but the row's last ends with its EOS
        assert segments[0] == 0 and (np.diff(segments) >= 0).all()


# ----------------------------------------------------------------------------------------- sources
def test_every_source_format_gives_the_tokenizers_ids(tmp_path, texts, tiny_tokenizer):
    import datasets

    few = texts[:4]
    for i, text in enumerate(few):
        (tmp_path / "txt").mkdir(exist_ok=True)
        (tmp_path / "txt" / f"d{i}.txt").write_text(text)
    (tmp_path / "rows.json").write_text(json.dumps([{"text": t} for t in few]))
    datasets.Dataset.from_dict({"text": few}).to_parquet(str(tmp_path / "rows.parquet"))
    datasets.Dataset.from_dict({"text": few, "n": list(range(4))}).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "hubrepo").mkdir()
    (tmp_path / "hubrepo" / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in few))
    (tmp_path / "globbed").mkdir()
    for i, text in enumerate(few):
        (tmp_path / "globbed" / f"part{i}.jsonl").write_text(json.dumps({"text": text}) + "\n")
    want = [tiny_tokenizer(t, add_special_tokens=False)["input_ids"] for t in few]
    entries = [str(tmp_path / "txt"), str(tmp_path / "rows.json"), str(tmp_path / "rows.parquet"),
               str(tmp_path / "saved"), {"hub": str(tmp_path / "hubrepo")}, str(tmp_path / "globbed" / "part*.jsonl")]
    for entry in entries:
        (cache,) = corpus_of([entry], tiny_tokenizer).caches
        got = [cache.tokens[a:b].tolist() for a, b in zip(cache.offsets[:-1], cache.offsets[1:])]
        assert got == want, entry


def test_a_second_run_reuses_the_cache_and_a_changed_file_is_tokenized_again(tmp_path, texts, tiny_tokenizer):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": texts[0]}) + "\n")
    first = corpus_of([str(path)], tiny_tokenizer).caches[0]
    again = corpus_of([str(path)], tiny_tokenizer).caches[0]
    assert (first.status, again.status) == ("built", "reused") and again.folder == first.folder
    path.write_text(json.dumps({"text": texts[1]}) + "\n")
    changed = corpus_of([str(path)], tiny_tokenizer).caches[0]
    assert changed.status == "built" and changed.folder != first.folder
    assert changed.tokens.tolist() == tiny_tokenizer(texts[1], add_special_tokens=False)["input_ids"]
    other_field = corpus_of([SourceSpec(path=str(path), text_field="text")], tiny_tokenizer,
                            messages_field="chat").caches[0]
    assert other_field.folder != changed.folder  # what reading depends on is part of the key


# ----------------------------------------------------------------------------------------- mixture
def test_holdout_and_max_docs_count_over_all_sources_in_order(tmp_path, texts, tiny_tokenizer):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:4]))
    b.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[4:]))
    for holdout, max_docs in [(0, None), (2, None), (6, None), (1, 3), (3, 6), (0, 5)]:
        corpus = corpus_of([str(a), str(b)], tiny_tokenizer, holdout_docs=holdout, max_docs=max_docs)
        used = [(int(s), int(d)) for s, d in zip(corpus.selection.source, corpus.selection.document)]
        order = [(0, i) for i in range(4)] + [(1, i) for i in range(len(texts) - 4)]
        kept = order[: len(order) - holdout][:max_docs]
        assert used == kept, (holdout, max_docs)


def test_weights_repeat_and_subsample_documents_from_the_seed(tmp_path, texts, tiny_tokenizer, jsonl):
    lengths = [len(tiny_tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    three = corpus_of([{"path": str(jsonl), "weight": 3.0}], tiny_tokenizer).selection
    assert three.document.tolist() == list(range(len(texts))) * 3
    assert three.uses[0].tokens == 3 * sum(lengths)
    picks = {seed: corpus_of([{"path": str(jsonl), "weight": 1.5}], tiny_tokenizer, seed=seed).selection.document
             for seed in (0, 0, 1, 2)}
    for seed, docs in picks.items():
        assert docs[: len(texts)].tolist() == list(range(len(texts)))  # the whole pass, then round(0.5 * 9) = 4 more
        extra = docs[len(texts):]
        assert len(extra) == 4 and len(set(extra.tolist())) == 4 and (np.diff(extra) > 0).all()
    again = corpus_of([{"path": str(jsonl), "weight": 1.5}], tiny_tokenizer, seed=0).selection.document
    assert np.array_equal(picks[0], again)
    assert len({tuple(d.tolist()) for d in picks.values()}) > 1  # another seed, other documents


def test_length_filters_drop_documents_outside_the_range(jsonl, texts, tiny_tokenizer):
    lengths = np.array([len(tiny_tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts])
    low, high = int(np.sort(lengths)[2]), int(np.sort(lengths)[-2])
    selection = corpus_of([{"path": str(jsonl), "min_tokens": low, "max_tokens": high}], tiny_tokenizer).selection
    keep = (lengths >= low) & (lengths <= high)
    assert selection.document.tolist() == np.flatnonzero(keep).tolist()
    use = selection.uses[0]
    assert (use.filtered, use.filtered_tokens, use.tokens) == (int((~keep).sum()), int(lengths[~keep].sum()),
                                                               int(lengths[keep].sum()))


def test_two_sources_mix_in_the_order_of_data_train(tmp_path, texts, tiny_tokenizer):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:3]))
    b.write_text("".join(json.dumps({"body": t}) + "\n" for t in texts[3:6]))
    corpus = corpus_of([str(a), {"path": str(b), "text_field": "body", "weight": 2.0}], tiny_tokenizer)
    assert corpus.selection.source.tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 1]
    reference = pack(tokenize_documents(texts[:3] + texts[3:6] * 2, tiny_tokenizer), 64, tiny_tokenizer.eos_token_id)
    assert np.array_equal(all_rows(corpus.rows)["input_ids"], reference.input_ids.numpy())


def test_too_little_text_for_one_row_is_a_clear_error(tmp_path, tiny_tokenizer):
    from longext.errors import LongextError

    (tmp_path / "tiny.jsonl").write_text(json.dumps({"text": "Hello there."}) + "\n")
    with pytest.raises(LongextError, match=r"data.train: \d+ tokens in all, fewer than one sample of data.seq_len 64"):
        corpus_of([str(tmp_path / "tiny.jsonl")], tiny_tokenizer)


# ------------------------------------------------------------------------------------------ summary
def test_summary_counts_against_the_documents(tmp_path, jsonl, texts, tiny_model_dir, capsys):
    from helpers import write_recipe

    from longext.cli import main
    from longext.data.summary import length_histogram

    from transformers import AutoTokenizer

    lengths = np.array([len(ids) for ids in tokenize_documents(texts, AutoTokenizer.from_pretrained(tiny_model_dir))])
    hist = length_histogram(np.array([10, 255, 256, 1023, 5000, 300_000]))
    assert [(n, d) for n, d, _ in hist] == [("< 256", 2), ("256 - 1k", 2), ("1k - 4k", 0), ("4k - 16k", 1),
                                            ("16k - 64k", 0), ("64k - 256k", 0), (">= 256k", 1)]
    recipe = write_recipe(tmp_path, tiny_model_dir, jsonl, data={"seq_len": 64, "holdout_docs": 2},
                          train={"steps": 3, "micro_batch_size": 2})
    assert main(["data", "prepare", str(recipe)]) == 0
    out = capsys.readouterr().out
    used = lengths[:-2]
    rows = (used + 1).sum() // 64
    assert f"used: {len(used):,} documents, {used.sum():,} tokens; {(used > 64).sum():,} longer than seq_len 64" in out
    assert f"rows: {rows:,} of 64 tokens (concat packing, document mask on); train.steps 3 x 2 rows" in out
    assert f"= {6 / rows:.2f} epochs" in out
    assert f"dropped: {(used + 1).sum() - rows * 64:,} tokens by the last partial row (concat), 0 tokens by " \
           f"min_tokens/max_tokens, 0 bad rows, 2 documents held out" in out


# ------------------------------------------------------------------------------------------------ resume
OLD_DATA_FIELDS = ("messages_field", "document_mask", "loss_on", "max_bad_rows", "encoding_errors", "cache_dir")


def test_resume_of_a_run_from_before_the_data_fields_reuses_the_cache(tmp_path, tiny_model_dir, texts, capsys):
    """A run whose recipe.yaml predates data.document_mask & co. (written here in the old format: the data section
    as it was) resumes: the missing fields take their defaults and are no change. --resume opens the token cache the
    run started with and tokenizes nothing."""
    import yaml

    from helpers import losses, write_recipe
    from longext.cli import main

    data_file = tmp_path / "own.jsonl"  # a file of its own: its cache is built by this run
    data_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    path = write_recipe(tmp_path, tiny_model_dir, data_file, train={"steps": 2, "save_every": 1})
    assert main(["train", str(path), "-s", "train.steps=1"]) == 0
    assert "data: tokenized" in capsys.readouterr().err
    run = tmp_path / "runs" / "t"
    stored = yaml.safe_load((run / "recipe.yaml").read_text())
    assert stored["data"]["document_mask"] is True  # the resolved value, recorded
    stored["data"] = {k: v for k, v in stored["data"].items() if k not in OLD_DATA_FIELDS}
    (run / "recipe.yaml").write_text(yaml.safe_dump(stored, sort_keys=False))
    assert main(["train", str(path), "--resume"]) == 0
    out = capsys.readouterr()
    assert "data: tokenized" not in out.err and "error" not in out.err
    assert sorted(losses(run)) == [1, 2]
    assert yaml.safe_load((run / "recipe.yaml").read_text())["data"]["document_mask"] is True
