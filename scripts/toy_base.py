"""Pretrain the toy base model of the benchmark's toy suite (`make toy-base`), seeded, on CPU.

A ~1M-parameter Llama with a short window L0 = 128, trained on the offline *train* books plus
synthetic retrieval documents, so that the base can copy (passkey retrieval within L0) before
anything is extended. What makes copying learnable in minutes on a CPU (the earlier attempt with
plain passkey documents never formed a copy circuit, /work/shared/toy-feasibility.md):

- a 1024-token byte-level BPE trained on the train books, every digit its own token;
- passkey documents in exactly the format the evaluator uses (longext.evaluate.passkey), short and
  long ones mixed (a curriculum for free: the key is often close to the question), answer digits
  weighted x`answer_weight` in the loss;
- "repeat" documents (a random token span repeated until the row is full, loss on the repeats
  only): the classic data that forms induction heads in a few hundred steps;
- 4 layers x 4 heads, a large learning rate with warmup, a schedule by steps (not wall time).

Writes to --out: model.safetensors + config.json, the tokenizer, settings.json (every setting,
the training log summary and the gate result) and SHA256SUMS. Gate: passkey accuracy at L0 with
the evaluator's own code, on held-out book filler.

    python scripts/toy_base.py --out bench/toy-base
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

L0 = 128
ANSWER_TOKENS = 7  # " " + 5 digits + "."
FILLER_CHARS = 60_000  # held-out filler for passkey prompts up to 8 x L0


def build_tokenizer(texts: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", model_max_length=1 << 20)


def build_model(vocab: int, args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 4, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, max_position_embeddings=L0,
        rope_parameters={"rope_type": "default", "rope_theta": float(args.rope_theta)}, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    return LlamaForCausalLM(config).float()


class Mixture:
    """Rows of L0 tokens with per-token loss weights: book windows, passkey docs, repeat docs."""

    def __init__(self, tokenizer, book_text: str, args):
        from longext.evaluate.passkey import filler_sentences, passkey_prompt

        self.tok, self.args, self.eos = tokenizer, args, tokenizer.eos_token_id
        # paragraph by paragraph: one call on the whole 8 MB string is pathologically slow
        parts = tokenizer([part + "\n\n" for part in book_text.split("\n\n")])["input_ids"]
        self.stream = torch.tensor([t for part in parts for t in part], dtype=torch.long)
        self.sentences = filler_sentences(book_text)
        self.passkey_prompt = passkey_prompt
        from longext.evaluate.passkey import prompt_text

        self.bare = len(tokenizer(prompt_text(self.sentences, 0, 0, 0, "00000")[1])["input_ids"])
        self.vocab = len(tokenizer)

    def book_row(self, rng: random.Random):
        start = rng.randrange(len(self.stream) - L0)
        return self.stream[start : start + L0], torch.ones(L0)

    def passkey_row(self, rng: random.Random):
        key = str(rng.randrange(10_000, 100_000))
        # the shortest prompts hold no filler at all; the prompt leaves room for the answer inside L0
        length = rng.randint(min(self.bare + 8, L0 - ANSWER_TOKENS), L0 - ANSWER_TOKENS)
        start = rng.randrange(len(self.sentences) - 16)  # passkey_prompt tokenizes its whole sentence list once
        prompt = self.passkey_prompt(self.tok, length, key, rng.random(), self.sentences[start : start + 16])
        answer = self.tok(" " + key + ".")["input_ids"]
        ids = (prompt.ids + answer)[:L0]
        weights = [1.0] * len(prompt.ids) + [self.args.answer_weight] * (len(ids) - len(prompt.ids))
        pad = L0 - len(ids)
        return torch.tensor(ids + [self.eos] * pad), torch.tensor(weights[: len(ids)] + [0.0] * pad)

    def repeat_row(self, rng: random.Random):
        n = rng.randint(4, 40)
        span = [rng.randrange(1, self.vocab) for _ in range(n)]
        ids = (span * (L0 // n + 1))[:L0]
        return torch.tensor(ids), torch.tensor([0.0] * n + [1.0] * (L0 - n))

    def batch(self, step: int):
        rng = random.Random(f"{self.args.seed}:{step}")
        rows, weights, kinds = [], [], []
        for _ in range(self.args.batch):
            u = rng.random()
            kind = "passkey" if u < self.args.p_passkey else "repeat" if u < self.args.p_passkey + self.args.p_repeat else "book"
            ids, w = getattr(self, f"{kind}_row")(rng)
            rows.append(ids)
            weights.append(w)
            kinds.append(kind)
        return torch.stack(rows), torch.stack(weights), kinds


def weighted_loss(model, ids: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(input_ids=ids).logits[:, :-1]  # [b, s-1, v]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    w = weights[:, 1:].reshape(-1)
    return (nll * w).sum() / w.sum(), logits


def answer_accuracy(logits: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, kinds: list[str], answer_weight: float):
    """Share of passkey rows whose 5 digits are all predicted (teacher-forced argmax)."""
    hits, n = 0, 0
    for i, kind in enumerate(kinds):
        if kind != "passkey":
            continue
        pos = (weights[i, 1:] == answer_weight).nonzero().flatten()[1:6]  # skip the leading space
        n += 1
        hits += bool((logits[i, pos].argmax(-1) == ids[i, 1:][pos]).all())
    return hits / max(n, 1)


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def gate(model, tokenizer, eval_text: str, trials: int, seed: int) -> dict:
    from longext.evaluate.passkey import passkey_at_lengths
    from longext.recipe import PasskeySpec

    spec = PasskeySpec(trials=trials, depths=[(i + 0.5) / 10 for i in range(10)])
    model.eval()
    # a slice of the held-out books is plenty of filler, and keeps prompt building cheap
    row = passkey_at_lengths(model, tokenizer, [L0], spec, seed, filler=eval_text[:FILLER_CHARS])[L0]
    model.train()
    return {"length": L0, "accuracy": row["accuracy"], "correct": row["correct"], "trials": row["trials"]}


def extrapolation(model, tokenizer, eval_text: str, windows: int) -> dict:
    """Perplexity of the unextended base at L0 and 8 x L0 with the toy suite's fixed targets (its acceptance
    asks ppl(8 L0) / ppl(L0) >= 2: a base that degrades too gently leaves nothing for a method to fix)."""
    from longext.evaluate.perplexity import document_token_ids, perplexity_at_lengths
    from longext.recipe import PerplexitySpec

    spec = PerplexitySpec(targets=64, windows=windows)
    model.eval()
    with torch.no_grad():
        rows = perplexity_at_lengths(model, document_token_ids(tokenizer, [eval_text]), [L0, 8 * L0], spec)
    model.train()
    ratio = rows[8 * L0]["ppl"] / rows[L0]["ppl"]
    return {"ppl_L0": rows[L0]["ppl"], "ppl_8L0": rows[8 * L0]["ppl"], "ratio": ratio, "windows": windows}


def record_attempt(settings: dict, path: Path) -> None:
    """One line per pretraining attempt (settings, last log line, gate): what was tried, for the docs."""
    keep = ("argv", "params", "tokens_trained", "train_seconds", "gate", "extrapolation")
    line = {**{k: settings[k] for k in keep}, "last_log": settings["log"][-1] if settings["log"] else None}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench/toy-base"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--rope-theta", type=float, default=1.0e5,
                   help="RoPE base (attempts 2, 4, 6: 1e4 -> ppl(8 L0)/ppl(L0) 1.62, 500 -> 1.38, 1e5 -> 4.58)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=60)
    p.add_argument("--p-passkey", type=float, default=0.3)
    p.add_argument("--p-repeat", type=float, default=0.15)
    p.add_argument("--answer-weight", type=float, default=5.0)
    p.add_argument("--gate-trials", type=int, default=50)
    p.add_argument("--ppl-windows", type=int, default=32, help="windows of the extrapolation check")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--attempts", type=Path, default=Path("bench/toy-base-attempts.jsonl"),
                   help="append a summary of this attempt here")
    args = p.parse_args(argv)

    from longext.materials import book_files
    from longext.models import quiet_libraries

    quiet_libraries()
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    train_text = "\n".join(f.read_text(encoding="utf-8") for f in book_files("train"))
    eval_text = "\n".join(f.read_text(encoding="utf-8") for f in book_files("eval"))
    tokenizer = build_tokenizer(train_text.split("\n\n"), args.vocab)
    model = build_model(len(tokenizer), args)
    data = Mixture(tokenizer, train_text, args)
    params = sum(p.numel() for p in model.parameters())
    print(f"params {params:,}  vocab {len(tokenizer)}  bare passkey prompt {data.bare} tokens  "
          f"book stream {len(data.stream):,} tokens  setup {time.perf_counter() - began:.0f}s", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    model.train()
    log, t0 = [], time.perf_counter()
    acc_sum, acc_n, loss_sum = 0.0, 0, 0.0
    for step in range(args.steps):
        ids, weights, kinds = data.batch(step)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        loss, logits = weighted_loss(model, ids, weights)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_sum += loss.item()
        acc_sum += answer_accuracy(logits.detach(), ids, weights, kinds, args.answer_weight)
        acc_n += 1
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            record = {"step": step + 1, "loss": loss_sum / acc_n, "answer_acc": acc_sum / acc_n,
                      "lr": lr_at(step, args), "seconds": time.perf_counter() - t0}
            log.append(record)
            print(json.dumps(record), flush=True)
            acc_sum, acc_n, loss_sum = 0.0, 0, 0.0
    train_seconds = time.perf_counter() - t0
    result = gate(model, tokenizer, eval_text, args.gate_trials, args.seed)
    print(f"gate: passkey@{L0} {result['correct']}/{result['trials']} = {result['accuracy']:.2f}", flush=True)
    extra = extrapolation(model, tokenizer, eval_text, args.ppl_windows)
    print(f"extrapolation: ppl {extra['ppl_L0']:.2f} at {L0}, {extra['ppl_8L0']:.2f} at {8 * L0}: "
          f"ratio {extra['ratio']:.2f} (the toy suite needs >= 2)", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    settings = {
        "script": "scripts/toy_base.py", "argv": sys.argv[1:],
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "L0": L0, "params": params, "vocab": len(tokenizer),
        "tokens_trained": args.steps * args.batch * L0, "train_seconds": train_seconds,
        "torch": torch.__version__, "gate": {**result, "passed": result["accuracy"] >= 0.9},
        "extrapolation": {**extra, "passed": extra["ratio"] >= 2.0}, "log": log,
    }
    (args.out / "settings.json").write_text(json.dumps(settings, indent=1) + "\n")
    files = sorted(f for f in args.out.iterdir() if f.is_file() and f.name != "SHA256SUMS")
    (args.out / "SHA256SUMS").write_text("".join(f"{sha256(f)}  {f.name}\n" for f in files))
    record_attempt(settings, args.attempts)
    print(f"saved {args.out} in {time.perf_counter() - began:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
