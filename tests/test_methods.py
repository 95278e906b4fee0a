"""The method registry (longext/methods): every kind the recipe schema admits has its hooks, nothing outside the
method and recipe packages tests a method's kind, and state a method derives from the model config is derived once."""

from __future__ import annotations

import re
import typing
from pathlib import Path

from helpers import write_recipe

PACKAGE = Path(__file__).resolve().parents[1] / "longext"


def schema_kinds() -> set[str]:
    from longext.recipe import Recipe

    union = typing.get_args(Recipe.model_fields["method"].annotation)
    return {kind for member in union for kind in typing.get_args(member.model_fields["kind"].annotation)}


def test_every_schema_kind_has_its_hooks_and_no_more():
    from longext.methods import METHODS

    assert set(METHODS) == schema_kinds()
    assert all(kind == method.kind for kind, method in METHODS.items())


def test_no_module_outside_methods_and_recipe_names_a_method_kind():
    kinds = "|".join(sorted(schema_kinds() - {"standard"}))
    pattern = re.compile(rf"""["']({kinds})["']""")
    found = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith(("methods/", "recipe", "bench/")):  # bench: suites' recipes and the LongGen suite, as data
            continue
        found += [f"{rel}:{i}" for i, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert found == []


def test_harpe_bases_are_computed_once_and_training_reads_them_from_the_rope_state(
        tmp_path, tiny_model_dir, corpus_dir, monkeypatch):
    import longext.methods.harpe as harpe
    from longext.methods import method_for
    from longext.recipe import load_recipe
    from longext.resolve import resolve

    calls = []
    search = harpe.head_bases
    monkeypatch.setattr(harpe, "head_bases", lambda method, config: calls.append(1) or search(method, config))
    method = {"kind": "harpe", "target_len": 256, "bases": {"kind": "uniform", "b_min": 1.0e4, "b_max": 1.0e5}}
    recipe = load_recipe(write_recipe(tmp_path, tiny_model_dir, corpus_dir, method=method, rope={"kind": "none"}))
    resolved = resolve(recipe)
    setup = method_for("harpe").setup(resolved.recipe, resolved.rope)
    assert resolved.rope.extra["bases"] == [1.0e4, 1.0e5] and len(calls) == 1

    from conftest import build_tiny_model

    model = build_tiny_model("llama")
    setup.apply(model)
    assert model.model.rotary_emb.head_bases == [1.0e4, 1.0e5] and len(calls) == 1
