"""Hostile and broken input (issue 15): YAML over its limits, bool-like words, model folders with missing or damaged
parts, hub names that cannot be fetched, bad hostfiles. Each case is one `error:` line per problem and exit code 2
(tests/helpers.bad_input), no traceback; nothing loads a model's weights."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import bad_input, write_recipe
from longext.recipe import load_recipe
from longext.recipe.base import MAX_ALIAS_NODES, MAX_DEPTH, MAX_YAML_BYTES, load_yaml

ROOT = Path(__file__).resolve().parent.parent
MINIMAL = "name: t\nmodel:\n  path: /nowhere\nmethod:\n  kind: standard\n  target_len: 4k\ntrain:\n  steps: 2\n"


def alias_bomb(levels: int = 9) -> str:
    """A few hundred bytes that stand for 9^levels strings ("billion laughs")."""
    lines = ['a0: &a0 ["x","x","x","x","x","x","x","x","x"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def one_line(capsys, *argv) -> str:
    [line] = bad_input(capsys, *argv)
    return line


# ------------------------------------------------------------------------------------------ YAML limits
def test_an_alias_bomb_is_refused_at_the_alias_that_crosses_the_budget(capsys, tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(MINIMAL + alias_bomb())
    assert len(path.read_bytes()) < 1000
    # 9 + 81 + 729 + 6561 strings fit the budget; the 5th anchor line's aliases pass it
    want = (f"error: {path}:13 <yaml>: aliases stand for more than {MAX_ALIAS_NODES:,} nodes in all (an alias bomb?); "
            "write the values out")
    for argv in (["recipes", "validate", path], ["train", path, "--dry-run"], ["plan", path]):
        assert one_line(capsys, *argv) == want


def test_an_alias_bomb_answers_in_a_fresh_process(tmp_path):
    """The guard against a hang: without the limit this process would build billions of strings."""
    path = tmp_path / "bomb.yaml"
    path.write_text(MINIMAL + alias_bomb(12))
    result = subprocess.run([sys.executable, "-m", "longext", "recipes", "validate", str(path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "alias bomb" in result.stderr


def test_aliases_within_the_budget_are_plain_yaml(tmp_path):
    path = tmp_path / "anchors.yaml"
    path.write_text(MINIMAL + "eval:\n  lengths: &ladder [4k, 8k]\n  perplexity: {targets: 64}\n"
                    "  niah: &retrieval {trials: 2, depths: [0.5]}\n  passkey: *retrieval\n")
    recipe = load_recipe(path)
    assert recipe.eval.lengths == [4096, 8192] and recipe.eval.passkey.trials == recipe.eval.niah.trials == 2


def test_an_alias_inside_its_own_anchor_is_refused(capsys, tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text(MINIMAL + "eval:\n  lengths: &a [4k, *a]\n")
    assert one_line(capsys, "recipes", "validate", path) == (
        f"error: {path}:10 <yaml>: alias *a inside the node it refers to (a loop)"
    )


@pytest.mark.parametrize("style", ["flow", "block"])
def test_nesting_5000_deep_is_one_line_not_a_recursion_error(capsys, tmp_path, style):
    path = tmp_path / "deep.yaml"
    if style == "flow":
        path.write_text(MINIMAL + "eval: " + "[" * 5000 + "]" * 5000 + "\n")
    else:  # a mapping per level, one space deeper each line (within 1 MB up to ~1400 levels)
        path.write_text(MINIMAL + "eval:\n" + "".join(" " * i + f"k{i}:\n" for i in range(1, 1400)))
    want = f"error: {path}:9 <yaml>: nested deeper than {MAX_DEPTH} levels; a recipe needs a handful"
    if style == "block":
        want = want.replace(":9 ", f":{MAX_DEPTH + 9} ")  # the root is level 1, eval's mapping (line 10) level 2 ...
    assert one_line(capsys, "recipes", "validate", path) == want


def test_an_alias_that_would_nest_too_deep_is_refused(capsys, tmp_path):
    deep = "[" * 30 + "1" + "]" * 30
    path = tmp_path / "deep-alias.yaml"
    path.write_text(MINIMAL + f"x: &d {deep}\neval:\n  lengths: " + "[" * 25 + "*d" + "]" * 25 + "\n")
    assert one_line(capsys, "recipes", "validate", path) == (
        f"error: {path}:11 <yaml>: nested deeper than {MAX_DEPTH} levels with what *d stands for; a recipe needs a "
        "handful"
    )


def test_a_50_mb_recipe_is_refused_before_it_is_read(capsys, tmp_path):
    path = tmp_path / "huge.yaml"
    with open(path, "wb") as f:
        f.truncate(50 * 2**20)  # sparse: nothing to read would be quick, but the size answers first
    assert one_line(capsys, "recipes", "validate", path) == (
        f"error: {path}: 52,428,800 bytes, over the {MAX_YAML_BYTES:,} a recipe may have (a recipe is a page of "
        "settings; long lists belong in data files)"
    )


def test_set_values_have_the_same_limits(capsys, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(MINIMAL)
    bomb = "[" + ",".join(f"&a{i} [" + ",".join([f"*a{i - 1}" if i else "1"] * 9) + "]" for i in range(8)) + "]"
    line = one_line(capsys, "recipes", "validate", path, "-s", f"eval.lengths={bomb}")
    assert line.startswith(f"error: {path} eval.lengths: aliases stand for more than {MAX_ALIAS_NODES:,} nodes")
    assert line.endswith("[from --set]")
    line = one_line(capsys, "recipes", "validate", path, "-s", "eval.lengths=" + "[" * 60 + "]" * 60)
    assert line == f"error: {path} eval.lengths: nested deeper than {MAX_DEPTH} levels; a recipe needs a handful [from --set]"


# ---------------------------------------------------------------------------------- bool-like words
def test_only_true_and_false_are_booleans():
    assert load_yaml("a: off\nb: On\nc: yes\nd: NO\ne: true\nf: False\ng: 1e-5") == {
        "a": "off", "b": "On", "c": "yes", "d": "NO", "e": True, "f": False, "g": 1e-5,
    }


def test_memory_check_off_in_the_file_and_from_set(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(MINIMAL + "  memory_check: off\n")
    assert load_recipe(path).train.memory_check == "off"
    path.write_text(MINIMAL)
    assert load_recipe(path, ["train.memory_check=off"]).train.memory_check == "off"


@pytest.mark.parametrize("word, value", [("yes", True), ("on", True), ("No", False), ("OFF", False)])
def test_a_true_false_field_takes_the_yaml_1_1_words(tmp_path, word, value):
    path = tmp_path / "r.yaml"
    path.write_text(MINIMAL + f"  gradient_checkpointing: {word}\n  tiled_loss: {word}\n")
    recipe = load_recipe(path, [f"eval.passkey.enabled={word}"])
    assert recipe.train.gradient_checkpointing is value and recipe.train.tiled_loss is value
    assert recipe.eval.passkey.enabled is value


def test_a_choice_field_shows_the_word_it_was_given(capsys, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(MINIMAL.replace("  path: /nowhere\n", "  path: /nowhere\n  attn_implementation: off\n"))
    assert one_line(capsys, "recipes", "validate", path) == (
        f"error: {path}:4 model.attn_implementation: Input should be 'auto', 'sdpa', 'eager' or 'flash_attention_2' "
        "(got 'off')"
    )


# --------------------------------------------------------------------------------------- target_len
def test_a_target_len_below_the_models_window_names_both(capsys, tmp_path, tiny_model_dir, corpus_dir):
    recipe = write_recipe(tmp_path, tiny_model_dir, corpus_dir, method={"kind": "standard", "target_len": 64})
    line = one_line(capsys, "train", recipe, "--dry-run")
    assert line.endswith("method.target_len: 64 is below the model's own window L0 128 (from the model's "
                         "config.json); set a target_len of at least 128")
    assert line.startswith(f"error: {recipe}:")


# ------------------------------------------------------------------------------------- model folders
@pytest.fixture
def model_copy(tmp_path, tiny_model_dir) -> Path:
    """A copy of the tiny model to damage."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_a_config_only_folder_and_missing_data_are_all_reported_by_train_and_dry_run(capsys, tmp_path, model_copy,
                                                                                     monkeypatch):
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (model_copy / name).unlink()
    recipe = write_recipe(tmp_path, model_copy, tmp_path / "data" / "long-train.jsonl")
    monkeypatch.setenv("LONGEXT_MEMORY_BUDGET", "1000GB")
    for argv in (["train", recipe], ["train", recipe, "--dry-run"]):
        lines = bad_input(capsys, *argv)
        assert [line.split(" ", 2)[2] for line in lines] == [
            f"model.path: {model_copy} has no tokenizer files (tokenizer.json, tokenizer.model, or vocab.json + "
            "merges.txt); copy them from the model the weights came from",
            f"model.path: {model_copy} has no weights (model.safetensors, sharded model-*.safetensors with "
            "model.safetensors.index.json, or pytorch_model.bin); a folder with only config.json serves `longext "
            "plan`, not training or eval",
            f"data.train.0: no such file or folder: '{tmp_path / 'data' / 'long-train.jsonl'}' (expected .txt, .jsonl, "
            ".json or .parquet files, folders of them, or `books`)",
        ]
    assert not (tmp_path / "runs").exists()


def test_a_truncated_safetensors_file_is_named_by_train_and_eval(capsys, tmp_path, model_copy, corpus_dir):
    weights = model_copy / "model.safetensors"
    size = weights.stat().st_size
    truncate(weights)
    recipe = write_recipe(tmp_path, model_copy, corpus_dir)
    want = f"model.path: {weights} is truncated: {size // 2:,} bytes, its header describes {size:,}"
    assert one_line(capsys, "train", recipe).endswith(want)
    assert one_line(capsys, "eval", model_copy, "--lengths", "64", "--no-passkey") == "error: " + want.replace(
        "model.path", "TARGET")


def test_a_damaged_safetensors_header_is_named(capsys, model_copy):
    weights = model_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    length = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + length].replace(b'"shape":[', b'"shape":[3,', 1)  # one tensor's shape no longer fits
    weights.write_bytes(bytes(data[:8]) + bytes(header) + bytes(data[8 + length :]))
    line = one_line(capsys, "eval", model_copy, "--lengths", "64", "--no-passkey")
    assert line.startswith(f"error: TARGET: {weights}: tensor ") and line.endswith(
        "has a byte range that does not match its dtype and shape (damaged header)")


def test_sharded_weights_need_every_shard_of_their_index(capsys, model_copy):
    from safetensors.torch import load_file, save_file

    tensors = load_file(model_copy / "model.safetensors")
    (model_copy / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, model_copy / shard, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (model_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    from longext.modeldir import model_problems

    assert model_problems(model_copy, "TARGET") == []  # a complete sharded model passes
    (model_copy / "model-00002-of-00002.safetensors").unlink()
    assert one_line(capsys, "eval", model_copy, "--lengths", "64", "--no-passkey") == (
        f"error: TARGET: {model_copy / 'model-00002-of-00002.safetensors'} is missing (named by "
        "model.safetensors.index.json)"
    )


def test_a_damaged_tokenizer_file_is_named(capsys, model_copy):
    truncate(model_copy / "tokenizer.json")
    line = one_line(capsys, "eval", model_copy, "--lengths", "64", "--no-passkey")
    assert line.startswith(f"error: TARGET: {model_copy / 'tokenizer.json'} is not valid JSON (")


def test_a_missing_modeling_file_of_a_custom_model_is_named(capsys, model_copy):
    config = json.loads((model_copy / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM", "AutoConfig": "modeling_x.XConfig"}
    (model_copy / "config.json").write_text(json.dumps(config))
    assert one_line(capsys, "eval", model_copy, "--lengths", "64", "--no-passkey") == (
        f"error: TARGET: {model_copy / 'modeling_x.py'} is missing (config.json's auto_map names it)"
    )


# ---------------------------------------------------------------------------------------- hub names
HUB_NAME = "longext-test/no-such-model"


def test_a_hub_name_offline_says_hf_hub_offline_blocks_it(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = tmp_path / "r.yaml"
    path.write_text(MINIMAL.replace("/nowhere", HUB_NAME))
    assert one_line(capsys, "plan", path) == (
        f"error: {path}:3 model.path: '{HUB_NAME}' is not a local directory, and as a hub name it cannot be "
        "downloaded: HF_HUB_OFFLINE is set and the hub cache has no copy (download it once without HF_HUB_OFFLINE, "
        "or give a local model directory)"
    )


def test_a_hub_name_without_a_reachable_hub_answers_at_once(tmp_path):
    """No HF_HUB_OFFLINE and a hub that refuses connections (HF_ENDPOINT on a closed local port, so no test ever
    reaches the real hub): one line, where transformers would retry for half a minute."""
    import os

    path = tmp_path / "r.yaml"
    path.write_text(MINIMAL.replace("/nowhere", HUB_NAME))
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))
    result = subprocess.run([sys.executable, "-m", "longext", "plan", str(path)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"error: {path}:3 model.path: '{HUB_NAME}' is not a local directory, and as a hub "
                                    "name it cannot be downloaded: the hub is unreachable (127.0.0.1:9: ")


def test_a_missing_relative_folder_is_named_as_a_folder(capsys, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(MINIMAL.replace("/nowhere", "./models/llama"))
    assert one_line(capsys, "plan", path) == (
        f"error: {path}:3 model.path: no such model directory: './models/llama' (for the offline SmolLM2 run "
        "`longext models prepare smollm2`)"
    )


# ----------------------------------------------------------------------------------------- hostfile
def test_hostfile_lines_are_read_as_deepspeed_reads_them(tmp_path):
    from longext.launch import read_hostfile

    path = tmp_path / "hostfile"
    path.write_text("# two nodes\n\nworker-1 slots=8\nworker-2  slots=4  # the small one\n")
    assert read_hostfile(path, nproc=4) == {"worker-1": 8, "worker-2": 4}


def test_bad_hostfile_lines_are_named_by_number_before_any_launch(capsys, tmp_path, monkeypatch):
    import longext.launch

    monkeypatch.setattr(longext.launch, "relaunch", lambda *a, **k: pytest.fail("launched"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(MINIMAL)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("worker-1 slots=8\nworker-2 slot=8\n# fine\nworker-1 slots=8\nworker-3 slots=2\nworker-4\n")
    assert bad_input(capsys, "train", recipe, "--hostfile", hostfile, "--nproc", "4") == [
        f"error: --hostfile: {hostfile}:2: expected `hostname slots=N`, e.g. `worker-1 slots=8` (got 'worker-2 slot=8')",
        f"error: --hostfile: {hostfile}:4: worker-1 is listed twice (first on line 1)",
        f"error: --hostfile: {hostfile}:5: worker-3 has slots=2, fewer than the --nproc 4 processes each host runs",
        f"error: --hostfile: {hostfile}:6: expected `hostname slots=N`, e.g. `worker-1 slots=8` (got 'worker-4')",
    ]
    hostfile.write_text("# nothing yet\n")
    assert bad_input(capsys, "train", recipe, "--hostfile", hostfile) == [
        f"error: --hostfile: {hostfile} lists no hosts (expected lines like `worker-1 slots=8`)"
    ]


def test_the_hostfile_gives_the_ranks_sequence_parallel_must_divide(capsys, tmp_path, monkeypatch):
    import longext.launch

    monkeypatch.setattr(longext.launch, "relaunch", lambda *a, **k: pytest.fail("launched"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(MINIMAL + "  sequence_parallel: 4\n")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("a slots=8\nb slots=8\nc slots=8\n")
    line = one_line(capsys, "train", recipe, "--hostfile", hostfile, "--nproc", "2")  # 3 hosts x 2 = 6 ranks
    assert line == (f"error: {recipe}:9 train.sequence_parallel: 4 does not divide the 6 ranks of this launch "
                    "(use --nproc 4 or a sequence_parallel that divides 6)")
