"""LongRecipe (Hu et al. 2024, methods.md §4): selected sentences at train_len_ratio·L with position ids that span
L (data: longext.longrecipe.data), and an enlarged RoPE base computed once from L.

The base is the method's, not a rope kind: it is the dynamic-NTK rule of transformers evaluated once at the
target length and then frozen, b' = b (s L/L0 - (s - 1))^(d/(d-2)) (methods.md §4.1.5). `resolve_method` writes it
into the resolved recipe as rope.theta (rope.kind none), so rope.json and the exported config carry it as a
plain rope_theta and inference needs nothing else.
"""

from __future__ import annotations

from longext.rope import config_theta, head_dim


def static_ntk_base(theta: float, factor: float, length: int, original: int, dim: int) -> float:
    """transformers' dynamic-NTK base at sequence length `length`, used as a fixed base (LongRecipe, §4.1.5)."""
    return theta * (factor * length / original - (factor - 1)) ** (dim / (dim - 2))


def resolved_factor(method, original: int) -> float:
    """s: the recipe's, or round(L / L0) as in the paper's table (10 for 80K/8K, not 9.77)."""
    return float(method.rope_factor) if method.rope_factor != "auto" else float(max(1, round(method.target_len / original)))


def resolve_method(recipe, config, original: int):
    """(method, rope) with every `auto` of the method filled in and rope.theta set to the enlarged base (an
    explicit rope.theta is kept as the base)."""
    method = recipe.method.model_copy(update={"rope_factor": resolved_factor(recipe.method, original)})
    if method.replay is not None:
        r = method.replay
        method = method.model_copy(update={"replay": r.model_copy(update={
            "lr": r.lr if r.lr is not None else recipe.train.lr / 10,
            "data": r.data if r.data is not None else list(recipe.data.train),
            "seq_len": r.seq_len if r.seq_len != "auto" else original,
        })})
    if recipe.rope.theta is not None:
        return method, recipe.rope
    theta = config_theta(config)
    base = static_ntk_base(theta, method.rope_factor, method.target_len, original, head_dim(config))
    return method, recipe.rope.model_copy(update={"theta": base})


def rope_extra(recipe) -> dict:
    m = recipe.method
    return {"method": "longrecipe", "rope_factor": m.rope_factor, "rope_theta": recipe.rope.theta}


def method_plan(recipe):
    """Extension data (selected sentences, transformed positions), then the optional replay stage and merge."""
    from longext.longrecipe.data import build_longrecipe_data
    from longext.longrecipe.stages import build_replay_data, merge_with_original
    from longext.methods.base import ExtraStage, MethodSetup

    m = recipe.method
    replay = ExtraStage("replay", m.replay.steps, m.replay.lr, build_replay_data) if m.replay else None
    merge = None
    if m.merge:
        def merge(engine, run_dir, rank):
            merge_with_original(engine, run_dir, m.merge.weight_original, rank)
    return MethodSetup(build_data=build_longrecipe_data, stage_name="extension", extra_stage=replay, finish=merge)
