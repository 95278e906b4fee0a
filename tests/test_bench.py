"""The benchmark harness: cache keys and reuse, suite errors, the page renderer, and determinism of
a tiny case. Nothing here runs a real suite (those take minutes to hours: `make bench`)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from longext.bench import report, run
from longext.bench.suites import suite_cases
from longext.errors import LongextError


def fake_case(name: str, **extra) -> dict:
    return {"kind": "model", "name": name, "label": name, **extra}


class CountingRunner:
    """Measures nothing: counts calls and reports that each case ran `files` of the package at `root`."""

    def __init__(self, root: Path, files=("longext/train.py",)):
        self.calls, self.root, self.files = [], root, files

    def __call__(self, case: dict, folder: Path):
        from longext.bench.fresh import Measured
        from longext.bench.results import file_hashes

        self.calls.append(case["name"])
        return Measured({"value": len(self.calls)}, 0.1, file_hashes(self.files, self.root))


def fake_package(root: Path) -> Path:
    for rel, text in {"longext/train.py": "x = 1\n", "longext/other.py": "y = 1\n"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


# ------------------------------------------------------------------------------------------ cache
def test_a_stored_case_is_reused_until_its_settings_or_the_code_it_ran_change(tmp_path):
    root = fake_package(tmp_path / "src")
    runner, cases = CountingRunner(root), [fake_case("a", lr=1e-3), fake_case("b")]

    def run_all(cases, force=False):
        return run.run_cases(cases, tmp_path / "results", tmp_path / "runs", force, runner, lambda _: None, root=root)

    first = run_all(cases)
    assert runner.calls == ["a", "b"] and not any(d["cached"] for d in first)
    stored = json.loads((tmp_path / "results" / "a.json").read_text())
    assert list(stored["code"]["files"]) == ["longext/train.py"] and stored["case"] == cases[0]
    assert {"commit", "dirty", "machine", "versions", "key"} <= set(stored)

    again = run_all(cases)
    assert runner.calls == ["a", "b"] and all(d["cached"] for d in again)
    assert [d["result"] for d in again] == [d["result"] for d in first]

    changed = [fake_case("a", lr=2e-3), fake_case("b")]  # a recipe field changed: only that case re-runs
    run_all(changed)
    assert runner.calls == ["a", "b", "a"]

    (root / "longext" / "other.py").write_text("y = 2\n")  # code no case ran: nothing re-runs
    run_all(changed)
    assert runner.calls == ["a", "b", "a"]

    (root / "longext" / "train.py").write_text("x = 2\n")  # code both ran: both re-run
    run_all(changed)
    assert runner.calls == ["a", "b", "a", "a", "b"]

    run_all(changed, force=True)
    assert runner.calls[-2:] == ["a", "b"]


def test_a_moved_module_makes_the_cases_that_ran_it_stale(tmp_path):
    from longext.bench.results import code_changed, file_hashes

    root = fake_package(tmp_path)
    doc = {"code": {"files": file_hashes(["longext/train.py"], root)}}
    assert not code_changed(doc, root)
    (root / "longext" / "train.py").rename(root / "longext" / "training.py")
    assert code_changed(doc, root) and code_changed({}, root)


def test_a_case_process_reports_the_longext_files_it_imported(tmp_path):
    import os

    from longext.bench.fresh import run_fresh

    path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    (tmp_path / "lengths_case.py").write_text(
        "from longext.bench.fresh import main\n"
        "def measure(case, folder):\n    from longext.lengths import parse_length\n"
        "    return {'tokens': parse_length(case['length'])}\n"
        "if __name__ == '__main__':\n    main(measure)\n"
    )
    measured = run_fresh("lengths_case", {"name": "l", "length": "4k"}, tmp_path / "l", 120, {"PYTHONPATH": path})
    assert measured.result == {"tokens": 4096}
    assert {"longext/lengths.py", "longext/bench/fresh.py", "longext/errors.py"} <= set(measured.code)
    assert not {"longext/train.py", "longext/bench/run.py", "longext/bench/results.py"} & set(measured.code)


def test_a_source_file_modified_after_the_case_process_started_is_refused():
    # loaded_code hashes at the end of a case: a module edited meanwhile would be stored as code the case never ran
    import time

    import longext.lengths  # noqa: F401  (a loaded module the check must see)
    from longext.bench.results import CodeChanged, loaded_code, process_start

    assert process_start() <= time.time()
    assert "longext/lengths.py" in loaded_code(since=time.time() + 60)
    with pytest.raises(CodeChanged, match=r"changed while it ran \(longext/.*run the case again"):
        loaded_code(since=0.0)


def test_a_failed_case_leaves_no_result_and_runs_again(tmp_path):
    root = fake_package(tmp_path / "src")

    def failing(case, folder):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        run.run_cases([fake_case("a")], tmp_path / "results", tmp_path / "runs", False, failing, lambda _: None, root=root)
    assert not (tmp_path / "results" / "a.json").exists()
    runner = CountingRunner(root)
    run.run_cases([fake_case("a")], tmp_path / "results", tmp_path / "runs", False, runner, lambda _: None, root=root)
    assert runner.calls == ["a"]


def test_unknown_suite_is_a_one_line_error_listing_the_allowed_ones(tmp_path):
    with pytest.raises(LongextError) as err:
        run.run_bench("toys", out=tmp_path, doc=tmp_path / "b.md")
    message = str(err.value)
    assert "\n" not in message and "'toys'" in message
    assert all(name in message for name in ("throughput", "toy", "smollm2", "all"))
    with pytest.raises(LongextError):
        suite_cases("all", quick=True)  # `all` is a run_bench choice, not a suite of its own


def test_cli_bench_reports_an_unknown_suite_with_exit_2(tmp_path, capsys):
    from longext.cli import main

    assert main(["bench", "nope", "--out", str(tmp_path), "--doc", str(tmp_path / "b.md")]) == 2
    assert "error: SUITE: unknown benchmark suite 'nope'" in capsys.readouterr().err


def test_a_page_the_bench_did_not_write_is_never_overwritten(tmp_path, capsys):
    from longext.cli import main

    notes = tmp_path / "notes.md"
    notes.write_text("# My notes\n\nnot a bench page\n")
    assert main(["bench", "toy", "--quick", "--out", str(tmp_path / "runs"), "--results", str(tmp_path / "results"),
                 "--doc", str(notes)]) == 2
    assert capsys.readouterr().err == (
        f"error: --doc: {notes} was not written by `longext bench` (no `# Benchmarks` title and `<!-- suite:NAME -->` "
        "markers); it is never overwritten: give a new file or a bench page\n"
    )
    assert notes.read_text() == "# My notes\n\nnot a bench page\n" and not (tmp_path / "results").exists()
    page = tmp_path / "page.md"
    page.write_text(report.render({}))  # a page the bench wrote (every suite "not run yet"), and an empty file
    run.check_page(page)
    (tmp_path / "empty.md").write_text("")
    run.check_page(tmp_path / "empty.md")


def test_default_outputs_are_the_checkouts_wherever_the_command_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = Path(run.__file__).resolve().parents[2]
    assert run.checkout_path(run.DOC, "--doc") == root / "docs" / "benchmarks.md"
    assert run.checkout_path(run.RESULTS, "--results") == root / "bench" / "results"
    with pytest.raises(LongextError, match=r"^--doc: longext runs from .*, not a source checkout \(no docs/ and bench/ "
                                           r"there\); give --doc explicitly$"):
        run.checkout_path(run.DOC, "--doc", root=tmp_path)


def test_throughput_quick_is_tiny_at_2k_only():
    cases = suite_cases("throughput", quick=True)
    train = [c for c in cases if c["case"] == "train"]
    assert {c["model"] for c in train} == {"tiny"} and {c["seq_len"] for c in train} == {2048}
    assert {c["path"] for c in train} == {"engine", "plain"}
    assert sorted(c["length"] for c in cases if c["case"] == "eval") == [2048, 4096]


# --------------------------------------------------------------------------------------- rendering
def model_result(ppl: dict[int, float], passkey: dict[int, tuple[int, int]], train: bool = False) -> dict:
    result = {
        "params_nonembed": 1000, "layers": 2, "hidden": 10, "peak_rss_mb": 500.0, "seconds": 60.0,
        "perplexity": {str(L): {"ppl": p, "tokens_per_s": 1000.0 * L} for L, p in ppl.items()},
        "passkey": {str(L): {"correct": c, "trials": t, "accuracy": c / t} for L, (c, t) in passkey.items()},
    }
    if train:
        result.update(train_tokens=4096, train_tokens_per_s=1234.0, train_seq_len=100, train_peak_rss_mb=700.0)
    return result


def suite_doc(cases: list[tuple[str, str, dict]], **extra) -> dict:
    return {"finished": "2026-01-01T00:00:00+00:00", "quick": False, "wall_seconds": 120.0, "cached_cases": 0,
            "machine": {"cpu": "Test CPU", "cores": 2, "ram_gb": 4, "flags": {"avx2": True, "avx512_bf16": False}},
            "versions": {"torch": "9.9"},
            "cases": [{"case": {"name": n, "label": label, **({"repeat_of": n[:-7]} if n.endswith("-repeat") else {})},
                       "result": r, "cached": False} for n, label, r in cases],
            **extra}


def store(results: Path, folder: str, doc: dict, stale: tuple[str, ...] = ()) -> None:
    """A suite document as `longext bench` stores it: one JSON per case (measured at the code as it is, except the
    `stale` ones) and the suite's summary."""
    from longext.bench.results import file_hashes
    from longext.files import write_json

    code = file_hashes(["longext/errors.py"])
    for c in doc["cases"]:
        files = {"longext/errors.py": "0" * 64} if c["case"]["name"] in stale else code
        write_json(results / folder / f"{c['case']['name']}.json", {**c, "code": {"files": files}, "commit": "abc1234"})
    summary = {k: v for k, v in doc.items() if k != "cases"}
    write_json(results / folder / "suite.json", {**summary, "order": [c["case"]["name"] for c in doc["cases"]]})


def test_the_page_is_rendered_from_results_only():
    doc = suite_doc([
        ("toy-base", "no extension", model_result({128: 10.0, 1024: 30.0}, {128: (19, 20), 1024: (0, 20)})),
        ("toy-pi-ft", "PI fine-tuned", model_result({128: 10.5, 1024: 10.8}, {128: (18, 20)}, train=True)),
        ("toy-pi-ft-repeat", "again", model_result({128: 10.5, 1024: 10.8 * 1.02}, {128: (18, 20)}, train=True)),
    ], toy_base={"params": 12345, "vocab": 1024, "gate": {"correct": 19, "trials": 20, "passed": True}})
    text = report.render({"toy": doc, "throughput": None, "smollm2": None})
    assert "| no extension | 10.00 | 30.00 |" in text
    assert "| no extension | 19/20 (76–99 %) | 0/20 (0–16 %) |" in text and "| PI fine-tuned | 18/20 (70–97 %) | – |" in text
    assert "Test CPU, 2 cores" in text and "avx512_bf16 no" in text and "torch 9.9" in text
    assert "wall time 2.0 min" in text and "**met**" in text
    assert "ppl(128) = 3.00 (needs ≥ 2): holds" in text and "= 1.08 (needs ≤ 1.1): holds" in text
    # compute ratio: (N + layers*train_len*d) / (N + layers*target*d) = (1000 + 2000) / (1000 + 20480)
    assert f"| {3000 / 21480:.2f} |" in text
    assert "Not run yet (`longext bench throughput`)" in text
    assert "largest perplexity difference 2.00%, passkey counts identical (needs ≤ 1 % and identical): fails" in text


def test_a_suite_without_new_results_keeps_its_old_section():
    old = report.render({"toy": suite_doc([("toy-base", "no extension", model_result({128: 7.0}, {}))],
                                          toy_base={"gate": {}})})
    new = report.render({"toy": None, "smollm2": suite_doc([("smollm2-base", "none", model_result({8192: 20.0}, {}))],
                                                           quick=True)}, old)
    assert "| no extension | 7.00 |" in new and "| none | 20.00 |" in new
    assert new.count("<!-- suite:toy -->") == 1



def test_a_run_stopped_before_its_first_case_keeps_the_old_section():
    old = report.render({"toy": suite_doc([("toy-base", "no extension", model_result({128: 7.0}, {}))],
                                          toy_base={"gate": {}})})
    stopped = {**suite_doc([], toy_base={"gate": {}}), "complete": False, "pending": ["toy-base"]}
    assert "| no extension | 7.00 |" in report.render({"toy": stopped}, old)
    fresh = report.render({"toy": stopped})
    toy = fresh[fresh.index("<!-- suite:toy -->"):fresh.index("<!-- /suite:toy -->")]
    assert "| no extension |" not in toy  # nothing older to keep: the empty run shows


def test_the_data_section_shows_each_size_and_the_issue_targets():
    from longext.bench.suites import data_cases

    assert [c["name"] for c in data_cases(quick=False)] == [
        "data-25M-cold", "data-25M-warm", "data-25M-resume", "data-100M-cold", "data-100M-warm", "data-100M-resume",
        "data-25M-ranks"]
    corpus = {"bytes": 93e6, "documents": 4000}
    run = {"seconds": 20.0, "first_step_seconds": 8.5, "data_seconds": 0.2, "peak_rss_mb": 1150.0, "tokens": 25e6,
           "corpus": corpus, "imports": {"total": 5.0, "largest": {"torch": 2.0}}}
    cases = [{"case": {"name": f"data-{size}-{what}", "size": size, "measure": what}, "result": result, "cached": False}
             for size, rss in (("25M", 760.0), ("100M", 900.0)) for what, result in (
                 ("cold", {"seconds": 50.0, "tokens": 25e6, "tokens_per_s": 5e5, "build_tokens_per_s": 6e5,
                           "peak_rss_mb": rss, "corpus": corpus}), ("warm", run), ("resume", run))]
    cases.append({"case": {"name": "data-25M-ranks", "size": "25M", "measure": "ranks"}, "cached": False, "result": {
        "rank_1": {"data_seconds": 40.0}, "ranks_2": {"data_seconds": 42.0}, "ratio": 1.05}})
    text = report.render({"data": {**suite_doc([]), "cases": cases}})
    assert "| 25M (93 MB jsonl, 4,000 docs) | 25.0M | 50.0 s | 500,000 | 600,000 | 760 | 0.20 s | 8.5 s |" in text
    assert "+140 MB (target: at most +300 MB)" in text
    assert "ratio 1.05 (target: at most 1.2" in text and "imports 5.0 s, largest torch 2.0 s" in text


def test_throughput_table_has_the_engine_to_plain_ratio():
    def case(name, path, tps):
        return {"case": {"name": name, "case": "train", "path": path, "model": "tiny", "seq_len": 2048, "steps": 3},
                "result": {"tokens_per_s": tps, "peak_rss_mb": 100.0, "precision": "fp32"}}

    doc = suite_doc([])
    doc["cases"] = [case("train-tiny-2048-engine", "engine", 900.0), case("train-tiny-2048-plain", "plain", 1000.0)]
    text = report.throughput_section(doc)
    assert "| tiny | 2k | 3 | 900 | 1,000 | 0.90 |" in text


def test_write_doc_is_atomic_and_writes_plots(tmp_path):
    pytest.importorskip("matplotlib")
    doc = suite_doc([("toy-base", "no extension", model_result({128: 10.0, 256: 12.0}, {128: (1, 2), 256: (0, 2)}))],
                    toy_base={"gate": {}}, suite="toy")
    store(tmp_path / "results", "toy", doc)
    page = run.write_doc(tmp_path / "results", tmp_path / "docs" / "benchmarks.md")
    assert "| no extension | 10.00 | 12.00 |" in page.read_text()
    assert sorted(p.name for p in (tmp_path / "docs" / "bench").iterdir()) == ["toy-passkey.png", "toy-ppl.png"]
    assert not list(tmp_path.rglob("*.tmp"))


# ------------------------------------------------------------------------------------- determinism
def test_a_tiny_case_gives_identical_figures_twice(tmp_path, tiny_model_dir, corpus_dir):
    """The toy suite's determinism claim, on a tiny model: train 2 steps with longext, evaluate
    perplexity and passkey; a second run with the same seed gives the same accuracies and
    perplexities within 1% (in practice: equal)."""
    from longext.bench.cases import model_case

    texts = sorted(str(p) for p in corpus_dir.glob("*.txt"))
    case = {
        "kind": "model", "name": "tiny-pi-ft", "label": "tiny", "train": True,
        "recipe": {
            "name": "tiny-pi-ft", "model": {"path": str(tiny_model_dir)},
            "method": {"kind": "standard", "target_len": 256}, "rope": {"kind": "linear"},
            "lora": {"r": 4, "alpha": 8.0}, "data": {"train": texts, "seq_len": 64},
            "train": {"steps": 2, "lr": 1e-3, "precision": "fp32", "zero_stage": 0, "seed": 3},
        },
        "eval": {"ppl_lengths": [128, 256], "targets": 32, "windows": 2, "passkey_lengths": [256], "trials": 2,
                 "depths": [0.25, 0.75], "texts": texts, "filler_chars": 20_000, "seed": 0},
    }
    first = model_case(case, tmp_path / "one")
    second = model_case(case, tmp_path / "two")
    for L in ("128", "256"):
        a, b = first["perplexity"][L]["ppl"], second["perplexity"][L]["ppl"]
        assert math.isfinite(a) and abs(a - b) <= 0.01 * a
    assert [r["answer"] for r in first["passkey"]["256"]["records"]] == [r["answer"] for r in second["passkey"]["256"]["records"]]
    assert first["train_tokens"] == second["train_tokens"] == 2 * 64
    assert json.dumps(first["final_loss"]) == json.dumps(second["final_loss"])


# ------------------------------------------------------------------------------------ training compute
def test_stage_tokens_and_compute_follow_the_formula(tmp_path):
    """A two-stage run (LongRecipe: extension then replay at a shorter length): tokens are split by the stage's
    length, and the compute is sum(tokens x (N + layers * length * d)), the report's per-token cost."""
    from longext.bench.cases import train_figures
    from longext.bench.report_models import train_compute

    records = [{"step": s, "loss": 1.0, "tokens": 300 if s <= 3 else 100, "tokens_per_s": 10.0, "step_seconds": 1.0}
               for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    figures = train_figures(tmp_path, [(3, 300), (5, 100)])
    assert figures["train_tokens_by_length"] == {"300": 900, "100": 200} and figures["train_tokens"] == 1100
    result = {**figures, "params_nonembed": 1000, "layers": 2, "hidden": 10}
    assert train_compute(result) == 900 * (1000 + 2 * 300 * 10) + 200 * (1000 + 2 * 100 * 10)
    assert train_compute({"params_nonembed": 1}) is None


def test_the_longrecipe_compute_check_compares_with_pi_fine_tuning():
    # per-token cost N + layers * L * d = 1000 + 20 L: LongRecipe 300 tokens at 307 and 100 of replay at 128
    # against PI's 1000 tokens at 1024
    lr = {**model_result({1024: 12.0}, {}, train=True), "train_tokens_by_length": {"307": 300, "128": 100}}
    pi = {**model_result({128: 10.0, 1024: 11.0}, {}, train=True), "train_tokens_by_length": {"1024": 1000}}
    ratio = (300 * (1000 + 20 * 307) + 100 * (1000 + 20 * 128)) / (1000 * (1000 + 20 * 1024))
    doc = suite_doc([("toy-base", "none", model_result({128: 10.0, 1024: 25.0}, {})), ("toy-pi-ft", "PI", pi),
                     ("toy-longrecipe", "LongRecipe", lr)], toy_base={"gate": {}})
    text = report.render({"toy": doc})
    assert f"LongRecipe training compute / PI fine-tuned at 1k (same steps; replay included) = {ratio:.2f} (target ≤ 0.35): holds" in text


def test_every_method_row_of_the_suites_is_a_valid_recipe():
    """The toy rows (LongRecipe at 0.3 x 8 L0, HARPE bases scaled from the toy's own RoPE base) and the SmolLM2
    method rows (the shipped CPU recipes) validate, with the lengths and bases the docs state."""
    from longext.bench.suites import TOY_DIR, smollm2_cases, toy_cases, toy_harpe_bases, toy_theta
    from longext.recipe import validate_recipe

    toy = {c["name"]: c for c in toy_cases(False)}
    lengths = {n: validate_recipe(c["recipe"], n).seq_len for n, c in toy.items()}
    assert lengths["toy-longrecipe"] == round(0.3 * 1024) and lengths["toy-e2llm"] == 128 and lengths["toy-pi-ft"] == 1024
    assert toy["toy-longrecipe"]["recipe"]["train"] == toy["toy-pi-ft"]["recipe"]["train"]  # same steps
    theta = toy_theta(TOY_DIR)
    assert toy_harpe_bases(theta) == (4 * theta, 20 * theta)
    assert toy["toy-abf-max"]["recipe"]["rope"]["theta"] == 20 * theta
    smol = {c["name"]: c for c in smollm2_cases(False)}
    assert {"smollm2-e2llm", "smollm2-harpe", "smollm2-longrecipe", "smollm2-pose", "smollm2-longgen"} <= set(smol)
    kinds = {n: validate_recipe(c["recipe"], n).method.kind for n, c in smol.items() if c["train"]}
    assert kinds["smollm2-harpe"] == "harpe" and kinds["smollm2-longrecipe"] == "longrecipe"
    assert kinds["smollm2-longgen"] == "longgen"
    assert all("eval" not in c["recipe"] for c in smol.values())


def test_rows_measured_at_code_that_changed_since_are_marked_stale(tmp_path):
    doc = suite_doc([("toy-base", "no extension", model_result({128: 10.0}, {})),
                     ("toy-pi", "PI x8", model_result({128: 11.0}, {}))], toy_base={"gate": {}}, suite="toy")
    store(tmp_path, "toy", doc, stale=("toy-pi",))
    text = report.render(run.load_suites(tmp_path))
    assert "| no extension | 10.00 |" in text and "| PI x8 *stale* | 11.00 |" in text
    assert "**Stale rows**" in text and "`longext bench toy` re-runs only them): toy-pi." in text
    assert "Measured at commit abc1234 (2 cases)." in text


def test_a_reduced_run_stays_on_the_page_next_to_a_full_run(tmp_path):
    """SmolLM2's quick run is shown beside the full one when both exist (the full run may not have reached rows
    the quick one has), rendered from its JSON, or kept from the previous page when its JSON is gone."""
    from longext.bench.results import portable
    from longext.bench.suites import smollm2_cases

    full = suite_doc([("smollm2-base", "no extension", model_result({8192: 16.5, 16384: 742.0}, {16384: (0, 3)}))])
    full["cases"][0]["case"] = portable(smollm2_cases(False)[0])  # the campaign's own row
    quick = {**suite_doc([("smollm2-pi", "PI x2, training-free", model_result({16384: 46.9}, {}))]), "quick": True}
    store(tmp_path, "smollm2", full)
    store(tmp_path, "smollm2-quick", quick)
    suites = run.load_suites(tmp_path)
    assert [c["result"] for c in suites["smollm2"]["cases"]] == [c["result"] for c in full["cases"]]
    text = report.render(suites)
    assert "| no extension | 16.49 |" not in text and "| no extension | 16.50 | 742 |" in text
    assert "<!-- suite:smollm2-quick -->" in text and "| PI x2, training-free | 46.90 |" in text
    assert text.index("<!-- /suite:smollm2 -->") < text.index("<!-- suite:smollm2-quick -->")
    # the quick JSON gone: the previous page's section is kept as it was
    shutil.rmtree(tmp_path / "smollm2-quick")
    again = report.render(run.load_suites(tmp_path), text)
    assert again.count("<!-- suite:smollm2-quick -->") == 1 and "| PI x2, training-free | 46.90 |" in again
    # a quick run alone goes in its own section; the campaign's lists its rows as pending
    alone = report.render({"smollm2": quick})
    assert alone.index("**Not known yet**") < alone.index("<!-- suite:smollm2-quick -->") < alone.index("(reduced run)")


def test_a_fresh_case_process_gets_no_launcher_variables_and_its_failure_is_reported(tmp_path, monkeypatch):
    import os

    from longext.bench.fresh import run_fresh

    (tmp_path / "probe_case.py").write_text(
        "import os\nfrom longext.bench.fresh import main\n"
        "def measure(case, folder):\n"
        "    if case.get('fail'):\n        raise SystemExit('the case broke')\n"
        "    return {'twice': 2 * case['n'], 'rank': os.environ.get('RANK'), 'extra': os.environ.get('EXTRA')}\n"
        "if __name__ == '__main__':\n    main(measure)\n"
    )
    monkeypatch.setenv("RANK", "3")
    path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    measured = run_fresh("probe_case", {"name": "p", "n": 21}, tmp_path / "p", 120, {"PYTHONPATH": path, "EXTRA": "x"})
    assert measured.result == {"twice": 42, "rank": None, "extra": "x"} and measured.seconds > 0
    assert not (tmp_path / "p" / "result.tmp.json").exists()
    with pytest.raises(RuntimeError, match=r"(?s)benchmark case q failed \(log: .*case.log\):.*the case broke"):
        run_fresh("probe_case", {"name": "q", "fail": True}, tmp_path / "q", 120, {"PYTHONPATH": path}, log=True)


def test_a_stored_result_stays_current_in_another_checkout_of_the_same_code(tmp_path):
    from longext.bench.results import is_current

    here, there = fake_package(tmp_path / "here"), fake_package(tmp_path / "there")
    runner = CountingRunner(here)
    case = fake_case("toy-base", recipe={"model": {"path": f"{here}/bench/toy-base"}})
    (doc,) = run.run_cases([case], tmp_path / "results", tmp_path / "runs", False, runner, lambda _: None, root=here)
    assert doc["case"]["recipe"]["model"]["path"] == "<checkout>/bench/toy-base"
    moved = fake_case("toy-base", recipe={"model": {"path": f"{there}/bench/toy-base"}})
    assert is_current(doc, moved, root=there) and not is_current(doc, fake_case("toy-pi"), root=there)
    (there / "longext" / "train.py").write_text("x = 3\n")
    assert not is_current(doc, moved, root=there)


def test_a_bf16_trained_row_is_not_run_on_a_cpu_that_only_emulates_bf16(tmp_path, monkeypatch):
    """The campaign's trained rows train in bf16 with budgets measured on a CPU with avx512_bf16; on an AVX2-only CPU
    (this project's machine on some days) a 60-minute row would take days: it is left pending, with one line."""
    import longext.engine

    cases = {c["name"]: c for c in suite_cases("smollm2", False)}
    trained, free = cases["smollm2-harpe"], cases["smollm2-base"]
    assert trained["recipe"]["train"]["precision"] == "bf16"
    monkeypatch.setattr(longext.engine, "native_bf16", lambda: True)
    assert run.cannot_run_here(trained) is None
    monkeypatch.setattr(longext.engine, "native_bf16", lambda: False)
    assert "avx512_bf16" in run.cannot_run_here(trained)
    assert run.cannot_run_here(free) is None  # evaluation only: fp32
    assert run.cannot_run_here(cases["smollm2-longgen"]) is None  # trains in fp32 (budget measured on such a CPU)
    ran, lines = [], []

    def runner(case, folder):
        from longext.bench.fresh import Measured

        ran.append(case["name"])
        return Measured({"value": 1}, 0.1, {})

    doc = run.run_suite("smollm2", False, False, tmp_path / "results", tmp_path / "runs", runner, lines.append,
                        only=["smollm2-harpe", "smollm2-base"])
    assert ran == ["smollm2-base"]
    assert "smollm2-harpe" in doc["pending"] and not doc["complete"]
    assert any(line.startswith("smollm2-harpe: not run on this machine:") for line in lines)
    assert not (tmp_path / "results" / "smollm2" / "smollm2-harpe.json").exists()


def test_the_cases_only_left_out_that_are_current_count_as_not_re_run(tmp_path):
    """`--only` runs one case; the page's "N of M cases were current and not re-run" counts the current cases it left
    out too (a one-row sitting of the campaign said "0 of 13" with 12 rows current)."""
    from longext.bench.fresh import Measured
    from longext.bench.results import file_hashes

    root = fake_package(tmp_path / "src")

    def runner(case, folder):
        return Measured({"value": 1}, 0.1, file_hashes(["longext/train.py"], root))

    def suite(only):
        return run.run_suite("smollm2", False, False, tmp_path / "results", tmp_path / "runs", runner, lambda _: None,
                             root=root, only=only)

    first = suite(["smollm2-base"])
    assert first["cached_cases"] == 0 and "smollm2-pi" in first["pending"]
    second = suite(["smollm2-pi"])  # base is current and left out
    assert second["cached_cases"] == 1 and "smollm2-base" not in second["pending"]
    third = suite(["smollm2-base", "smollm2-pi"])  # both current: found so, not re-run
    assert third["cached_cases"] == 2 and all(d["cached"] for d in third["cases"])
