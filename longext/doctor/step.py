"""The measuring process of `longext doctor`: LoRA training steps of a recipe at several lengths, timed, with their
peak memory; optionally the Ulysses SP=1 check. The only doctor module that imports longext's training internals
(recipe loading and resolution, model building, LoRA, the memory savers, the engine): it sets the model up exactly as
`longext train` does (longext/train.py), on random token ids instead of the recipe's data.

    python -m longext.doctor.step '{"recipe": "r.yaml", "lengths": [8192, 16384], "timed_steps": 2, "sp_length": 8192,
                                    "overrides": ["method.target_len=16k"]}'

prints one JSON line. Peak memory: on CUDA `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`; on
CPU the peak resident set (VmHWM, reset before each length) minus the resident set before the model was built,
after a warm-up step of the same code path on a 1-layer toy (so lazy imports count as process baseline) -- the
quantities `longext plan` (GPU) and `longext plan --cpu` (total minus its fixed term) estimate.
"""

from __future__ import annotations

import gc
import json
import math
import os
import statistics
import sys
import time

import torch

from longext.bench.memory import rss_kb, trim_and_reset_peak
from longext.engine import init_distributed, make_engine, release_zero3_linear
from longext.methods import method_for
from longext.models import add_lora, quiet_libraries
from longext.recipe import LoraSpec, TrainSpec, load_recipe
from longext.resolve import resolve
from longext.savers import activation_offload
from longext.sp import layout, micro_batch_loss, shard_batch
from longext.train import trainable_model

GiB = 2**30
MODEL_SWITCHES = ("gradient_checkpointing", "tiled_mlp", "fused_norm", "zero_stage", "precision", "optimizer")


def on_gpu() -> bool:
    return torch.cuda.is_available()


def synchronize() -> None:
    if on_gpu():
        torch.cuda.synchronize()


class Built:
    """Model and engine for one set of model-shaping switches, as `longext train` sets them up."""

    def __init__(self, resolved):
        recipe = resolved.recipe
        t = recipe.train
        self.key = tuple(getattr(t, k) for k in MODEL_SWITCHES)
        method = method_for(recipe.method.kind).setup(recipe, resolved.rope)
        model, self.lay = trainable_model(resolved, method, layout(0, 1, t.sequence_parallel))  # exactly train's set-up
        self.engine = make_engine(model, t, self.lay.dp, self.lay.mpu)
        self.engine.train()
        self.vocab = model.config.vocab_size

    def loss(self, batch: dict, t):
        """train._forward's choice: transformers' loss, or longext.sp's on the (SP=1) shard with the tiled loss."""
        with activation_offload(t):
            if self.lay.sp == 1 and not t.tiled_loss:
                return self.engine(**{k: v.to(self.engine.device) for k, v in batch.items()}).loss
            return micro_batch_loss(self.engine, shard_batch(batch, self.lay), self.lay, t.tiled_loss)[0]

    def step(self, batch: dict, t) -> float:
        loss = self.loss(batch, t)
        self.engine.backward(loss)
        self.engine.step()
        return float(loss.detach().float().item())


def random_batch(vocab: int, length: int, seed: int = 0) -> dict:
    ids = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
            "position_ids": torch.arange(length)[None]}


def reset_peak() -> None:
    if on_gpu():
        torch.cuda.reset_peak_memory_stats()
    else:
        trim_and_reset_peak()


def peak_bytes(baseline_kb: int) -> int:
    if on_gpu():
        return torch.cuda.max_memory_allocated()
    return (rss_kb("VmHWM") - baseline_kb) * 1024


def measure_length(built: Built, t, length: int, timed_steps: int, baseline_kb: int) -> dict:
    """One warm-up step, then `timed_steps` timed ones, at `length` tokens; the peak over all of them."""
    batch = random_batch(built.vocab, length)
    reset_peak()
    times, losses = [], []
    for _ in range(1 + timed_steps):
        synchronize()
        began = time.perf_counter()
        losses.append(built.step(batch, t))
        synchronize()
        times.append(time.perf_counter() - began)
    seconds = statistics.median(times[1:]) if timed_steps else times[0]
    return {"length": length, "seconds_per_step": seconds, "tokens_per_s": length / seconds, "all_seconds": times,
            "losses": losses, "finite": all(math.isfinite(x) for x in losses), "peak_bytes": peak_bytes(baseline_kb),
            "reserved_bytes": torch.cuda.max_memory_reserved() if on_gpu() else None,
            "switches": {k: getattr(t, k) for k in ("tiled_loss", "tiled_mlp", "fused_norm", "gradient_checkpointing",
                                                     "checkpoint_offload", "zero_stage", "precision")}}


def sp_check(built: Built, t, length: int) -> dict:
    """The Ulysses code path at SP=1 (longext.sp: shard_batch + micro_batch_loss, the tiled loss) against
    transformers' own loss on the same batch and weights, then one timed engine step through it."""
    batch = random_batch(built.vocab, length, seed=1)
    with torch.no_grad():
        reference = float(built.engine(**{k: v.to(built.engine.device) for k, v in batch.items()}).loss.float())
    synchronize()
    began = time.perf_counter()
    loss, logged = micro_batch_loss(built.engine, shard_batch(batch, built.lay), built.lay, True)
    built.engine.backward(loss)
    built.engine.step()
    synchronize()
    seconds = time.perf_counter() - began
    sp_loss = float(logged.float())
    return {"length": length, "reference_loss": reference, "sp_loss": sp_loss,
            "relative_difference": abs(sp_loss - reference) / max(abs(reference), 1e-12), "seconds": seconds,
            "tokens_per_s": length / seconds}


def warm_up(zero_stage: int, precision: str) -> None:
    """A step of the same code path on a 1-layer toy, dropped again: lazy imports and first-call set-up are then
    part of the process baseline (as in `longext bench memory`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1)
    model = add_lora(AutoModelForCausalLM.from_config(config, attn_implementation="sdpa"), LoraSpec(r=2))
    engine = make_engine(model, TrainSpec(steps=1, zero_stage=zero_stage, precision=precision, memory_check="off"), 1)
    ids = torch.arange(8)[None]
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    del engine, model
    release_zero3_linear()
    gc.collect()


def measure(request: dict) -> dict:
    quiet_libraries()
    init_distributed()
    extra = request.get("overrides", [])
    resolved = [resolve(load_recipe(request["recipe"], [f"data.seq_len={n}", *extra])) for n in request["lengths"]]
    recipes = [r.recipe for r in resolved]
    if not on_gpu():
        warm_up(recipes[0].train.zero_stage, recipes[0].train.precision)
        trim_and_reset_peak()
    baseline = 0 if on_gpu() else rss_kb()
    built, results, checks = None, [], {}
    try:
        for one, length in zip(resolved, request["lengths"]):
            t = one.recipe.train
            if built is None or built.key != tuple(getattr(t, k) for k in MODEL_SWITCHES):
                built = None
                gc.collect()
                built = Built(one)
            results.append(measure_length(built, t, length, request.get("timed_steps", 2), baseline))
        if request.get("sp_length"):
            checks["sp_check"] = sp_check(built, recipes[0].train, request["sp_length"])
    finally:
        release_zero3_linear()
    return {"results": results, **checks, "device": "cuda" if on_gpu() else "cpu", "threads": torch.get_num_threads(),
            "baseline_bytes": baseline * 1024}


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))))
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown of the process group and engine threads
