"""The document mask under every method, one rank: every token's loss in a packed row equals the same document's loss
run alone with the same positions (fp32, <= 1e-5), for contiguous, PoSE, E2-LLM (its row's scale) and LongRecipe
positions, HARPE's per-head bases and LongGen's sparse layers (attn_sink and block_sparse, block and dense kernels);
the rows come from the real pipeline (token cache → pack, or LongRecipe's sentence cache → TrainData). Sequence
parallelism: tests/test_document_mask_sp.py."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from longext.data.masks import model_inputs

SEQ, TARGET, L0 = 48, 192, 128
DOC_CHARS = (20, 60, 35, 90, 15, 45, 130, 25, 70, 40, 20, 160, 50, 30, 60, 25)  # rows hold several documents
LONGGEN = {"longgen-sink": dict(full_layers=[1], sparse_type="attn_sink", sink_tokens=2, window=6),
           "longgen-block": dict(full_layers=[1], sparse_type="block_sparse", block_size=4, local_blocks=2,
                                 vert_stride=3, homo_head=True),
           "longgen-shifted": dict(full_layers=[0], sparse_type="block_sparse", block_size=4, local_blocks=2,
                                   vert_stride=3, homo_head=False)}
KINDS = ["contiguous", "pose", "e2llm", "longrecipe", "harpe", *LONGGEN, "longgen-sink-dense"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_tokenizer):
    from conftest import synthetic_text

    from longext.data.prepare import prepare_corpus
    from longext.recipe.data import DataSpec

    path = tmp_path_factory.mktemp("short-docs") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": synthetic_text(60, seed=200 + i)[:n]}) + "\n"
                            for i, n in enumerate(DOC_CHARS)))
    return prepare_corpus(DataSpec(train=[str(path)]), tiny_tokenizer, SEQ, seed=0)


def packed_data(kind: str, corpus, tokenizer):
    """TrainData with the document mask on and the method's sampler, over the real pipeline's rows."""
    from longext.data.batches import TrainData
    from longext.methods.e2llm import scale_set_sampler
    from longext.methods.pose import pose_sampler

    if kind == "longrecipe":
        from longext.methods.longrecipe.data import LongRecipeData
        from longext.methods.longrecipe.sentences import selected_rows
        from longext.recipe.methods import LongRecipeSelection

        selection = LongRecipeSelection(mode="digits", keep_other=0.6)
        rows = selected_rows(corpus, tokenizer, selection, 0, SEQ, None)
        return LongRecipeData(rows, 2, 3, TARGET, "composition", None, True, document_mask=True)
    samplers = {"pose": pose_sampler(TARGET, 3), "e2llm": scale_set_sampler(L0, [1.0, 2.0, 4.0], 2)}
    kwargs = {"positions": samplers[kind]} if kind in samplers else {}
    return TrainData(corpus.rows, micro_batch_size=2, seed=3, document_mask=True, **kwargs)


def method_model(kind: str, vocab: int):
    """A tiny fp32 Llama (sdpa) with the method's patch; peaked attention (initializer 0.2) so that a token that
    sees another document shows in its loss."""
    from conftest import build_tiny_model

    model = build_tiny_model("llama", vocab_size=vocab, initializer_range=0.2)
    model.set_attn_implementation("sdpa")
    if kind == "harpe":
        from longext.methods.harpe import apply_harpe

        apply_harpe(model, [2e3, 5e4])
    if kind == "e2llm":
        from longext.rotary import apply_scaled_rotary

        apply_scaled_rotary(model)
    if kind.startswith("longgen"):
        from longext.methods.longgen.modeling_longext_longgen import LongGenSpec, apply_longgen

        spec = dict(LONGGEN[kind.removesuffix("-dense")], kernel="dense" if kind.endswith("-dense") else "block")
        apply_longgen(model, LongGenSpec(**spec))
    return model


def set_scale(model, kind: str, scale) -> None:
    if kind == "e2llm":
        from longext.rotary import set_rope_scale

        set_rope_scale(model, scale)


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[b, L] next-token losses (0 where the target is -100)."""
    shifted = F.pad(labels[:, 1:], (0, 1), value=-100)
    return F.cross_entropy(logits.float().transpose(1, 2), shifted, ignore_index=-100, reduction="none")


def alone_losses(model, batch, kind: str) -> torch.Tensor:
    """Each document piece run by itself with the positions the packed row gave it (and its row's E2-LLM scale),
    laid out like the packed row. The explicit all-ones mask keeps transformers from reading jumps in the positions
    as packed sequences."""
    out = torch.zeros(batch["input_ids"].shape)
    for r, segments in enumerate(batch["segment_ids"]):
        for s in segments.unique():
            where = (segments == s).nonzero().flatten()
            ids, labels = batch["input_ids"][r, where][None], batch["labels"][r, where].clone()[None]
            set_scale(model, kind, batch["rope_scale"][r:r + 1] if "rope_scale" in batch else None)
            with torch.no_grad():
                logits = model(input_ids=ids, position_ids=batch["position_ids"][r, where][None],
                               attention_mask=torch.ones_like(ids)).logits
            out[r, where] = token_losses(logits, labels)[0]
    return out


def packed_losses(model, batch, kind: str) -> tuple[torch.Tensor, float]:
    """([b, L] token losses, transformers' loss) of the packed micro-batch with the document mask."""
    set_scale(model, kind, batch.get("rope_scale"))
    inputs = model_inputs(batch, model.config._attn_implementation, torch.float32)
    with torch.no_grad():
        result = model(**inputs)
    return token_losses(result.logits, batch["labels"]), result.loss.item()


@pytest.mark.parametrize("kind", KINDS)
def test_every_packed_token_has_the_loss_of_its_document_alone(kind, corpus, tiny_tokenizer):
    data = packed_data("contiguous" if kind.startswith("longgen") else kind, corpus, tiny_tokenizer)
    model = method_model(kind, len(tiny_tokenizer))
    for index in range(2):
        batch = data.micro_batch(index)
        assert int(batch["segment_ids"].max()) >= 2  # every row pair packs 3+ document pieces
        packed, loss = packed_losses(model, batch, kind)
        alone = alone_losses(model, batch, kind)
        assert torch.allclose(packed, alone, atol=1e-5, rtol=0), (packed - alone).abs().max()
        counted = batch["labels"][:, 1:] != -100
        assert loss == pytest.approx(alone[:, :-1][counted].mean().item(), abs=1e-5)  # what train logs


@pytest.mark.parametrize("kind", ["pose", "e2llm", "longrecipe", "longgen-sink"])
def test_without_the_mask_later_documents_see_earlier_ones(kind, corpus, tiny_tokenizer):
    """The control: the same rows and positions with whole-row attention differ from the documents alone."""
    data = packed_data("contiguous" if kind.startswith("longgen") else kind, corpus, tiny_tokenizer)
    model = method_model(kind, len(tiny_tokenizer))
    batch = data.micro_batch(0)
    set_scale(model, kind, batch.get("rope_scale"))
    with torch.no_grad():
        logits = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}).logits
    later = batch["segment_ids"] > 0
    assert (token_losses(logits, batch["labels"]) - alone_losses(model, batch, kind))[later].abs().max() > 1e-2


def test_positions_are_drawn_per_document(corpus, tiny_tokenizer):
    """Each document piece gets its own draw: positions restart at 0 (PoSE, LongRecipe, E2-LLM sinks), PoSE and
    LongRecipe positions stay increasing inside a piece and below their span, E2-LLM's stay below g * L0 at one
    scale per row."""
    from longext.data.batches import piece_lengths

    for kind in ("pose", "e2llm", "longrecipe"):
        batch = packed_data(kind, corpus, tiny_tokenizer).micro_batch(1)
        for r in range(2):
            at = 0
            for n in piece_lengths(batch["segment_ids"][r]):
                pos = batch["position_ids"][r, at:at + n]
                assert pos[0] == 0 and (pos.diff() > 0).all()
                limit = batch["rope_scale"][r] * L0 if kind == "e2llm" else TARGET
                assert pos[-1] < limit
                at += n


def test_without_the_mask_a_row_is_one_sample_as_before(corpus, tiny_tokenizer):
    """document_mask off: the samplers see one piece per row and draw exactly what they drew per row before."""
    from longext.data.batches import TrainData
    from longext.methods.pose import pose_sampler
    from longext.positions import pose_positions

    data = TrainData(corpus.rows, micro_batch_size=2, seed=3, positions=pose_sampler(TARGET, 3))
    batch = data.micro_batch(0)
    for j in range(2):
        gen = torch.Generator().manual_seed(3 * 7_919 + j)
        assert torch.equal(batch["position_ids"][j], pose_positions(SEQ, TARGET, 3, gen))
    assert "segment_ids" not in batch


def test_flash_inputs_keep_each_rows_e2llm_scale(corpus, tiny_tokenizer):
    """flash_attention_2 flattens the micro-batch to one row [1, b*L] (longext.data.masks): E2-LLM's scale, one
    per row, follows its row's tokens there (through the reference varlen kernel of tests/test_data_masks.py)."""
    from test_data_masks import _varlen_reference
    from transformers import AttentionInterface

    AttentionInterface.register("longext_varlen_reference", _varlen_reference)
    data = packed_data("e2llm", corpus, tiny_tokenizer)
    batch = next(b for b in map(data.micro_batch, range(20)) if b["rope_scale"][0] != b["rope_scale"][1])
    flash, plain = method_model("e2llm", len(tiny_tokenizer)), method_model("e2llm", len(tiny_tokenizer))
    flash.set_attn_implementation("longext_varlen_reference")
    inputs = model_inputs(batch, "flash_attention_2")
    set_scale(flash, "e2llm", batch["rope_scale"])
    with torch.no_grad():
        logits = flash(**inputs).logits
    packed = token_losses(logits, inputs["labels"]).view(2, SEQ)
    assert torch.allclose(packed, alone_losses(plain, batch, "e2llm"), atol=1e-5, rtol=0)
