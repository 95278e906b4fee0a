"""Gemma-3-270M, the second real model (`longext models prepare gemma3`; Gemma Terms of Use): `longext eval` at 4k
against stock transformers' perplexity, and YaRN on its full-attention layers trained for 2 steps, exported, and
reloaded by plain transformers in a fresh process. Slow (minutes on 2 cores); skipped when the model is not
prepared."""

from __future__ import annotations

import json
import math

import pytest
import torch

from helpers import run_fresh, write_recipe
from longext.families import FULL, SLIDING

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma3():
    from longext.materials import GEMMA3_SPEC, gemma3_dir
    from longext.materials.cache import is_complete

    folder = gemma3_dir()
    if not is_complete(folder, GEMMA3_SPEC):
        pytest.skip("Gemma-3-270M is not prepared (longext models prepare gemma3)")
    return folder


@pytest.fixture(scope="module")
def books():
    from longext.materials import BOOKS_SPEC, books_dir
    from longext.materials.cache import is_complete

    if not is_complete(books_dir(), BOOKS_SPEC):
        pytest.skip("the books are not prepared (longext models prepare books)")
    return books_dir()


def test_eval_at_4k_equals_stock_transformers_perplexity(gemma3, books, tmp_path):
    """`longext eval MODEL --lengths 4k` (fixed mode, one window) against stock transformers' own forward on the
    same 4096 tokens: the mean NLL of the scored tokens from its logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from longext.cli import main
    from longext.evaluate.perplexity import document_token_ids, plan_windows
    from longext.evaluate.run import EvalRequest, load_texts
    from longext.recipe import PerplexitySpec

    out = tmp_path / "eval"
    assert main(["eval", str(gemma3), "--lengths", "4k", "--no-passkey", "-s", "perplexity.windows=1",
                 "-s", "perplexity.targets=256", "--out", str(out)]) == 0
    (row,) = json.loads((out / "eval.json").read_text())["models"]
    got = row["perplexity"]["4096"]

    texts = load_texts(EvalRequest.from_cli(gemma3, lengths="4k", out=tmp_path / "unused"))
    ids = document_token_ids(AutoTokenizer.from_pretrained(gemma3), texts)
    (window,) = plan_windows([len(t) for t in ids], [4096], PerplexitySpec(windows=1, targets=256))[4096]
    tokens = ids[window.doc][window.start:window.end][None]
    model = AutoModelForCausalLM.from_pretrained(gemma3, dtype=torch.float32, attn_implementation="sdpa").eval()
    with torch.no_grad():
        logits = model(tokens, logits_to_keep=257).logits[0, :-1].float()  # predictions of the last 256 tokens
    nll = torch.nn.functional.cross_entropy(logits, tokens[0, -256:]).item()
    print(f"Gemma-3-270M ppl at 4k: longext {got['ppl']:.4f}, stock transformers {math.exp(nll):.4f}")
    assert got["scored_tokens"] == 256
    assert got["ppl"] == pytest.approx(math.exp(nll), rel=1e-4)


FRESH = """
with torch.no_grad():
    logits = model(torch.load(sys.argv[4])).logits
torch.save({"refused": refused, "logits": logits, "class": type(model).__name__,
            "rope": model.config.rope_parameters}, out)
"""


def test_yarn_on_the_full_attention_layers_trains_exports_and_reloads(gemma3, books, tmp_path):
    """YaRN x2 (32k -> 64k) on the 3 full-attention layers, 2 LoRA steps at 512 tokens; the export keeps the 15
    sliding-window layers' RoPE, holds Gemma 3's nested v5 keys and the legacy ones, and plain transformers in a
    process without longext reloads it with the logits of the run as longext loads it."""
    from transformers import AutoConfig

    from longext.export import run_export
    from longext.recipe import load_recipe
    from longext.targets import load_target
    from longext.train import run_training

    path = write_recipe(tmp_path, gemma3, books, name="gemma3-yarn", method={"kind": "standard", "target_len": 65536},
                        rope={"kind": "yarn"}, lora={"r": 8, "alpha": 16.0}, data={"train": ["books"], "seq_len": 512},
                        train={"steps": 2, "lr": 1.0e-4, "precision": "auto", "zero_stage": 2})
    run = run_training(load_recipe(path))
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    state = json.loads((run / "rope.json").read_text())["parameters"]
    base = AutoConfig.from_pretrained(gemma3).rope_parameters
    assert state[SLIDING] == base[SLIDING] and state[FULL]["rope_type"] == "yarn" and state[FULL]["factor"] == 2.0

    out = tmp_path / "export"
    result = run_export(run, out)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["rope_parameters"] == state
    assert config["rope_scaling"]["rope_type"] == "yarn" and config["rope_local_base_freq"] == 1.0e4
    ids = torch.randint(0, 262144, (1, 600), generator=torch.Generator().manual_seed(0))
    fresh = run_fresh(tmp_path, FRESH, out, ids)
    reloaded = {kind: {k: v for k, v in p.items() if k != "type"} for kind, p in fresh["rope"].items()}  # legacy alias
    assert fresh["refused"] is None and fresh["class"] == "Gemma3ForCausalLM" and reloaded == state
    loaded = load_target(run, dtype=torch.float32)
    with torch.no_grad():
        want = loaded.model(ids).logits
    diff = (fresh["logits"] - want).abs().max().item()
    print(f"Gemma-3-270M YaRN export: check {result.max_abs_diff:.3g}, fresh reload {diff:.3g}; losses {losses}")
    assert diff < 1e-3 * max(1.0, want.abs().max().item())
