"""PoSE (Zhu et al. 2023, methods.md §2.7): skipped position ids at a short training window.

The model itself is unchanged; the `rope` section carries the interpolation (the paper uses linear,
NTK or YaRN with factor target/L0) for training and inference alike.
"""

from __future__ import annotations

import torch

from longext.methods.base import Method, MethodSetup
from longext.positions import pose_positions


def pose_sampler(target_len: int, chunks: int):
    """PoSE on every piece of a row (longext.data.batches.PositionSampler): with the document mask, each document
    piece is a sample of its own, with at most `chunks` chunks whose positions span up to target_len."""
    def sample(pieces: list[int], gen: torch.Generator) -> tuple[torch.Tensor, dict]:
        return torch.cat([pose_positions(n, target_len, min(chunks, n), gen) for n in pieces]), {}

    return sample


def pose_state(recipe, config) -> dict:
    return {"method": "pose", "chunks": recipe.method.chunks}


def pose_setup(recipe, state) -> MethodSetup:
    method = recipe.method
    return MethodSetup(positions=pose_sampler(method.target_len, method.chunks), per_step=method.sample_scope == "step")


METHOD = Method(kind="pose", state=pose_state, setup=pose_setup)
