"""Builders shared by the gpu tier (a module of its own: conftest modules are not importable by name)."""

from __future__ import annotations

import pytest
import torch

CUDA = torch.cuda.is_available()
cuda_only = pytest.mark.skipif(not CUDA, reason="needs CUDA itself (no CPU stand-in)")


def tiny_config(**overrides):
    """2 layers, 4 query heads over 2 kv heads (GQA), 16-dim heads; a wide init so that logits are far from
    uniform and precision errors show in the loss."""
    from transformers import AutoConfig

    kw = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False, initializer_range=0.2)
    return AutoConfig.for_model("llama", **{**kw, **overrides})


def tiny_model(seed: int = 0, attn: str = "sdpa", **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(**overrides), dtype=torch.float32, attn_implementation=attn)


def token_batch(length: int, rows: int = 1, vocab: int = 512, seed: int = 0) -> dict:
    ids = torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
            "position_ids": torch.arange(length).expand(rows, length).clone()}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in fp32 on the CPU."""
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
