"""Resolve a recipe against the model's config.json (no weights): L0, RoPE state, `auto` values,
the DeepSpeed config. Shared by `train --dry-run`, `longext plan` and the start of every training run."""

from __future__ import annotations

import json
from dataclasses import dataclass

from longext.recipe import Recipe, dump_recipe


@dataclass(frozen=True)
class Resolved:
    """A recipe against its model, computed once per process (`resolve`) and handed to everything that needs it:
    the memory check, build_model, the method's hooks, the run directory."""

    recipe: Recipe  # every `auto` replaced by its value
    rope: "RopeState"  # noqa: F821  (the RoPE state, with the method's state in rope.extra)
    model_config: object  # the model's transformers config, as config.json says
    model_dir: str  # model.path with `~` and `$LONGEXT_CACHE` expanded


def resolve(recipe: Recipe) -> Resolved:
    import dataclasses

    from longext.data.mask_policy import document_mask_enabled, document_mask_problems, mask_kernel
    from longext.engine import resolve_precision
    from longext.errors import LongextError
    from longext.families import family_of, lora_targets
    from longext.files import expand_path
    from longext.methods import method_for
    from longext.models import attn_implementation, check_attention, load_model_config
    from longext.rope import original_context, rope_state
    from longext.savers import resolve_switches
    from longext.sp import check_parallel

    model_dir = expand_path(recipe.model.path)
    config = load_model_config(model_dir)
    family = family_of(config)
    method = method_for(recipe.method.kind)
    problem = method.family_problem(family)
    if problem:
        raise LongextError(f"method.kind: {recipe.method.kind} does not apply to {family.label}: {problem}")
    check_attention(recipe.model.attn_implementation, config)
    L0 = original_context(config, recipe.model.original_context)
    recipe = method.resolve(recipe, config, L0)  # the method's own `auto`s: LongRecipe's enlarged base, E2-LLM's g_max
    kernel = mask_kernel(attn_implementation(recipe.model.attn_implementation, config), method.own_attention)
    state = rope_state(recipe, config)
    rope = recipe.rope
    if getattr(rope, "factor", None) == "auto":
        rope = rope.model_copy(update={"factor": state.factor})
    seq_len = recipe.data.seq_len if recipe.data.seq_len != "auto" else recipe.method.default_seq_len(L0)
    if seq_len > recipe.method.target_len:
        raise LongextError(f"data.seq_len: {seq_len} is longer than method.target_len {recipe.method.target_len}")
    lora = recipe.lora
    if lora.targets == "auto":  # the family's attention projections (Phi-3: its fused qkv_proj)
        lora = lora.model_copy(update={"targets": lora_targets(config)})
    if problems := document_mask_problems(recipe, kernel, seq_len):  # e.g. a 4D mask too large for sdpa
        raise LongextError(": ".join(problems[0]))
    resolved = recipe.model_copy(update={
        "rope": rope, "lora": lora,
        "data": recipe.data.model_copy(update={"seq_len": seq_len,
                                               "document_mask": document_mask_enabled(recipe, kernel, seq_len)}),
        "model": recipe.model.model_copy(update={"original_context": L0}),
        "train": recipe.train.model_copy(update={"precision": resolve_precision(recipe.train.precision)}),
    })
    check_parallel(resolved, config, method)  # heads, lengths and kernel against train.sequence_parallel, no weights
    resolved = resolved.model_copy(update={"train": resolve_switches(resolved.train, seq_len, config)})
    state = dataclasses.replace(state, extra=method.state(resolved, config))
    return Resolved(resolved, state, config, model_dir)


def describe_resolved(resolved: Resolved) -> str:
    """What `train --dry-run` prints: the resolved recipe, the RoPE state and the DeepSpeed config."""
    from longext.engine import deepspeed_config
    from longext.plan import Dims, lora_params, setup_from_recipe

    recipe, world = resolved.recipe, 1
    # the trainable count sizes ZeRO's reduce bucket; from the config, as `longext plan` counts it
    s = setup_from_recipe(recipe)
    dims = Dims.from_config(resolved.model_config)
    trainable = dims.params if s.full else lora_params(dims, s.lora_targets, s.lora_r, s.modules_to_save, s.lora_experts)
    parts = [
        "# resolved recipe",
        dump_recipe(recipe).rstrip(),
        "",
        *family_notes(resolved),
        "# RoPE state written to the run directory and the exported config",
        json.dumps(resolved.rope.to_json(), indent=2),
        "",
        f"# DeepSpeed config (world size {world}; scales train_batch_size with --nproc)",
        json.dumps(deepspeed_config(recipe.train, world, trainable), indent=2),
        "",
        f"# run directory: {recipe.run_dir}",
    ]
    return "\n".join(parts)


def family_notes(resolved: Resolved) -> list[str]:
    """What the model family changes about the run, for --dry-run: which layers' RoPE is extended (Gemma 2/3),
    what LoRA adapts (MoE: attention, experts optional, never the router)."""
    from longext.families import family_of, full_layer_count

    config, recipe = resolved.model_config, resolved.recipe
    family = family_of(config)
    lines = []
    if family.layer_types:
        full, n = full_layer_count(config)
        lines.append(f"# {family.label}: the RoPE of the {full} full-attention layers (of {n}) is extended; the {n - full} "
                     f"sliding-window layers (window {config.sliding_window}) keep theirs (rope_parameters.sliding_attention)")
    if family.moe and not recipe.train.full_finetune:
        adapted = "attention and every expert (lora.experts: true)" if recipe.lora.experts else \
            "attention only (lora.experts: false)"
        lines.append(f"# {family.label}: LoRA on {', '.join(recipe.lora.targets)}: {adapted}; the router is not adapted")
    return [*lines, ""] if lines else []
