"""The SmolLM2 campaign (issue 18): its case list and budgets, a trained row and its dose-response case end to end on
a tiny model through the bench's case runner, the checkpoint loading against the saved adapter, the page's section
and its verdict sentence against hand-made results."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from longext.bench import report, run
from longext.bench.report_campaign import campaign_rows, campaign_section, verdict
from longext.bench.smollm2 import (
    CAMPAIGN_MINUTES, FP32_STEP_SECONDS, RULER_TASKS, SMOL_LENGTHS, STEP_SECONDS, campaign_case, campaign_cases,
    train_block,
)
from longext.bench.suites import smollm2_cases
from longext.errors import LongextError

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "bench" / "toy-base"
FREE = ["base", "pi", "ntk", "dynamic", "yarn"]
TRAINED = ["yarn-lora", "pose", "e2llm", "harpe", "longrecipe", "longgen"]


# -------------------------------------------------------------------------------------------- case list
def test_the_campaign_has_every_row_and_equal_training_minutes():
    from longext.recipe import validate_recipe

    cases = {c["name"]: c for c in smollm2_cases(False)}
    assert list(cases) == [f"smollm2-{n}" for n in [*FREE, *TRAINED, "yarn-lora-at-1of3", "yarn-lora-at-2of3"]]
    kinds = {n: validate_recipe(c["recipe"], n).method.kind for n, c in cases.items()}
    assert [kinds[f"smollm2-{n}"] for n in TRAINED] == ["standard", "pose", "e2llm", "harpe", "longrecipe", "longgen"]
    ropes = [cases[f"smollm2-{n}"]["recipe"]["rope"]["kind"] for n in FREE]
    assert ropes == ["none", "linear", "ntk", "dynamic", "yarn"]
    for name in TRAINED:
        case = cases[f"smollm2-{name}"]
        train, budget = case["recipe"]["train"], case["budget"]
        # bf16 at the bf16 step times, but the rows measured on the AVX2-only CPU: fp32 at fp32 step times from there
        precision, seconds = ("fp32", FP32_STEP_SECONDS) if name in ("pose", "longrecipe", "longgen") else (
            "bf16", STEP_SECONDS)
        assert case["train"] and train["precision"] == precision and budget["minutes"] == CAMPAIGN_MINUTES >= 60
        assert train["steps"] == budget["steps"] and budget["step_seconds"] == seconds[name]
        # the minutes the steps take at the measured step times: the budget, at most one (3 for the dose row) step over
        longest = max(seconds.values()) / 60
        used = train["steps"] * seconds[name]
        if name == "longrecipe":
            replay = case["recipe"]["method"]["replay"]["steps"]
            assert replay == budget["replay_steps"] > 0
            used = train["steps"] * seconds[name] + replay * seconds["longrecipe-replay"]
        assert CAMPAIGN_MINUTES <= used / 60 <= CAMPAIGN_MINUTES + 3 * longest
        assert math.isclose(budget["planned_minutes"], used / 60, abs_tol=0.05)
        # one optimizer for all: the train blocks differ in steps, warm-up and checkpoints only
        same = {k: v for k, v in train.items() if k not in ("steps", "warmup_steps", "save_every", "keep_checkpoints")}
        assert same == {k: v for k, v in train_block(1, precision=precision).items()
                        if k not in ("steps", "warmup_steps")}
    for name, case in cases.items():
        if not case.get("checkpoint"):
            e = case["eval"]
            assert e["ppl_lengths"] == e["passkey_lengths"] == e["ruler"]["lengths"] == SMOL_LENGTHS
            assert e["trials"] == len(e["depths"]) == 10 and e["ruler"]["tasks"] == RULER_TASKS


def test_the_step_times_of_the_budget_are_the_measured_ones():
    """STEP_SECONDS is bench/smollm2-step-times.json's bf16 step time of each row (wall time, quiet machine)."""
    measured = json.loads((ROOT / "bench" / "smollm2-step-times.json").read_text())["rows"]
    for name in TRAINED:
        assert STEP_SECONDS[name] == round(measured[name]["bf16"]["step_s"], 1), name
    assert STEP_SECONDS["longrecipe-replay"] == round(measured["longrecipe"]["bf16"]["replay_step_s"], 1)
    # the fp32 rows': measured in fp32 on the AVX2-only CPU they train on
    avx2 = json.loads((ROOT / "bench" / "smollm2-step-times-avx2.json").read_text())
    assert not avx2["machine"]["flags"]["avx512_bf16"] and set(avx2["rows"]) == {"pose", "longrecipe", "longgen"}
    for name in avx2["rows"]:
        assert FP32_STEP_SECONDS[name] == round(avx2["rows"][name]["fp32"]["step_s"], 1), name
    assert FP32_STEP_SECONDS["longrecipe-replay"] == round(avx2["rows"]["longrecipe"]["fp32"]["replay_step_s"], 1)


def test_the_dose_cases_evaluate_the_yarn_lora_runs_checkpoints():
    cases = {c["name"]: c for c in campaign_cases()}
    lora = cases["smollm2-yarn-lora"]
    train = lora["recipe"]["train"]
    assert train["save_every"] * 3 == train["steps"] and train["keep_checkpoints"] >= 3
    doses = [c for c in cases.values() if c.get("checkpoint")]
    assert [c["checkpoint"]["step"] for c in doses] == [train["save_every"], 2 * train["save_every"]]
    for dose in doses:
        assert dose["checkpoint"]["of"] == "smollm2-yarn-lora" and dose["recipe"] == lora["recipe"]
        assert not dose["train"] and dose["eval"]["ppl_lengths"] == dose["eval"]["ruler"]["lengths"] == [16384]
        assert {k: v for k, v in dose["eval"]["ruler"].items() if k != "lengths"} == \
               {k: v for k, v in lora["eval"]["ruler"].items() if k != "lengths"}


# ------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def toy_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama (L0 = 512) with the committed toy tokenizer, saved like a model folder; its output layer is its
    embedding (tied), as SmolLM2's is."""
    from transformers import AutoTokenizer

    from conftest import build_tiny_model

    tokenizer = AutoTokenizer.from_pretrained(TOY)
    d = tmp_path_factory.mktemp("campaign-tiny")
    model = build_tiny_model("llama", vocab_size=len(tokenizer), max_position_embeddings=512, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


def tiny_cases(model_dir: Path, corpus_dir: Path) -> list[dict]:
    """The campaign's YaRN + LoRA row and its 1/3 dose case, as campaign_cases builds them, on a tiny model."""
    texts = sorted(str(p) for p in corpus_dir.glob("*.txt"))
    recipe = {"name": "tiny-yarn-lora", "model": {"path": str(model_dir)},
              "method": {"kind": "standard", "target_len": 1024}, "rope": {"kind": "yarn"},
              "lora": {"r": 4, "alpha": 8.0}, "data": {"train": texts, "seq_len": 64},
              "train": {**train_block(6, save_every=2), "precision": "fp32", "lr": 1e-3, "log_every": 1}}
    ruler = {"lengths": [512], "tasks": ["niah_single_2", "vt"], "samples": 1, "haystack": str(corpus_dir)}
    settings = {"ppl_lengths": [256, 512], "targets": 32, "windows": 1, "passkey_lengths": [256], "trials": 2,
                "depths": [0.25, 0.75], "texts": texts, "filler_chars": 20_000, "seed": 0, "ruler": ruler}
    dose = {**settings, "ppl_lengths": [512], "passkey_lengths": []}
    trained = campaign_case("yarn-lora", "tiny YaRN + LoRA", recipe, True, settings=settings)
    return [trained, campaign_case("yarn-lora-at-1of3", "tiny after 1/3", recipe, False, settings=dose,
                                   checkpoint={"of": trained["name"], "step": 2, "fraction": [1, 3]})]


def test_a_trained_row_and_its_dose_case_run_through_the_case_runner(tmp_path, toy_model_dir, corpus_dir):
    import torch

    from longext.bench.campaign import load_adapter_state
    from longext.targets import load_target

    cases = tiny_cases(toy_model_dir, corpus_dir)
    docs = run.run_cases(cases, tmp_path / "results", tmp_path / "runs", log=lambda _: None)
    trained, dose = (d["result"] for d in docs)
    assert trained["train_steps"] == 6 and set(trained["perplexity"]) == {"256", "512"}
    assert trained["passkey"]["256"]["trials"] == 2 and set(trained["ruler"]["512"]["tasks"]) == {"niah_single_2", "vt"}
    assert dose["checkpoint_step"] == 2 and set(dose["perplexity"]) == {"512"} and "passkey" not in dose
    assert dose["ruler"]["512"]["samples"] == 2 and 0 <= dose["ruler"]["512"]["score"] <= 1
    # the dose case ran on the trained run's code too: a change to train.py makes it stale with the trained row
    assert "longext/train.py" in docs[1]["code"]["files"] and "longext/bench/campaign.py" in docs[1]["code"]["files"]
    assert dose["perplexity"]["512"]["ppl"] != trained["perplexity"]["512"]["ppl"]  # other weights
    # reference: the final checkpoint's weights are the adapter the run saved with peft, an earlier one differs
    run_dir = tmp_path / "runs" / "cases" / "smollm2-yarn-lora" / "run"
    saved = {n: p.detach().clone() for n, p in load_target(run_dir).model.named_parameters() if "lora_" in n}
    model = load_target(run_dir).model
    load_adapter_state(model, run_dir / "checkpoints" / "step-000006")
    assert all(torch.equal(p, saved[n]) for n, p in model.named_parameters() if "lora_" in n)
    load_adapter_state(model, run_dir / "checkpoints" / "step-000002")
    assert any(not torch.equal(p, saved[n]) for n, p in model.named_parameters() if "lora_B" in n)
    # DeepSpeed keeps the tied output layer (SmolLM2's case): accepted as it equals the base's, refused if not
    states_file = run_dir / "checkpoints" / "step-000002" / "mp_rank_00_model_states.pt"
    states = torch.load(states_file, map_location="cpu", weights_only=False)
    assert "base_model.model.lm_head.weight" in states["module"]
    states["module"]["base_model.model.lm_head.weight"] = states["module"]["base_model.model.lm_head.weight"] + 1
    other = tmp_path / "other-base"
    other.mkdir()
    torch.save(states, other / states_file.name)
    with pytest.raises(LongextError, match="lm_head.weight differs"):
        load_adapter_state(model, other)
    # stored and current: a second sitting re-runs nothing
    again = run.run_cases(cases, tmp_path / "results", tmp_path / "runs", log=lambda _: None,
                          runner=lambda case, folder: pytest.fail(f"{case['name']} re-ran"))
    assert all(d["cached"] for d in again)


def test_an_interrupted_evaluation_is_run_again_without_training_again(tmp_path, toy_model_dir, corpus_dir):
    """trained.json is written when the training ends: a second run of the case (a sitting that ended during the
    evaluation) evaluates the same run; a change to the training's code, or to the case, trains again."""
    from longext.bench.campaign import TRAINED_FILE, run_case

    case = tiny_cases(toy_model_dir, corpus_dir)[0]
    folder = tmp_path / "cases" / case["name"]
    first = run_case(case, folder)
    adapter = next((folder / "run").rglob("adapter_model.safetensors"))
    written = adapter.stat().st_mtime_ns
    again = run_case(case, folder)
    assert again.result["training_reused"] is True and "training_reused" not in first.result
    assert adapter.stat().st_mtime_ns == written and "earlier sitting" in (folder / "case.log").read_text()
    assert again.result["train_steps"] == first.result["train_steps"] == 6
    for length, row in first.result["perplexity"].items():  # the same weights, evaluated alike
        assert again.result["perplexity"][length]["ppl"] == pytest.approx(row["ppl"], rel=1e-6)
    assert "longext/train.py" in again.code and again.code["longext/train.py"] == first.code["longext/train.py"]
    # the training's code recorded as something else: this checkout's code did not train the run, so train again
    trained = json.loads((folder / TRAINED_FILE).read_text())
    trained["code"]["longext/train.py"] = "0" * 64
    (folder / TRAINED_FILE).write_text(json.dumps(trained))
    third = run_case(case, folder)
    assert "training_reused" not in third.result and adapter.stat().st_mtime_ns != written
    # another case (one more step) in the same folder trains too
    other = {**case, "recipe": {**case["recipe"], "train": {**case["recipe"]["train"], "steps": 7}}}
    assert run_case(other, folder).result["train_steps"] == 7


def test_a_dose_case_without_its_trained_run_says_which_case_to_run_first(tmp_path, toy_model_dir, corpus_dir):
    from longext.bench.campaign import run_case

    dose = tiny_cases(toy_model_dir, corpus_dir)[1]
    with pytest.raises(LongextError, match="--only smollm2-yarn-lora"):
        run_case(dose, tmp_path / "cases" / dose["name"])
    (tmp_path / "cases" / "smollm2-yarn-lora").mkdir(parents=True)
    other = {**dose["recipe"], "train": {**dose["recipe"]["train"], "steps": 9}}
    (tmp_path / "cases" / "smollm2-yarn-lora" / "trained.json").write_text(
        json.dumps({"case": {"recipe": other}, "code": {}}))
    with pytest.raises(LongextError, match="another recipe"):
        run_case(dose, tmp_path / "cases" / dose["name"])


# -------------------------------------------------------------------------------------------- the page
def result(ppl16: float, ruler16: float, samples: int = 4, train: bool = False) -> dict:
    from longext.evaluate.stats import wilson_interval

    out = {"perplexity": {"16384": {"ppl": ppl16, "tokens_per_s": 100.0}}, "params_nonembed": 10**8, "layers": 30,
           "hidden": 576,
           "ruler": {"16384": {"score": ruler16, "ci95": list(wilson_interval(ruler16 * samples, samples)),
                               "samples": samples, "tasks": {}}}}
    if train:
        out.update(train_seconds=3600.0, train_seq_len=2048, train_tokens=1000, train_tokens_per_s=50.0)
    return out


def measured(results: dict[str, dict], cases: list[dict]) -> dict:
    """A suite document with these results stored at the current code (what load_suite returns)."""
    from longext.bench.results import portable

    by = {c["name"]: c for c in cases}
    return {"suite": "smollm2", "quick": False, "started": "2026-12-06", "finished": "2026-12-07", "complete": False,
            "pending": [], "cases": [{"case": portable(by[n]), "result": r, "commit": "abcdef1234567", "dirty": False,
                                      "stale": False} for n, r in results.items()]}


def everything(yarn: tuple[float, float], trained: dict[str, tuple[float, float]]) -> dict[str, dict]:
    out = {f"smollm2-{n}": result(20.0, 0.25) for n in FREE}
    out["smollm2-yarn"] = result(*yarn)
    out.update({f"smollm2-{n}": result(*trained.get(n, (25.0, 0.0)), train=True) for n in TRAINED})
    return out


def test_the_verdict_is_yes_no_or_not_known_from_the_results():
    cases = campaign_cases()
    rows = lambda results: campaign_rows(measured(results, cases), cases)  # noqa: E731
    yes = verdict(rows(everything((17.25, 0.25), {"harpe": (16.0, 0.75), "longrecipe": (15.0, 0.25)})))
    assert yes.startswith("**Yes**") and "HARPE" in yes and "16.00 against 17.25" in yes and "75 %" in yes
    assert "LongRecipe" not in yes  # lower perplexity, but not better on RULER
    no = verdict(rows(everything((17.25, 0.5), {"longrecipe": (15.0, 0.5), "harpe": (18.0, 0.75)})))
    assert no.startswith("**No**") and "LongRecipe" in no and "does not in RULER (" in no
    assert "More training" not in no  # the dose points have no result: nothing said about them
    doses = everything((17.25, 0.5), {"yarn-lora": (16.5, 0.25)})
    doses.update({"smollm2-yarn-lora-at-1of3": result(18.0, 0.0), "smollm2-yarn-lora-at-2of3": result(16.75, 0.25)})
    no = verdict(rows(doses))
    assert no.startswith("**No**") and "YaRN x2 + LoRA, trained" in no.split("More training")[0]
    assert "goes 18.00 → 16.75 → 16.50 in perplexity at 16k after 1/3, 2/3 and all" in no and "it still falls" in no
    assert "0 → 25 → 25 % on the RULER subset" in no
    results = everything((17.25, 0.25), {"harpe": (16.0, 0.75)})
    del results["smollm2-longgen"], results["smollm2-yarn"]
    unknown = verdict(rows(results))
    assert unknown.startswith("**Not known yet**") and "smollm2-longgen (pending)" in unknown
    assert "smollm2-yarn (pending)" in unknown and "smollm2-harpe" not in unknown
    stale = measured(everything((17.25, 0.25), {"harpe": (16.0, 0.75)}), cases)
    stale["cases"][6]["stale"] = True  # smollm2-pose: its code changed since
    assert "smollm2-pose (stale)" in verdict(campaign_rows(stale, cases))


def test_the_section_shows_budgets_commits_and_pending_rows_never_invented_figures():
    cases = campaign_cases()
    results = {"smollm2-yarn": result(17.25, 0.25), "smollm2-harpe": result(16.0, 0.75, train=True)}
    text = campaign_section(measured(results, cases), cases, plots=False)
    assert text.index("**Not known yet**") < text.index("| row | status | training | commit |")
    harpe = next(line for line in text.splitlines() if line.startswith("| HARPE") and "current" in line)
    steps = next(c for c in cases if c["name"] == "smollm2-harpe")["budget"]["steps"]
    assert f"{steps} × 2k" in harpe and "60.0 min measured" in harpe and "abcdef1234" in harpe
    assert "| PoSE (YaRN x2), trained at 2k | pending |" in text
    assert "Measured training time of the 1 trained rows: 60-60 min against the stated 60" in text
    assert "| YaRN x2, training-free | 25 % (" in text  # the RULER table, with the interval
    assert "742" not in text and "45.57" not in text  # nothing from an older page
    # each row's CPU: the project's machine changes between sittings (minutes and tokens/s depend on it)
    assert harpe.endswith("| ? (AVX2 only) |")  # no machine stored: no flags
    doc = measured(results, cases)
    for stored, flags in zip(doc["cases"], ({"avx2": True, "avx512_bf16": True}, {"avx2": True, "avx512f": True})):
        stored["machine"] = {"cpu": "AMD EPYC", "flags": flags}
    rows = {line.split(" | ")[0]: line for line in campaign_section(doc, cases, plots=False).splitlines()
            if " | current | " in line or " | pending | " in line}  # the rows table
    assert rows["| YaRN x2, training-free"].endswith("| AMD EPYC (avx512_bf16) |")
    assert rows["| HARPE (3 bases 2e5-1e6, per KV group), trained at 2k"].endswith("| AMD EPYC (avx512, no bf16) |")
    assert rows["| PoSE (YaRN x2), trained at 2k"].endswith("| – | – |")
    # a stored result measured for other settings (the 10-step rows) is not shown as this campaign's row
    old = measured({"smollm2-pose": result(12.0, 1.0, train=True)}, cases)
    old["cases"][0]["case"] = {**old["cases"][0]["case"], "recipe": {"train": {"steps": 10}}}
    text = campaign_section(old, cases, plots=False)
    assert "12.0" not in text and "pending (stored result is for other settings)" in text


def test_the_page_renders_the_campaign_without_results_and_keeps_the_reduced_run():
    text = report.render({"smollm2": None})
    assert "## SmolLM2-135M campaign" in text and "**Not known yet**" in text
    rows = measured({"smollm2-pi": result(46.9, 0.0)}, campaign_cases())["cases"]
    quick = {"suite": "smollm2", "quick": True, "cases": rows}
    text = report.render({"smollm2": quick})
    assert "## SmolLM2-135M campaign" in text and "(reduced run)" in text and "| PI x2, training-free | 46.90 |" in text


def test_the_readme_campaign_table_quotes_the_stored_results():
    """README.md copies the campaign's perplexity and passkey by hand; every row must match its committed result
    (the case whose label is the README row's, or starts with it and a comma)."""
    root = Path(__file__).resolve().parents[1]
    stored = [json.loads(p.read_text()) for p in sorted((root / "bench/results/smollm2").glob("smollm2-*.json"))]
    section = (root / "README.md").read_text().split("Every row, at 4k / 8k / 12k / 16k:")[1].split("\n\n")[1]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines()[2:]]
    assert len(rows) == len([s for s in stored if not s["case"].get("checkpoint")])  # every row, the dose cases aside
    for name, _, ppl, passkey in rows:
        found = [s for s in stored if s["case"]["label"] == name or s["case"]["label"].startswith(name + ",")]
        assert len(found) == 1, (name, [s["case"]["label"] for s in found])
        result = found[0]["result"]
        lengths = sorted(result["perplexity"], key=int)
        assert ppl == " / ".join(f"{result['perplexity'][n]['ppl']:.2f}" for n in lengths), name
        assert passkey == " / ".join(str(result["passkey"][n]["correct"]) for n in lengths), name
