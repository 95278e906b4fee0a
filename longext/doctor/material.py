"""Inputs `longext doctor` makes for itself, so it runs on a machine with nothing prepared (no model hub, no cache):
seeded synthetic text, a byte-level BPE tokenizer trained on it, a tiny Llama for the round trip, SmolLM2-135M's
shape with random weights when its weights are not here, and the recipes of the checks."""

from __future__ import annotations

import random
import textwrap
from pathlib import Path

import yaml

WORDS = (
    "the a of and to in is was that it he she they we you for on with as his her at by from this had not but be "
    "are were which one all there when so what who would been has more if no out house river garden letter morning "
    "evening window door road horse ship captain sister brother said saw came went thought knew found gave took "
    "made told asked walked looked turned heard"
).split()

# SmolLM2-135M's published dimensions (its config.json): the measured steps use this shape when the model's weights
# are not on this machine (the speed and memory of a step do not depend on the weights' values).
SMOLLM2_CONFIG = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, bos_token_id=1, eos_token_id=2, pad_token_id=2,
)
TINY_CONFIG = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def synthetic_text(n_words: int, seed: int) -> str:
    """Sentence-like text with punctuation and numbers, seeded."""
    rng = random.Random(seed)
    out, sentence = [], []
    for _ in range(n_words):
        sentence.append(rng.choice(WORDS) if rng.random() > 0.04 else str(rng.randint(1, 9999)))
        if len(sentence) >= rng.randint(6, 18):
            out.append(" ".join(sentence).capitalize() + rng.choice([".", ".", "?", "!"]))
            sentence = []
    return "\n".join(textwrap.wrap(" ".join(out), 80)) + "\n"


def write_texts(folder: Path, documents: int = 2, words: int = 30000) -> Path:
    """`documents` .txt files of `words` words each (about 1.3 tokens per word with SmolLM2's tokenizer)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(documents):
        (folder / f"doc{i}.txt").write_text(synthetic_text(words, seed=i))
    return folder


def build_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE of about `vocab_size` tokens, `<|endoftext|>` as EOS (tokenizers, as transformers uses it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def save_model(folder: Path, config: dict, tokenizer, dtype: str = "float32", seed: int = 0) -> Path:
    """A model of `config` (its model_type, else Llama) with seeded random weights and `tokenizer`, saved as a
    transformers model folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = dict(config)
    kind = config.pop("model_type", "llama")
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **config), dtype=getattr(torch, dtype))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def has_weights(folder: Path) -> bool:
    return any((folder / name).is_file() for name in WEIGHT_FILES)


def has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file()


def step_model(model: Path | None, cache_model: Path, work: Path, tokenizer) -> tuple[Path, str]:
    """(model folder for the measured steps and the eval forward, where its weights come from).

    --model with weights: as it is; --model without weights (a config.json only): its shape, random weights; no
    --model: the prepared SmolLM2-135M, else SmolLM2's shape with random weights. A folder without a tokenizer is
    given the doctor's synthetic one (a copy with random weights, in the work folder)."""
    import json

    if model is None and has_weights(cache_model) and has_tokenizer(cache_model):
        return cache_model, f"SmolLM2-135M ({cache_model})"
    if model is not None and has_weights(model) and has_tokenizer(model):
        return model, f"{model}"
    if model is not None:
        dropped = ("architectures", "transformers_version", "dtype", "torch_dtype")
        config = {k: v for k, v in json.loads((model / "config.json").read_text()).items()
                  if not k.startswith("_") and k not in dropped}
        source = f"{model}'s config, random weights (none in the folder)"
        if has_weights(model):
            source = f"{model} without a tokenizer: its config, random weights"
    else:
        config = SMOLLM2_CONFIG
        source = "SmolLM2-135M's shape, random weights (`longext models prepare smollm2` not run)"
    return save_model(work / "step-model", config, tokenizer, dtype="bfloat16"), source


def write_recipe(path: Path, name: str, model: Path, texts: Path, run_dir: Path, seq_len: int, target_len: int,
                 train: dict, rope: str = "yarn", lora_r: int = 8) -> Path:
    """A training recipe for the checks (standard method, LoRA on q/k/v/o), as a user would write it."""
    recipe = {
        "name": name,
        "description": "written by longext doctor",
        "model": {"path": str(model)},
        "method": {"kind": "standard", "target_len": target_len},
        "rope": {"kind": rope},
        "lora": {"r": lora_r, "alpha": 2.0 * lora_r, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "data": {"train": [str(texts)], "seq_len": seq_len},
        "train": {"seed": 0, **train},
        "eval": {"passkey": {"enabled": False}, "perplexity": {"windows": 1, "targets": 128}},
        "output": {"dir": str(run_dir), "overwrite": True},
    }
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path
