"""Reading a recipe: YAML text, `--set` overrides, the schema, the cross-field checks; and writing one back."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import yaml
from pydantic import ValidationError

from longext.errors import Issue, RecipeError
from longext.recipe.base import MAX_YAML_BYTES, YamlLimit, compose_yaml, load_yaml, load_yaml_tree
from longext.recipe.data import data_checks
from longext.recipe.locate import line_of, to_issue
from longext.recipe.sections import Recipe


def load_recipe(path: Path | str, overrides: Sequence[str] = ()) -> Recipe:
    """Read, override (`a.b=value`, value parsed as YAML) and validate a recipe file."""
    path = Path(path)
    raw, root, text = read_recipe_file(path)
    issues: list[Issue] = []
    for item in overrides:
        issue = apply_override(raw, item)
        if issue:
            issues.append(issue)
    if issues:
        raise RecipeError(path, issues)
    return validate_recipe(raw, path, text, overridden={o.split("=", 1)[0].strip() for o in overrides}, root=root)


def read_recipe_file(path: Path) -> tuple[dict, yaml.Node | None, str]:
    """(mapping, node tree, text) of a recipe file; RecipeError for a missing, oversized, non-UTF-8 or non-YAML
    file, a text over the YAML limits, a key given twice or a root that is not a mapping. The size is checked before
    the file is read."""
    if not path.is_file():
        raise RecipeError(path, [Issue("", "no such recipe file")])
    if path.stat().st_size > MAX_YAML_BYTES:
        raise RecipeError(path, [Issue("", f"{path.stat().st_size:,} bytes, over the {MAX_YAML_BYTES:,} a recipe may "
                                           f"have (a recipe is a page of settings; long lists belong in data files)")])
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise RecipeError(path, [Issue("", f"not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
                                           f"{err.start}); a recipe is a YAML text file")]) from None
    try:
        raw, root = load_yaml_tree(text)
    except YamlLimit as err:
        raise RecipeError(path, [Issue("<yaml>", err.message, err.line)]) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise RecipeError(path, [Issue("<yaml>", problem, mark.line + 1 if mark else None)]) from None
    duplicates = _duplicate_keys(root)
    if duplicates:
        raise RecipeError(path, duplicates)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(path, [Issue("<root>", f"a recipe is a mapping of sections (got {type(raw).__name__})", 1)])
    return raw, root, text


def validate_recipe(raw: dict, path: Path | str, text: str = "", overridden: set[str] = frozenset(),
                    root: yaml.Node | None = None) -> Recipe:
    """The Recipe of a mapping read from `path` (`text`, or its node tree `root`, gives the lines of problems)."""
    root = root if root is not None else compose_yaml(text)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        raise RecipeError(path, [to_issue(e, raw, root, overridden) for e in err.errors()]) from None
    issues = [
        Issue(field, message, line_of(root, field.split(".")))
        for field, message in cross_checks(recipe)
    ]
    if issues:
        raise RecipeError(path, issues)
    return recipe


def cross_checks(recipe: Recipe) -> list[tuple[str, str]]:
    """Rules that span fields. Returns (field path, message) pairs."""
    out = []
    t = recipe.train
    if t.checkpoint_offload and not t.gradient_checkpointing:
        out.append(("train.checkpoint_offload",
                    "offloads the activation checkpoints, so it needs train.gradient_checkpointing: true (got false)"))
    if t.full_finetune and "lora" in recipe.model_fields_set:
        out.append(("lora", "LoRA is not used when train.full_finetune is true (every weight trains); "
                            "remove the lora section or set full_finetune: false"))
    if recipe.lora.experts and recipe.lora.dropout:
        out.append(("lora.dropout", f"LoRA on the experts (lora.experts: true) needs dropout 0 (got {recipe.lora.dropout})"))
    if t.offload_params and t.zero_stage != 3:
        out.append(("train.offload_params", f"parameter offload needs train.zero_stage 3 (got zero_stage {t.zero_stage})"))
    if recipe.data.seq_len != "auto" and recipe.data.seq_len > recipe.method.target_len:
        out.append(("data.seq_len", f"must not exceed method.target_len {recipe.method.target_len} (got {recipe.data.seq_len})"))
    factor = getattr(recipe.rope, "factor", None)
    if isinstance(factor, float) and factor < 1.0:
        out.append(("rope.factor", f"must be >= 1 (got {factor})"))
    out += recipe.method.checks(recipe)
    out += data_checks(recipe)
    for i, depth in enumerate(recipe.eval.passkey.depths):
        if not 0.0 <= depth <= 1.0:
            out.append((f"eval.passkey.depths.{i}", f"a depth is between 0 and 1 (got {depth})"))
    return out


def apply_override(raw: dict, item: str) -> Issue | None:
    if "=" not in item:
        return Issue("--set", f"expected KEY=VALUE such as train.lr=1e-5 (got {item!r})")
    key, value = (s.strip() for s in item.split("=", 1))
    parts = key.split(".")
    if not all(parts):
        return Issue("--set", f"expected a dotted field path such as train.lr (got {key!r})")
    try:
        parsed = load_yaml(value) if value else None
    except YamlLimit as err:
        return Issue(key, f"{err.message} [from --set]")
    except yaml.YAMLError:
        parsed = value
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            return Issue(".".join(parts[: i + 1]), f"is not a section, cannot set {key} (got {child!r})")
        node = child
    node[parts[-1]] = parsed
    return None


def _duplicate_keys(node: yaml.Node | None, path: tuple[str, ...] = ()) -> list[Issue]:
    """A key given twice in one mapping (YAML keeps the last one silently; we refuse)."""
    issues: list[Issue] = []
    if isinstance(node, yaml.MappingNode):
        first: dict[str, int] = {}
        for key, value in node.value:
            name, line = str(key.value), key.start_mark.line + 1
            if name in first:
                field = ".".join((*path, name))
                issues.append(Issue(field, f"given twice (first on line {first[name]}); keep one", line))
            else:
                first[name] = line
            issues += _duplicate_keys(value, (*path, name))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            issues += _duplicate_keys(item, (*path, str(i)))
    return issues


def dump_recipe(recipe: Recipe) -> str:
    """YAML text of a (resolved) recipe, every field written out; a full fine-tune has no `lora` section, so the
    text loads again (cross_checks refuses one next to train.full_finetune: true)."""
    exclude = {"lora"} if recipe.train.full_finetune else None
    return yaml.safe_dump(recipe.model_dump(mode="json", exclude=exclude), sort_keys=False)
