"""LongGen benchmark cases (issue 6): the hybrid model against the same model with every layer full, in
the same run, as ratios.

- efficiency cases (one process each): KV-cache bytes after a prefill of the target length, prefill
  seconds, and one training step (forward + backward + AdamW, LoRA r8 on q/k/v/o, DeepSpeed ZeRO-2) at
  the target length; at 8 x L0 = 1024 on the toy base and at 16k on SmolLM2-135M;
- passkey cases (model cases of longext.bench.cases): a LongGen run and an all-full run of the toy base
  trained with the same recipe, steps and tokens, evaluated at the same lengths.

The case lists are in longext.bench.suites (longgen_cases), like every suite's.

    python -m longext.bench.longgen '<case json>' OUT.json
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from pathlib import Path

import torch

from longext.bench.fresh import Measured, main, run_fresh, timed

# ---------------------------------------------------------------------------------------- FLOPs
def flop_ratios(config: dict, sparse: dict, full_layers: int, length: int, checkpointing: bool) -> dict:
    """Full-attention FLOPs over LongGen FLOPs for one prefill (logits of the last token only) and one LoRA training
    step, from the model's config.json: the speed-up if time followed FLOPs. Linear layers 2 T x params (backward:
    input gradients only, the base weights being frozen); attention 4 h per query head and visible (query, key)
    pair, its backward 2.5 x (a flash backward's five matmuls against two); gradient checkpointing one more forward
    of the layers; the training step's lm_head over every token, forward and input gradient. attn_sink only."""
    d, i, n, V = (config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"))
    H = config["num_attention_heads"]
    h = config.get("head_dim") or d // H
    G = config.get("num_key_value_heads") or H
    T, sinks, window = length, sparse.get("sink_tokens", 0), sparse["window"]
    linear = 2 * T * (2 * d * H * h + 2 * d * G * h + 3 * d * i)
    pairs_full = T * (T + 1) // 2
    pairs_sparse = sum(min(q + 1, window) + min(sinks, max(0, q + 1 - window)) for q in range(T))

    def total(pairs: list[int], train: bool) -> float:
        attention = sum(4 * h * H * p for p in pairs)
        if not train:
            return n * linear + attention + 2 * d * V
        forward = n * linear + attention
        return forward * (2 if checkpointing else 1) + n * linear + 2.5 * attention + 4 * T * d * V

    full = [pairs_full] * n
    hybrid = [pairs_full] * full_layers + [pairs_sparse] * (n - full_layers)
    return {"prefill": total(full, False) / total(hybrid, False), "train": total(full, True) / total(hybrid, True)}


# ------------------------------------------------------------------------------------ measuring
def _model(name: str):
    from transformers import AutoModelForCausalLM

    if name == "toy":
        from longext.bench.suites import TOY_DIR

        path = TOY_DIR
    else:
        from longext.materials import smollm2_dir

        path = smollm2_dir()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")


def _spec(model, sparse: dict):
    """The LongGenSpec the recipe defaults give this model: middle third full, `sparse` elsewhere."""
    from longext.methods.longgen import longgen_spec
    from longext.recipe import LongGenMethod

    method = LongGenMethod(kind="longgen", target_len=1, sparse=sparse)
    return longgen_spec(method, model.config)


def _prepare(case: dict):
    from longext.methods.longgen.modeling_longext_longgen import apply_longgen
    from longext.models import quiet_libraries

    quiet_libraries()
    model = _model(case["model"])
    spec = _spec(model, case["sparse"])
    if case["arm"] == "longgen":
        apply_longgen(model, spec)
    return model, spec


def _ids(vocab: int, length: int) -> torch.Tensor:
    return torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(0))


def prefill_case(case: dict) -> dict:
    """Median prefill seconds of `length` tokens (no_grad, batch 1) and the cache's KV bytes after it."""
    from longext.methods.longgen import modeling_longext_longgen as lg

    model, spec = _prepare(case)
    model.eval()
    ids = _ids(model.config.vocab_size, case["length"])

    def prefill(tokens):
        cache = new_cache(model, spec, case["arm"])
        with torch.no_grad():
            model(input_ids=tokens, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return cache

    prefill(ids[:, : min(256, case["length"])])  # warm-up: allocator, first-call kernels
    times, cache = [], None
    for _ in range(case["repeats"]):
        began = time.perf_counter()
        cache = prefill(ids)
        times.append(time.perf_counter() - began)
    layers = model.config.num_hidden_layers
    return {"prefill_seconds": statistics.median(times), "all_seconds": times, "kv_bytes": lg.kv_bytes(cache),
            "full_layers": list(spec.full_layers), "layers": layers, "budget": lg.budget(spec, case["length"]),
            "cache": type(cache).__name__}


def new_cache(model, spec, arm: str):
    """LongGenCache for the hybrid (sparse layers keep only what they can still read), DynamicCache otherwise."""
    from transformers import DynamicCache

    from longext.methods.longgen import modeling_longext_longgen as lg

    if arm == "longgen":
        return lg.LongGenCache(config=model.config)
    return DynamicCache(config=model.config)


def train_case(case: dict) -> dict:
    """Median seconds of one optimizer step (forward + backward + AdamW) at batch 1 x length, LoRA r8 q/k/v/o,
    longext's DeepSpeed ZeRO-2 engine (as `longext train` runs it)."""
    from longext.engine import init_distributed, make_engine
    from longext.models import add_lora
    from longext.recipe import LoraSpec, TrainSpec

    model, _ = _prepare(case)
    init_distributed()
    peft = add_lora(model, LoraSpec(r=8, alpha=16.0), case.get("gradient_checkpointing", False))
    steps = case["repeats"]
    engine = make_engine(peft, TrainSpec(steps=steps + 1, lr=1e-4, zero_stage=2, precision="fp32"), world_size=1)
    engine.train()  # from_pretrained gives eval mode, where transformers skips gradient checkpointing
    ids = _ids(model.config.vocab_size, case["length"])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids,
             "position_ids": torch.arange(case["length"])[None]}

    tiled = case.get("tiled_loss", False)  # both arms alike: at 16k the untiled [L, vocab] logits fill 24 GB
    if tiled:
        from longext.sp import layout, micro_batch_loss, shard_batch

        one = layout(0, 1, 1)

    def step():
        loss = micro_batch_loss(engine, shard_batch(batch, one), one, True)[0] if tiled else engine(**batch).loss
        engine.backward(loss)
        engine.step()

    times = timed(step, steps)  # after one warm-up step
    return {"step_seconds": statistics.median(times), "all_seconds": times}


def run_case(case: dict, folder: Path, timeout: int = 4 * 3600) -> Measured:
    """One efficiency measurement in a fresh process (its peak memory is its own); adds wall time."""
    env = {"DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    measured = run_fresh("longext.bench.longgen", case, folder, timeout, env)
    measured.result = {**measured.result, "wall_seconds": measured.seconds}
    return measured


def measure(case: dict, folder: Path) -> dict:
    result = prefill_case(case) if case["measure"] == "prefill" else train_case(case)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


if __name__ == "__main__":
    main(measure)
