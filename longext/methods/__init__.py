"""The registry of methods: method.kind -> the module that holds all of that method's code (longext.methods.base
lists the hooks). Nothing outside this package tests a method's kind; it asks the registry.

Adding a method: its recipe block in longext/recipe/methods.py (the schema, with its cross-field checks), one
module or folder here that defines `METHOD = Method(kind=..., <hooks>)`, and one line below.
"""

from __future__ import annotations

from longext.methods import e2llm, harpe, longgen, longrecipe, pose, standard
from longext.methods.base import Method

METHODS: dict[str, Method] = {
    m.METHOD.kind: m.METHOD for m in (standard, pose, e2llm, harpe, longrecipe, longgen)
}


def method_for(kind: str) -> Method:
    """The hooks of a recipe's method.kind (the schema admits only registered kinds)."""
    return METHODS[kind]


def trained_method(state) -> Method:
    """The hooks of the method a run was trained with, from its RoPE state (rope.json's extra["method"])."""
    return METHODS[state.extra.get("method", "standard")]
