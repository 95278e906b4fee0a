"""Regenerate the two `longext plan` tables of docs/scaling.md from the CLI itself, as markdown on stdout.

Every row is one `longext plan RECIPE --gpus N --gpu-memory 80GB --json -s ... [--full-finetune]` run through
the CLI's own entry point (`longext.cli.main`, in this process: the same code as the command, without starting
Python 17 times). The Llama-3-8B rows use recipes/llama3-8b-plan.yaml as shipped; the published-figure rows for
Llama-2-7B and Qwen3-8B point `model.path` at a temporary directory holding those models' public config.json
dimensions (the plan reads nothing else).

    .venv/bin/python scripts/scaling_table.py            # both tables
    .venv/bin/python scripts/scaling_table.py --commands # also print every command line
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = "recipes/llama3-8b-plan.yaml"
GiB = 2**30
# public config.json dimensions (meta-llama/Llama-2-7b-hf, Qwen/Qwen3-8B); Llama-3-8B's ship in recipes/configs
CONFIGS = {
    "llama2-7b": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
                  "max_position_embeddings": 4096, "rope_theta": 10000.0, "tie_word_embeddings": False},
    "qwen3-8b": {"model_type": "qwen3", "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
                 "max_position_embeddings": 40960, "rope_theta": 1000000.0, "tie_word_embeddings": False},
}
OFF = {"sequence_parallel": 1, "gradient_checkpointing": False, "tiled_loss": False, "tiled_mlp": False,
       "fused_norm": False}

# (length, training, switches besides bf16 + ZeRO-3); every row on 8 GPUs
LLAMA3_ROWS = [
    ("32k", "LoRA", {}),
    ("32k", "LoRA", {"gradient_checkpointing": True}),
    ("32k", "full", {"gradient_checkpointing": True}),
    ("32k", "full", {"gradient_checkpointing": True, "tiled_loss": True}),
    ("128k", "LoRA", {"gradient_checkpointing": True}),
    ("128k", "LoRA", {"sequence_parallel": 8, "gradient_checkpointing": True, "tiled_loss": True}),
    ("128k", "full", {"sequence_parallel": 8, "gradient_checkpointing": True, "tiled_loss": True}),
    ("512k", "LoRA", {"sequence_parallel": 8, "gradient_checkpointing": True, "tiled_loss": True, "tiled_mlp": True}),
    ("512k", "LoRA", {"sequence_parallel": 8, "gradient_checkpointing": True, "tiled_loss": True, "tiled_mlp": True,
                      "fused_norm": True}),
    ("512k", "full", {"sequence_parallel": 8, "gradient_checkpointing": True, "tiled_loss": True, "tiled_mlp": True}),
    ("512k", "full", {"sequence_parallel": 8, "gradient_checkpointing": True, "tiled_loss": True, "tiled_mlp": True,
                      "offload_optimizer": True, "checkpoint_offload": True}),
]

# (publication, published, model, length, gpus, switches besides bf16 + ZeRO-3 + full fine-tuning, assumed)
PUBLISHED_ROWS = [
    ("HF baseline, Llama-3-8B, 32K, 8 x H100", "OOM beyond 32K (ALST)", None, 32768, 8,
     {"gradient_checkpointing": True}, "ZeRO-3, checkpointing"),
    ("same at 64K", "OOM (ALST)", None, 65536, 8, {"gradient_checkpointing": True}, "ZeRO-3, checkpointing"),
    ("ALST, Llama-3-8B, 500K, 1 x H100", "fits; the maximum (ALST)", None, 500_000, 1,
     {"gradient_checkpointing": True, "offload_params": True, "offload_optimizer": True, "checkpoint_offload": True,
      "tiled_loss": True, "tiled_mlp": True, "fused_norm": True},
     "ZeRO-3 + param/optimizer offload, checkpoint offload, tiled loss, TiledMLP, fused RMSNorm (Liger)"),
    ("ALST, Llama-3-8B, 3.7M, 8 x H100", "fits; the maximum (ALST)", None, 3_700_000, 8,
     {"sequence_parallel": 8, "gradient_checkpointing": True, "offload_optimizer": True, "checkpoint_offload": True,
      "tiled_loss": True, "tiled_mlp": True, "fused_norm": True},
     "SP 8, ZeRO-3 + optimizer offload, checkpoint offload, tiled loss, TiledMLP, fused RMSNorm (Liger)"),
    ("TRL, Qwen3-8B, 1,048,576, 8 x H100", "56.2 GB measured (TRL)", "qwen3-8b", 1_048_576, 8,
     {"sequence_parallel": 8, "gradient_checkpointing": True, "checkpoint_offload": True, "tiled_loss": True},
     "CP/SP 8, checkpointing + offload, chunked loss"),
    ("same without checkpoint offload", "–", "qwen3-8b", 1_048_576, 8,
     {"sequence_parallel": 8, "gradient_checkpointing": True, "tiled_loss": True},
     "CP/SP 8, checkpointing, chunked loss"),
    ("EasyContext, Llama-2-7B, 700K, 8 x A100-80GB", "fits; the maximum (EasyContext)", "llama2-7b", 700_000, 8,
     {"sequence_parallel": 8, "gradient_checkpointing": True, "offload_optimizer": True},
     "ring/SP 8, ZeRO-3 + optimizer offload, checkpointing, untiled loss"),
]


def command(length, gpus: int, switches: dict, full: bool, model_path: str | None = None) -> list[str]:
    """The `longext plan` argument list of one row (the recipe's other settings stay: bf16, ZeRO-3)."""
    sets = [f"data.seq_len={length}", f"method.target_len={length}"]
    sets += [f"train.{k}={str(v).lower()}" for k, v in {**OFF, **switches}.items()]
    if model_path:
        sets.append(f"model.path={model_path}")
    argv = ["plan", RECIPE, "--gpus", str(gpus), "--gpu-memory", "80GB", "--json"]
    argv += [x for item in sets for x in ("-s", item)]
    return argv + (["--full-finetune"] if full else [])


def run_plan(argv: list[str]) -> dict:
    """`longext <argv>` through the CLI's entry point; its JSON output."""
    from longext.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    if code != 0:
        raise SystemExit(f"longext {' '.join(argv)} exited with {code}")
    return json.loads(out.getvalue())


def terms(doc: dict) -> dict[str, float]:
    return {t["name"]: t["bytes"] / GiB for t in doc["terms"]}


def loss_or_backward(doc: dict) -> str:
    t = terms(doc)
    if "loss (logits)" in t:
        return f"{t['loss (logits)']:.1f} (loss)"
    backward = next(x for x in doc["terms"] if x["name"] == "one layer's backward")
    moment = backward["formula"].split(" at the ")[1].split(" (")[0].replace("'s backward", "")
    return f"{t[backward['name']]:.1f} (layer: {moment})"


def switch_names(switches: dict) -> str:
    on = [f"sp {v}" if k == "sequence_parallel" else k for k, v in switches.items()
          if v is True or (k == "sequence_parallel" and v > 1)]
    return ", ".join(on) or "none"


def llama3_table(show: bool) -> list[str]:
    lines = ["| length | training | switches (besides bf16, ZeRO-3) | weights | trainable state | grad bucket | "
             "kept activations | loss / layer backward | fixed | total GiB | 80 GB | fixing switches | "
             "FLOPs per sample |", "|" + "---|" * 13]
    commands = []
    for length, training, switches in LLAMA3_ROWS:
        argv = command(length, 8, switches, training == "full")
        commands.append("longext " + " ".join(a for a in argv if a != "--json"))
        doc = run_plan(argv)
        t = terms(doc)
        fix = ", ".join(f"train.{k}={str(v).lower()}" for k, v in doc["fixing_switches"] or []) or "–"
        flops = doc["flops_terms"]["per_sample"]
        lines.append(f"| {length} | {training} | {switch_names(switches)} | {t['weights']:.1f} | "
                     f"{t['trainable state']:.1f} | {t.get('gradient bucket', 0):.1f} | "
                     f"{t['kept activations']:.1f} | {loss_or_backward(doc)} | {t['fixed overhead']:.1f} | "
                     f"**{doc['total_bytes'] / GiB:.1f}** | {'fits' if doc['fits'] else 'no'} | {fix} | "
                     f"{flops:.2e} |")
    return lines + ([""] + [f"    {c}" for c in commands] if show else [])


def published_table(show: bool) -> list[str]:
    lines = ["| publication: model, length, hardware | published | switches assumed | plan GB per GPU (GiB) | "
             "largest terms (GiB) |", "|---|---|---|---|---|"]
    commands = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, config in CONFIGS.items():
            (Path(tmp) / name).mkdir()
            (Path(tmp) / name / "config.json").write_text(json.dumps(config))
        for title, published, model, length, gpus, switches, assumed in PUBLISHED_ROWS:
            argv = command(length, gpus, switches, True, model and str(Path(tmp) / model))
            commands.append("longext " + " ".join(a for a in argv if a != "--json").replace(tmp, "<tmp>"))
            doc = run_plan(argv)
            top = sorted(((b, n) for n, b in terms(doc).items() if n != "fixed overhead"), reverse=True)[:2]
            largest = ", ".join(f"{_term_label(doc, n)} {b:.1f}" for b, n in top)
            lines.append(f"| {title} | {published} | {assumed} | **{doc['total_bytes'] / 1e9:.1f}** "
                         f"({doc['total_bytes'] / GiB:.1f}) | {largest} |")
    return lines + ([""] + [f"    {c}" for c in commands] if show else [])


def _term_label(doc: dict, name: str) -> str:
    """A term's name; for one layer's backward, the moment that is its peak."""
    if name != "one layer's backward":
        return name
    backward = next(x for x in doc["terms"] if x["name"] == name)
    return f"one layer's backward ({backward['formula'].split(' at the ')[1].split(' (')[0]})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commands", action="store_true", help="also print every command line")
    args = parser.parse_args()
    import os

    os.chdir(ROOT)  # the recipe's model.path is relative to the repository
    sys.stdout.write("\n".join(["### Llama-3-8B on 8 x 80 GB", "", *llama3_table(args.commands), "",
                                "### Against published figures", "", *published_table(args.commands), ""]))


if __name__ == "__main__":
    main()
