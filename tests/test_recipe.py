"""The recipe schema and loader: shipped recipes, lengths, `--set`, and errors as `file:line field: message`.

No torch here: every test parses YAML and validates with pydantic only.
"""

from __future__ import annotations

import importlib.util
import textwrap
from pathlib import Path

import pytest
import yaml

from longext.catalog import shipped_recipes
from longext.errors import RecipeError
from longext.lengths import format_length, parse_length
from longext.recipe import ROPE_KINDS, NoRope, Recipe, YarnRope, dump_recipe, load_recipe, validate_recipe

ROOT = Path(__file__).resolve().parent.parent

MINIMAL = """\
name: t
model:
  path: /models/tiny
method:
  kind: standard
  target_len: 4k
train:
  steps: 10
"""


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def problems(path: Path, overrides: tuple[str, ...] = ()) -> list[tuple[int | None, str, str]]:
    """(line, field, message) of every issue load_recipe reports, in line order."""
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    assert info.value.path == str(path)
    return sorted(((i.line, i.field, i.message) for i in info.value.issues), key=lambda p: (p[0] or 0, p[1]))


# --------------------------------------------------------------------------------- shipped recipes
def test_the_shipped_recipes_are_found():
    assert {p.stem for p in shipped_recipes()} >= {"demo", "pi-llama2-7b-32k", "yarn-mistral-7b-64k"}


@pytest.mark.parametrize("path", shipped_recipes(), ids=lambda p: p.stem)
def test_shipped_recipe_survives_a_dump_and_reload_unchanged(path):
    recipe = load_recipe(path)
    text = dump_recipe(recipe)
    again = validate_recipe(yaml.safe_load(text), "dumped.yaml", text)
    assert again == recipe
    assert dump_recipe(again) == text


def test_dump_writes_every_field_including_defaults(tmp_path):
    dumped = yaml.safe_load(dump_recipe(load_recipe(write(tmp_path, MINIMAL))))
    assert dumped["rope"] == {"theta": None, "kind": "none"}
    assert dumped["train"]["zero_stage"] == 2
    assert dumped["eval"]["passkey"]["depths"] == [0.1, 0.5, 0.9]


def test_minimal_recipe_gets_schema_defaults(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL))
    assert recipe.rope == NoRope(kind="none")
    assert recipe.seq_len == recipe.method.target_len == 4096  # data.seq_len auto = target_len
    assert recipe.run_dir == Path("runs/t")


# ---------------------------------------------------------------------------------------- lengths
@pytest.mark.parametrize(
    "text, tokens",
    [(4096, 4096), ("4096", 4096), ("4k", 4096), ("4K", 4096), ("128k", 131072), ("1m", 1048576),
     ("1.5k", 1536), (" 2k ", 2048), (2048.0, 2048)],
)
def test_length_syntax(text, tokens):
    assert parse_length(text) == tokens


@pytest.mark.parametrize("text", [0, "0", "-4k", -1, "4q", "k", "", "1.1k", True, False, None, 1.5, [4]])
def test_bad_lengths_are_refused_with_the_allowed_forms(text):
    with pytest.raises(ValueError, match="a positive whole number of tokens like 4096, 4k, 128k or 1m"):
        parse_length(text)


def test_fractional_length_says_it_is_not_whole():
    with pytest.raises(ValueError, match=r"'1\.1k' is not a whole number of tokens"):
        parse_length("1.1k")


@pytest.mark.parametrize("tokens, text", [(16384, "16k"), (1048576, "1m"), (1000, "1000"), (1536, "1536")])
def test_format_length_is_the_short_form(tokens, text):
    assert format_length(tokens) == text
    assert parse_length(text) == tokens


def test_lengths_in_a_recipe_accept_the_same_syntax(tmp_path):
    text = MINIMAL.replace("target_len: 4k", "target_len: 1.5k") + "eval:\n  lengths: [512, 1k, 1.5k]\n"
    path = write(tmp_path, text)
    recipe = load_recipe(path)
    assert recipe.method.target_len == 1536
    assert recipe.eval.lengths == [512, 1024, 1536]


@pytest.mark.parametrize("value", ["true", "0", "-4k", "4q", "1.1k"])
def test_bad_length_in_a_recipe_names_file_line_field_and_value(tmp_path, value):
    path = write(tmp_path, MINIMAL.replace("target_len: 4k", f"target_len: {value}"))
    [(line, field, message)] = problems(path)
    assert (line, field) == (6, "method.target_len")
    assert "a positive whole number of tokens like 4096, 4k, 128k or 1m" in message
    assert repr(yaml.safe_load(value)) in message


# ---------------------------------------------------------------------------------------- --set
def test_set_overrides_nested_fields_and_parses_values_as_yaml(tmp_path):
    recipe = load_recipe(
        write(tmp_path, MINIMAL),
        ["train.lr=1e-5", "eval.lengths=[4k,8k]", "eval.passkey.trials=3", "lora.targets=[q_proj]", "model.path=a=b"],
    )
    assert recipe.train.lr == 1e-5  # YAML 1.1 reads `1e-5` as text; the schema converts it
    assert recipe.eval.lengths == [4096, 8192]
    assert recipe.eval.passkey.trials == 3
    assert recipe.lora.targets == ["q_proj"]
    assert recipe.model.path == "a=b"  # only the first `=` splits


def test_set_can_switch_a_kind_and_fill_its_fields(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL), ["rope.kind=yarn", "rope.factor=4", "rope.beta_fast=16"])
    assert recipe.rope == YarnRope(kind="yarn", factor=4.0, beta_fast=16.0)


def test_set_type_error_is_flagged_as_coming_from_set(tmp_path):
    [(line, field, message)] = problems(write(tmp_path, MINIMAL), ("train.steps=abc",))
    assert field == "train.steps"
    assert line == 8  # where the field is in the file, even though the bad value came from --set
    assert message.startswith("Input should be a valid integer")
    assert message.endswith("(got 'abc') [from --set]")


def test_set_of_an_unknown_field_is_flagged_as_coming_from_set(tmp_path):
    [(_, field, message)] = problems(write(tmp_path, MINIMAL), ("train.stpes=3",))
    assert field == "train.stpes"
    assert message.startswith("unknown field, did you mean steps? (allowed: ")
    assert message.endswith("[from --set]")


def test_set_into_a_value_that_is_not_a_section_is_refused(tmp_path):
    [(_, field, message)] = problems(write(tmp_path, MINIMAL), ("train.steps.max=3",))
    assert field == "train.steps"
    assert message == "is not a section, cannot set train.steps.max (got 10)"


@pytest.mark.parametrize(
    "item, message",
    [("train.lr", "expected KEY=VALUE such as train.lr=1e-5 (got 'train.lr')"),
     (".lr=1", "expected a dotted field path such as train.lr (got '.lr')"),
     ("train..lr=1", "expected a dotted field path such as train.lr (got 'train..lr')")],
)
def test_malformed_set_items_are_refused(tmp_path, item, message):
    assert problems(write(tmp_path, MINIMAL), (item,)) == [(None, "--set", message)]


def test_set_only_changes_the_loaded_recipe_not_the_file(tmp_path):
    path = write(tmp_path, MINIMAL)
    load_recipe(path, ["train.steps=99"])
    assert path.read_text() == MINIMAL


# ------------------------------------------------------------------------------ error reporting
FOUR_MISTAKES = """\
name: t
model:
  path: /models/tiny
  atn_implementation: sdpa
method:
  kind: standard
  target_len: 4q
rope:
  kind: yarn
  beta_fast: -2
train:
  steps: 10
  precision: fp16
"""


def test_every_problem_is_reported_at_once_with_its_line_and_field(tmp_path):
    path = write(tmp_path, FOUR_MISTAKES)
    found = problems(path)
    assert [(line, field) for line, field, _ in found] == [
        (4, "model.atn_implementation"),
        (7, "method.target_len"),
        (10, "rope.beta_fast"),  # the union tag `yarn` that pydantic adds is not shown
        (13, "train.precision"),
    ]
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    lines = info.value.lines()
    assert len(lines) == 4
    # The format, literally once: file:line field.path: message (got X)
    assert (
        f"{path}:7 method.target_len: expected a positive whole number of tokens like 4096, 4k, 128k or 1m (got '4q')"
    ) in lines
    assert f"{path}:13 train.precision: Input should be 'auto', 'bf16' or 'fp32' (got 'fp16')" in lines
    assert f"{path}:10 rope.beta_fast: Input should be greater than 0 (got -2)" in lines


def test_unknown_field_suggests_the_closest_name_and_lists_the_allowed_ones(tmp_path):
    path = write(tmp_path, MINIMAL.replace("  steps: 10", "  steps: 10\n  grad_acum: 4"))
    [(line, field, message)] = problems(path)
    assert (line, field) == (9, "train.grad_acum")
    assert message.startswith("unknown field, did you mean grad_accum? (allowed: betas, checkpoint_offload, eps, ")
    assert ", grad_accum, grad_clip, gradient_checkpointing, " in message  # sorted
    assert "(got" not in message


def test_a_key_given_twice_is_an_error_on_the_second_line(tmp_path):
    path = write(tmp_path, MINIMAL.replace("  steps: 10", "  steps: 10\n  lr: 1.0e-5\n  steps: 20"))
    [(line, field, message)] = problems(path)
    assert (line, field) == (10, "train.steps")
    assert message == "given twice (first on line 8); keep one"


def test_booleans_and_numeric_strings_are_not_numbers_but_1e_5_is(tmp_path):
    path = write(tmp_path, MINIMAL.replace("  steps: 10", "  steps: true\n  lr: '1e-5'"))
    found = {field: message for _, field, message in problems(path)}
    assert set(found) == {"train.steps", "train.lr"}
    assert found["train.steps"].endswith("(got True)")
    assert load_recipe(write(tmp_path, MINIMAL.replace("  steps: 10", "  steps: 10\n  lr: 1e-5"))).train.lr == 1e-5


def test_unknown_top_level_section_lists_the_sections(tmp_path):
    [(line, field, message)] = problems(write(tmp_path, MINIMAL + "training:\n  steps: 3\n"))
    assert (line, field) == (9, "training")
    assert message == (
        "unknown field, did you mean train? "
        "(allowed: data, description, eval, lora, method, model, name, output, rope, train)"
    )


def test_unknown_field_without_a_close_match_still_lists_the_allowed_ones(tmp_path):
    [(_, field, message)] = problems(write(tmp_path, MINIMAL + "lora:\n  zzz: 1\n"))
    assert field == "lora.zzz"
    assert message == "unknown field (allowed: alpha, dropout, experts, modules_to_save, r, targets)"


def test_unknown_field_of_a_kind_variant_lists_that_variants_fields(tmp_path):
    [(line, field, message)] = problems(write(tmp_path, MINIMAL + "rope:\n  kind: yarn\n  betafast: 8\n"))
    assert (line, field) == (11, "rope.betafast")
    assert message == (
        "unknown field, did you mean beta_fast? (allowed: attention_factor, beta_fast, beta_slow, factor, kind, theta)"
    )


def test_wrong_kind_lists_the_allowed_kinds(tmp_path):
    [(line, field, message)] = problems(write(tmp_path, MINIMAL + "rope:\n  kind: foo\n"))
    assert (line, field) == (10, "rope.kind")
    assert message == f"must be one of {', '.join(repr(k) for k in ROPE_KINDS)} (got 'foo')"


def test_missing_kind_is_a_missing_field_with_the_allowed_kinds(tmp_path):
    path = write(tmp_path, MINIMAL.replace("  kind: standard\n", ""))
    assert problems(path) == [(4, "method.kind", "Field required, one of 'standard', 'pose', 'e2llm', 'harpe', 'longrecipe', 'longgen'")]


def test_missing_required_fields_are_all_reported(tmp_path):
    path = write(tmp_path, "name: t\nmethod:\n  kind: standard\n")
    assert problems(path) == [
        (None, "model", "Field required"),  # absent from the file: no line to point at
        (None, "train", "Field required"),
        (2, "method.target_len", "Field required"),  # the line of its section
    ]


def test_empty_file_needs_the_four_required_sections(tmp_path):
    assert [f for _, f, _ in problems(write(tmp_path, ""))] == ["method", "model", "name", "train"]


def test_a_value_where_a_section_belongs_is_named(tmp_path):
    [(line, field, message)] = problems(write(tmp_path, MINIMAL + "lora: 8\n"))
    assert (line, field, message) == (9, "lora", "expected a section of `key: value` fields (got 8)")


def test_number_or_auto_field_gives_one_issue_not_one_per_union_member(tmp_path):
    path = write(tmp_path, MINIMAL + "rope:\n  kind: linear\n  factor: big\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    lines = set(info.value.lines())  # pydantic fails once per member; each renders to the same line
    assert lines == {f"{path}:11 rope.factor: expected a number, or 'auto' (got 'big')"}


def test_switch_or_auto_field_names_both_choices_in_words(tmp_path):
    path = write(tmp_path, MINIMAL.replace("  steps: 10", "  steps: 10\n  fused_norm: maybe"))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert set(info.value.lines()) == {f"{path}:9 train.fused_norm: expected true or false, or 'auto' (got 'maybe')"}


def test_list_items_are_located_by_index(tmp_path):
    [(line, field, message)] = problems(write(tmp_path, MINIMAL + "eval:\n  lengths:\n    - 4k\n    - 1.1k\n"))
    assert (line, field) == (12, "eval.lengths.1")
    assert message.startswith("'1.1k' is not a whole number of tokens")


def test_yaml_syntax_error_gives_the_line(tmp_path):
    path = write(tmp_path, "name: t\nmodel:\n  path: [unclosed\nmethod:\n  kind: standard\n")
    [(line, field, message)] = problems(path)
    assert field == "<yaml>"
    assert line is not None and line >= 3
    assert "expected ',' or ']'" in message


def test_a_recipe_must_be_a_mapping(tmp_path):
    assert problems(write(tmp_path, "- a\n- b\n")) == [(1, "<root>", "a recipe is a mapping of sections (got list)")]


def test_missing_file_is_one_issue(tmp_path):
    assert problems(tmp_path / "nope.yaml") == [(None, "", "no such recipe file")]


# --------------------------------------------------------------------------------- cross checks
def test_parameter_offload_needs_zero_3(tmp_path):
    path = write(tmp_path, MINIMAL + "  zero_stage: 2\n  offload_params: true\n")
    assert problems(path) == [
        (10, "train.offload_params", "parameter offload needs train.zero_stage 3 (got zero_stage 2)")
    ]
    assert load_recipe(path, ["train.zero_stage=3"]).train.offload_params


def test_training_length_may_not_exceed_the_target(tmp_path):
    path = write(tmp_path, MINIMAL + "data:\n  seq_len: 8k\n")
    assert problems(path) == [(10, "data.seq_len", "must not exceed method.target_len 4096 (got 8192)")]


def test_passkey_depths_must_lie_between_0_and_1(tmp_path):
    path = write(tmp_path, MINIMAL + "eval:\n  passkey:\n    depths: [0.0, 1.5, -0.1, 1.0]\n")
    assert problems(path) == [
        (11, "eval.passkey.depths.1", "a depth is between 0 and 1 (got 1.5)"),
        (11, "eval.passkey.depths.2", "a depth is between 0 and 1 (got -0.1)"),
    ]


def test_rope_factor_below_one_is_refused(tmp_path):
    path = write(tmp_path, MINIMAL + "rope:\n  kind: linear\n  factor: 0.5\n")
    assert problems(path) == [(11, "rope.factor", "must be >= 1 (got 0.5)")]


def test_cross_checks_report_every_rule_at_once(tmp_path):
    text = MINIMAL + "  offload_params: true\ndata:\n  seq_len: 8k\neval:\n  passkey:\n    depths: [2]\n"
    assert [f for _, f, _ in problems(write(tmp_path, text))] == [
        "train.offload_params", "data.seq_len", "eval.passkey.depths.0"
    ]


# ----------------------------------------------------------------------------------------- docs
def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_recipe_docs", ROOT / "scripts" / "gen_recipe_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_recipes_md_is_what_the_generator_writes():
    committed = (ROOT / "docs" / "recipes.md").read_text()
    assert _load_generator().render() == committed, (
        "docs/recipes.md is out of date: run `python scripts/gen_recipe_docs.py > docs/recipes.md`"
    )


def test_generated_docs_name_every_field_of_every_section():
    text = (ROOT / "docs" / "recipes.md").read_text()
    generator = _load_generator()
    for prefix, cls in generator.sections():
        for name in cls.model_fields:
            assert f"| `{name}` |" in text, f"{prefix}{name} is missing from docs/recipes.md"


def test_every_leaf_field_has_a_description():
    generator = _load_generator()
    undocumented = [
        f"{prefix}{name}"
        for prefix, cls in generator.sections()
        for name, info in cls.model_fields.items()
        if not info.description and generator.section_of(info.annotation) is None and name != "kind"
    ]
    assert undocumented == []


def test_the_example_in_the_docs_is_a_valid_recipe():
    generator = _load_generator()
    assert isinstance(validate_recipe(yaml.safe_load(generator.EXAMPLE), "example.yaml", generator.EXAMPLE), Recipe)
