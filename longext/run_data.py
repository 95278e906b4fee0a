"""The data a training run reads: the method's own (LongRecipe's selected sentences, its replay stage) or the
prepared corpus, with the method's position sampler. `train` builds it in every rank; `train --nproc` builds it once
in the launching process first (every cache then exists and the ranks only open it); `longext data prepare` builds
it and prints what the run trains on. The caches are keyed by what they hold (longext.data.cache), so each of these
finds what another built, and `--resume` never tokenizes again."""

from __future__ import annotations


def training_data(recipe, tokenizer, setup, group: int = 1):
    """(TrainData of the main stage, TrainData of the method's extra stage or None) for a resolved recipe and its
    method's MethodSetup; `group`: samples that share one position draw (per-step sampling)."""
    from longext.data.prepare import build_train_data

    data = setup.build_data(recipe, tokenizer) if setup.build_data else build_train_data(
        recipe, tokenizer, setup.positions, group)
    extra = setup.extra_stage.build_data(recipe, tokenizer) if setup.extra_stage else None
    return data, extra


def prepare_run_data(resolved) -> float:
    """Build every cache the run `resolved` (longext.resolve.Resolved) reads, in this process; returns seconds."""
    import time

    from longext.methods import method_for
    from longext.models import load_tokenizer

    began = time.perf_counter()
    recipe = resolved.recipe
    setup = method_for(recipe.method.kind).setup(recipe, resolved.rope)
    training_data(recipe, load_tokenizer(resolved.model_dir), setup)
    return time.perf_counter() - began


def prepare_data(resolved, console):
    """`longext data prepare`: build or check every cache of the run with a progress bar, print the summary of the
    corpus (and the method's own line: LongRecipe's selection); returns the Corpus."""
    from longext.data.prepare import build_progress, prepare_corpus
    from longext.data.summary import render_summary
    from longext.methods import method_for
    from longext.models import load_tokenizer

    recipe = resolved.recipe
    tokenizer = load_tokenizer(resolved.model_dir)
    with build_progress(console.is_terminal) as (progress, say):
        corpus = prepare_corpus(recipe.data, tokenizer, recipe.seq_len, recipe.train.seed, recipe.model.path,
                                progress=progress, say=say)
    training_data(recipe, tokenizer, method_for(recipe.method.kind).setup(recipe, resolved.rope))
    for item in render_summary(corpus, recipe):
        console.print(item, markup=False) if isinstance(item, str) else console.print(item)
    return corpus
