"""Training data: files → documents → tokens → fixed-length samples → deterministic micro-batches.

Every micro-batch is a pure function of (seed, global micro-batch index, rank): resuming from a
checkpoint replays exactly the batches an uninterrupted run would have seen, and position samplers
(PoSE, E2-LLM, LongRecipe) draw from a generator seeded the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from longext.errors import LongextError

SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def load_documents(paths: list[Path], text_field: str = "text") -> list[str]:
    """Texts of the given files through `datasets` (.txt: one document per file)."""
    from datasets import Dataset, load_dataset

    docs: list[str] = []
    for path in paths:
        kind = SUFFIXES.get(path.suffix)
        if kind is None:
            raise LongextError(f"data.train: unsupported file type {path.suffix!r}: {path} (allowed: {', '.join(SUFFIXES)})")
        if kind == "text":
            table = Dataset.from_dict({text_field: [path.read_text(encoding="utf-8", errors="replace")]})
        else:
            try:
                table = load_dataset(kind, data_files=str(path), split="train")
            except Exception as err:  # datasets raises many types for malformed files
                raise LongextError(f"data.train: cannot read {path}: {str(err).splitlines()[0]}") from None
        if text_field not in table.column_names:
            raise LongextError(
                f"data.text_field: column {text_field!r} not in {path} (columns: {', '.join(table.column_names)})"
            )
        docs.extend(t for t in table[text_field] if t)
    return docs


def tokenize_documents(docs: list[str], tokenizer) -> list[list[int]]:
    """Token ids of each document, no special tokens (EOS separators are added when packing)."""
    from datasets import Dataset

    table = Dataset.from_dict({"text": docs})
    table = table.map(
        lambda batch: {"ids": tokenizer(batch["text"], add_special_tokens=False)["input_ids"]},
        batched=True, remove_columns=["text"], desc=None,
    )
    return table["ids"]


@dataclass(frozen=True)
class Samples:
    """[n, seq_len] token ids and a mask of real (non-padding) tokens."""

    input_ids: torch.Tensor
    real: torch.Tensor  # bool

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def pack(token_docs: list[list[int]], seq_len: int, eos_id: int, mode: str = "concat") -> Samples:
    """concat: documents joined by EOS, cut into seq_len blocks (remainder dropped);
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
    """Position ids (and extra model inputs) for one sample; must be a pure function of `gen`."""

    def __call__(self, seq_len: int, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


def contiguous_positions(seq_len: int, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return torch.arange(seq_len), {}


class TrainData:
    """Deterministic micro-batches over packed samples, sharded by rank."""

    def __init__(self, samples: Samples, micro_batch_size: int, seed: int, positions: PositionSampler = contiguous_positions,
                 draw_group: int = 1):
        self.samples, self.mbs, self.seed, self.positions = samples, micro_batch_size, seed, positions
        self.draw_group = draw_group  # samples sharing one position draw (one optimizer step's worth, or 1)
        self._orders: dict[int, torch.Tensor] = {}

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._orders = {epoch: torch.randperm(len(self.samples), generator=gen)}
        return self._orders[epoch]

    def micro_batch(self, index: int, rank: int = 0, world_size: int = 1) -> dict[str, torch.Tensor]:
        """Micro-batch number `index` (counted over the whole run) for `rank`."""
        rows, positions, extras = [], [], []
        for j in range(self.mbs):
            k = (index * world_size + rank) * self.mbs + j  # global sample counter
            epoch, offset = divmod(k, len(self.samples))
            rows.append(int(self._order(epoch)[offset]))
            gen = torch.Generator().manual_seed(self.seed * 7_919 + k // self.draw_group)
            pos, extra = self.positions(self.samples.input_ids.shape[1], gen)
            positions.append(pos)
            extras.append(extra)
        input_ids = self.samples.input_ids[rows]
        real = self.samples.real[rows]
        labels = input_ids.masked_fill(~real, -100)
        batch = {
            "input_ids": input_ids,
            # Always explicit: with skipped position ids and no mask transformers treats the row as
            # packed sequences and blocks attention across the jumps (feasibility.md §4).
            "attention_mask": real.long(),
            "labels": labels,
            "position_ids": torch.stack(positions),
        }
        for key in extras[0]:
            batch[key] = torch.stack([e[key] for e in extras])
        return batch

    def epochs(self, micro_batches: int, world_size: int) -> float:
        return micro_batches * world_size * self.mbs / len(self.samples)


def training_documents(recipe) -> list[str]:
    """The texts of data.train after data.holdout_docs and data.max_docs."""
    from longext.materials import resolve_texts

    docs = load_documents(resolve_texts(recipe.data.train, "train", "data.train"), recipe.data.text_field)
    if recipe.data.holdout_docs:
        docs = docs[: -recipe.data.holdout_docs]
    if recipe.data.max_docs:
        docs = docs[: recipe.data.max_docs]
    if not docs:
        raise LongextError("data.train: no documents left to train on (check data.max_docs / data.holdout_docs)")
    return docs


def build_train_data(recipe, tokenizer, positions: PositionSampler = contiguous_positions, draw_group: int = 1) -> TrainData:
    docs = training_documents(recipe)
    samples = pack(tokenize_documents(docs, tokenizer), recipe.seq_len, tokenizer.eos_token_id, recipe.data.packing)
    return TrainData(samples, recipe.train.micro_batch_size, recipe.train.seed, positions, draw_group)

