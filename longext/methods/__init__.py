"""What each method adds to a standard run: position sampler (data), instance patches (model),
per-batch inputs consumed before the forward pass, and what inference needs. `standard` adds nothing.

Methods plug in here (one module each); the training loop never tests the method's name.
"""

from __future__ import annotations

from typing import Callable

from longext.methods.base import MethodSetup


def method_setup(recipe, model_config=None) -> MethodSetup:
    """The MethodSetup for a resolved recipe (L0, seq_len and g_max already filled in)."""
    method = recipe.method
    match method.kind:
        case "standard":
            return MethodSetup()
        case "pose":
            from longext.methods.pose import pose_sampler

            return MethodSetup(positions=pose_sampler(method.target_len, method.chunks), per_step=method.sample_scope == "step")
        case "e2llm":
            from longext.methods import e2llm
            from longext.rotary import apply_scaled_rotary

            sampler = e2llm.e2llm_sampler(
                recipe.model.original_context, recipe.seq_len, method.g_max, method.scales, method.sink_tokens
            )
            return MethodSetup(
                positions=sampler, apply=apply_scaled_rotary, before_forward=e2llm.before_forward,
                per_step=method.sample_scope == "step",
            )
        case "harpe":
            from longext.methods.harpe import apply_harpe, head_bases
            from longext.models import load_model_config

            bases = head_bases(method, model_config or load_model_config(recipe.model.path))
            return MethodSetup(apply=lambda model: apply_harpe(model, bases))
        case "longrecipe":
            from longext.methods.longrecipe import method_plan

            return method_plan(recipe)
        case "longgen":
            from longext.methods.longgen import method_plan as longgen_plan
            from longext.models import load_model_config

            return longgen_plan(method, model_config or load_model_config(recipe.model.path))
    raise NotImplementedError(method.kind)  # the schema admits only implemented kinds


def rope_extra(recipe) -> dict:
    """Method state the trained model needs at inference, stored in rope.json (RopeState.extra)."""
    method = recipe.method
    if method.kind == "e2llm":
        from longext.positions import e2llm_scales

        scales = e2llm_scales(recipe.model.original_context, recipe.seq_len, method.g_max, method.scales)
        return {"method": "e2llm", "scales": scales, "eval_rule": method.eval_rule, "sink_tokens": method.sink_tokens}
    if method.kind == "pose":
        return {"method": "pose", "chunks": method.chunks}
    if method.kind == "harpe":
        from longext.methods.harpe import rope_extra as harpe_extra
        from longext.models import load_model_config

        return harpe_extra(method, load_model_config(recipe.model.path))
    if method.kind == "longrecipe":
        from longext.methods.longrecipe import rope_extra as longrecipe_extra

        return longrecipe_extra(recipe)
    if method.kind == "longgen":
        from longext.methods.longgen import rope_extra as longgen_extra
        from longext.models import load_model_config

        return longgen_extra(method, load_model_config(recipe.model.path))
    return {}


def eval_setup(model, state) -> Callable[[int], None]:
    """set_length(L) for a loaded run: what the method changes per evaluated window (no-op for most)."""
    if state.extra.get("method") == "e2llm":
        from longext.methods.e2llm import eval_hook

        return eval_hook(model, state.original_context, state.extra["eval_rule"])
    if state.extra.get("method") == "harpe":
        from longext.methods.harpe import eval_hook as harpe_eval_hook

        return harpe_eval_hook(model, state.extra["bases"])
    if state.extra.get("method") == "longgen":
        from longext.methods.longgen import eval_hook as longgen_eval_hook

        return longgen_eval_hook(model, state.extra)
    return lambda length: None
