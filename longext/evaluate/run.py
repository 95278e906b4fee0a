"""`longext eval TARGET`: check the flags, load the model(s), measure, write the report.

Flow: `cli.eval_cmd → EvalRequest.from_cli → run_eval → {targets.load_target, lmeval, perplexity, passkey, niah,
ruler, report.write_report}`. The eval settings start from the run's recipe `eval:` section (or the
defaults), then `--set` overrides, then the flags; every mistake is a one-line error naming the flag.
"""

from __future__ import annotations

import gc
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from pydantic import ValidationError

from longext.errors import LongextError, Problems
from longext.lengths import length_flag
from longext.recipe import EvalSpec, apply_override, load_recipe, to_issue

MAX_LADDER = 8
MODES = ("fixed", "sliding")
SUITE = {"ppl": "perplexity", "passkey": "passkey", "niah": "niah", "ruler": "ruler"}  # --suite name -> eval section


# --------------------------------------------------------------------------------------- request
@dataclass(frozen=True)
class EvalRequest:
    """Everything `run_eval` needs, validated. Lengths are in tokens."""

    target: Path
    spec: EvalSpec
    out: Path
    lengths: tuple[int, ...] = ()  # explicit ladder (--lengths, or the recipe's eval.lengths)
    longest: int | None = None  # --length: the ladder is built once L0 is known
    baseline: bool = False
    text_field: str = "text"
    texts_flag: str = "eval.perplexity.texts"  # what errors about the texts name: the flag or the field

    @classmethod
    def from_cli(cls, target, length=None, lengths=None, baseline=False, texts=None, mode=None, passkey=None,
                 perplexity=None, trials=None, out=None, overrides: Sequence[str] = (), niah=None,
                 filler=None, suite=None, tasks=None, samples=None, ruler_qa=None, lm_eval=None) -> EvalRequest:
        """Validate the `longext eval` arguments. Raises LongextError with one line per problem."""
        target = Path(target)
        if not target.is_dir():
            raise LongextError(f"TARGET: no such directory: {target}")
        recipe = load_recipe(target / "recipe.yaml") if (target / "recipe.yaml").is_file() else None
        if baseline and recipe is None:
            raise LongextError(f"--baseline: {target} is not a run directory, so it has no base model to compare with")
        if mode is not None and mode not in MODES:
            raise LongextError(f"--mode: expected fixed or sliding (got {mode!r})")
        if length is not None and lengths is not None:
            raise LongextError("--length, --lengths: give one of them (--length builds a ladder, --lengths lists it)")
        on = suite_flag(suite)
        perplexity, passkey, niah = (x if x is not None or on is None else name in on
                                     for x, name in ((perplexity, "perplexity"), (passkey, "passkey"), (niah, "niah")))
        flags = {"perplexity.texts": ("--texts", texts), "perplexity.mode": ("--mode", mode),
                 "perplexity.enabled": ("--ppl", perplexity), "passkey.enabled": ("--passkey", passkey),
                 "passkey.trials": ("--trials", trials), "niah.enabled": ("--niah", niah),
                 "niah.trials": ("--trials", trials), "filler": ("--filler", filler),
                 "ruler.enabled": ("--suite", None if on is None else "ruler" in on),
                 "ruler.tasks": ("--tasks", comma_list(tasks)), "ruler.samples": ("--samples", samples),
                 "ruler.qa": ("--ruler-qa", ruler_qa), "lm_eval.tasks": ("--lm-eval", comma_list(lm_eval))}
        spec = eval_spec(recipe.eval if recipe else EvalSpec(), overrides, flags)
        longest = length_flag("--length", length) if length is not None else None
        explicit = lengths_flag(lengths) if lengths is not None else ([] if longest else list(spec.lengths))
        if not longest and not explicit:
            raise LongextError(
                "--length: give the longest context to test, e.g. --length 16k, or a ladder with --lengths 4k,8k,16k"
                + (" (the run's recipe has no eval.lengths)" if recipe else "")
            )
        if not any((spec.perplexity.enabled, spec.passkey.enabled, spec.niah.enabled, spec.ruler.enabled,
                    spec.lm_eval.tasks)):
            raise LongextError("--ppl, --passkey, --niah, --suite, --lm-eval: all are off, nothing to evaluate")
        if spec.lm_eval.tasks:
            from longext.evaluate.lmeval import require

            require()
        if recipe is None and not (target / "config.json").is_file():
            raise LongextError(f"TARGET: {target} is neither a run directory (no recipe.yaml) nor a model directory "
                               f"(no config.json)")
        out = Path(out) if out else (target / "eval" if recipe else Path("evals") / target.resolve().name)
        _check_out(out)
        return cls(
            target=target, spec=spec, out=out, lengths=tuple(sorted(set(explicit))), longest=longest,
            baseline=baseline, text_field=recipe.data.text_field if recipe else "text",
            texts_flag="--texts" if texts else "eval.perplexity.texts",
        )

    def ladder(self, original_context: int | None) -> list[int]:
        """The lengths to test: the explicit list, else `ladder_lengths(longest, L0)`."""
        return list(self.lengths) if self.lengths else ladder_lengths(self.longest, original_context)


def suite_flag(value: str | None) -> set[str] | None:
    """The eval sections `--suite ppl,passkey,ruler` turns on (the others off); None when not given."""
    if value is None:
        return None
    names = comma_list(value) or []
    bad = [n for n in names if n not in SUITE]
    if bad or not names:
        raise LongextError(f"--suite: expected a comma-separated list of {', '.join(SUITE)} (got {value!r})")
    return {SUITE[n] for n in names}


def comma_list(value: str | Sequence[str] | None) -> list[str] | None:
    """'a,b' (or repeated flags) as ['a', 'b']; None stays None."""
    if value is None:
        return None
    items = [value] if isinstance(value, str) else list(value)
    return [part.strip() for item in items for part in str(item).split(",") if part.strip()]


def lengths_flag(value: str) -> list[int]:
    """Tokens from a comma list like 4k,8k,12k."""
    items = [item.strip() for item in str(value).split(",") if item.strip()]
    if not items:
        raise LongextError(f"--lengths: expected a comma-separated list like 4k,8k,16k (got {value!r})")
    return [length_flag("--lengths", item) for item in items]


def ladder_lengths(longest: int, original_context: int | None) -> list[int]:
    """Powers of two from 1k below `longest`, plus `longest`, plus L0 and 1.5 L0 when below it.

    At most MAX_LADDER lengths: the shortest powers of two are dropped first.
    """
    keep = {longest}
    if original_context:
        keep |= {L for L in (original_context, original_context * 3 // 2) if L < longest}
    powers = [2**k for k in range(10, 64) if 2**k < longest]
    for power in reversed(powers):
        if len(keep) >= MAX_LADDER:
            break
        keep.add(power)
    return sorted(keep)


def eval_spec(base: EvalSpec, overrides: Sequence[str], flags: dict[str, tuple[str, object]]) -> EvalSpec:
    """`base` with `--set` overrides (paths relative to `eval.`; an `eval.` prefix is accepted), then the
    flags that were given (not None), validated by the schema. `flags` maps a field path to (flag, value); an
    error in a field a flag set names the flag."""
    raw = base.model_dump(mode="json")
    lines = []
    for item in overrides:
        item = item.strip().removeprefix("eval.")
        issue = apply_override(raw, item)
        if issue:
            where = "--set" if issue.field == "--set" else f"--set eval.{issue.field}"
            lines.append(f"{where}: {issue.message}")
    if lines:
        raise Problems(lines)
    given = {}
    for field, (flag, value) in flags.items():
        if value is not None:
            *sections, name = field.split(".")
            node = raw
            for section in sections:
                node = node.setdefault(section, {})
            node[name] = list(value) if isinstance(value, (list, tuple)) else value
            given[f"eval.{field}"] = flag
    try:
        spec = EvalSpec.model_validate(raw)
    except ValidationError as err:
        wrapped = {"eval": raw}  # so field paths, 'did you mean' hints and lengths read as in a recipe
        issues = [to_issue({**e, "loc": ("eval", *e["loc"])}, wrapped, None, set()) for e in err.errors()]
        def flag(field: str) -> str | None:  # a list flag's items (eval.ruler.tasks.1) still name the flag
            return next((given[f] for f in given if field == f or field.startswith(f + ".")), None)

        raise Problems([f"{flag(issue.field)}: {issue.message}" if flag(issue.field)
                        else f"--set {issue.field}: {issue.message}" for issue in issues]) from None
    bad = [(part, i, d) for part in ("passkey", "niah") for i, d in enumerate(getattr(spec, part).depths)
           if not 0.0 <= d <= 1.0]
    if bad:
        raise Problems([f"--set eval.{part}.depths.{i}: a depth is between 0 and 1 (got {d})" for part, i, d in bad])
    return spec


def _check_out(out: Path) -> None:
    from longext.evaluate.report import replaceable
    from longext.files import check_writable

    if not replaceable(out):
        raise LongextError(f"--out: {out} exists and is not a longext eval report; choose another directory")
    check_writable(out, "--out")


# ------------------------------------------------------------------------------------------- run
def run_eval(request: EvalRequest) -> Path:
    """Evaluate the target (and its base model with --baseline), write the report, print the table.

    Returns the report directory.
    """
    from longext.console import console
    from longext.evaluate.report import rich_table, write_report
    from longext.models import quiet_libraries
    from longext.targets import check_target_files, load_target

    quiet_libraries()
    check_target_files(request.target)  # every model file, before texts or weights load
    documents = load_texts(request) if request.spec.perplexity.enabled else []
    retrieval = request.spec.passkey.enabled or request.spec.niah.enabled
    filler = load_filler(request.spec.filler, request.text_field) if retrieval else None
    sources = None
    if request.spec.ruler.enabled:
        from longext.evaluate.ruler.run import chosen_tasks, load_sources

        sources = load_sources(request.spec.ruler, request.text_field)
        chosen_tasks(request.spec.ruler, sources.qa)  # a QA task without its data: stop now
    if request.spec.lm_eval.tasks:
        from longext.evaluate.lmeval import check_tasks

        check_tasks(list(request.spec.lm_eval.tasks))
    entries, context = [], {}
    with EvalProgress(console(stderr=True)) as bar:
        for i, baseline in enumerate((False, True) if request.baseline else (False,)):
            loaded = load_target(request.target, baseline=baseline)
            context = context or {
                "lengths": request.ladder(loaded.original_context),
                "original_context": loaded.original_context, "target_context": loaded.target_context,
            }
            models_left = 1 + request.baseline - i
            entries.append(evaluate_model(loaded, context["lengths"], request, documents, bar, models_left, filler,
                                          sources))
            entries[-1]["baseline"] = baseline
            del loaded
            gc.collect()
    results = build_results(request, context, entries, documents)
    report = write_report(request.out, results)
    console().print(rich_table(results))
    from longext.evaluate.ruler.report import rich_table as ruler_table

    if (table := ruler_table(results)) is not None:
        console().print(table)
    return report


def load_texts(request: EvalRequest) -> list[str]:
    """The perplexity documents named by eval.perplexity.texts (eval split of `books`)."""
    from longext.data import load_documents
    from longext.materials import resolve_texts

    paths = resolve_texts(list(request.spec.perplexity.texts), split="eval", field=request.texts_flag)
    documents = load_documents(paths, request.text_field)
    if not documents:
        raise LongextError(f"{request.texts_flag}: no text found in {', '.join(request.spec.perplexity.texts)}")
    return documents


def load_filler(value: str, text_field: str = "text") -> str | None:
    """The haystack text of eval.filler: None for the classic lines, else the named texts joined."""
    if value == "classic":
        return None
    from longext.data import load_documents
    from longext.materials import resolve_texts

    field = "eval.filler"
    documents = load_documents(resolve_texts([value], split="eval", field=field), text_field)
    text = "\n".join(documents)
    if not re.search(r"[.!?]", text):
        raise LongextError(f"{field}: {value!r} has no sentences (no . ! or ?) to build a haystack from")
    return text


def evaluate_model(loaded, lengths: list[int], request: EvalRequest, documents: list[str], bar: EvalProgress,
                   models_left: int, filler: str | None = None, sources=None) -> dict:
    """One model's lm-eval, perplexity, passkey, needle and RULER results, per length (str keys, as in eval.json).
    lm-eval goes first: a task that cannot load fails before the long parts."""
    from longext.evaluate.ruler.run import check_ruler, chosen_tasks, ruler_at_lengths
    from longext.evaluate.niah import niah_at_lengths, niah_prompt, trial_needles
    from longext.evaluate.passkey import passkey_at_lengths, passkey_prompt
    from longext.evaluate.perplexity import document_token_ids, perplexity_at_lengths, plan_windows

    spec = request.spec
    ids = document_token_ids(loaded.tokenizer, documents) if spec.perplexity.enabled else []
    passes = []
    if spec.perplexity.enabled:
        plan = plan_windows([len(t) for t in ids], lengths, spec.perplexity)  # raises before any forward pass
        passes += [w.length for windows in plan.values() for w in windows]
    if spec.passkey.enabled:
        passkey_prompt(loaded.tokenizer, min(lengths), "0" * spec.passkey.digits, 0.5)  # too short: raise now
        passes += [L for L in lengths for _ in range(spec.passkey.trials)]
    if spec.niah.enabled:
        needles, query = trial_needles(spec.seed, min(lengths), 0, spec.niah, 0.5)
        niah_prompt(loaded.tokenizer, min(lengths), needles, query)  # too short: raise now
        passes += [L for L in lengths for _ in range(spec.niah.trials)]
    if spec.ruler.enabled:
        tasks = chosen_tasks(spec.ruler, sources.qa)
        check_ruler(loaded.tokenizer, lengths, tasks, spec.ruler, spec.seed, sources)  # too short: raise now
        passes += [L for L in lengths for _ in range(len(tasks) * spec.ruler.samples)]
    bar.expect(passes, models_left)
    entry = {
        "name": loaded.name, "original_context": loaded.original_context, "target_context": loaded.target_context,
        "rope": json.loads(json.dumps(loaded.rope, default=str)), "text_tokens": [len(t) for t in ids],
    }
    progress = bar.callback(loaded.name)
    if spec.lm_eval.tasks:
        from longext.evaluate.lmeval import run_lm_eval

        entry["lm_eval"] = run_lm_eval(loaded, spec.lm_eval, lengths)
    if spec.perplexity.enabled:
        rows = perplexity_at_lengths(loaded.model, ids, lengths, spec.perplexity, set_length=loaded.set_length,
                                     progress=progress)
        entry["perplexity"] = {str(L): row for L, row in rows.items()}
    if spec.passkey.enabled:
        rows = passkey_at_lengths(loaded.model, loaded.tokenizer, lengths, spec.passkey, spec.seed, filler=filler,
                                  set_length=loaded.set_length, progress=progress)
        entry["passkey"] = {str(L): row for L, row in rows.items()}
    if spec.niah.enabled:
        rows = niah_at_lengths(loaded.model, loaded.tokenizer, lengths, spec.niah, spec.seed, filler=filler,
                               set_length=loaded.set_length, progress=progress)
        entry["niah"] = {str(L): row for L, row in rows.items()}
    if spec.ruler.enabled:
        rows = ruler_at_lengths(loaded.model, loaded.tokenizer, lengths, spec.ruler, spec.seed, sources, tasks=tasks,
                                set_length=loaded.set_length, progress=progress)
        entry["ruler"] = {str(L): row for L, row in rows.items()}
    return entry


def build_results(request: EvalRequest, context: dict, entries: list[dict], documents: list[str]) -> dict:
    """The eval.json document (see report.py for the layout); the base model comes first."""
    from longext.evaluate.report import machine_info, reference_length

    entries = sorted(entries, key=lambda e: not e["baseline"])
    names = [e["name"] for e in entries]
    if len(set(names)) < len(names):
        entries[0]["name"] = f"{entries[0]['name']} (base)"
    return {
        "target": str(request.target),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        **context,
        "reference_length": reference_length(context["lengths"], context["original_context"]),
        "settings": request.spec.model_dump(mode="json"),
        "texts": {"sources": list(request.spec.perplexity.texts), "documents": len(documents)},
        "models": entries,
    }


# -------------------------------------------------------------------------------------- progress
def pass_cost(tokens: int) -> int:
    """Relative cost of a forward pass over `tokens`: linear layers plus attention (~L^2)."""
    return tokens * (tokens + 2048)


class EvalProgress:
    """One rich progress bar over every forward pass of the eval.

    It advances by `pass_cost`, not by tokens, so the ETA stays honest as the lengths (and the
    quadratic attention cost) grow; the tokens/s column counts plain tokens.
    """

    def __init__(self, console):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=console, transient=False,
        )
        self.task = self.bar.add_task("loading", total=None, rate="")
        self.tokens, self.started = 0, None

    def __enter__(self) -> EvalProgress:
        self.bar.start()
        return self

    def __exit__(self, kind, *exc) -> None:
        if kind is None:  # prompts may run a few tokens under their length; end at 100 %
            self.bar.update(self.task, completed=self.bar.tasks[0].total)
        self.bar.stop()

    def expect(self, passes: list[int], models: int = 1) -> None:
        """Add the passes (lengths in tokens) still to come; `models` = how many models will run them."""
        task = self.bar.tasks[0]
        remaining = sum(pass_cost(L) for L in passes) * models
        self.bar.update(self.task, total=task.completed + remaining)

    def callback(self, name: str):
        """progress(label, tokens) for perplexity_at_lengths / passkey_at_lengths."""

        def report(label: str, tokens: int) -> None:
            self.started = self.started or time.perf_counter()
            self.tokens += tokens
            rate = self.tokens / max(time.perf_counter() - self.started, 1e-9)
            self.bar.update(self.task, description=f"{name} {label}", advance=pass_cost(tokens) if tokens else 0,
                            rate=f"{rate:,.0f} tok/s")

        return report
