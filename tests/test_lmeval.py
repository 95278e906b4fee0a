"""lm-eval bridge: a local task (YAML + jsonl in a temp folder) on a tiny model, offline. The harness's
log-likelihoods must equal a direct forward pass of the model as longext loads it (with the method's eval patch
set for the eval length), and `longext eval --lm-eval` must put its metrics in the report.

Skipped where lm-evaluation-harness is not installed (`pip install 'longext[lm-eval]'`; `make test` does not
install it: it brings scipy, scikit-learn, nltk and more, ~30 packages)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import bad_input, write_recipe

from conftest import synthetic_text

# contexts of ~100 tokens, so that the positions (and so E2-LLM's scale) weigh on every answer
DOCS = [
    {"question": " ".join(synthetic_text(60, seed).split()), "choices": choices, "label": label}
    for seed, (choices, label) in enumerate([(["garden", "river", "horse"], 0), (["door", "letter"], 1),
                                             (["river", "morning"], 0), (["looked", "house"], 1)])
]


@pytest.fixture(scope="module")
def task_yaml(tmp_path_factory) -> Path:
    """A multiple-choice task in lm-eval's YAML format over a local jsonl file."""
    d = tmp_path_factory.mktemp("lm_task")
    (d / "docs.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    (d / "longext_tiny.yaml").write_text(
        "task: longext_tiny\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {d / 'docs.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return d / "longext_tiny.yaml"


def loglikelihood(loaded, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens | context) from one forward pass (the tokenizer adds no special tokens)."""
    tok = loaded.tokenizer
    context_ids = tok(context)["input_ids"]
    whole = tok(context + continuation)["input_ids"]
    with torch.no_grad():
        logits = loaded.model(torch.tensor([whole])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return float(sum(logp[i - 1, whole[i]] for i in range(len(context_ids), len(whole))))


@pytest.fixture(scope="module")
def e2llm_run(tmp_path_factory, tiny_tokenizer, corpus_dir) -> Path:
    """A trained E2-LLM run: its eval patch (the PI scale picked for the eval window) changes every logit. The base
    has larger weights (as in test_e2llm_pose) so that attention is peaked and positions move the scores."""
    from conftest import build_tiny_model
    from longext.recipe import load_recipe
    from longext.train import run_training

    tmp = tmp_path_factory.mktemp("lm_e2llm")
    base = tmp / "base"
    build_tiny_model("llama", vocab_size=len(tiny_tokenizer), initializer_range=0.2).save_pretrained(base)
    tiny_tokenizer.save_pretrained(base)
    recipe = write_recipe(tmp, base, corpus_dir, name="e2", method={"kind": "e2llm", "target_len": 512},
                          rope={"kind": "none"}, data={"train": [str(corpus_dir)], "seq_len": 128},
                          train={"steps": 2, "lr": 1.0e-3, "precision": "fp32", "zero_stage": 0, "seed": 3})
    return run_training(load_recipe(recipe))


def test_lm_eval_scores_the_patched_model_like_a_direct_forward_pass(e2llm_run, task_yaml):
    pytest.importorskip("lm_eval")
    from longext.evaluate.lmeval import run_lm_eval
    from longext.targets import load_target
    from longext.recipe import LmEvalSpec

    loaded = load_target(e2llm_run)
    result = run_lm_eval(loaded, LmEvalSpec(tasks=[str(task_yaml)]), [256, 512], log_samples=True)
    records = result["records"]["longext_tiny"]
    assert result["samples"] == {"longext_tiny": len(DOCS)} and result["max_length"] == 512
    loaded.set_length(512)  # what the bridge set: the longest eval length
    correct = 0
    for record in records:
        got = [r[0][0] for r in record["resps"]]
        want = [loglikelihood(loaded, ctx, cont) for ctx, cont in record["arguments"]]
        assert got == pytest.approx(want, abs=1e-5)
        correct += max(range(len(want)), key=want.__getitem__) == record["doc"]["label"]
    assert result["tasks"]["longext_tiny"]["acc"]["value"] == pytest.approx(correct / len(DOCS))
    loaded.set_length(128)  # the patch matters: at L0's scale the same model scores clearly differently
    ctx, cont = records[0]["arguments"][0]
    assert abs(loglikelihood(loaded, ctx, cont) - records[0]["resps"][0][0][0]) > 1e-2  # 1000x the agreement above


def test_eval_lm_eval_flag_puts_the_metrics_in_the_report(tiny_model_dir, task_yaml, tmp_path):
    pytest.importorskip("lm_eval")
    from longext.cli import main
    from longext.evaluate.lmeval import run_lm_eval
    from longext.targets import load_target
    from longext.recipe import LmEvalSpec

    out = tmp_path / "r"
    args = ["eval", str(tiny_model_dir), "--lengths", "128", "--no-ppl", "--no-passkey", "--lm-eval", str(task_yaml)]
    assert main([*args, "--out", str(out)]) == 0
    results = json.loads((out / "eval.json").read_text())
    (model,) = results["models"]
    assert results["settings"]["lm_eval"]["tasks"] == [str(task_yaml)] and "passkey" not in model
    direct = run_lm_eval(load_target(tiny_model_dir), LmEvalSpec(tasks=[str(task_yaml)]), [128])
    assert model["lm_eval"]["tasks"] == direct["tasks"]
    assert set(model["lm_eval"]["tasks"]["longext_tiny"]) == {"acc"}
    md = (out / "eval.md").read_text()
    assert "## lm-evaluation-harness" in md and "| longext_tiny | acc | 4 |" in md


def test_missing_lm_eval_is_one_line_naming_the_extra(capsys, tiny_model_dir, monkeypatch):
    from longext.evaluate import lmeval

    monkeypatch.setattr(lmeval, "available", lambda: False)  # as on a machine without the extra
    lines = bad_input(capsys, "eval", tiny_model_dir, "--lengths", "128", "--lm-eval", "hellaswag")
    assert lines == ["error: --lm-eval: lm-evaluation-harness is not installed; install the extra: "
                     "pip install 'longext[lm-eval]'"]


def test_unknown_tasks_stop_before_the_model_loads(capsys, tiny_model_dir, tmp_path):
    pytest.importorskip("lm_eval")
    lines = bad_input(capsys, "eval", tiny_model_dir, "--lengths", "128", "--no-ppl", "--no-passkey",
                      "--lm-eval", f"{tmp_path / 'missing.yaml'},no_such_task_anywhere", "--out", tmp_path / "r")
    assert lines[0] == f"error: --lm-eval: no such task file: '{tmp_path / 'missing.yaml'}'"
    assert lines[1].startswith("error: --lm-eval: 'no_such_task_anywhere' is not an lm-eval task, group or tag")
    assert not (tmp_path / "r").exists()
