"""Shared fixtures: tiny models and tokenizers built from a config, local texts. No network, CPU, seconds."""

from __future__ import annotations

import os
import random
import textwrap
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory) -> Path:
    """Token caches of the tests' corpora go to a session folder, never into the user's $LONGEXT_CACHE/data."""
    folder = tmp_path_factory.mktemp("data-cache")
    os.environ["LONGEXT_DATA_CACHE"] = str(folder)  # subprocesses (the CLI, ranks) inherit it
    return folder

WORDS = (
    "the a of and to in is was that it he she they we you for on with as his her at by from this "
    "had not but be are were which one all there when so what who would been has more if no out "
    "house river garden letter morning evening window door road horse ship captain sister brother "
    "said saw came went thought knew found gave took made told asked walked looked turned heard"
).split()


def synthetic_text(n_words: int, seed: int) -> str:
    """Sentence-like text with punctuation and numbers (so digit-aware code has something to see)."""
    rng = random.Random(seed)
    out, sentence = [], []
    for _ in range(n_words):
        sentence.append(rng.choice(WORDS) if rng.random() > 0.04 else str(rng.randint(1, 9999)))
        if len(sentence) >= rng.randint(6, 18):
            out.append(" ".join(sentence).capitalize() + rng.choice([".", ".", ".", "?", "!"]))
            sentence = []
    return "\n".join(textwrap.wrap(" ".join(out), 80)) + "\n"


def build_tokenizer(texts: list[str]):
    """Byte-level BPE, ~400 tokens, every digit its own token, `<|endoftext|>` as EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


# What each family needs besides the common tiny dimensions (longext.families): Gemma's sliding window of 32 tokens
# on layer 0 and full attention on layer 1 (the tests' sequences are longer than the window), Phi-3's original
# window equal to its max_position_embeddings, special tokens inside the 400-token vocabulary, 4 experts (top 2).
FAMILY_EXTRAS = {
    "qwen3": dict(head_dim=16),
    "gemma2": dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=32, pad_token_id=0, eos_token_id=1,
                   bos_token_id=2, layer_types=["sliding_attention", "full_attention"]),
    "gemma3_text": dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=32, pad_token_id=0, eos_token_id=1,
                        bos_token_id=2, layer_types=["sliding_attention", "full_attention"]),
    "phi3": dict(pad_token_id=0, eos_token_id=1, bos_token_id=2),
    "olmo2": dict(pad_token_id=0, eos_token_id=1),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, norm_topk_prob=True),
}


def tiny_config(arch: str = "llama", vocab_size: int = 400, **overrides):
    """A few-layer GQA model of the given family; 16-dim heads so RoPE has 8 rotary pairs."""
    from transformers import AutoConfig

    kw = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )
    kw.update(FAMILY_EXTRAS.get(arch, {}))
    kw.update(overrides)
    if arch == "phi3":
        kw.setdefault("original_max_position_embeddings", kw["max_position_embeddings"])
    return AutoConfig.for_model(arch, **kw)


def build_tiny_model(arch: str = "llama", seed: int = 0, **overrides):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(arch, **overrides)
    attn = "eager" if arch == "gemma2" else "sdpa"  # transformers runs Gemma 2's soft-capped scores eagerly only
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn)
    return model.eval()


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """Three .txt documents of ~6k words each, plus a .jsonl with the same texts."""
    import json

    d = tmp_path_factory.mktemp("corpus")
    texts = [synthetic_text(6000, seed) for seed in range(3)]
    for i, text in enumerate(texts):
        (d / f"doc{i}.txt").write_text(text)
    with open(d.parent / "corpus.jsonl", "w") as f:
        for text in texts:
            f.write(json.dumps({"text": text, "id": 0}) + "\n")
    return d


@pytest.fixture(scope="session")
def tiny_tokenizer(corpus_dir):
    return build_tokenizer([p.read_text() for p in sorted(corpus_dir.glob("*.txt"))])


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A saved tiny Llama (L0 = 128) with its tokenizer: what `model.path` points at in test recipes."""
    d = tmp_path_factory.mktemp("tiny-llama")
    model = build_tiny_model("llama", vocab_size=len(tiny_tokenizer))
    model.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


@pytest.fixture
def tiny_llama(tiny_tokenizer):
    return build_tiny_model("llama", vocab_size=len(tiny_tokenizer))


def free_port() -> int:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port
