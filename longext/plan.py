"""Resolve a recipe against the model's config.json (no weights): L0, RoPE state, `auto` values,
the DeepSpeed config. Shared by `train --dry-run` and the start of every training run."""

from __future__ import annotations

import json
from dataclasses import dataclass

from longext.recipe import Recipe, dump_recipe


@dataclass(frozen=True)
class Resolved:
    recipe: Recipe  # every `auto` replaced by its value
    rope: "RopeState"  # noqa: F821
    model_config: object


def resolve(recipe: Recipe) -> Resolved:
    import dataclasses

    from longext.data.spec import document_mask_enabled, document_mask_problems
    from longext.engine import resolve_precision
    from longext.errors import LongextError
    from longext.methods import rope_extra
    from longext.models import attn_implementation, load_model_config
    from longext.rope import rope_state

    config = load_model_config(recipe.model.path)
    kernel = attn_implementation(recipe.model.attn_implementation)
    state = rope_state(recipe, config)
    L0 = state.original_context
    if recipe.method.kind == "longrecipe":  # the method computes its enlarged base from L0 (methods.md §4.1.5)
        from longext.methods.longrecipe import resolve_method

        method, rope = resolve_method(recipe, config, L0)
        recipe = recipe.model_copy(update={"method": method, "rope": rope})
        state = rope_state(recipe, config)
    rope = recipe.rope
    if getattr(rope, "factor", None) == "auto":
        rope = rope.model_copy(update={"factor": state.factor})
    seq_len = recipe.data.seq_len if recipe.data.seq_len != "auto" else recipe.method.default_seq_len(L0)
    if seq_len > recipe.method.target_len:
        raise LongextError(f"data.seq_len: {seq_len} is longer than method.target_len {recipe.method.target_len}")
    if problems := document_mask_problems(recipe, kernel, seq_len):  # e.g. a 4D mask too large for sdpa
        raise LongextError(": ".join(problems[0]))
    method = recipe.method
    if getattr(method, "g_max", None) == "auto":
        method = method.model_copy(update={"g_max": method.resolved_g_max(L0)})
    resolved = recipe.model_copy(update={
        "rope": rope,
        "method": method,
        "data": recipe.data.model_copy(update={"seq_len": seq_len,
                                               "document_mask": document_mask_enabled(recipe, kernel, seq_len)}),
        "model": recipe.model.model_copy(update={"original_context": L0}),
        "train": recipe.train.model_copy(update={"precision": resolve_precision(recipe.train.precision)}),
    })
    from longext.sp import check_parallel, resolve_switches

    check_parallel(resolved, config)  # heads, lengths and kernel against train.sequence_parallel, before any weights
    resolved = resolved.model_copy(update={"train": resolve_switches(resolved.train, seq_len, config.vocab_size)})
    state = dataclasses.replace(state, extra=rope_extra(resolved))
    return Resolved(resolved, state, config)


def describe_plan(recipe: Recipe) -> str:
    """What `train --dry-run` prints: the resolved recipe, the RoPE state and the DeepSpeed config."""
    from longext.engine import deepspeed_config
    from longext.memplan import Dims, lora_params, setup_from_recipe

    resolved = resolve(recipe)
    world = 1
    # the trainable count sizes ZeRO's reduce bucket; from the config, as `longext plan` counts it
    s = setup_from_recipe(resolved.recipe)
    dims = Dims.from_config(resolved.model_config)
    trainable = dims.params if s.full else lora_params(dims, s.lora_targets, s.lora_r, s.modules_to_save)
    parts = [
        "# resolved recipe",
        dump_recipe(resolved.recipe).rstrip(),
        "",
        "# RoPE state written to the run directory and the exported config",
        json.dumps(resolved.rope.to_json(), indent=2),
        "",
        f"# DeepSpeed config (world size {world}; scales train_batch_size with --nproc)",
        json.dumps(deepspeed_config(recipe.train, world, trainable), indent=2),
        "",
        f"# run directory: {recipe.run_dir}",
    ]
    return "\n".join(parts)
