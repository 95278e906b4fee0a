"""The recipe schema's building blocks: the YAML dialect with its limits, the strict Section every part derives from,
and the Length and Auto field types.

The dialect is YAML 1.1 as PyYAML reads it, with two changes: `1e-5` is a float, and only true/false are booleans
(YAML 1.2's rule): `memory_check: off` is the word 'off', not false. A true/false field still takes yes/no/on/off.

Limits, checked on the parser's event stream before a node or a Python object is built, so a hostile text answers
at once with its line: at most MAX_YAML_BYTES, nesting at most MAX_DEPTH deep (aliases count with the depth of
what they stand for), and aliases standing for at most MAX_ALIAS_NODES nodes in all (a "billion laughs" text of a
few hundred bytes would otherwise expand to billions of nodes).
"""

from __future__ import annotations

import functools
import re
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, model_validator

from longext.errors import LongextError
from longext.lengths import parse_length

MAX_YAML_BYTES = 1_000_000  # a recipe is a page of settings; 1 MB is thousands of data entries
MAX_DEPTH = 50  # the schema nests 4 deep; list values of a field add one or two
MAX_ALIAS_NODES = 10_000  # nodes that aliases may stand for, all aliases together
YAML11_WORDS = {"yes": True, "on": True, "no": False, "off": False}  # booleans in YAML 1.1, words here


FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X)
BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")


def _dialect(loader: type) -> type:
    """`loader` reading `1e-5` as a float (plain PyYAML wants `1.0e-5` and would give the string '1e-5') and only
    true/false as booleans."""
    loader.add_implicit_resolver("tag:yaml.org,2002:float", FLOAT, list("-+0123456789."))  # copies the table first
    for resolvers in loader.yaml_implicit_resolvers.values():
        resolvers[:] = [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    loader.add_implicit_resolver("tag:yaml.org,2002:bool", BOOL, list("tTfF"))
    return loader


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader in longext's dialect (the pure-Python parser: its error messages)."""


_dialect(YamlLoader)
if getattr(yaml, "CSafeLoader", None) is not None:
    class FastYamlLoader(yaml.CSafeLoader):
        """The same dialect on libyaml's parser, ~10x faster; a text it refuses is read again by YamlLoader."""

    _dialect(FastYamlLoader)
else:  # PyYAML built without libyaml
    FastYamlLoader = YamlLoader


class YamlLimit(LongextError):
    """A YAML text over one of the limits; `line` is 1-based. Readers of a recipe turn it into file:line."""

    def __init__(self, message: str, line: int | None):
        self.message, self.line = message, line
        super().__init__(f"line {line}: {message}" if line else message)


def check_yaml_text(text: str) -> None:
    """Raise YamlLimit when `text` is over MAX_YAML_BYTES, nests deeper than MAX_DEPTH or has aliases standing for
    more than MAX_ALIAS_NODES nodes. Walks the parser's events (an iterative state machine), so nothing is built and
    nothing recurses; a syntax error is left to the loader, which reports it with its own words."""
    size = len(text.encode("utf-8"))
    if size > MAX_YAML_BYTES:
        line = text.encode("utf-8")[:MAX_YAML_BYTES].count(b"\n") + 1
        raise YamlLimit(f"{size:,} bytes, over the {MAX_YAML_BYTES:,} a YAML text of longext may have", line)
    for loader in dict.fromkeys((FastYamlLoader, YamlLoader)):  # the loader that builds it may be either
        try:
            return _check_events(yaml.parse(text, Loader=loader))
        except yaml.YAMLError:
            continue


def _check_events(events) -> None:
    open_nodes: list[list] = []  # per open collection: [nodes below it, height below it, anchor]
    done: dict[str, tuple[int, int]] = {}  # anchor -> (nodes, height) of what it stands for
    expanded = 0
    for event in events:
        if isinstance(event, yaml.CollectionStartEvent):
            open_nodes.append([1, 0, event.anchor])
            if len(open_nodes) > MAX_DEPTH:
                raise YamlLimit(_too_deep(), event.start_mark.line + 1)
        elif isinstance(event, yaml.CollectionEndEvent):
            nodes, height, anchor = open_nodes.pop()
            _count(open_nodes, done, anchor, nodes, height + 1)
        elif isinstance(event, yaml.ScalarEvent):
            _count(open_nodes, done, event.anchor, 1, 1)
        elif isinstance(event, yaml.AliasEvent):
            line = event.start_mark.line + 1
            if event.anchor not in done:
                if any(anchor == event.anchor for *_, anchor in open_nodes):
                    raise YamlLimit(f"alias *{event.anchor} inside the node it refers to (a loop)", line)
                continue  # an undefined alias: the loader names it
            nodes, height = done[event.anchor]
            expanded += nodes
            if expanded > MAX_ALIAS_NODES:
                raise YamlLimit(f"aliases stand for more than {MAX_ALIAS_NODES:,} nodes in all (an alias bomb?); "
                                f"write the values out", line)
            if len(open_nodes) + height > MAX_DEPTH:
                raise YamlLimit(_too_deep(f" with what *{event.anchor} stands for"), line)
            _count(open_nodes, done, None, nodes, height)


def _count(open_nodes: list[list], done: dict, anchor: str | None, nodes: int, height: int) -> None:
    if anchor:
        done[anchor] = (nodes, height)
    if open_nodes:
        open_nodes[-1][0] += nodes
        open_nodes[-1][1] = max(open_nodes[-1][1], height)


def _too_deep(how: str = "") -> str:
    return f"nested deeper than {MAX_DEPTH} levels{how}; a recipe needs a handful"


def load_yaml(text: str) -> Any:
    """The value of a YAML text in longext's dialect, within the limits (YamlLimit), or yaml.YAMLError."""
    return load_yaml_tree(text)[0]


def load_yaml_tree(text: str) -> tuple[Any, yaml.Node | None]:
    """(value, node tree for line numbers) of a YAML text: the limits checked first, then composed once."""
    check_yaml_text(text)
    try:
        return _tree(FastYamlLoader, text)
    except yaml.YAMLError:
        return _tree(YamlLoader, text)  # raises again, in the words the pure-Python parser uses


def _tree(loader_class: type, text: str) -> tuple[Any, yaml.Node | None]:
    loader = loader_class(text)
    try:
        root = loader.get_single_node()
        return (loader.construct_document(root) if root is not None else None), root
    finally:
        loader.dispose()


def compose_yaml(text: str) -> yaml.Node | None:
    """The node tree of a recipe text (for line numbers), or None when there is none, it does not parse or it is
    over the limits."""
    try:
        return load_yaml_tree(text)[1] if text else None
    except (yaml.YAMLError, YamlLimit):
        return None


Length = Annotated[int, BeforeValidator(parse_length)]
Auto = Literal["auto"]


class Section(BaseModel):
    # Unknown keys are errors: a typo like `lora.rnak` must never fall back to a default quietly. Strict types:
    # `steps: true` or `lr: "1e-5"` is an error, not 1 or a parsed string (lengths like "4k" go through Length).
    # Floats are finite: `lr: .inf` passes `gt=0` but is never meant.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _yaml11_booleans(cls, data: Any) -> Any:
        """yes/no/on/off in a true/false field mean what YAML 1.1 made of them (the dialect reads them as words, so
        that a choice field such as `memory_check: off` gets the word)."""
        if not isinstance(data, dict):
            return data
        flags = _flag_fields(cls)
        words = {k: YAML11_WORDS[v.lower()] for k, v in data.items()
                 if k in flags and isinstance(v, str) and v.lower() in YAML11_WORDS}
        return {**data, **words} if words else data


@functools.cache
def _flag_fields(cls: type[BaseModel]) -> frozenset[str]:
    """Fields of `cls` that take true/false (bool, or a union with bool such as `bool | "auto"`)."""
    return frozenset(name for name, info in cls.model_fields.items()
                     if info.annotation is bool or bool in get_args(info.annotation))
