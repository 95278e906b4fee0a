"""Impactful-token analysis, paper version (Hu et al. 2024 §3.1; methods.md §4.1.1): how much a model already
extended to long context (H') raises the logit of each true next token over the base model (H).

For every position t of a few long windows, S(x_t | x_<t) is the final-layer logit of the true token; the change
of a token type τ is Δ(τ) = Σ over occurrences of τ of [S_H'(x_t) - S_H(x_t)]. Types are ranked by Δ; the file
`longext analyze` writes is read by `method.selection.mode: logit_change` (selection.load_impactful), which keeps the sentences holding a
top-ranked type. (The paper then tallies part-of-speech tags of the top tokens and finds numerals; with no
tagger offline we keep token types, which is the finer-grained form of the same signal.)
"""

from __future__ import annotations

import torch

from longext.errors import LongextError


@torch.no_grad()
def true_token_logits(model, ids: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """[n - 1] logits of ids[1:] given their prefixes, for one sequence `ids` [n]; never builds [n, vocab]."""
    device = next(model.parameters()).device
    out = model(input_ids=ids[None].to(device), output_hidden_states=True, logits_to_keep=1)
    hidden = out.hidden_states[-1][0, :-1]  # after the final norm
    head = model.get_output_embeddings()
    targets = ids[1:].to(device)
    parts = [
        head(hidden[i:i + chunk]).float().gather(-1, targets[i:i + chunk, None])[:, 0] for i in range(0, len(targets), chunk)
    ]
    return torch.cat(parts).cpu()


def logit_change(base, reference, windows: list[torch.Tensor], vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Δ sum [vocab], occurrences [vocab]) over the predicted tokens of all windows."""
    total = torch.zeros(vocab_size, dtype=torch.float64)
    count = torch.zeros(vocab_size, dtype=torch.long)
    for ids in windows:
        delta = (true_token_logits(reference, ids) - true_token_logits(base, ids)).double()
        total.index_add_(0, ids[1:], delta)
        count.index_add_(0, ids[1:], torch.ones_like(ids[1:]))
    return total, count


def ranking(total: torch.Tensor, count: torch.Tensor, texts: list[str]) -> list[dict]:
    """Token types seen at least once, by Δ descending (ties: lower id first, so the order is deterministic)."""
    seen = [i for i in count.nonzero().flatten().tolist()]
    seen.sort(key=lambda i: (-float(total[i]), i))
    return [
        {"id": i, "text": texts[i], "count": int(count[i]), "delta": float(total[i]), "mean": float(total[i] / count[i])}
        for i in seen
    ]


def sample_windows(token_docs: list[list[int]], eos_id: int, length: int, n: int) -> list[torch.Tensor]:
    """n windows of `length` tokens, evenly spread over the documents joined by EOS."""
    stream = torch.tensor([t for doc in token_docs for t in (*doc, eos_id)], dtype=torch.long)
    if len(stream) < length:
        raise LongextError(f"--texts: {len(stream)} tokens in all, fewer than one window of --length {length}")
    starts = torch.linspace(0, len(stream) - length, n).round().long().unique().tolist()
    return [stream[s:s + length] for s in starts]
