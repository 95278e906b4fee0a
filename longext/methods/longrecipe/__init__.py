"""LongRecipe (Hu et al. 2024, methods.md §4): selected sentences at train_len_ratio·L with position ids that span
L (data.py: sentences selected by selection.py's rules, cached by sentences.py; positions from longext.positions),
an enlarged RoPE base computed once from L, and the replay and merge stages (stages.py). analysis.py is `longext
analyze`, which writes the token ranking the logit_change selection reads.

The base is the method's, not a rope kind: it is the dynamic-NTK rule of transformers evaluated once at the
target length and then frozen, b' = b (s L/L0 - (s - 1))^(d/(d-2)) (methods.md §4.1.5). `resolve_longrecipe` writes it
into the resolved recipe as rope.theta (rope.kind none), so rope.json and the exported config carry it as a
plain rope_theta and inference needs nothing else.
"""

from __future__ import annotations

from longext.methods.base import ExtraStage, Method, MethodSetup
from longext.rope import config_theta, head_dim


def static_ntk_base(theta: float, factor: float, length: int, original: int, dim: int) -> float:
    """transformers' dynamic-NTK base at sequence length `length`, used as a fixed base (LongRecipe, §4.1.5)."""
    return theta * (factor * length / original - (factor - 1)) ** (dim / (dim - 2))


def resolved_factor(method, original: int) -> float:
    """s: the recipe's, or round(L / L0) as in the paper's table (10 for 80K/8K, not 9.77)."""
    return float(method.rope_factor) if method.rope_factor != "auto" else float(max(1, round(method.target_len / original)))


def resolve_longrecipe(recipe, config, original: int):
    """The recipe with every `auto` of the method filled in and rope.theta set to the enlarged base (an explicit
    rope.theta is kept as the base)."""
    method = recipe.method.model_copy(update={"rope_factor": resolved_factor(recipe.method, original)})
    if method.replay is not None:
        r = method.replay
        method = method.model_copy(update={"replay": r.model_copy(update={
            "lr": r.lr if r.lr is not None else recipe.train.lr / 10,
            "data": r.data if r.data is not None else list(recipe.data.train),
            "seq_len": r.seq_len if r.seq_len != "auto" else original,
        })})
    rope = recipe.rope
    if rope.theta is None:
        base = static_ntk_base(config_theta(config), method.rope_factor, method.target_len, original, head_dim(config))
        rope = rope.model_copy(update={"theta": base})
    return recipe.model_copy(update={"method": method, "rope": rope})


def longrecipe_state(recipe, config) -> dict:
    m = recipe.method
    return {"method": "longrecipe", "rope_factor": m.rope_factor, "rope_theta": recipe.rope.theta}


def training_lengths(recipe) -> list[tuple[str, int]]:
    """The extension samples, and the replay stage's."""
    replay = recipe.method.replay
    out = [("data.seq_len", recipe.data.seq_len)]
    return out + [("method.replay.seq_len", replay.seq_len)] if replay is not None else out


def longrecipe_setup(recipe, state) -> MethodSetup:
    """Extension data (selected sentences, transformed positions), then the optional replay stage and merge."""
    from longext.methods.longrecipe.data import build_longrecipe_data
    from longext.methods.longrecipe.stages import build_replay_data, merge_with_original

    m = recipe.method
    replay = ExtraStage("replay", m.replay.steps, m.replay.lr, build_replay_data) if m.replay else None
    merge = None
    if m.merge:
        def merge(engine, run_dir, rank):
            merge_with_original(engine, run_dir, recipe, rank)
    return MethodSetup(build_data=build_longrecipe_data, stage_name="extension", extra_stage=replay, finish=merge)


def longrecipe_inputs(recipe) -> list[str]:
    """The analysis file of the logit_change selection and the replay texts, before anything loads."""
    from longext.data.sources import resolve_sources
    from longext.errors import LongextError
    from longext.methods.longrecipe.selection import analysis_problem

    m, problems = recipe.method, []
    if m.selection.mode == "logit_change" and m.selection.analysis is not None:
        problems += [p for p in [analysis_problem(m.selection.analysis)] if p]
    if m.replay is not None and m.replay.data and list(m.replay.data) != list(recipe.data.train):  # not twice
        try:
            resolve_sources(list(m.replay.data), recipe.data.text_field, {}, "method.replay.data")
        except LongextError as err:
            problems += err.lines()
    return problems


METHOD = Method(
    kind="longrecipe", resolve=resolve_longrecipe, state=longrecipe_state, training_lengths=training_lengths,
    setup=longrecipe_setup, input_problems=longrecipe_inputs,
)
