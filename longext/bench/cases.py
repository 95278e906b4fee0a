"""One benchmark row: (optionally) train a recipe with longext, then measure perplexity and passkey.

A model case is a JSON-able dict:

    {"kind": "model", "name": "pi-ft", "label": "PI x8, fine-tuned", "train": true,
     "recipe": {...a full longext recipe...},
     "eval": {"ppl_lengths": [...], "targets": 64, "windows": 16,
              "passkey_lengths": [...], "trials": 20, "depths": [...], "filler_chars": 60000, "seed": 0,
              "texts": [optional .txt files; default the eval books]}}

Training goes through `longext.train.run_training` and loading through `longext.targets` (the tool
is what is benchmarked). A training-free row builds the base model with the recipe's RoPE setting
(`resolve.resolve`, then `models.build_model`), exactly what a fine-tuned row starts from. Every case runs in its own
process (`run_model_case`), so its peak memory is its own and no distributed state leaks.

    python -m longext.bench.cases '<case json>' RESULT.json     (bench/fresh.py)
"""

from __future__ import annotations

import json
import resource
import statistics
import time
from pathlib import Path

import torch

from longext.bench.fresh import Measured, main, run_fresh


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def architecture(model) -> dict:
    """What the compute formula needs: non-embedding parameters, layers, hidden size."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    embed = base.get_input_embeddings().weight.numel()
    head = base.get_output_embeddings()
    tied = head is None or head.weight.data_ptr() == base.get_input_embeddings().weight.data_ptr()
    total = sum(p.numel() for n, p in base.named_parameters() if "lora_" not in n)
    return {"params": total, "params_nonembed": total - embed - (0 if tied else head.weight.numel()),
            "layers": config.num_hidden_layers, "hidden": config.hidden_size}


def train_figures(run_dir: Path, stages: list[tuple[int, int]] | None = None) -> dict:
    """Median training tokens/s over the steps after the first (warm-up), tokens seen, wall seconds; with
    stages [(last step, tokens per sample), ...] also the tokens trained at each length."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [r["tokens_per_s"] for r in records[1:] or records if r.get("tokens_per_s")]
    out = {"train_tokens_per_s": statistics.median(rates), "train_tokens": sum(r["tokens"] for r in records),
           "train_steps": len(records), "train_seconds": sum(r["step_seconds"] for r in records),
           "final_loss": records[-1]["loss"]}
    if stages:
        by_length: dict[str, int] = {}
        for r in records:
            length = next((L for last, L in stages if r["step"] <= last), stages[-1][1])
            by_length[str(length)] = by_length.get(str(length), 0) + r["tokens"]
        out["train_tokens_by_length"] = by_length
    return out


def stage_lengths(recipe, original: int | None) -> list[tuple[int, int]]:
    """(last step, tokens per sample) of each training stage: the main one, then a LongRecipe replay stage."""
    stages = [(recipe.train.steps, recipe.seq_len)]
    replay = getattr(recipe.method, "replay", None)
    if replay is not None:
        length = replay.seq_len if replay.seq_len != "auto" else original or recipe.seq_len
        stages.append((recipe.train.steps + replay.steps, int(length)))
    return stages


def load_case_model(case: dict, out_dir: Path):
    """(Loaded, training figures or {}) for the case: trains first when case["train"]."""
    from longext.models import build_model, load_tokenizer, quiet_libraries
    from longext.recipe import validate_recipe
    from longext.resolve import resolve
    from longext.targets import Loaded, load_target

    quiet_libraries()
    raw = dict(case["recipe"])
    if case.get("train"):
        raw["output"] = {"dir": str(out_dir / "run"), "overwrite": True}
    recipe = validate_recipe(raw, f"<bench case {case['name']}>")
    if case.get("train"):
        from longext.train import run_training

        run_dir = run_training(recipe)
        figures = {"train_peak_rss_mb": peak_rss_mb(), "train_seq_len": recipe.seq_len}
        loaded = load_target(run_dir)
        figures.update(train_figures(run_dir, stage_lengths(recipe, loaded.original_context)))
        return loaded, figures
    resolved = resolve(recipe)
    rope = resolved.rope
    loaded = Loaded(model=build_model(resolved).eval(), tokenizer=load_tokenizer(resolved.model_dir), name=case["name"],
                    original_context=rope.original_context, target_context=rope.target_len, rope=rope.parameters)
    return loaded, {}


def evaluate(loaded, settings: dict) -> dict:
    """Perplexity (fixed targets, eval books) and passkey (eval-book filler) at the case's lengths."""
    from longext.evaluate.passkey import passkey_at_lengths
    from longext.evaluate.perplexity import document_token_ids, perplexity_at_lengths
    from longext.materials import book_files
    from longext.recipe import PasskeySpec, PerplexitySpec

    files = [Path(f) for f in settings["texts"]] if settings.get("texts") else book_files("eval")
    texts = [f.read_text(encoding="utf-8") for f in files]
    out: dict = {}
    if settings.get("ppl_lengths"):
        spec = PerplexitySpec(mode="fixed", targets=settings["targets"], windows=settings["windows"])
        ids = document_token_ids(loaded.tokenizer, texts)
        rows = perplexity_at_lengths(loaded.model, ids, settings["ppl_lengths"], spec, set_length=loaded.set_length)
        out["perplexity"] = {str(L): row for L, row in rows.items()}
    if settings.get("passkey_lengths"):
        spec = PasskeySpec(trials=settings["trials"], depths=settings["depths"])
        # a slice of the held-out books is enough filler for every length, and keeps prompt building cheap
        filler = "\n".join(texts)[: settings.get("filler_chars", 200_000)]
        rows = passkey_at_lengths(loaded.model, loaded.tokenizer, settings["passkey_lengths"], spec,
                                  settings.get("seed", 0), filler=filler, set_length=loaded.set_length)
        out["passkey"] = {str(L): row for L, row in rows.items()}
    return out


def model_case(case: dict, out_dir: Path) -> dict:
    """Train (if asked), evaluate and measure one row, in this process."""
    torch.manual_seed(0)
    began = time.perf_counter()
    loaded, figures = load_case_model(case, Path(out_dir))
    result = {**figures, **architecture(loaded.model), "original_context": loaded.original_context,
              "rope": json.loads(json.dumps(loaded.rope, default=str))}
    result.update(evaluate(loaded, case["eval"]))
    result["peak_rss_mb"] = peak_rss_mb()
    result["seconds"] = time.perf_counter() - began
    return result


def run_model_case(case: dict, out_dir: Path, timeout: int = 6 * 3600) -> Measured:
    """model_case in a fresh process (its log goes to out_dir/case.log)."""
    return run_fresh("longext.bench.cases", case, out_dir, timeout, log=True)


if __name__ == "__main__":
    main(model_case)
