"""Deterministic micro-batches over packed rows.

Every micro-batch is a pure function of (seed, global micro-batch index, rank): resuming from a checkpoint replays
exactly the batches an uninterrupted run would have seen, and position samplers (PoSE, E2-LLM, LongRecipe) draw from
a generator seeded the same way. The rows come from longext.data.packing.PackedRows (memory-mapped, the training path)
or from Samples (tensors in memory: LongRecipe's selected sentences, small tests); both answer `rows(indices)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from longext.errors import LongextError


@dataclass(frozen=True)
class Samples:
    """[n, seq_len] token ids and a mask of real (non-padding) tokens, in memory."""

    input_ids: torch.Tensor
    real: torch.Tensor  # bool

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def rows(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[indices], "real": self.real[indices]}


def pack(token_docs: list[list[int]], seq_len: int, eos_id: int, mode: str = "concat") -> Samples:
    """In memory: concat: documents joined by EOS, cut into seq_len blocks (remainder dropped);
    per_doc: one document per sample, truncated, padded with EOS marked not-real."""
    if mode == "concat":
        stream = [t for doc in token_docs for t in (*doc, eos_id)]
        n = len(stream) // seq_len
        if n == 0:
            raise LongextError(
                f"data.train: {len(stream)} tokens in all, fewer than one sample of data.seq_len {seq_len}"
            )
        ids = torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)
        return Samples(ids, torch.ones_like(ids, dtype=torch.bool))
    rows, real = [], []
    for doc in token_docs:
        doc = list(doc[: seq_len - 1]) + [eos_id]
        pad = seq_len - len(doc)
        rows.append(doc + [eos_id] * pad)
        real.append([True] * len(doc) + [False] * pad)
    if not rows:
        raise LongextError("data.train: no documents")
    return Samples(torch.tensor(rows, dtype=torch.long), torch.tensor(real, dtype=torch.bool))


class PositionSampler(Protocol):
    """Position ids (and extra model inputs) for one row; must be a pure function of `gen`.

    `pieces` are the lengths of the row's document pieces, in order, summing to the row's length: one piece (the
    whole row) without data.document_mask; with it, one per document piece, and the sampler treats each piece as a
    sample of its own (positions restart, PoSE skips inside each document, E2-LLM's offset per document). Returns
    [sum(pieces)] positions and per-row extras (E2-LLM's scale, one per row)."""

    def __call__(self, pieces: list[int], gen: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


def contiguous_positions(pieces: list[int], gen: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return torch.cat([torch.arange(n) for n in pieces]), {}


def piece_lengths(segments) -> list[int]:
    """Lengths of the runs of equal segment numbers in one row (its document pieces), in order."""
    segments = torch.as_tensor(segments)
    bounds = torch.nonzero(segments[1:] != segments[:-1]).flatten() + 1
    edges = torch.cat([torch.zeros(1, dtype=torch.long), bounds, torch.tensor([len(segments)])])
    return edges.diff().tolist()


class TrainData:
    """Deterministic micro-batches over packed rows, sharded by rank.

    With `document_mask`, each row carries `segment_ids` (which document piece each token belongs to), the position
    sampler runs on every piece as on a sample of its own (positions restart at each document), and the first token
    of every piece is not a target (nothing of its document comes before it); longext.data.masks turns the segments
    into what the attention kernel needs."""

    def __init__(self, samples, micro_batch_size: int, seed: int, positions: PositionSampler = contiguous_positions,
                 draw_group: int = 1, document_mask: bool = False):
        self.samples, self.mbs, self.seed, self.positions = samples, micro_batch_size, seed, positions
        self.draw_group = draw_group  # samples sharing one position draw (one optimizer step's worth, or 1)
        self.document_mask = document_mask
        self._orders: dict[int, torch.Tensor] = {}

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._orders = {epoch: torch.randperm(len(self.samples), generator=gen)}
        return self._orders[epoch]

    def micro_batch(self, index: int, rank: int = 0, world_size: int = 1) -> dict[str, torch.Tensor]:
        """Micro-batch number `index` (counted over the whole run) for `rank`."""
        counters, rows = [], []
        for j in range(self.mbs):
            k = (index * world_size + rank) * self.mbs + j  # global sample counter
            epoch, offset = divmod(k, len(self.samples))
            counters.append(k)
            rows.append(int(self._order(epoch)[offset]))
        block = {key: torch.as_tensor(value) for key, value in self.samples.rows(rows).items()}
        if self.document_mask and "segments" not in block:
            raise LongextError("data.document_mask: these rows carry no document boundaries")
        positions, extras = [], []
        for j, k in enumerate(counters):
            gen = torch.Generator().manual_seed(self.seed * 7_919 + k // self.draw_group)
            pos, extra = self.row_positions(block, j, gen)
            positions.append(pos)
            extras.append(extra)
        input_ids, real = block["input_ids"], block["real"]
        learn = real & block["learn"] if "learn" in block else real
        batch = {
            "input_ids": input_ids,
            # Always explicit: with skipped position ids and no mask transformers treats the row as
            # packed sequences and blocks attention across the jumps (feasibility.md §4).
            "attention_mask": real.long(),
            "labels": input_ids.masked_fill(~learn, -100),
            "position_ids": torch.stack(positions),
        }
        if self.document_mask:
            segments = block["segments"].long()
            batch["segment_ids"] = segments
            batch["labels"] = batch["labels"].masked_fill(_piece_starts(segments), -100)
        for key in extras[0]:
            batch[key] = torch.stack([e[key] for e in extras])
        return batch

    def row_positions(self, block: dict[str, torch.Tensor], j: int, gen: torch.Generator):
        """(positions, extras) of row j of `block`: the sampler over its document pieces, or over the whole row."""
        pieces = piece_lengths(block["segments"][j]) if self.document_mask else [self.samples.seq_len]
        return self.positions(pieces, gen)

    def epochs(self, micro_batches: int, world_size: int) -> float:
        return micro_batches * world_size * self.mbs / len(self.samples)


def _piece_starts(segments: torch.Tensor) -> torch.Tensor:
    """[b, L] bool: the first token of every document piece."""
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return starts
