"""Real peak memory of one longext training step on CPU, to hold `longext plan`'s estimate against.

A memory case is a JSON-able dict:

    {"kind": "memory", "name": "mem-tiny-1k-z2", "model": "tiny" | "tiny-moe" | "smollm2", "seq_len": 1024,
     "zero_stage": 2, "gradient_checkpointing": false, "steps": 2,
     "tiled_loss": false, "tiled_mlp": false, "fused_norm": false,   (optional: longext.sp's savers)
     "lora_experts": false}                                           (optional: LoRA on a tiny-moe's experts too)

tiny-moe is the tiny model's dimensions as a Mixtral: 8 experts of the tiny MLP's size, top 2 (transformers 5's
grouped experts, a router per layer), LoRA on the attention by default.

Each case runs in its own process (`run_case`), which does exactly what `longext train` does around the
model: `init_distributed` (world of one, gloo), `models.add_lora` (LoRA r8 on q/k/v/o, as the schema's
default targets), `engine.make_engine` (a real `deepspeed.initialize` at the case's ZeRO stage, torch AdamW,
fp32), then `steps` full optimizer steps (`engine(**batch).loss`, `engine.backward`, `engine.step`) on a
batch of the train loop's keys.

How the peak is measured (Linux):

- baseline = the process's resident set (VmRSS) just before the model is built, after the imports, the
  process group and a warm-up step of the same code path on a 1-layer toy (lazy imports and kernel set-up:
  see `_warm_up`): the process baseline, which the plan states separately;
- after the model, adapters and engine exist, `malloc_trim(0)` hands freed heap pages back and
  `/proc/self/clear_refs` (value 5) resets the peak-RSS counter (VmHWM) to the current RSS, so transients
  of loading a checkpoint (a file page and its copy both resident) are not counted: they are not what the
  plan estimates and a GPU run loads differently;
- peak = VmHWM after the steps; measured = peak - baseline. `ru_maxrss - baseline` (the whole-life peak,
  loading included) is recorded too.

Weights loaded from safetensors stay file-backed (mmap) until first touched; the forward pass touches them
all, so they are in the peak.

Allocator. By default glibc keeps freed heap blocks resident for reuse, so the peak RSS is the live tensors'
peak plus that retention. A case with `"live_peak": true` runs with MALLOC_MMAP_THRESHOLD_=65536 (every block
of 64 KiB or more is its own mmap, unmapped when freed), so its RSS follows the live tensors: the quantity the
plan's formulas describe. Both kinds are in the table.

RSS counts only touched pages, so a buffer DeepSpeed allocates with `torch.empty` and fills in part
(ZeRO-2's 5e8-element gradient bucket) counts only the part written; the plan's CPU estimate says the same.

    python -m longext.bench.memory '<case json>' OUT.json
"""

from __future__ import annotations

import ctypes
import time
from pathlib import Path

from longext.bench.fresh import Measured, main, run_fresh

MB = 2**20
LIVE_PEAK_MMAP_THRESHOLD = 65536


def rss_kb(field: str = "VmRSS") -> int:
    """A `/proc/self/status` memory field in kB (VmRSS: resident now; VmHWM: peak since the last reset)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def trim_and_reset_peak() -> None:
    """Give freed heap pages back to the OS, then make the peak counter start from the current RSS."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: nothing to trim
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _model(name: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from longext.bench.throughput import TINY

    if name in ("tiny", "tiny-moe"):
        torch.manual_seed(0)
        arch, dims = _tiny_moe() if name == "tiny-moe" else ("llama", TINY)
        config = AutoConfig.for_model(arch, **dims)
        config._attn_implementation = "sdpa"
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    from longext.materials import smollm2_dir

    return AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32, attn_implementation="sdpa")


def _tiny_moe() -> tuple:
    from longext.bench.throughput import TINY

    return "mixtral", {**TINY, "num_local_experts": 8, "num_experts_per_tok": 2}


def _warm_up(case: dict) -> None:
    """One step of the same code path on a 1-layer, 8-token toy, then everything dropped.

    Lazy one-time costs are part of the process baseline, not of the run: importing the modeling module
    (~90 MB) and, for ZeRO 1-3, the torch._inductor / networkx modules DeepSpeed's optimizer pulls in
    (~45 MB), and first-call kernel set-up.
    """
    import gc

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from longext.engine import make_engine
    from longext.models import add_lora
    from longext.recipe import LoraSpec, TrainSpec

    moe = {"num_local_experts": 2, "num_experts_per_tok": 1} if case["model"] == "tiny-moe" else {}
    config = AutoConfig.for_model("mixtral" if moe else "llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, **moe)
    lora = LoraSpec(r=2, experts=bool(case.get("lora_experts")))
    model = add_lora(AutoModelForCausalLM.from_config(config, attn_implementation="sdpa"), lora,
                     case["gradient_checkpointing"])
    engine = make_engine(model, TrainSpec(steps=1, zero_stage=case["zero_stage"], precision="fp32"), world_size=1)
    ids = torch.arange(8)[None]
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    del engine, model
    gc.collect()


def measure(case: dict) -> dict:
    """Peak memory of `case` in this process (see the module docstring)."""
    import torch

    from longext.engine import init_distributed, make_engine
    from longext.models import add_lora, quiet_libraries
    from longext.recipe import LoraSpec, TrainSpec

    quiet_libraries()
    init_distributed()
    _warm_up(case)
    trim_and_reset_peak()
    baseline = rss_kb()
    model = _model(case["model"])
    config = model.config.to_dict()
    lora = LoraSpec(r=8, alpha=16.0, experts=bool(case.get("lora_experts")))
    train = TrainSpec(steps=case["steps"], lr=1e-4, zero_stage=case["zero_stage"], precision="fp32",
                      gradient_checkpointing=case["gradient_checkpointing"], memory_check="off")
    model = add_lora(model, lora, train.gradient_checkpointing)
    if case.get("tiled_mlp"):
        from longext.savers import apply_tiled_mlp

        apply_tiled_mlp(model)
    if case.get("fused_norm"):
        from longext.savers import apply_fused_norm

        apply_fused_norm(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    engine = make_engine(model, train, world_size=1)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config["vocab_size"], (1, case["seq_len"]), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
             "position_ids": torch.arange(case["seq_len"])[None]}
    trim_and_reset_peak()
    after_init = rss_kb()
    engine.train()
    began = time.perf_counter()
    for _ in range(case["steps"]):
        loss = _loss(engine, batch, case.get("tiled_loss", False))
        engine.backward(loss)
        engine.step()
        del loss
    import resource

    peak = rss_kb("VmHWM")
    return {
        "baseline_mb": baseline / 1024, "after_init_mb": after_init / 1024, "peak_mb": peak / 1024,
        "measured_mb": (peak - baseline) / 1024,
        "maxrss_minus_baseline_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline / 1024,
        "trainable_params": trainable, "step_seconds": (time.perf_counter() - began) / case["steps"],
        "threads": torch.get_num_threads(), "model_config": config,
    }


def _loss(engine, batch: dict, tiled: bool):
    """The loss as `train._forward` computes it with one rank: transformers' own, or longext.sp's tiled one."""
    if not tiled:
        return engine(**batch).loss
    from longext.sp import Layout, micro_batch_loss, shard_batch

    return micro_batch_loss(engine, shard_batch(batch, Layout()), Layout(), True)[0]


def run_case(case: dict, folder: Path, timeout: int = 3600) -> Measured:
    """`measure(case)` in a fresh process (its own peak, no leftover distributed state)."""
    env = {}
    if case.get("live_peak"):
        # glibc then serves every block >= 64 KiB with its own mmap and unmaps it on free: RSS follows the live
        # tensors, without the heap's retention of freed blocks (the default raises this threshold as it goes)
        env["MALLOC_MMAP_THRESHOLD_"] = str(LIVE_PEAK_MMAP_THRESHOLD)
    return run_fresh("longext.bench.memory", case, folder, timeout, env)


if __name__ == "__main__":
    main(lambda case, folder: measure(case), default=str)


# ------------------------------------------------------------------------------------------ estimate
def case_setup(case: dict):
    """The plan's Setup for a case: one CPU rank, fp32, sdpa, LoRA r8 on q/k/v/o (and the experts with
    lora_experts; what `measure` runs)."""
    from longext.plan import Setup

    return Setup(seq_len=case["seq_len"], device="cpu", precision="fp32", zero_stage=case["zero_stage"],
                 gradient_checkpointing=case["gradient_checkpointing"], tiled_loss=case.get("tiled_loss", False),
                 tiled_mlp=case.get("tiled_mlp", False), fused_norm=case.get("fused_norm", False), lora_r=8,
                 allocator="live" if case.get("live_peak") else "glibc", lora_experts=bool(case.get("lora_experts")))


def case_estimate(case: dict, model_config: dict):
    """The plan's estimate for the case (plan.Estimate); compare `total - fixed` with `measured_mb`."""
    from longext.plan import Dims, estimate

    return estimate(Dims.from_config(model_config), case_setup(case))
