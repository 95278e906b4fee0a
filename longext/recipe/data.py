"""The recipe's `data` section: sources (files, folders, globs, `books`, a `datasets` folder, a hub name) with
mixture weights and length filters, packing, the document mask, chat loss, bad-input limits and the cache
(docs/data.md). Whether the document mask is on for a resolved recipe is longext.data.document_mask's answer."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, model_serializer

from longext.recipe.base import Auto, Length, Section


class SourceSpec(Section):
    """One entry of `data.train`. A plain string is the same as `{path: <string>}`."""

    path: str | None = Field(
        None, description="A .txt (one document per file), .jsonl, .json or .parquet file; a folder of them; a glob "
        "(`data/*.jsonl`, `**` recurses); a folder written by `datasets` save_to_disk; or `books` (the offline "
        "public-domain books).",
    )
    hub: str | None = Field(
        None, description="A `datasets` hub name (`owner/name`), streamed; needs a reachable hub (HF_HUB_OFFLINE unset). "
        "A local folder laid out like a hub dataset repo works too, and offline.",
    )
    subset: str | None = Field(None, description="hub only: the dataset's configuration name.")
    split: str = Field("train", description="hub only: the split to read.")
    revision: str | None = Field(None, description="hub only: a branch, tag or commit; part of the cache key.")
    weight: float = Field(
        1.0, gt=0, description="Times each document of this source is used per pass over the data: 3 = three copies "
        "(long-document upsampling), 0.5 = a seeded half. Fractions pick documents from train.seed.",
    )
    min_tokens: int | None = Field(None, ge=1, description="Drop documents with fewer tokens (counted before packing).")
    max_tokens: int | None = Field(None, ge=1, description="Drop documents with more tokens.")
    text_field: str | None = Field(None, description="Column holding the text for this source. Default: data.text_field.")

    @model_serializer(mode="wrap")
    def _as_written(self, handler):
        # the resolved recipe.yaml of a run shows an entry as it was written: `- books` stays `- books`, a mapping
        # keeps only its own keys
        if self.model_fields_set <= {"path"} and self.path is not None:
            return self.path
        return {k: v for k, v in handler(self).items() if k in self.model_fields_set}

    @property
    def label(self) -> str:
        """How messages and summaries name this source."""
        return self.path if self.path is not None else f"hub:{self.hub}"


def _entry(value: Any) -> Any:
    if isinstance(value, str):
        return {"path": value}
    if isinstance(value, (dict, SourceSpec)):
        return value
    raise ValueError("expected a path (file, folder, glob or `books`) or a mapping with `path` or `hub`")


TrainSource = Annotated[SourceSpec, BeforeValidator(_entry)]


class DataSpec(Section):
    """Training text: tokenized once into a cache, packed to seq_len, with labels and attention masks (docs/data.md)."""

    train: list[TrainSource] = Field(
        default_factory=lambda: [SourceSpec(path="books")],
        min_length=1,
        description="Sources, each a path (files, folders, globs, a `datasets` save_to_disk folder, `books`) or a "
        "mapping with a weight and filters (see data.train entries below). Rows with `messages` are chat data.",
    )
    text_field: str = Field("text", description="Column holding the text in .jsonl/.json/.parquet/datasets rows.")
    messages_field: str = Field(
        "messages", description="Column holding a chat (a list of {role, content}); such rows go through the "
        "tokenizer's chat template.",
    )
    seq_len: Length | Auto = Field(
        "auto",
        description="Tokens per training sample. auto = the method's default: target_len (standard, harpe, longgen), "
        "L0 (pose, e2llm), round(train_len_ratio * target_len) (longrecipe).",
    )
    packing: Literal["concat", "per_doc"] = Field(
        "concat",
        description="concat: documents joined with EOS and cut into seq_len blocks; per_doc: one document per "
        "sample, truncated, shorter ones padded (padding masked out of loss and attention).",
    )
    document_mask: bool | Literal["auto"] = Field(
        "auto",
        description="With concat packing, each document attends only to itself (ProLong) and the method's positions "
        "are drawn per document piece: they restart at 0, PoSE skips and E2-LLM offsets fall inside each document "
        "(E2-LLM's scale stays one per row), LongRecipe transforms each document's sentences over its share of "
        "target_len, LongGen's sparse pattern counts from each document's first token. auto = on for concat packing "
        "when the attention kernel is flash-attn (no mask tensor), or sdpa/eager with a [batch, 1, L, L] mask of at "
        "most 1 GiB (32k tokens at batch 1 with sdpa), at any train.sequence_parallel. false: documents attend "
        "across their EOS boundaries.",
    )
    loss_on: Literal["assistant", "all"] = Field(
        "assistant", description="Chat rows: learn only the assistant turns (the rest is context), or every token.",
    )
    max_docs: int | None = Field(None, ge=1, description="Use at most this many documents.")
    holdout_docs: int = Field(
        0, ge=0, description="Documents at the end of the list kept out of training (for your own eval)."
    )
    max_bad_rows: int = Field(
        0, ge=0, description="Malformed rows (invalid JSON, missing or non-text field, empty text) skipped before "
        "the run stops; each is reported with file:line.",
    )
    encoding_errors: Literal["strict", "replace"] = Field(
        "strict", description="Text that is not valid UTF-8: refuse it (naming file and byte offset), or replace "
        "the bad bytes with U+FFFD. Mostly non-printable text is refused either way.",
    )
    cache_dir: str | None = Field(
        None, description="Where tokenized data is cached. Default $LONGEXT_CACHE/data.",
    )


def data_checks(recipe) -> list[tuple[str, str]]:
    """Rules of the data section that span fields and need no model config (recipe.load.cross_checks adds them;
    the method's own data rules are in its block's checks)."""
    out = []
    if recipe.data.document_mask is True and recipe.data.packing != "concat":
        out.append(("data.document_mask", "applies to concat packing; per_doc rows hold one document already "
                                          "(set data.packing: concat or remove document_mask)"))
    for i, source in enumerate(recipe.data.train):
        where = f"data.train.{i}"
        if (source.path is None) == (source.hub is None):
            out.append((where, "give exactly one of path or hub (got "
                               f"{'both' if source.path is not None else 'neither'})"))
        hub_only = sorted(source.model_fields_set & {"subset", "split", "revision"})
        if source.path is not None and hub_only:
            out.append((f"{where}.{hub_only[0]}", "is for hub sources; a path source has none"))
        if source.min_tokens and source.max_tokens and source.min_tokens > source.max_tokens:
            out.append((f"{where}.max_tokens", f"must be at least min_tokens {source.min_tokens} "
                                               f"(got {source.max_tokens})"))
    return out
