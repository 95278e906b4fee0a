"""Long texts are tokenized in pieces (longext.data.pieces) with exactly the ids of the whole text: byte-level BPE
tokenizers (the tests' own, SmolLM2's) are cut at checked newlines; a SentencePiece-style tokenizer, which marks
the start of every text, fails the check and is encoded whole."""

from __future__ import annotations

import pytest

from longext.data.pieces import CUT, encode_texts, split_text


@pytest.fixture(scope="module")
def long_text():
    from conftest import synthetic_text

    return "".join(synthetic_text(400, seed=s) for s in range(12))  # ~30k characters, a newline every ~80


def whole_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids


def test_a_long_text_is_cut_at_checked_newlines_with_the_whole_texts_ids(tiny_tokenizer, long_text, monkeypatch):
    import longext.data.pieces as pieces

    backend = tiny_tokenizer.backend_tokenizer
    parts = split_text(backend, long_text, every=2000)
    assert len(parts) >= 10 and "".join(parts) == long_text
    assert all(p[-1] == "\n" and not p[-2].isspace() and not q[0].isspace() for p, q in zip(parts, parts[1:]))
    monkeypatch.setattr(pieces, "PIECE_CHARS", 2000)
    monkeypatch.setattr(pieces, "CALL_CHARS", 5000)  # several calls, each with pieces of several texts
    texts = [long_text, "short one", long_text[:7000]]
    assert encode_texts(backend, texts) == [whole_ids(tiny_tokenizer, t) for t in texts]


def test_smollm2s_tokenizer_gives_the_same_ids_in_pieces(long_text):
    from longext.materials.cache import smollm2_dir

    if not (smollm2_dir() / "tokenizer.json").is_file():
        pytest.skip("SmolLM2 is not prepared (longext models prepare smollm2)")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    text = long_text.replace(".", ".\n\n", 50)  # blank lines too: only single newlines between visible text cut
    parts = split_text(tokenizer.backend_tokenizer, text, every=1500)
    assert len(parts) > 5
    assert [i for p in parts for i in whole_ids(tokenizer, p)] == whole_ids(tokenizer, text)


def test_a_tokenizer_that_marks_the_start_of_a_text_is_encoded_whole(long_text):
    """SentencePiece's Metaspace with prepend_scheme first puts ▁ before a text's first word: a cut would add one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(prepend_scheme="first")
    tokenizer.train_from_iterator([long_text], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"]))
    assert CUT.search(long_text)  # there are newlines to cut at
    assert split_text(tokenizer, long_text, every=2000) == [long_text]
    assert encode_texts(tokenizer, [long_text]) == [tokenizer.encode(long_text, add_special_tokens=False).ids]


def test_a_long_txt_document_in_the_cache_has_the_whole_texts_ids(tmp_path, tiny_tokenizer, long_text, monkeypatch):
    import longext.data.pieces as pieces
    from longext.data.prepare import prepare_corpus
    from longext.recipe.data import DataSpec

    monkeypatch.setattr(pieces, "PIECE_CHARS", 2000)
    path = tmp_path / "long.txt"
    path.write_text(long_text)
    (cache,) = prepare_corpus(DataSpec(train=[str(path)]), tiny_tokenizer, 64, seed=0).caches
    assert cache.documents == 1 and cache.tokens.tolist() == whole_ids(tiny_tokenizer, long_text)
