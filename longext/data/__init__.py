"""Training data: sources → checked rows → tokens cached on disk once → memory-mapped → packed rows → deterministic
micro-batches (docs/data.md).

    sources   data.train entries → files, `datasets` folders, hub streams, read row by row
    checks    bad rows (file:line) and text that is not text
    chat      chat templates and assistant-only loss masks
    tokenize  the one-time build of a source's token files
    cache     cache key, manifest, lock, atomic publish, validation
    pack      mixture and filters, and the lazy row → spans index over the memory-mapped tokens
    batches   deterministic micro-batches (TrainData) over packed rows
    masks     the document mask for each attention kernel
    prepare   the whole pipeline for a recipe, its summary, `longext data prepare`
    documents whole documents in memory (eval texts, `longext analyze`)

Names resolve lazily, so `import longext.data` loads no torch. The recipe's data section is longext.recipe.data;
whether the document mask is on, longext.data.mask_policy.
"""

from __future__ import annotations

import importlib

_HOMES = {
    "Samples": "batches", "pack": "batches", "PositionSampler": "batches", "contiguous_positions": "batches",
    "TrainData": "batches",
    "load_documents": "documents", "tokenize_documents": "documents",
    "build_train_data": "prepare", "prepare_corpus": "prepare",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(f"longext.data.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'longext.data' has no attribute {name!r}")
