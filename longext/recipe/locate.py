"""Where a problem is in the recipe file: pydantic's errors as `field.path: message (got X)` with their line, and
problems found after validation (a missing model.path, the memory refusal, ...) with the file and line in front."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal, Sequence, get_args, get_origin

import yaml
from pydantic import BaseModel

from longext.errors import Issue, LongextError, Problems
from longext.lengths import ALLOWED as LENGTH_ALLOWED
from longext.lengths import parse_length
from longext.recipe.base import compose_yaml
from longext.recipe.sections import Recipe


_FIELD_LINE = re.compile(r"^([a-z][a-z0-9_]*(?:\.[a-z0-9_]+)+): (.+)$")


def located(path: Path | str, err: LongextError, overrides: Sequence[str] = ()) -> LongextError:
    """A problem found after validation (a missing model.path, texts, the memory refusal ...) with the recipe file
    and line in front, like the schema's own errors: `file:line field: message`, for fields the file or a --set
    gave. Other lines (a field from a flag such as --out, no field at all), and errors that are not plain bad input
    (TrainingStopped, ...), come back as they were."""
    if type(err) not in (LongextError, Problems):
        return err
    try:
        root = compose_yaml(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        root = None
    overridden = {o.split("=", 1)[0].strip() for o in overrides}
    lines, changed = [], False
    for line in err.lines():
        m = _FIELD_LINE.match(line)
        field = m.group(1) if m else ""
        from_set = any(field == o or field.startswith(o + ".") for o in overridden)
        if m and (from_set or _has_path(root, field.split("."))):
            lines.append(f"{path}:{line_of(root, field.split('.'))} {line}" + (" [from --set]" if from_set else ""))
            changed = True
        else:
            lines.append(line)
    return Problems(lines) if changed else err


def _has_path(root: yaml.Node | None, parts: Sequence[str]) -> bool:
    node = root
    for part in parts:
        if isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
            node = node.value[int(part)]  # a list entry, e.g. data.train.2
            continue
        if not isinstance(node, yaml.MappingNode):
            return False
        node = next((v for k, v in node.value if k.value == part), None)
        if node is None:
            return False
    return True


def to_issue(error: dict, raw: dict, root: yaml.Node | None, overridden: set[str]) -> Issue:
    """One pydantic error as `field.path: message (got X)`, with the line of the field in the YAML."""
    loc, member = _user_loc(error["loc"], raw)
    kind, got = error["type"], error.get("input")
    message = error["msg"].removeprefix("Value error, ")
    show_got = kind not in ("missing", "extra_forbidden")
    if member:
        # `float | "auto"` fails once per member; every member error becomes the same single line.
        message = f"expected {_expected(_field_annotation(loc, raw))}"
    elif kind == "extra_forbidden":
        allowed = _allowed_fields(loc[:-1], raw)
        close = difflib.get_close_matches(loc[-1], allowed, n=1)
        message = "unknown field" + (f", did you mean {close[0]}?" if close else "")
        message += f" (allowed: {', '.join(allowed)})" if allowed else ""
    elif kind in ("union_tag_invalid", "union_tag_not_found"):
        kinds = ", ".join(repr(k) for k in _kinds(_field_annotation(loc, raw)))
        loc = [*loc, "kind"]
        if kind == "union_tag_invalid":
            message, got = f"must be one of {kinds}", error.get("ctx", {}).get("tag")
        else:
            message, show_got = f"Field required, one of {kinds}", False
    elif kind in ("model_type", "model_attributes_type", "dict_type"):
        message = "expected a section of `key: value` fields"
    if show_got and "input" in error and f"(got {got!r})" not in message:
        message += f" (got {got!r})"
    field = ".".join(loc) or "<root>"
    if field in overridden or any(field.startswith(o + ".") for o in overridden):
        message += " [from --set]"
    return Issue(field, message, line_of(root, loc))


def _user_loc(loc: tuple, raw: Any) -> tuple[list[str], bool]:
    """pydantic's location as the user wrote it, and whether it pointed inside a union member.

    Discriminator tags are dropped ('rope', 'yarn', 'factor' -> rope.factor), and so are the member
    names pydantic appends below a plain value ('rope.factor.float', "rope.factor.literal['auto']").
    """
    out, node, member = [], raw, False
    for part in loc:
        if isinstance(node, dict) and part not in node and node.get("kind") == part:
            continue  # discriminator tag
        if out and not isinstance(node, (dict, list)):
            member = True  # below a scalar: a union member's name, not something the user wrote
            break
        out.append(str(part))
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            node = None
    return out, member


def _allowed_fields(loc: list[str], raw: Any) -> list[str]:
    """Field names of the section at `loc`, for 'unknown field' messages."""
    return sorted(getattr(_section_at(loc, raw), "model_fields", {}))


def _section_at(loc: Sequence[str], raw: Any) -> Any:
    """The schema class of the section at `loc` (the variant named by `kind` for unions), or None."""
    cls: Any = Recipe
    node = raw
    for part in loc:
        if isinstance(node, list) and str(part).isdigit():  # an entry of a list of sections (data.train.2)
            node = node[int(part)] if int(part) < len(node) else None
            continue
        node = node.get(part) if isinstance(node, dict) else None
        info = getattr(cls, "model_fields", {}).get(part)
        if info is None:
            return None
        cls = _section_class(info.annotation, node)
        if cls is None:
            return None
    return cls


def _field_annotation(loc: Sequence[str], raw: Any) -> Any:
    info = getattr(_section_at(loc[:-1], raw), "model_fields", {}).get(loc[-1]) if loc else None
    return info.annotation if info is not None else None


def _kinds(annotation: Any) -> list[str]:
    """The `kind` values of a discriminated union of sections (rope -> none, linear, ...)."""
    members = get_args(annotation) or (annotation,)
    return [
        tag for m in members if isinstance(m, type) and issubclass(m, BaseModel) and "kind" in m.model_fields
        for tag in get_args(m.model_fields["kind"].annotation)
    ]


def _expected(annotation: Any) -> str:
    """What a union field accepts, in words: `float | "auto"` -> "a number, or 'auto'"."""
    words = []
    for arg in get_args(annotation) or (annotation,):
        if get_origin(arg) is Literal:
            words += [repr(v) for v in get_args(arg)]
        elif any(getattr(m, "func", None) is parse_length for m in getattr(arg, "__metadata__", ())):
            words.append(LENGTH_ALLOWED)
        else:
            words.append({bool: "true or false", float: "a number", int: "a whole number", str: "text",
                          type(None): "null"}.get(arg, str(arg)))
    return ", or ".join(words)


def _section_class(annotation: Any, node: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            kind = arg.model_fields.get("kind")
            if kind is None or (isinstance(node, dict) and node.get("kind") in getattr(kind.annotation, "__args__", ())):
                return arg
        elif (found := _section_class(arg, node)) is not None:
            return found
    return None


def line_of(root: yaml.Node | None, loc: Sequence[str]) -> int | None:
    """1-based line of the deepest node along `loc` that exists in the YAML text."""
    if root is None:
        return None
    node, line = root, None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == part), None)
            if match is None:
                break
            key_node, node = match
            line = key_node.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and str(part).isdigit() and int(part) < len(node.value):
            node = node.value[int(part)]
            line = node.start_mark.line + 1
        else:
            break
    return line
