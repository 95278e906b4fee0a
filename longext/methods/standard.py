"""Plain fine-tuning with contiguous positions at data.seq_len; the `rope` section is the whole extension. Every hook
is the default (longext.methods.base)."""

from __future__ import annotations

from longext.methods.base import Method

METHOD = Method(kind="standard")
