"""One row of the SmolLM2 campaign (longext/bench/smollm2.py): train (if the row trains) or load the YaRN + LoRA run at
one of its checkpoints, then perplexity and passkey (longext/bench/cases.py's evaluation) and a RULER subset
(longext.evaluate.ruler) at the row's lengths.

    parent:  run_case(case, case_dir)   ->   python -m longext.bench.campaign '<case json>' RESULT.json

A dose-response case ({"checkpoint": {"of": "smollm2-yarn-lora", "step": 120}}) trains nothing: it evaluates the
trained row's run folder, `<case_dir>/../<of>/run`, with the adapter weights of `checkpoints/step-000120` (the run saves
them: train.save_every), so its result depends on the code that trained that run too: the parent adds the trained
case's code files (`<case_dir>/../<of>/trained.json`, written when its training ended) to the dose case's own, and a
change to any of them makes both stale.

A trained row writes trained.json as soon as its training ends (the case and the code the training ran). When a
sitting ends during the row's evaluation, the next one evaluates the run again without training it again, provided
the case is the same, the run finished, and every file of the training's code is unchanged; the result then counts
the training's code with the evaluation's.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from longext.bench.fresh import Measured, main, run_fresh
from longext.errors import LongextError
from longext.files import write_json

TRAINED_FILE = "trained.json"  # in a trained case's folder: its case JSON, the code its training ran, its figures


def say(message: str) -> None:
    """A progress line in the case's log (the parent sends the process's output to case.log)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ------------------------------------------------------------------------------------------- parent
def run_case(case: dict, case_dir: Path, timeout: int = 8 * 3600) -> Measured:
    """The row in a fresh process (log: case_dir/case.log). A trained row leaves trained.json next to its run; a dose
    case first checks that the run it evaluates was trained for its recipe. Either counts the training's code."""
    case_dir = Path(case_dir)
    trained = trained_run(case, case_dir) if case.get("checkpoint") else None
    measured = run_fresh("longext.bench.campaign", case, case_dir, timeout, log=True)
    if case.get("train"):
        trained = json.loads((case_dir / TRAINED_FILE).read_text())
    if trained is not None:
        measured.code = {**trained["code"], **measured.code}
    return measured


def trained_run(case: dict, case_dir: Path) -> dict:
    """The trained.json of the run a dose case evaluates, after checking it is the run of the same recipe."""
    of = case["checkpoint"]["of"]
    path = case_dir.parent / of / TRAINED_FILE
    try:
        trained = json.loads(path.read_text())
    except (OSError, ValueError):
        raise LongextError(f"{case['name']}: no finished run of {of} in {path.parent} (its checkpoints are evaluated "
                           f"here; bench-runs/ is not committed); run `longext bench smollm2 --only {of} --force` "
                           f"in this checkout first") from None
    if trained["case"]["recipe"] != case["recipe"]:
        raise LongextError(f"{case['name']}: the run in {path.parent} was trained for another recipe than this case's; "
                           f"run `longext bench smollm2 --only {of} --force` first")
    return trained


# -------------------------------------------------------------------------------------------- child
def campaign_row(case: dict, out_dir: Path) -> dict:
    """Train or load, then evaluate one row, in this process."""
    from longext.bench.cases import architecture, evaluate, load_case_model, peak_rss_mb

    torch.manual_seed(0)
    began = time.perf_counter()
    if case.get("checkpoint"):
        loaded, figures = checkpoint_model(case, Path(out_dir)), {"checkpoint_step": case["checkpoint"]["step"]}
    elif case.get("train"):
        loaded, figures = trained_model(case, Path(out_dir))
    else:
        say(f"{case['name']}: building the model")
        loaded, figures = load_case_model(case, Path(out_dir))
    result = {**figures, **architecture(loaded.model), "original_context": loaded.original_context,
              "rope": json.loads(json.dumps(loaded.rope, default=str))}
    settings = case["eval"]
    say(f"perplexity at {settings['ppl_lengths']}, passkey at {settings.get('passkey_lengths')}")
    result.update(evaluate(loaded, settings))
    if settings.get("ruler"):
        result["ruler"] = ruler(loaded, settings["ruler"], settings.get("seed", 0))
    result["peak_rss_mb"] = peak_rss_mb()
    result["seconds"] = time.perf_counter() - began
    return result


def trained_model(case: dict, out_dir: Path):
    """(Loaded, training figures): the row trained now, or its run as an earlier sitting trained it
    (reused_training)."""
    from longext.bench.cases import load_case_model
    from longext.bench.results import loaded_code
    from longext.targets import load_target

    earlier = reused_training(case, out_dir)
    if earlier is not None:
        say(f"{case['name']}: trained by an earlier sitting with the same code ({out_dir / 'run'}); evaluating it")
        return load_target(out_dir / "run"), {**earlier["figures"], "training_reused": True}
    (out_dir / TRAINED_FILE).unlink(missing_ok=True)
    say(f"{case['name']}: training")
    loaded, figures = load_case_model(case, out_dir)
    write_json(out_dir / TRAINED_FILE, {"case": case, "code": loaded_code(), "figures": figures}, indent=1,
               default=float)
    return loaded, figures


def reused_training(case: dict, out_dir: Path) -> dict | None:
    """trained.json of this case's finished run when the code it recorded is the code in this checkout, else None."""
    from longext.bench.results import file_hashes
    from longext.rundir import read_status

    try:
        trained = json.loads((out_dir / TRAINED_FILE).read_text())
        unchanged = file_hashes(trained["code"]) == trained["code"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if trained.get("case") != case or "figures" not in trained or not unchanged:
        return None
    return trained if read_status(out_dir / "run").get("state") == "finished" else None


def ruler(loaded, settings: dict, seed: int) -> dict:
    """RULER's tasks `settings["tasks"]`, `samples` each, at `lengths` (essay haystack: `haystack`, default the eval
    books); per length the average, its interval and per task the score (ruler.run.ruler_at_lengths)."""
    from longext.evaluate.ruler.run import load_sources, ruler_at_lengths
    from longext.recipe import RulerSpec

    spec = RulerSpec(enabled=True, tasks=settings["tasks"], samples=settings["samples"],
                     haystack=settings.get("haystack", "books"))
    lengths = settings["lengths"]
    total = len(lengths) * len(spec.tasks) * spec.samples
    done = []

    def progress(name: str, tokens: int) -> None:
        if tokens:  # called once before and once after each sample
            done.append(tokens)
            say(f"{name}: sample {len(done)}/{total} ({tokens} prompt tokens)")

    rows = ruler_at_lengths(loaded.model, loaded.tokenizer, lengths, spec, seed, load_sources(spec),
                            set_length=loaded.set_length, progress=progress)
    return {str(length): row for length, row in rows.items()}


def checkpoint_model(case: dict, out_dir: Path):
    """The trained run of `case["checkpoint"]["of"]` loaded as `longext eval` loads it, with the adapter weights of
    its checkpoint at `step` instead of the final ones."""
    from longext.checkpoints import tag, verify
    from longext.targets import load_target

    point = case["checkpoint"]
    run_dir = out_dir.parent / point["of"] / "run"
    folder = run_dir / "checkpoints" / tag(point["step"])
    problem = verify(folder) if folder.is_dir() else f"{folder} does not exist"
    if problem:
        raise LongextError(f"{case['name']}: checkpoint {folder} cannot be used ({problem}); the run keeps "
                           f"train.keep_checkpoints of them: run `longext bench smollm2 --only {point['of']} --force`")
    say(f"{case['name']}: {run_dir} at {folder.name}")
    loaded = load_target(run_dir)
    load_adapter_state(loaded.model, folder)
    return loaded


def load_adapter_state(model, folder: Path) -> None:
    """Copy a longext checkpoint's trainable weights (DeepSpeed's module states, saved without the frozen ones) into
    the loaded peft model: every adapter weight of the model must be in the checkpoint. DeepSpeed's
    exclude_frozen_parameters misses a tied weight's second name (SmolLM2's lm_head is its embedding), so the
    checkpoint may also hold frozen weights of the model: each must equal the model's own, anything else is refused."""
    states = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    own = dict(model.named_parameters(remove_duplicate=False))
    adapter = {name for name in own if "lora_" in name}
    frozen = {name for name in set(states) - adapter if name in own and not own[name].requires_grad}
    extra, missing = sorted(set(states) - adapter - frozen), sorted(adapter - set(states))
    if extra or missing:
        raise LongextError(f"{folder}: its weights do not match the run's adapter (not in the model: {extra[:3]}; "
                           f"not in the checkpoint: {missing[:3]})")
    for name in sorted(frozen):
        if not torch.equal(states[name], own[name].detach().to(states[name].dtype)):
            raise LongextError(f"{folder}: its frozen weight {name} differs from the model's: not this run's base")
    with torch.no_grad():
        for name in adapter:
            own[name].copy_(states[name].to(own[name].dtype))


if __name__ == "__main__":
    main(campaign_row)
