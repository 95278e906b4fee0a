"""The recipe schema's building blocks: the YAML dialect, the strict Section every part derives from, and the
Length and Auto field types."""

from __future__ import annotations

import re
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict

from longext.lengths import parse_length


class YamlLoader(yaml.SafeLoader):
    """YAML 1.1 with `1e-5` read as a float (plain PyYAML wants `1.0e-5` and would give the string '1e-5')."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def load_yaml(text: str):
    return yaml.load(text, Loader=YamlLoader)


def compose_yaml(text: str) -> yaml.Node | None:
    """The node tree of a recipe text (for line numbers), or None when there is none or it does not parse."""
    try:
        return yaml.compose(text, Loader=YamlLoader) if text else None
    except yaml.YAMLError:
        return None


Length = Annotated[int, BeforeValidator(parse_length)]
Auto = Literal["auto"]


class Section(BaseModel):
    # Unknown keys are errors: a typo like `lora.rnak` must never fall back to a default quietly. Strict types:
    # `steps: true` or `lr: "1e-5"` is an error, not 1 or a parsed string (lengths like "4k" go through Length).
    # Floats are finite: `lr: .inf` passes `gt=0` but is never meant.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)
