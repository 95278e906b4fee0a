"""Chat rows: the chat template renders them, and only assistant turns are learned; checked against label rows
built by hand from the template's pieces."""

from __future__ import annotations

import json

import numpy as np
import pytest

from longext.data.batches import TrainData
from longext.data.prepare import prepare_corpus
from longext.recipe.data import DataSpec
from longext.errors import LongextError

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHAT = [
    {"role": "system", "content": "Answer in one line."},
    {"role": "user", "content": "Where is the house by the river?"},
    {"role": "assistant", "content": "Behind the garden, 42 steps from the road."},
    {"role": "user", "content": "And the ship?"},
    {"role": "assistant", "content": "The captain took it in the morning."},
]


@pytest.fixture(scope="module")
def chat_tokenizer(corpus_dir):
    """The tests' tiny BPE with ChatML's two special tokens and template."""
    from conftest import build_tokenizer

    tokenizer = build_tokenizer([p.read_text() for p in sorted(corpus_dir.glob("*.txt"))])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    return tokenizer


def hand_built(tokenizer, chat) -> tuple[list[int], list[int]]:
    """(ids, learned 0/1) from the template's pieces: headers and non-assistant turns 0, assistant answers with their
    <|im_end|> and newline 1."""
    ids, learn = [], []
    for m in chat:
        head = tokenizer(f"<|im_start|>{m['role']}\n", add_special_tokens=False)["input_ids"]
        body = tokenizer(f"{m['content']}<|im_end|>\n", add_special_tokens=False)["input_ids"]
        ids += head + body
        learn += [0] * len(head) + [int(m["role"] == "assistant")] * len(body)
    return ids, learn


def write_rows(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_assistant_only_mask_equals_the_hand_built_label_row(tmp_path, chat_tokenizer):
    ids, learn = hand_built(chat_tokenizer, CHAT)
    whole = chat_tokenizer(chat_tokenizer.apply_chat_template(CHAT, tokenize=False), add_special_tokens=False)
    assert whole["input_ids"] == ids  # the pieces tokenize like the whole conversation: the reference is sound
    (cache,) = prepare_corpus(DataSpec(train=[write_rows(tmp_path / "c.jsonl", [{"messages": CHAT}])]), chat_tokenizer,
                              32, 0).caches
    assert cache.tokens.tolist() == ids and cache.loss.tolist() == learn
    assert 0 < sum(learn) < len(learn)


def test_loss_on_all_learns_every_token(tmp_path, chat_tokenizer):
    (cache,) = prepare_corpus(DataSpec(train=[write_rows(tmp_path / "c.jsonl", [{"messages": CHAT}])], loss_on="all"),
                              chat_tokenizer, 32, 0).caches
    assert cache.loss is None and cache.tokens.tolist() == hand_built(chat_tokenizer, CHAT)[0]


def test_text_and_chat_rows_mix_and_labels_follow_the_mask(tmp_path, chat_tokenizer):
    from conftest import synthetic_text

    text = synthetic_text(40, seed=1)
    rows = [{"text": text}, {"messages": CHAT}, {"text": text}]
    corpus = prepare_corpus(DataSpec(train=[write_rows(tmp_path / "m.jsonl", rows)], packing="per_doc"),
                            chat_tokenizer, 128, 0)
    data = TrainData(corpus.rows, micro_batch_size=3, seed=0)
    batch = data.micro_batch(0)
    eos = chat_tokenizer.eos_token_id
    ids, learn = hand_built(chat_tokenizer, CHAT)
    text_ids = chat_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(text_ids) < 127 and len(ids) < 127  # nothing truncated: every row is its whole document + EOS
    seen = []
    for row, labels in zip(batch["input_ids"], batch["labels"]):
        if row[: len(ids)].tolist() == ids:  # the chat row: the answers, then the EOS after the last one (learned)
            want, seen = [i if keep else -100 for i, keep in zip(ids, learn)] + [eos], seen + ["chat"]
        else:  # a text row: every real token learned
            want, seen = text_ids + [eos], seen + ["text"]
        assert labels.tolist() == want + [-100] * (128 - len(want))
    assert sorted(seen) == ["chat", "text", "text"]


def test_a_template_that_rewrites_earlier_turns_is_a_bad_row(tmp_path, chat_tokenizer):
    """An assistant turn rendered differently once later turns follow cannot be located: named, not guessed."""
    changing = CHATML.replace("{{ m['content'] }}", "{{ m['content'] }}{% if loop.last %} (final){% endif %}")
    tokenizer = chat_tokenizer.__class__(tokenizer_object=chat_tokenizer.backend_tokenizer, eos_token="<|endoftext|>")
    tokenizer.chat_template = changing
    path = write_rows(tmp_path / "c.jsonl", [{"messages": CHAT}])
    with pytest.raises(LongextError) as err:
        prepare_corpus(DataSpec(train=[path]), tokenizer, 32, 0)
    # messages[:2] ends with the user turn, which this template marks as last: the prompt is not a prefix
    assert err.value.lines()[0] == (f"data.train.0: {path}:1: the chat template's prompt before messages[2] is not "
                                    f"how the conversation starts, so its tokens cannot be found (use data.loss_on: all)")
    (cache,) = prepare_corpus(DataSpec(train=[path], loss_on="all"), tokenizer, 32, 0).caches  # the way out
    assert cache.documents == 1


@pytest.mark.parametrize(("messages", "problem"), [
    ("hello", "field 'messages' is text (got 'hello'); expected a list of {role, content} messages"),
    ([], "field 'messages' is a list (got []); expected a list of {role, content} messages"),
    ([{"role": "user"}], "messages[0].content is missing; expected text"),
    ([{"role": "user", "content": 5}], "messages[0].content is a number (got 5); expected text"),
    ([{"role": "user", "content": "hi"}], "no assistant message to learn (data.loss_on: assistant)"),
])
def test_malformed_chats_are_bad_rows_with_file_and_line(tmp_path, chat_tokenizer, messages, problem):
    path = write_rows(tmp_path / "c.jsonl", [{"messages": CHAT}, {"messages": messages}])
    with pytest.raises(LongextError) as err:
        prepare_corpus(DataSpec(train=[path]), chat_tokenizer, 32, 0)
    assert err.value.lines()[0] == f"data.train.0: {path}:2: {problem}"


def test_a_tokenizer_without_a_chat_template_is_one_line_naming_the_source(tmp_path, tiny_tokenizer):
    path = write_rows(tmp_path / "c.jsonl", [{"messages": CHAT}])
    with pytest.raises(LongextError) as err:
        prepare_corpus(DataSpec(train=[path]), tiny_tokenizer, 32, 0, "models/x")
    (line,) = err.value.lines()
    assert line.startswith("data.train.0: has chat rows (data.messages_field), but the tokenizer of model.path "
                           "models/x has no chat template")


def test_smollm2_chat_learns_exactly_the_answers(tmp_path):
    """SmolLM2's own ChatML template (with its default system prompt): the learned tokens decode to the answers."""
    from longext.materials import smollm2_dir

    if not (smollm2_dir() / "tokenizer.json").is_file():
        pytest.skip("SmolLM2 is not prepared (longext models prepare smollm2)")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    chat = CHAT[1:]  # no system message: the template adds its own
    (cache,) = prepare_corpus(DataSpec(train=[write_rows(tmp_path / "c.jsonl", [{"messages": chat}])]), tokenizer,
                              32, 0).caches
    tokens, learn = np.asarray(cache.tokens), np.asarray(cache.loss, dtype=bool)
    spans = [tokenizer.decode(tokens[a:b]) for a, b in _runs(learn)]
    assert spans == [f"{m['content']}<|im_end|>\n" for m in chat if m["role"] == "assistant"]
    assert tokenizer.decode(tokens).startswith("<|im_start|>system\n")


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flags.astype(int), [0]])))
    return list(zip(edges[::2], edges[1::2]))
