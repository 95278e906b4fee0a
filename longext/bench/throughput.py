"""Training tokens/s on longext's DeepSpeed path against a plain transformers + peft loop, and eval
seconds per length. Each measurement runs in its own process, so peak memory (max RSS) is its own
and no engine state leaks between cases.

    python -m longext.bench.throughput '{"case": "train", "path": "engine", "model": "tiny", "seq_len": 2048}' OUT.json
"""

from __future__ import annotations

import resource
import statistics
import time
from pathlib import Path

import torch

from longext.bench.fresh import Measured, main, run_fresh, timed

TINY = dict(vocab_size=49152, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)


def _model(name: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    if name == "tiny":
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **TINY), dtype=torch.float32)
    from longext.materials import smollm2_dir

    return AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32, attn_implementation="sdpa")


def _lora(model):
    from longext.models import add_lora
    from longext.recipe import LoraSpec

    return add_lora(model, LoraSpec(r=8, alpha=16.0))


def _batch(vocab: int, seq_len: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (1, seq_len), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids,
            "position_ids": torch.arange(seq_len)[None]}


def train_case(path: str, model_name: str, seq_len: int, steps: int, precision: str = "auto") -> dict:
    """Median step time of forward + backward + AdamW at batch 1 x seq_len, LoRA r8 on q/k/v/o."""
    from longext.models import quiet_libraries

    from longext.engine import resolve_precision

    quiet_libraries()
    precision = resolve_precision(precision)
    model = _model(model_name)
    batch = _batch(model.config.vocab_size, seq_len)
    if path == "engine":
        from longext.engine import init_distributed, make_engine
        from longext.recipe import TrainSpec

        init_distributed()
        peft = _lora(model)
        engine = make_engine(peft, TrainSpec(steps=steps + 1, lr=1e-4, zero_stage=2, precision=precision), world_size=1)

        def step():
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
    else:  # the same model and adapters in a hand-written loop: what a user would write without longext
        if precision == "bf16":
            model = model.to(torch.bfloat16)
        peft = _lora(model)
        params = [p for p in peft.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95))

        def step():
            loss = peft(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    times = timed(step, steps)
    median = statistics.median(times)
    return {"step_seconds": median, "tokens_per_s": seq_len / median, "steps": steps, "all_seconds": times,
            "precision": precision}


def eval_case(model_name: str, length: int, scored: int = 512) -> dict:
    """Seconds for one fixed-target perplexity window of `length` tokens (fp32, SDPA, chunked head)."""
    from longext.evaluate.perplexity import window_nll
    from longext.models import quiet_libraries

    quiet_libraries()
    model = _model(model_name).eval()
    ids = torch.randint(0, model.config.vocab_size, (length,), generator=torch.Generator().manual_seed(0))
    window_nll(model, ids[:256], 128)  # warm-up
    began = time.perf_counter()
    window_nll(model, ids, scored)
    seconds = time.perf_counter() - began
    return {"seconds": seconds, "tokens_per_s": length / seconds}


def run_case(case: dict, folder: Path, timeout: int = 3600) -> Measured:
    """One measurement in a fresh process; adds peak_rss_mb and the wall time including start-up."""
    measured = run_fresh("longext.bench.throughput", case, folder, timeout)
    measured.result = {**case, **measured.result, "wall_seconds": measured.seconds}
    return measured


def measure(case: dict, folder: Path) -> dict:
    if case["case"] == "train":
        result = train_case(case["path"], case["model"], case["seq_len"], case.get("steps", 3), case.get("precision", "auto"))
    else:
        result = eval_case(case["model"], case["length"])
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


if __name__ == "__main__":
    main(measure)
