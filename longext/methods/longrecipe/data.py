"""LongRecipe training data: documents → sentences → selected sentences → samples of exactly seq_len tokens,
each with its segment (sentence) lengths, and position ids from the LongRecipe transform (methods.md §4.1.4).

The transform needs to know where each sample's sentences start, so the per-sample position draw takes the
sample's segments; the draw is seeded like every other sampler (recipe seed + global sample index).
"""

from __future__ import annotations

import torch

from longext.data import Samples, TrainData, tokenize_documents, training_documents
from longext.errors import LongextError
from longext.methods.longrecipe.selection import (
    digit_ids, fill_samples, load_impactful, select_sentences, sentence_end_ids, split_sentences,
)
from longext.methods.longrecipe.selection import token_texts
from longext.positions import longrecipe_positions


class LongRecipeData(TrainData):
    """TrainData whose position ids follow each sample's own sentence boundaries."""

    def __init__(self, samples: Samples, segments: list[list[int]], micro_batch_size: int, seed: int, target_len: int,
                 gap_mode: str, max_gap: int | None, contiguous_prefix: bool):
        super().__init__(samples, micro_batch_size, seed)
        self.segments, self.target_len = segments, target_len
        self.gap_mode, self.max_gap, self.prefix = gap_mode, max_gap, contiguous_prefix

    def micro_batch(self, index: int, rank: int = 0, world_size: int = 1) -> dict[str, torch.Tensor]:
        batch = super().micro_batch(index, rank, world_size)
        rows = []
        for j in range(self.mbs):
            k = (index * world_size + rank) * self.mbs + j  # the global sample counter TrainData uses
            epoch, offset = divmod(k, len(self.samples))
            row = int(self._order(epoch)[offset])
            gen = torch.Generator().manual_seed(self.seed * 7_919 + k)
            rows.append(longrecipe_positions(
                self.segments[row], self.target_len, gen, self.gap_mode, self.max_gap, self.prefix
            ))
        batch["position_ids"] = torch.stack(rows)
        return batch


def impactful_ids(selection, texts: list[str]) -> set[int] | None:
    """The token ids that make a sentence impactful, or None to keep every sentence."""
    if selection.mode == "digits":
        return digit_ids(texts)
    if selection.mode == "logit_change":
        return load_impactful(selection.analysis, selection.top_fraction, len(texts))
    return None


def selected_samples(token_docs: list[list[int]], texts: list[str], eos_id: int, seq_len: int,
                     impactful: set[int] | None, keep_other: float, seed: int) -> tuple[Samples, list[list[int]]]:
    """Samples of exactly seq_len tokens made of the selected sentences of all documents, in order."""
    ends = sentence_end_ids(texts) | {eos_id}
    gen = torch.Generator().manual_seed(seed)
    kept = []
    for doc in token_docs:
        kept += select_sentences(split_sentences([*doc, eos_id], ends), impactful, keep_other, gen)
    rows, segments = fill_samples(kept, seq_len)
    if not rows:
        total = sum(map(len, kept))
        raise LongextError(
            f"data.train: {total} tokens left after method.selection, fewer than one sample of data.seq_len {seq_len}"
        )
    ids = torch.tensor(rows, dtype=torch.long)
    return Samples(ids, torch.ones_like(ids, dtype=torch.bool)), segments


def build_longrecipe_data(recipe, tokenizer) -> LongRecipeData:
    method = recipe.method
    docs = training_documents(recipe)
    texts = token_texts(tokenizer)
    samples, segments = selected_samples(
        tokenize_documents(docs, tokenizer), texts, tokenizer.eos_token_id, recipe.seq_len,
        impactful_ids(method.selection, texts), method.selection.keep_other, recipe.train.seed,
    )
    p = method.positions
    return LongRecipeData(samples, segments, recipe.train.micro_batch_size, recipe.train.seed, method.target_len,
                          p.gap_mode, p.max_gap, p.contiguous_prefix)
