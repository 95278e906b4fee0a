"""The recipe: one strict, typed schema for a whole run, and the loader that reports every problem at once as
`file:line field.path: message (got X)`.

    base.py      the YAML dialect, Section (unknown keys are errors), Length, Auto
    methods.py   the `method` blocks, one per method, with their cross-field checks
    data.py      the data section: sources (with weights and filters), packing, document mask, chat loss
    sections.py  model, rope, lora, train, eval, output, and Recipe
    load.py      load_recipe / validate_recipe (+ --set overrides, cross-field checks), dump_recipe
    locate.py    pydantic errors and later problems as file:line field: message

Nothing here imports torch; `longext recipes validate` and `longext train --dry-run` stay instant.
"""

from longext.recipe.base import Auto, Length, Section, compose_yaml, load_yaml
from longext.recipe.data import DataSpec, SourceSpec, TrainSource
from longext.recipe.load import apply_override, cross_checks, dump_recipe, load_recipe, validate_recipe
from longext.recipe.locate import line_of, located, to_issue
from longext.recipe.methods import (
    E2LLMMethod, HarpeMethod, LongGenMethod, LongRecipeMethod, MethodSection, MethodSpec, PoseMethod, StandardMethod,
)
from longext.recipe.sections import (
    ROPE_KINDS, DynamicRope, EvalSpec, Llama3Rope, LinearRope, LmEvalSpec, LongRope, LoraSpec, ModelSpec,
    NiahSpec, NoRope, NtkRope, OutputSpec, PasskeySpec, PerplexitySpec, Recipe, RopeSpec, RulerSpec, TrainSpec,
    YarnRope,
)

__all__ = [
    "ROPE_KINDS", "Auto", "DataSpec", "DynamicRope", "E2LLMMethod", "EvalSpec", "HarpeMethod", "Length", "Llama3Rope",
    "LinearRope", "LmEvalSpec", "LongRope", "LongGenMethod", "LongRecipeMethod", "LoraSpec", "MethodSection",
    "MethodSpec", "ModelSpec",
    "NiahSpec", "NoRope", "NtkRope", "OutputSpec", "PasskeySpec", "PerplexitySpec", "PoseMethod", "Recipe", "RopeSpec",
    "RulerSpec", "Section", "SourceSpec", "StandardMethod", "TrainSource", "TrainSpec", "YarnRope", "apply_override",
    "compose_yaml", "cross_checks", "dump_recipe", "line_of", "load_recipe", "load_yaml", "located", "to_issue",
    "validate_recipe",
]
