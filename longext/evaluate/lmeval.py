"""Bridge to lm-evaluation-harness (optional extra: `pip install 'longext[lm-eval]'`).

`longext eval TARGET --lm-eval TASKS` hands the model exactly as longext evaluates it (base + RoPE setting +
adapter, with the method's eval patches set for the longest eval length: E2-LLM's scale, HARPE's bases,
LongGen's layout) to lm-eval's HFLM wrapper, runs the tasks and keeps their metrics in the report (eval.json
`lm_eval`, an eval.md table). Tasks are lm-eval task names or paths to task YAML files, so a local task with a
local dataset runs offline; hub tasks (ruler, longbench, babilong, ...) need a machine that reaches the Hub.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path

from longext.errors import LongextError

EXTRA = "pip install 'longext[lm-eval]'"


def available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def require() -> None:
    """One line naming the extra when lm-eval is missing."""
    if not available():
        raise LongextError(f"--lm-eval: lm-evaluation-harness is not installed; install the extra: {EXTRA}")


def is_task_file(entry: str) -> bool:
    return entry.endswith((".yaml", ".yml"))


def check_tasks(tasks: list[str]) -> None:
    """Task files must exist; names must be known to lm-eval (its index takes ~10 s to build, so only when a name
    is given). Raises LongextError with one line per unknown task."""
    require()
    problems = [f"--lm-eval: no such task file: {t!r}" for t in tasks if is_task_file(t) and not Path(t).is_file()]
    names = [t for t in tasks if not is_task_file(t)]
    if names:
        known = set(task_manager(names).all_tasks)
        problems += [f"--lm-eval: {t!r} is not an lm-eval task, group or tag (lm-eval {version()}; a local task is "
                     f"given as the path of its YAML file)" for t in names if t not in known]
    if problems:
        from longext.errors import Problems

        raise Problems(problems)


def version() -> str:
    from importlib.metadata import version as package_version

    return package_version("lm_eval")


def task_manager(tasks: list[str], metadata: dict | None = None):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=any(not is_task_file(t) for t in tasks), metadata=metadata)


def run_lm_eval(loaded, spec, lengths: list[int], log_samples: bool = False) -> dict:
    """Run spec.tasks (LmEvalSpec) on the loaded target at the longest length; the compact result for eval.json.

    The tokenizer path and the lengths go to the tasks as metadata (lm-eval's ruler reads `max_seq_lengths` and
    `tokenizer`), and HFLM's max_length is the longest length, so inputs are cut to what longext evaluates.
    """
    require()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    longest = max(lengths)
    loaded.set_length(longest)
    started = time.perf_counter()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    lm = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, max_length=longest, batch_size=spec.batch_size,
              device=str(next(loaded.model.parameters()).device))
    metadata = {"max_seq_lengths": sorted(lengths), "tokenizer": loaded.tokenizer.name_or_path}
    try:
        out = simple_evaluate(model=lm, tasks=list(spec.tasks), task_manager=task_manager(spec.tasks, metadata),
                              limit=spec.limit, num_fewshot=spec.num_fewshot, log_samples=log_samples,
                              bootstrap_iters=1000)
    except KeyError as err:
        raise LongextError(f"--lm-eval: {err.args[0] if err.args else err}") from None
    except ConnectionError as err:
        raise LongextError(f"--lm-eval: a task's data is not on this machine and the Hub cannot be reached "
                           f"({str(err).splitlines()[0]}); run hub tasks where the Hub is reachable, or give a "
                           f"local task YAML") from None
    result = {
        "tasks": {name: metrics(values) for name, values in out["results"].items()},
        "samples": {name: n.get("effective") for name, n in out.get("n-samples", {}).items()},
        "n_shot": out.get("n-shot", {}), "versions": out.get("versions", {}), "lm_eval": version(),
        "max_length": longest, "limit": spec.limit, "seconds": time.perf_counter() - started,
    }
    if log_samples:
        result["records"] = out.get("samples", {})
    return result


def metrics(values: dict) -> dict:
    """lm-eval's 'acc,none' / 'acc_stderr,none' keys as {'acc': {'value', 'stderr'}}; other filters keep their
    name ('exact_match,strict-match' -> 'exact_match (strict-match)')."""
    out: dict[str, dict] = {}
    for key, value in values.items():
        if "," not in key or not isinstance(value, (int, float)):
            continue
        metric, filt = key.split(",", 1)
        stderr = metric.endswith("_stderr")
        name = metric.removesuffix("_stderr") + ("" if filt == "none" else f" ({filt})")
        out.setdefault(name, {})["stderr" if stderr else "value"] = value
    return {k: v for k, v in out.items() if "value" in v}


def markdown(results: dict) -> list[str]:
    """The lm-eval section of eval.md: one row per task and metric, one column per model."""
    models = [m for m in results["models"] if m.get("lm_eval")]
    if not models:
        return []
    first = models[0]["lm_eval"]
    rows = []
    for task, found in first["tasks"].items():
        for metric in found:
            cells = []
            for m in models:
                v = m["lm_eval"]["tasks"].get(task, {}).get(metric)
                stderr = v.get("stderr") if v else None
                cells.append("–" if not v else f"{v['value']:.4f}" + (f" ± {stderr:.4f}" if stderr is not None
                                                                        and stderr == stderr else ""))
            rows.append([task, metric, str(first["samples"].get(task, "")), *cells])
    header = ["task", "metric", "examples", *(m["name"] for m in models)]
    return ["## lm-evaluation-harness", "",
            f"lm-eval {first['lm_eval']}, model as evaluated here at max_length {first['max_length']} (the method's "
            f"eval patches set for that length); ± = lm-eval's bootstrap standard error.", "",
            "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows), ""]
