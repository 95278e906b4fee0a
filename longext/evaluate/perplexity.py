"""Perplexity against context length, with memory linear in the length.

Never builds `[s, v]` logits: the decoder gives `[s, d]` hidden states, and the output head plus the
cross-entropy run over 1024-row chunks of the scored positions only (design.md §4, "Long eval").
Modes (docs/eval.md):

- fixed: the same final `targets` tokens of `windows` spans, scored with L tokens of context for
  every L, so a change in perplexity between lengths comes from the context alone;
- sliding: windows of L tokens advanced by `stride`, each scoring its last `stride` tokens (the
  first window of a document scores all but its first token), at most `windows * (L // stride)`
  windows per length.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from longext.errors import LongextError
from longext.lengths import format_length
from longext.recipe import PerplexitySpec

CHUNK_ROWS = 1024

# progress(label, tokens): called with tokens=0 before a forward pass and tokens=its length after.
Progress = Callable[[str, int], None]


@dataclass(frozen=True)
class Window:
    """One forward pass: tokens [end - length, end) of document `doc`, scoring the last `scored`."""

    doc: int
    end: int
    length: int
    scored: int

    @property
    def start(self) -> int:
        return self.end - self.length


# ------------------------------------------------------------------------------------- planning
def plan_windows(doc_tokens: list[int], lengths: list[int], spec: PerplexitySpec) -> dict[int, list[Window]]:
    """The forward passes for each length, given the token count of each document.

    Raises:
        LongextError: `targets`/`stride` too large for the shortest length, or no document long enough.
    """
    shortest = min(lengths)
    if spec.mode == "fixed":
        if spec.targets >= shortest:
            raise LongextError(
                f"eval.perplexity.targets: {spec.targets} scored tokens need every length above {spec.targets} "
                f"(shortest is {shortest}); lower it, e.g. --set perplexity.targets={max(1, shortest // 2)}"
            )
        ends = fixed_ends(doc_tokens, max(lengths), spec.windows)
        return {L: [Window(d, e, L, spec.targets) for d, e in ends] for L in lengths}
    if spec.stride >= shortest:
        raise LongextError(
            f"eval.perplexity.stride: a stride of {spec.stride} needs every length above it (shortest is "
            f"{shortest}); lower it, e.g. --set perplexity.stride={max(1, shortest // 4)}"
        )
    return {L: sliding_windows(doc_tokens, L, spec.stride, spec.windows * (L // spec.stride)) for L in lengths}


def fixed_ends(doc_tokens: list[int], need: int, n: int) -> list[tuple[int, int]]:
    """`n` (document, end offset) pairs spread evenly over the documents with >= `need` tokens.

    The valid ends of a document are need..len; the ranges of all long-enough documents, longest
    first, are laid end to end and `n` points are taken at the centres of `n` equal parts.
    Deterministic, and independent of every length but the longest.
    """
    usable = sorted(
        ((i, t - need + 1) for i, t in enumerate(doc_tokens) if t >= need), key=lambda item: (-item[1], item[0])
    )
    if not usable:
        raise _too_short(need, doc_tokens)
    total = sum(count for _, count in usable)
    n = min(n, total)
    ends = []
    for k in range(n):
        point = int((k + 0.5) * total / n)
        for doc, count in usable:
            if point < count:
                ends.append((doc, need + point))
                break
            point -= count
    return ends


def sliding_windows(doc_tokens: list[int], length: int, stride: int, cap: int) -> list[Window]:
    """Full windows of `length` tokens moved by `stride` through each document in order, at most `cap`."""
    if max(doc_tokens, default=0) < length:
        raise _too_short(length, doc_tokens)
    out: list[Window] = []
    for doc, tokens in enumerate(doc_tokens):
        end = length
        while end <= tokens and len(out) < cap:
            out.append(Window(doc, end, length, length - 1 if end == length else stride))
            end += stride
    return out


def _too_short(need: int, doc_tokens: list[int]) -> LongextError:
    longest = max(doc_tokens, default=0)
    return LongextError(
        f"perplexity at {format_length(need)}: no text is long enough (need {need} tokens, the longest of "
        f"{len(doc_tokens)} has {longest}); give longer --texts or test shorter lengths"
    )


# -------------------------------------------------------------------------------------- scoring
def document_token_ids(tokenizer, texts: list[str]) -> list[torch.Tensor]:
    """[n_tokens] int64 ids of each text, no special tokens."""
    return [
        torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
        for text in texts
    ]


def decoder_and_head(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The decoder stack (ids -> final-norm hidden states) and the output head; unwraps peft models."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def summed_nll(head, hidden: torch.Tensor, targets: torch.Tensor, softcap: float | None = None,
               rows: int = CHUNK_ROWS) -> float:
    """Sum over positions of -log p(target), in nats, from hidden [n, d] and targets [n].

    Logits are made `rows` at a time ([rows, v], upcast to float32), so memory does not grow with n * v.
    """
    total = 0.0
    for i in range(0, hidden.shape[0], rows):
        logits = head(hidden[i : i + rows]).float()  # [rows, v]
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        total += F.cross_entropy(logits, targets[i : i + rows], reduction="sum").item()
    return total


def window_nll(model, ids: torch.Tensor, scored: int, rows: int = CHUNK_ROWS) -> float:
    """Summed NLL (nats) of the last `scored` tokens of ids [s], each predicted from all tokens before it."""
    decoder, head = decoder_and_head(model)
    device = next(model.parameters()).device
    x = ids.unsqueeze(0).to(device)  # [1, s]
    with torch.inference_mode():
        out = decoder(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False)
        hidden = out.last_hidden_state[0, -scored - 1 : -1]  # [scored, d]: position i predicts token i + 1
        softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
        return summed_nll(head, hidden, x[0, -scored:], softcap, rows)


def perplexity_at_lengths(
    model,
    token_ids: list[torch.Tensor],
    lengths: list[int],
    spec: PerplexitySpec,
    *,
    set_length: Callable[[int], None] | None = None,
    progress: Progress | None = None,
) -> dict[int, dict]:
    """Perplexity at each length over documents token_ids (each [n_tokens] int64).

    Returns per length: ppl, nll (mean nats per scored token), scored_tokens, windows, seconds and
    tokens_per_s (tokens fed to the model per second).
    """
    plan = plan_windows([len(t) for t in token_ids], sorted(set(lengths)), spec)
    out = {}
    for length, windows in plan.items():
        if set_length:
            set_length(length)
        label = f"ppl {format_length(length)}"
        nll, scored, started = 0.0, 0, time.perf_counter()
        for w in windows:
            if progress:
                progress(label, 0)
            nll += window_nll(model, token_ids[w.doc][w.start : w.end], w.scored)
            scored += w.scored
            if progress:
                progress(label, w.length)
        seconds = time.perf_counter() - started
        mean = nll / scored
        out[length] = {
            "ppl": math.exp(mean) if mean < 700 else math.inf,
            "nll": mean,
            "scored_tokens": scored,
            "windows": len(windows),
            "seconds": seconds,
            "tokens_per_s": length * len(windows) / max(seconds, 1e-9),
        }
    return out
