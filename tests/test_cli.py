"""The command line's contract for bad input: exit code 2, one `error:` line per problem on stderr, no
traceback, nothing written. Plus: every --help works, and the CLI starts without importing torch.

Tests call `longext.cli.main(argv)` in-process; nothing here trains. The few that read a model use the
tiny saved Llama's config.json (`train --dry-run`, and `train` into a used run directory, which stops
before any weights load).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Annotated, Literal, Optional

import pytest
import typer
import yaml

from longext.cli import app, main

ROOT = Path(__file__).resolve().parent.parent
HEAVY = {"torch", "transformers", "deepspeed", "peft", "datasets"}

RECIPE = """\
name: t
model:
  path: {model}
method:
  kind: standard
  target_len: 512
train:
  steps: 2
"""


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def recipe(tmp_path) -> Path:
    """A valid recipe whose model.path does not exist (fine for everything but --dry-run and train)."""
    return write(tmp_path / "r.yaml", RECIPE.format(model=tmp_path / "no-model"))


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def bad_input(capsys, *argv, problems: int = 1) -> list[str]:
    """Run argv, check the bad-input contract, return the error lines."""
    code, out, err = run(capsys, *argv)
    lines = err.splitlines()
    assert "Traceback" not in out + err, err
    assert code == 2, err
    assert len(lines) == problems, err
    assert all(line.startswith("error: ") for line in lines), err
    return lines


# ---------------------------------------------------------------------------------- recipe input
def test_missing_recipe_file(capsys, tmp_path):
    path = tmp_path / "nope.yaml"
    assert bad_input(capsys, "train", path) == [f"error: {path}: no such recipe file"]


def test_yaml_syntax_error_shows_the_line(capsys, tmp_path):
    path = write(tmp_path / "r.yaml", "name: t\nmodel:\n  path: [unclosed\nmethod:\n  kind: standard\n")
    [line] = bad_input(capsys, "train", path)
    assert re.fullmatch(rf"error: {re.escape(str(path))}:\d+ <yaml>: expected ',' or '\]', but got .*", line)


def test_unknown_field_gives_file_line_suggestion_and_allowed_fields_on_one_line(capsys, tmp_path):
    path = write(tmp_path / "r.yaml", RECIPE.format(model="m") + "  stpes: 3\n")
    [line] = bad_input(capsys, "train", path)
    assert line.startswith(f"error: {path}:9 train.stpes: unknown field, did you mean steps? (allowed: betas, checkpoint_offload, eps,")
    assert len(line) > 200  # long, yet never wrapped onto a second line


def test_bad_enum_value(capsys, tmp_path):
    path = write(tmp_path / "r.yaml", RECIPE.format(model="m") + "  precision: fp16\n")
    assert bad_input(capsys, "recipes", "validate", path) == [
        f"error: {path}:9 train.precision: Input should be 'auto', 'bf16' or 'fp32' (got 'fp16')"
    ]


def test_bad_length(capsys, tmp_path):
    path = write(tmp_path / "r.yaml", RECIPE.format(model="m").replace("target_len: 512", "target_len: 12q"))
    assert bad_input(capsys, "train", path) == [
        f"error: {path}:6 method.target_len: expected a positive whole number of tokens like 4096, 4k, 128k "
        "or 1m (got '12q')"
    ]


def test_wrong_kind_lists_the_kinds(capsys, tmp_path):
    path = write(tmp_path / "r.yaml", RECIPE.format(model="m") + "rope:\n  kind: foo\n")
    [line] = bad_input(capsys, "train", path)
    assert line == (
        f"error: {path}:10 rope.kind: must be one of 'none', 'linear', 'ntk', 'dynamic', 'yarn', 'llama3', 'longrope' (got 'foo')"
    )


def test_number_or_auto_field_is_one_line_not_one_per_union_member(capsys, tmp_path):
    path = write(tmp_path / "r.yaml", RECIPE.format(model="m") + "rope:\n  kind: yarn\n  factor: big\n")
    assert bad_input(capsys, "train", path) == [
        f"error: {path}:11 rope.factor: expected a number, or 'auto' (got 'big')"
    ]


def test_cross_field_rule(capsys, tmp_path):
    path = write(tmp_path / "r.yaml", RECIPE.format(model="m") + "  offload_params: true\n")
    assert bad_input(capsys, "train", path) == [
        f"error: {path}:9 train.offload_params: parameter offload needs train.zero_stage 3 (got zero_stage 2)"
    ]


def test_several_problems_in_one_file_are_one_line_each(capsys, tmp_path):
    text = RECIPE.format(model="m").replace("target_len: 512", "target_len: 0") + "  precision: fp16\n  lr: -1\n"
    lines = bad_input(capsys, "train", write(tmp_path / "r.yaml", text), problems=3)
    assert {re.match(r"error: \S+:(\d+) (\S+):", line).groups() for line in lines} == {
        ("6", "method.target_len"), ("9", "train.precision"), ("10", "train.lr"),
    }


# ------------------------------------------------------------------------------------------ --set
def test_set_without_equals(capsys, recipe):
    assert bad_input(capsys, "train", recipe, "--set", "train.lr") == [
        f"error: {recipe} --set: expected KEY=VALUE such as train.lr=1e-5 (got 'train.lr')"
    ]


def test_set_type_error_is_marked_as_from_set(capsys, recipe):
    assert bad_input(capsys, "train", recipe, "-s", "train.steps=abc") == [
        f"error: {recipe}:8 train.steps: Input should be a valid integer (got 'abc') [from --set]"
    ]


def test_set_into_a_value_that_is_not_a_section(capsys, recipe):
    assert bad_input(capsys, "train", recipe, "-s", "train.steps.max=1") == [
        f"error: {recipe} train.steps: is not a section, cannot set train.steps.max (got 2)"
    ]


# ----------------------------------------------------------------------------- model.path checks
def test_dry_run_with_a_missing_model_directory(capsys, recipe, tmp_path):
    [line] = bad_input(capsys, "train", recipe, "--dry-run")
    # found after validation, still named like a schema error: file, line, field
    assert line.startswith(f"error: {recipe}:3 model.path: no such model directory: '{tmp_path / 'no-model'}'")


def test_dry_run_with_a_model_directory_without_config_json(capsys, recipe, tmp_path):
    (tmp_path / "empty-model").mkdir()
    [line] = bad_input(capsys, "train", recipe, "--dry-run", "-s", f"model.path={tmp_path / 'empty-model'}")
    assert line == (
        f"error: {recipe}:3 model.path: {tmp_path / 'empty-model'} has no config.json (expected a transformers model "
        "directory) [from --set]"
    )


def test_dry_run_with_an_unsupported_model_type(capsys, recipe, tmp_path):
    model = tmp_path / "gpt2"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert bad_input(capsys, "train", recipe, "--dry-run", "-s", f"model.path={model}") == [
        f"error: {recipe}:3 model.path: model type 'gpt2' is not supported (supported: llama, mistral, qwen2, qwen3, gemma2, gemma3_text, phi3, olmo2, mixtral, qwen3_moe) "
        "[from --set]"
    ]


# ----------------------------------------------------------------------------------------- flags
def test_unknown_flag_lists_the_allowed_ones(capsys, recipe):
    [line] = bad_input(capsys, "train", recipe, "--bogus")
    assert line.startswith("error: longext train: no such option --bogus")
    assert "(allowed: --set, --dry-run, --resume, --out, --nproc, --hostfile, --help)" in line
    assert "--local_rank" not in line  # hidden: only launchers pass it


def test_misspelt_flag_gets_a_suggestion(capsys, recipe):
    [line] = bad_input(capsys, "train", recipe, "--dry")
    assert line.startswith("error: longext train: no such option --dry, did you mean --dry-run? (allowed: ")


@pytest.mark.parametrize("value, message", [("0", "Input should be greater than or equal to 1 (got '0')"),
                                            ("two", "Input should be a valid integer")])
def test_nproc_must_be_a_positive_integer(capsys, recipe, value, message):
    [line] = bad_input(capsys, "train", recipe, "--nproc", value)
    assert line.startswith(f"error: --nproc: {message}")


def test_unknown_command_lists_the_commands(capsys):
    [line] = bad_input(capsys, "trian")
    assert line == (
        "error: longext: No such command 'trian'. Did you mean 'train'? "
        "(commands: train, plan, eval, export, analyze, bench, doctor, recipes, models, data)"
    )


def test_missing_argument(capsys):
    assert bad_input(capsys, "train") == [
        "error: longext train: Missing argument 'RECIPE'. (see `longext train --help`)"
    ]


def test_nproc_builds_the_data_once_then_relaunches_the_arguments_main_was_given(capsys, tmp_path, tiny_model_dir,
                                                                                monkeypatch):
    """The launching process tokenizes (before any rank starts, so the ranks only open the cache) and relaunches
    the arguments main() was given, not sys.argv."""
    import os

    import longext.launch

    (tmp_path / "doc.txt").write_text("A short document. " * 200)
    recipe = write(tmp_path / "ok.yaml", RECIPE.format(model=tiny_model_dir) + f"data:\n  train: [{tmp_path / 'doc.txt'}]\n")
    caches = Path(os.environ["LONGEXT_DATA_CACHE"])
    before = set(caches.glob("doc.txt-*")) if caches.exists() else set()
    calls = []

    def launcher(argv, nproc, hostfile):  # instead of torchrun: what exists when the ranks would start
        calls.append((argv, nproc, set(caches.glob("doc.txt-*")) - before))
        return 0

    monkeypatch.setattr(longext.launch, "relaunch", launcher)
    argv = ["train", str(recipe), "--nproc", "2", "-s", "train.steps=3"]
    assert main(argv) == 0
    [(relaunched, nproc, built)] = calls
    assert relaunched == argv and nproc == 2 and len(built) == 1
    assert "data: tokenized" in capsys.readouterr().err


def test_hostfile_that_does_not_exist_is_refused_before_launching(capsys, recipe):
    assert bad_input(capsys, "train", recipe, "--hostfile", "/no/hostfile") == [
        "error: --hostfile: no such file: '/no/hostfile'"
    ]


# ------------------------------------------------------------------------------------------- eval
def test_eval_of_a_missing_target(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert bad_input(capsys, "eval", tmp_path / "nope", "--length", "4k") == [
        f"error: TARGET: no such directory: {tmp_path / 'nope'}"
    ]
    assert list(tmp_path.iterdir()) == []  # no report folder started


def test_eval_without_a_target(capsys):
    assert bad_input(capsys, "eval") == ["error: longext eval: Missing argument 'TARGET'. (see `longext eval --help`)"]


LENGTHS = "a positive whole number of tokens like 4096, 4k, 128k or 1m"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--length", "abc"], f"--length: expected {LENGTHS} (got 'abc')"),
        (["--lengths", "4k,abc"], f"--lengths: expected {LENGTHS} (got 'abc')"),
        (["--length", "4k", "--mode", "foo"], "--mode: expected fixed or sliding (got 'foo')"),
        (["--length", "4k", "--trials", "0"], "--trials: Input should be greater than or equal to 1 (got '0')"),
    ],
)
def test_eval_bad_flags(capsys, tmp_path, monkeypatch, flags, message):
    target = tmp_path / "model"
    target.mkdir()
    monkeypatch.chdir(tmp_path)
    assert bad_input(capsys, "eval", target, *flags) == [f"error: {message}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# ----------------------------------------------------------------------------------------- export
def test_export_of_a_directory_that_is_not_a_run(capsys, tmp_path):
    pytest.importorskip("longext.export")
    assert bad_input(capsys, "export", tmp_path, "--out", tmp_path / "merged") == [
        f"error: RUN: {tmp_path} is not a run directory (no recipe.yaml/rope.json)"
    ]
    assert not (tmp_path / "merged").exists()


def test_export_dtype_is_checked_before_anything_loads(capsys, tmp_path):
    assert bad_input(capsys, "export", tmp_path, "--out", tmp_path / "merged", "--dtype", "float16") == [
        "error: --dtype: 'float16' is not one of 'float32', 'bfloat16', 'auto'"
    ]
    assert not (tmp_path / "merged").exists()


def test_export_needs_out(capsys, tmp_path):
    [line] = bad_input(capsys, "export", tmp_path)
    assert line == "error: longext export: Missing option '--out' / '-o'. (see `longext export --help`)"


# ---------------------------------------------------------------------------------------- recipes
def test_recipes_show_of_an_unknown_name_lists_the_shipped_ones(capsys):
    [line] = bad_input(capsys, "recipes", "show", "nosuchrecipe")
    assert line.startswith("error: NAME: no recipe named 'nosuchrecipe' (shipped: demo, ")


def test_recipes_validate_reports_every_problem_of_every_file(capsys, tmp_path):
    one = write(tmp_path / "one.yaml", RECIPE.format(model="m") + "  precision: fp16\nlora:\n  rnak: 4\n")
    two = write(tmp_path / "two.yaml", "name: t\nmodel: {path: m}\nmethod: {kind: standard, target_len: 4q}\n"
                                     "train: {steps: 1}\n")
    good = write(tmp_path / "good.yaml", RECIPE.format(model="m"))
    code, out, err = run(capsys, "recipes", "validate", one, good, two)
    assert code == 2
    assert "Traceback" not in err
    assert out.splitlines() == [f"ok  {good}"]
    lines = err.splitlines()
    files = [line.split(":", 2)[1].split("/")[-1] for line in lines]
    assert files == ["one.yaml", "one.yaml", "two.yaml"]  # files in the order given
    assert sorted(lines) == sorted([
        f"error: {one}:9 train.precision: Input should be 'auto', 'bf16' or 'fp32' (got 'fp16')",
        f"error: {one}:11 lora.rnak: unknown field (allowed: alpha, dropout, experts, modules_to_save, r, targets)",
        f"error: {two}:3 method.target_len: expected a positive whole number of tokens like 4096, 4k, 128k or 1m "
        "(got '4q')",
    ])


def test_models_prepare_of_an_unknown_material(capsys):
    assert bad_input(capsys, "models", "prepare", "gpt5") == [
        "error: WHAT: 'gpt5' is not one of 'smollm2', 'books', 'gemma3', 'all'"
    ]


# ----------------------------------------------------------------------------- used run directory
@pytest.fixture
def tiny_recipe(tmp_path, tiny_model_dir, corpus_dir) -> Path:
    """Valid against the tiny model and its texts: train's checks before loading pass, so what stops it is the run
    directory (checked before any weights load)."""
    text = RECIPE.format(model=tiny_model_dir) + f"data:\n  train: [{corpus_dir}]\n"
    return write(tmp_path / "tiny.yaml", text)


def test_train_into_a_used_run_directory_is_refused_and_left_alone(capsys, tmp_path, tiny_recipe):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "status.json").write_text('{"state": "interrupted"}')
    [line] = bad_input(capsys, "train", tiny_recipe, "--out", run_dir)
    assert line == (
        f"error: output.dir: {run_dir} already holds an unfinished run (continue it with --resume, "
        "set output.overwrite: true, or choose another --out)"
    )
    assert [p.name for p in run_dir.iterdir()] == ["status.json"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_that_is_not_a_run_is_never_replaced(capsys, tmp_path, tiny_recipe, overwrite):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    [line] = bad_input(capsys, "train", tiny_recipe, "--out", folder, "--set", f"output.overwrite={str(overwrite).lower()}")
    assert line == (
        f"error: output.dir: {folder} is not empty and is not a longext run (holds notes.txt); output.overwrite "
        "only replaces runs: choose another --out"
    )
    assert (folder / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("where, message", [
    ("afile", "{out} is a file; give a folder"),
    ("/proc/longext-x", "{out}: cannot write in /proc ("),  # then the OS's reason: root and users differ
])
def test_an_output_folder_that_cannot_be_written_is_refused_before_training(capsys, tmp_path, tiny_recipe, where,
                                                                            message):
    (tmp_path / "afile").write_text("x")
    out = tmp_path / where if where == "afile" else Path(where)
    [line] = bad_input(capsys, "train", tiny_recipe, "--out", out)
    assert line.startswith("error: output.dir: " + message.format(out=out))
    assert line.endswith(")") == message.endswith("(")  # the OS's reason closes the /proc line
    assert (tmp_path / "afile").read_text() == "x"


def test_resume_without_a_checkpoint_is_refused(capsys, tmp_path, tiny_recipe):
    run_dir = tmp_path / "run"
    assert bad_input(capsys, "train", tiny_recipe, "--out", run_dir, "--resume") == [
        f"error: --resume: no checkpoint in {run_dir}/checkpoints (start without --resume)"
    ]
    assert not run_dir.exists()


# -------------------------------------------------------------------------------------- dry run
def test_dry_run_prints_the_resolved_recipe_and_the_deepspeed_config(capsys, tmp_path, tiny_recipe):
    run_dir = tmp_path / "run"
    code, out, err = run(capsys, "train", tiny_recipe, "--dry-run", "-s", "rope.kind=linear", "--out", run_dir)
    assert (code, err) == (0, "")
    resolved = yaml.safe_load(out.split("# resolved recipe\n", 1)[1].split("\n# ", 1)[0])
    assert resolved["rope"]["factor"] == 4.0  # auto = target_len 512 / L0 128 from config.json
    assert resolved["model"]["original_context"] == 128
    assert resolved["data"]["seq_len"] == 512
    assert resolved["output"]["dir"] == str(run_dir)
    deepspeed = json.loads(out.split("# DeepSpeed config", 1)[1].split("\n", 1)[1].split("\n# ", 1)[0])
    assert deepspeed["zero_optimization"]["stage"] == 2
    assert deepspeed["train_micro_batch_size_per_gpu"] == 1
    # the reduce bucket is the LoRA's trainable count (engine.reduce_bucket), which a training step would use
    assert 0 < deepspeed["zero_optimization"]["reduce_bucket_size"] < 1_000_000
    assert not run_dir.exists()  # a dry run writes nothing


@pytest.mark.parametrize("native", [False, True])
def test_bf16_asked_for_on_a_cpu_that_only_emulates_it_is_one_warning_line(capsys, monkeypatch, tiny_recipe, native):
    import longext.engine

    monkeypatch.setattr(longext.engine, "on_gpu", lambda: False)
    monkeypatch.setattr(longext.engine, "native_bf16", lambda: native)
    code, out, err = run(capsys, "train", tiny_recipe, "--dry-run", "-s", "train.precision=bf16")
    assert code == 0 and "precision: bf16" in out  # the recipe is kept as written: a warning, not a refusal
    if native:
        assert err == ""
    else:
        assert err.splitlines() == [
            "warning: train.precision is bf16, which this CPU only emulates (no avx512_bf16 or amx_bf16): training runs"
            " many times slower than in fp32; set train.precision: auto (fp32 here, bf16 where the hardware has it)"]
    code, out, err = run(capsys, "train", tiny_recipe, "--dry-run", "-s", "train.precision=auto")
    assert err == ""


# ------------------------------------------------------------------------------------ help, start-up
def _command_paths(command=None, path=()) -> list[tuple[str, ...]]:
    command = command or typer.main.get_command(app)
    out = [path]
    for name, sub in getattr(command, "commands", {}).items():
        out += _command_paths(sub, (*path, name))
    return out


@pytest.mark.parametrize("path", _command_paths(), ids=lambda p: " ".join(p) or "longext")
def test_every_command_has_help(capsys, path):
    code, out, err = run(capsys, *path, "--help")
    assert (code, err) == (0, "")
    assert out.startswith(f"Usage: {' '.join(['longext', *path])} ")
    # plain metavars (RECIPE, --out DIR), never typer's types or braces: <path>, <int range>, <list[str]>, {RECIPE}
    assert not re.search(r"<(?:path|str|int|float|bool|int range|float range|list\[\w+\])>|\{[A-Z_]+\}", out), out


def test_a_command_added_later_gets_plain_metavars_from_its_option_types(capsys):
    """plain_help covers every command of an app, so a new command's options without a metavar show one from their
    type (PATH, N, X, TEXT, the choices), not typer's <path>, <int range>."""
    from longext.usage import plain_help

    extra = typer.Typer(rich_markup_mode=None)  # as longext's app: plain help, no rich panels

    @extra.command()
    def probe(where: Annotated[Path, typer.Argument(help="A folder.")],
              out: Annotated[Optional[Path], typer.Option(help="Out.")] = None,
              steps: Annotated[int, typer.Option(min=1, help="Steps.")] = 1,
              scale: Annotated[float, typer.Option(help="Scale.")] = 1.0,
              name: Annotated[str, typer.Option(help="Name.")] = "x",
              kind: Annotated[Literal["a", "b"], typer.Option(help="Kind.")] = "a") -> None:
        pass

    @extra.command()
    def other() -> None:
        pass

    plain_help(extra)
    typer.main.get_command(extra).main(["probe", "--help"], prog_name="x", standalone_mode=False)
    out = " ".join(capsys.readouterr().out.split())
    assert "Usage: x probe [OPTIONS] WHERE " in out
    for option in ("--out PATH", "--steps N", "--scale X", "--name TEXT", "--kind a|b"):
        assert option in out, out


def test_version(capsys):
    from longext import __version__

    assert run(capsys, "--version") == (0, f"longext {__version__}\n", "")


@pytest.mark.parametrize("command", ["train", "eval"])
def test_the_set_example_of_each_help_works_on_that_command(capsys, command, tiny_model_dir, tmp_path):
    from longext.evaluate.run import EvalRequest
    from longext.recipe import load_recipe

    _, out, _ = run(capsys, command, "--help")
    example = re.search(r"e\.g\. -s (\S+)", " ".join(out.split())).group(1)
    if command == "eval":
        request = EvalRequest.from_cli(tiny_model_dir, length="256", out=tmp_path / "eval", overrides=[example])
        assert example == "passkey.trials=3" and request.spec.passkey.trials == 3
    else:
        recipe = load_recipe(write(tmp_path / "r.yaml", RECIPE.format(model=tiny_model_dir)), [example])
        assert example == "train.lr=1e-5" and recipe.train.lr == 1e-5


@pytest.mark.parametrize("path", [(), ("recipes",), ("models",)])
def test_a_group_without_a_command_prints_its_help(capsys, path):
    code, out, _ = run(capsys, *path)
    assert code == 0
    assert out.startswith("Usage: longext")


@pytest.mark.parametrize("argv", [["--local_rank=0", "recipes", "validate", "recipes/demo.yaml"],
                                  ["--local_rank=1", "train", "--help"]])
def test_deepspeed_launchers_local_rank_before_the_command_is_accepted(capsys, monkeypatch, argv):
    monkeypatch.chdir(ROOT)  # `deepspeed --module longext train ...` runs `python -m longext --local_rank=N train ...`
    code, _, err = run(capsys, *argv)
    assert (code, err) == (0, "")


def test_commands_we_document_exist():
    assert set(_command_paths()) >= {
        ("train",), ("eval",), ("export",), ("recipes", "list"), ("recipes", "show"), ("recipes", "validate"),
        ("models", "prepare"), ("models", "where"),
    }


def test_documented_demo_evals_that_report_passkey_ask_for_it():
    """The demo recipe leaves passkey off (make demo stays short): a documented `longext eval runs/demo` whose
    comment promises passkey must pass --passkey."""
    from longext.recipe import load_recipe

    assert load_recipe(ROOT / "recipes" / "demo.yaml").eval.passkey.enabled is False
    lines = [line for doc in ("README.md", "docs/eval.md", "docs/cli.md") for line in (ROOT / doc).read_text().splitlines()
             if line.startswith("longext eval runs/demo")]
    assert lines
    for line in lines:
        command, _, comment = line.partition("#")
        assert "passkey" not in comment or "--passkey" in command.split(), line


def test_docs_cli_md_names_every_command_and_visible_option():
    text = (ROOT / "docs" / "cli.md").read_text()
    root = typer.main.get_command(app)
    missing = []
    for path in _command_paths()[1:]:
        command = root
        for name in path:
            command = command.commands[name]
        if f"longext {' '.join(path)}" not in text and f"`{' '.join(path)}" not in text:
            missing.append(" ".join(path))
        for param in command.params:
            if param.param_type_name == "option" and not getattr(param, "hidden", False):
                opts = (*param.opts, *param.secondary_opts)
                missing += [f"{' '.join(path)} {opt}" for opt in opts if f"`{opt}" not in text]
    assert missing == []


def test_importing_the_cli_does_not_import_torch():
    code = "import sys, longext.cli; print(sorted(m for m in sys.modules if m.split('.')[0] in %r))" % (HEAVY,)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["recipes", "validate", "recipes/demo.yaml"]])
def test_a_fresh_process_answers_without_importing_torch(argv):
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "longext", *argv], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    imported = {
        line.rsplit("|", 1)[-1].strip().split(".")[0]
        for line in result.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert imported, "no -X importtime output"
    assert not imported & HEAVY


# ------------------------------------------------------------------------------ success paths
def test_recipes_list_names_every_shipped_recipe_and_show_prints_it_byte_for_byte(capsys, tmp_path):
    from longext.catalog import shipped_recipes
    from longext.recipe import load_recipe

    code, out, _ = run(capsys, "recipes", "list")
    assert code == 0 and all(path.stem in out for path in shipped_recipes())
    code, out, _ = run(capsys, "recipes", "show", "demo")
    assert code == 0 and out == (ROOT / "recipes" / "demo.yaml").read_text()  # long lines not wrapped
    copy = tmp_path / "mine.yaml"
    copy.write_text(out)
    assert load_recipe(copy).name == "demo"


def test_models_where_names_the_cache_and_what_is_missing(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("LONGEXT_CACHE", str(tmp_path / "cache"))
    code, out, _ = run(capsys, "models", "where")
    assert code == 0 and f"cache: {tmp_path / 'cache'}" in out
    assert "smollm2: not prepared" in out and "books: not prepared" in out


# ---------------------------------------------------------------------- more bad input (audit)
def test_a_recipe_that_is_not_utf8_text_is_one_line(capsys, tmp_path):
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfe name: x\n")
    want = f"error: {path}: not UTF-8 text (byte 0xff at offset 0); a recipe is a YAML text file"
    assert bad_input(capsys, "train", path, "--dry-run") == [want]
    assert bad_input(capsys, "recipes", "validate", path) == [want]
    assert bad_input(capsys, "recipes", "show", path) == [f"error: NAME: {path} is not UTF-8 text; a recipe is a YAML text file"]


@pytest.mark.parametrize("override, message", [
    ("train.lr=.inf", "train.lr: Input should be a finite number (got inf) [from --set]"),
    ("train.lr=0", "train.lr: Input should be greater than 0 (got 0) [from --set]"),  # "0" is in the message's text
    ("method.target_len=0", "method.target_len: expected a positive whole number of tokens like 4096, 4k, 128k or 1m "
                            "(got 0) [from --set]"),
    ("method.target_len=99999999m", "method.target_len: 99999999m tokens is beyond any model; expected at most 1024m "
                                    "(got '99999999m') [from --set]"),
])
def test_values_that_pass_their_type_but_not_their_meaning(capsys, recipe, override, message):
    [line] = bad_input(capsys, "recipes", "validate", recipe, "--set", override)
    assert line.startswith(f"error: {recipe}:") and line.endswith(message)


def test_analyze_names_each_model_and_checks_its_output_before_loading(capsys, tmp_path):
    toy = ROOT / "bench" / "toy-base"
    assert bad_input(capsys, "analyze", toy, tmp_path / "nowhere", "--out", tmp_path / "a.json") == [
        f"error: REFERENCE: no such model or run directory: '{tmp_path / 'nowhere'}'"]
    assert bad_input(capsys, "analyze", tmp_path, toy, "--out", tmp_path / "a.json") == [
        f"error: BASE: {tmp_path} is neither a model directory (no config.json) nor a run directory"]
    (tmp_path / "notes.txt").write_text("mine")
    assert bad_input(capsys, "analyze", toy, toy, "--out", tmp_path / "notes.txt") == [
        f"error: --out: {tmp_path / 'notes.txt'} exists and is not a file written by `longext analyze`; choose another path"]
    assert bad_input(capsys, "analyze", toy, toy, "--out", tmp_path) == [f"error: --out: {tmp_path} is a folder; give a file path"]
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_eval_and_bench_refuse_an_output_they_cannot_write_before_any_work(capsys, tmp_path, tiny_model_dir):
    [line] = bad_input(capsys, "eval", tiny_model_dir, "--length", "256", "--out", "/proc/longext-x")
    assert line.startswith("error: --out: /proc/longext-x: cannot write in /proc (")
    [line] = bad_input(capsys, "bench", "toy", "--doc", "/proc/longext-x.md")
    assert line.startswith("error: --doc: /proc/longext-x.md: cannot write in /proc (")


def test_missing_training_texts_are_named_with_the_recipe_line(capsys, tmp_path, tiny_model_dir):
    import re

    text = RECIPE.format(model=tiny_model_dir) + f"data:\n  train: [{tmp_path / 'no-data.txt'}]\n"
    tiny_recipe = write(tmp_path / "tiny.yaml", text)
    [line] = bad_input(capsys, "train", tiny_recipe, "--out", tmp_path / "run")
    lines = tiny_recipe.read_text().splitlines()
    want = next(i for i, text in enumerate(lines, 1) if text.strip().startswith("train: ["))
    assert re.match(rf"error: {re.escape(str(tiny_recipe))}:{want} data.train.0: no such file or folder: ", line), line
    assert not (tmp_path / "run").exists()


def test_eval_flag_and_output_errors_answer_before_torch_is_imported(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    code = (
        "import sys\nfrom longext.errors import LongextError\nfrom longext.evaluate.run import EvalRequest\n"
        f"try:\n    EvalRequest.from_cli({str(tmp_path)!r}, length='4k', out='/proc/longext-x')\n"
        "except LongextError as err:\n    print(err)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in %r))" % (HEAVY,)
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    message, modules = result.stdout.strip().splitlines()
    assert message.startswith("--out: /proc/longext-x: cannot write in /proc (") and modules == "[]"


def test_a_background_thread_failing_on_the_file_system_is_one_warning_line(capsys):
    # tensorboard's event writer thread hit a run folder made read-only mid-run and printed its traceback before the
    # run's own one-line error (CI, stop 25); while a command runs, main() routes such thread failures to warn()
    import threading

    from longext import cli

    def fail_in_a_thread(exc: BaseException) -> None:
        def target():
            raise exc

        thread = threading.Thread(target=target, name="tb-writer")
        thread.start()
        thread.join()

    saved = threading.excepthook
    threading.excepthook = cli._background_thread_failed
    try:
        fail_in_a_thread(PermissionError(13, "Permission denied", b"/runs/x/tb/events.out"))
        assert capsys.readouterr().err == ("warning: background thread tb-writer stopped: PermissionError: Permission "
                                           "denied (/runs/x/tb/events.out)\n")
        fail_in_a_thread(ValueError("a bug"))  # not the file system: a bug keeps its traceback
        err = capsys.readouterr().err
        assert "Traceback" in err and "ValueError: a bug" in err
    finally:
        threading.excepthook = saved
    assert cli.main(["--version"]) == 0
    assert threading.excepthook is saved  # main() puts the previous hook back


def test_a_bench_stopped_with_sigterm_takes_its_running_case_process_with_it(capsys, monkeypatch, tmp_path):
    """`kill` or `timeout` on `longext bench` reaches only the bench's own process; the case it runs (a process of its
    own, started with subprocess.run as longext.bench.fresh does) used to keep running, orphaned, for up to hours."""
    import os
    import signal
    import threading
    import time

    import longext.bench.run

    pid_file = tmp_path / "case.pid"

    def run_bench(*args, **kwargs):
        def stop_when_the_case_runs():
            while not pid_file.exists() or not pid_file.read_text():
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=stop_when_the_case_runs, daemon=True).start()
        code = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
        subprocess.run([sys.executable, "-c", code], check=True)
        pytest.fail("the case ran to its end")

    monkeypatch.setattr(longext.bench.run, "run_bench", run_bench)
    before = signal.getsignal(signal.SIGTERM)
    code, out, err = run(capsys, "bench", "smollm2")
    assert (code, err) == (143, "error: longext bench: stopped by SIGTERM; the case that was running was stopped too "
                                "and left no result (the next run measures it again)\n")
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(int(pid_file.read_text()), 0)
    assert signal.getsignal(signal.SIGTERM) is before
