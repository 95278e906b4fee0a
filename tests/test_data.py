"""Data: files through `datasets`, tokenization, packing with labels and masks, deterministic batches."""

from __future__ import annotations

import json

import pytest
import torch

from longext.data import TrainData, load_documents, pack, tokenize_documents
from longext.errors import LongextError


def test_txt_jsonl_and_parquet_give_the_same_documents(tmp_path):
    import datasets

    texts = ["first document.\nwith two lines", "second one", "third, 42 tokens?"]
    for i, text in enumerate(texts):
        (tmp_path / f"d{i}.txt").write_text(text)
    (tmp_path / "all.jsonl").write_text("".join(json.dumps({"body": t, "n": i}) + "\n" for i, t in enumerate(texts)))
    datasets.Dataset.from_dict({"body": texts}).to_parquet(str(tmp_path / "all.parquet"))
    from_txt = load_documents(sorted(tmp_path.glob("d*.txt")), "body")
    assert from_txt == texts
    assert load_documents([tmp_path / "all.jsonl"], "body") == texts
    assert load_documents([tmp_path / "all.parquet"], "body") == texts


def test_a_missing_text_column_names_the_field_and_the_columns(tmp_path):
    (tmp_path / "x.jsonl").write_text(json.dumps({"content": "hi"}) + "\n")
    with pytest.raises(LongextError, match=r"data.text_field: column 'text' not in .*x.jsonl \(columns: content\)"):
        load_documents([tmp_path / "x.jsonl"], "text")


def test_concat_packing_joins_documents_with_eos_and_drops_the_remainder():
    samples = pack([[1, 2, 3], [4, 5], [6, 7, 8, 9]], seq_len=4, eos_id=0)
    # stream: 1 2 3 0 4 5 0 6 7 8 9 0 -> three full blocks
    assert samples.input_ids.tolist() == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]
    assert samples.real.all()


def test_per_doc_packing_masks_padding_out_of_loss_and_attention():
    samples = pack([[1, 2, 3, 4, 5, 6], [7, 8]], seq_len=4, eos_id=0, mode="per_doc")
    assert samples.input_ids.tolist() == [[1, 2, 3, 0], [7, 8, 0, 0]]
    batch = TrainData(samples, micro_batch_size=2, seed=0).micro_batch(0)
    row = batch["input_ids"].tolist().index([7, 8, 0, 0])
    assert batch["attention_mask"][row].tolist() == [1, 1, 1, 0]
    assert batch["labels"][row].tolist() == [7, 8, 0, -100]  # the EOS that ends the document is learned


def test_too_little_text_for_one_sample_is_a_clear_error():
    with pytest.raises(LongextError, match="data.train: 3 tokens in all, fewer than one sample of data.seq_len 8"):
        pack([[1, 2]], seq_len=8, eos_id=0)


def test_batches_are_a_pure_function_of_seed_index_and_rank():
    samples = pack([list(range(1, 400))], seq_len=8, eos_id=0)
    a, b = TrainData(samples, 2, seed=5), TrainData(samples, 2, seed=5)
    assert all(torch.equal(a.micro_batch(9)[k], b.micro_batch(9)[k]) for k in a.micro_batch(9))
    one_rank = [a.micro_batch(i)["input_ids"] for i in range(4)]
    two_ranks = [a.micro_batch(i, rank=r, world_size=2)["input_ids"] for i in range(2) for r in range(2)]
    assert all(torch.equal(x, y) for x, y in zip(one_rank, two_ranks))  # ranks shard the same global order
    epoch = torch.cat([a.micro_batch(i)["input_ids"] for i in range(len(samples) // 2)])
    assert sorted(map(tuple, epoch.tolist())) == sorted(map(tuple, samples.input_ids.tolist()))  # each sample once


def test_tokenization_adds_no_special_tokens(tiny_tokenizer):
    ids = tokenize_documents(["Hello there 12"], tiny_tokenizer)[0]
    assert tiny_tokenizer.eos_token_id not in ids
    assert tiny_tokenizer.decode(ids) == "Hello there 12"


THREE = ["first document", "second document", "third document"]


def documents_of(tmp_path, tiny_model_dir, **data) -> list[str]:
    """The documents the training pipeline uses (longext.data.prepare), in order."""
    from transformers import AutoTokenizer

    from helpers import write_recipe
    from longext.data.prepare import prepare_corpus
    from longext.recipe import load_recipe

    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in THREE))
    path = write_recipe(tmp_path, tiny_model_dir, tmp_path / "docs.jsonl", data=data)
    corpus = prepare_corpus(load_recipe(path).data, AutoTokenizer.from_pretrained(tiny_model_dir), 4, seed=0)
    return [THREE[i] for i in corpus.selection.document.tolist()]


@pytest.mark.parametrize(("data", "kept"), [
    ({}, THREE),
    ({"holdout_docs": 1}, THREE[:2]),  # the last documents are the held-out ones
    ({"holdout_docs": 2}, THREE[:1]),
    ({"max_docs": 2}, THREE[:2]),
    ({"max_docs": 5}, THREE),
    ({"holdout_docs": 1, "max_docs": 1}, THREE[:1]),
    ({"holdout_docs": 2, "max_docs": 2}, THREE[:1]),  # max_docs never reaches into the held-out documents
])
def test_holdout_and_max_docs_keep_the_right_documents(tmp_path, tiny_model_dir, data, kept):
    assert documents_of(tmp_path, tiny_model_dir, **data) == kept


def test_holding_out_every_document_is_a_clear_error(tmp_path, tiny_model_dir):
    with pytest.raises(LongextError, match=r"data.train: no documents left to train on \(check data.max_docs, data.holdout_docs"):
        documents_of(tmp_path, tiny_model_dir, holdout_docs=3)
    with pytest.raises(LongextError, match="no documents left to train on"):
        documents_of(tmp_path, tiny_model_dir, holdout_docs=7)
