"""The `gpu` test tier: CUDA paths against CPU / fp32 references, with tiny models built from a config.

One rule: tests marked `gpu` are skipped when torch sees no CUDA device. `make test-gpu` (or `longext doctor` on a
GPU) runs them. To work on these tests without a GPU, LONGEXT_GPU_TESTS_ON_CPU=1 runs them on the CPU against the
same references (the CUDA-only ones, marked `cuda_only` in gpu_helpers.py, still skip); that proves the test
code, not the CUDA kernels.
"""

from __future__ import annotations

import os

import pytest
import torch

ON_CPU = os.environ.get("LONGEXT_GPU_TESTS_ON_CPU") == "1"
CUDA = torch.cuda.is_available()
if CUDA and os.environ.get("DS_ACCELERATOR") == "cpu":
    # tests/conftest.py pins DeepSpeed to its CPU accelerator for the CPU suite (and every subprocess inherits it);
    # this tier needs CUDA's. Run it on its own (`make test-gpu`), before anything has imported deepspeed.
    del os.environ["DS_ACCELERATOR"]


def pytest_collection_modifyitems(config, items):
    if CUDA or ON_CPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (LONGEXT_GPU_TESTS_ON_CPU=1 runs them on the CPU)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if CUDA else "cpu"


@pytest.fixture(scope="session")
def distributed():
    """A process group of one (NCCL on CUDA, gloo on CPU), as `longext train` makes it."""
    from longext.engine import init_distributed

    return init_distributed()
