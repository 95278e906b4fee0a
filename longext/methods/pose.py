"""PoSE (Zhu et al. 2023, methods.md §2.7): skipped position ids at a short training window.

The model itself is unchanged; the `rope` section carries the interpolation (the paper uses linear,
NTK or YaRN with factor target/L0) for training and inference alike.
"""

from __future__ import annotations

import torch

from longext.methods.base import Method, MethodSetup
from longext.positions import pose_positions


def pose_sampler(target_len: int, chunks: int):
    def sample(seq_len: int, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
        return pose_positions(seq_len, target_len, chunks, gen), {}

    return sample


def pose_state(recipe, config) -> dict:
    return {"method": "pose", "chunks": recipe.method.chunks}


def pose_setup(recipe, state) -> MethodSetup:
    method = recipe.method
    return MethodSetup(positions=pose_sampler(method.target_len, method.chunks), per_step=method.sample_scope == "step")


METHOD = Method(kind="pose", state=pose_state, setup=pose_setup, document_mask_problem="PoSE's skipped positions")
