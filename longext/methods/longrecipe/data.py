"""LongRecipe training data: the prepared corpus → selected sentences (cached once, sentences.py) → rows of exactly
seq_len tokens, with position ids from the LongRecipe transform over each row's sentences (methods.md §4.1.4).

The transform needs to know where each row's sentences start, so the rows carry their sentence pieces and the
position draw is seeded like every other sampler (recipe seed + global sample index). With data.document_mask,
each document piece of a row is transformed on its own, its positions spanning the same share of target_len as its
share of the row (a piece of n of the row's B tokens spans round(n * target_len / B) positions) and restarting at
0; a row of one document is the paper's transform unchanged.
"""

from __future__ import annotations

import sys

import torch

from longext.data.batches import TrainData, piece_lengths
from longext.data.prepare import build_progress, prepare_corpus
from longext.methods.longrecipe.sentences import SentenceRows, selected_rows
from longext.positions import longrecipe_positions


class LongRecipeData(TrainData):
    """TrainData whose position ids follow each row's own sentence boundaries."""

    def __init__(self, rows: SentenceRows, micro_batch_size: int, seed: int, target_len: int, gap_mode: str,
                 max_gap: int | None, contiguous_prefix: bool, document_mask: bool = False):
        super().__init__(rows, micro_batch_size, seed, document_mask=document_mask)
        self.target_len, self.gap_mode, self.max_gap, self.prefix = target_len, gap_mode, max_gap, contiguous_prefix

    def row_positions(self, block: dict[str, torch.Tensor], j: int, gen: torch.Generator):
        sentences, length = block["sentences"][j], block["sentences"].shape[1]
        pieces = piece_lengths(block["segments"][j]) if self.document_mask else [length]
        out, at = [], 0
        for n in pieces:
            span = self.target_len if n == length else max(n, round(n * self.target_len / length))
            lengths = piece_lengths(sentences[at:at + n])  # a document piece starts a sentence piece
            out.append(longrecipe_positions(lengths, span, gen, self.gap_mode, self.max_gap, self.prefix))
            at += n
        return torch.cat(out), {}


def build_longrecipe_data(recipe, tokenizer) -> LongRecipeData:
    """The resolved recipe's extension data: data.train prepared like every method's (token caches, mixture), then
    method.selection over it, cached."""
    method, data = recipe.method, recipe.data
    with build_progress(sys.stderr.isatty()) as (progress, say):
        corpus = prepare_corpus(data, tokenizer, recipe.seq_len, recipe.train.seed, recipe.model.path,
                                progress=progress, say=say)
        rows = selected_rows(corpus, tokenizer, method.selection, recipe.train.seed, recipe.seq_len, data.cache_dir,
                             say)
    p = method.positions
    return LongRecipeData(rows, recipe.train.micro_batch_size, recipe.train.seed, method.target_len, p.gap_mode,
                          p.max_gap, p.contiguous_prefix, document_mask=data.document_mask is True)
