"""The document mask at the model level: every token's loss in a packed row equals the same document's loss run
alone with the same positions (fp32, <= 1e-5), for sdpa and eager on CPU and for the flash varlen inputs (through a
reference varlen kernel registered with transformers); the rows come from the real pipeline (cache → pack →
TrainData)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from longext.data.masks import block_causal_mask, flash_varlen_kwargs, flatten_rows, model_inputs

SEQ = 48
DOC_CHARS = (20, 60, 35, 90, 15, 45, 130, 25, 70, 40, 20, 160, 50, 30, 60, 25)  # rows hold several documents


@pytest.fixture(scope="module")
def short_docs(tmp_path_factory):
    from conftest import synthetic_text

    path = tmp_path_factory.mktemp("short-docs") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": synthetic_text(60, seed=100 + i)[:n]}) + "\n"
                            for i, n in enumerate(DOC_CHARS)))
    return path


@pytest.fixture(scope="module")
def packed_batches(short_docs, tiny_tokenizer):
    """Two micro-batches of 2 rows with document mask on, from a jsonl of short documents."""
    from longext.data.batches import TrainData
    from longext.data.prepare import prepare_corpus
    from longext.recipe.data import DataSpec

    corpus = prepare_corpus(DataSpec(train=[str(short_docs)]), tiny_tokenizer, SEQ, seed=0)
    data = TrainData(corpus.rows, micro_batch_size=2, seed=3, document_mask=True)
    batches = [data.micro_batch(i) for i in range(2)]
    assert all(int(b["segment_ids"].max()) >= 2 for b in batches)  # every row pair packs 3+ document pieces
    return batches


def _model(tokenizer, attn: str, harpe: bool = False):
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = tiny_config("llama", vocab_size=len(tokenizer), initializer_range=0.2)  # peaked attention
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn).eval()
    if harpe:  # a RoPE base per key/value head: document_mask auto is on for HARPE too
        from longext.methods.harpe import apply_harpe

        apply_harpe(model, [2e3, 5e4])
    return model


def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[b, L] next-token losses (0 where the target is -100)."""
    shifted = F.pad(labels[:, 1:], (0, 1), value=-100)
    return F.cross_entropy(logits.float().transpose(1, 2), shifted, ignore_index=-100, reduction="none")


def _alone_losses(model, batch) -> torch.Tensor:
    """Each document piece run by itself with positions 0.. and its own labels; laid out like the packed row."""
    out = torch.zeros(batch["input_ids"].shape)
    for r, segments in enumerate(batch["segment_ids"]):
        for s in segments.unique():
            where = (segments == s).nonzero().flatten()
            ids, labels = batch["input_ids"][r, where][None], batch["labels"][r, where].clone()[None]
            labels[0, 0] = -100  # the piece's first token has no context of its own (as in the packed row)
            with torch.no_grad():
                logits = model(input_ids=ids, position_ids=torch.arange(len(where))[None]).logits
            out[r, where] = _token_losses(logits, labels)[0]
    return out


@pytest.mark.parametrize(("attn", "harpe"), [("sdpa", False), ("eager", False), ("sdpa", True), ("eager", True)])
def test_every_packed_token_has_the_loss_of_its_document_alone(packed_batches, tiny_tokenizer, attn, harpe):
    model = _model(tiny_tokenizer, attn, harpe)
    for batch in packed_batches:
        inputs = model_inputs(batch, attn, torch.float32)
        with torch.no_grad():
            result = model(**inputs)
        packed = _token_losses(result.logits, batch["labels"])
        alone = _alone_losses(model, batch)
        assert torch.allclose(packed, alone, atol=1e-5, rtol=0), (packed - alone).abs().max()
        counted = batch["labels"][:, 1:] != -100
        assert result.loss.item() == pytest.approx(alone[:, :-1][counted].mean().item(), abs=1e-5)  # what train logs


def test_without_the_mask_later_documents_see_earlier_ones(packed_batches, tiny_tokenizer):
    """The control: plain causal attention over the same packed row differs from the documents alone."""
    model = _model(tiny_tokenizer, "sdpa")
    batch = packed_batches[0]
    with torch.no_grad():
        logits = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}).logits
    later = batch["segment_ids"] > 0
    gap = (_token_losses(logits, batch["labels"]) - _alone_losses(model, batch))[later].abs().max()
    assert gap > 1e-2


def _varlen_reference(module, query, key, value, attention_mask, scaling=None, dropout=0.0, cu_seq_lens_q=None,
                      cu_seq_lens_k=None, max_length_q=None, max_length_k=None, **kwargs):
    """flash_attn_varlen_func's contract in plain torch: causal attention inside each cu_seqlens piece."""
    assert attention_mask is None and query.shape[0] == 1 and torch.equal(cu_seq_lens_q, cu_seq_lens_k)
    assert max_length_q == int(cu_seq_lens_q.diff().max())
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    out = torch.empty_like(query)
    for a, b in zip(cu_seq_lens_q[:-1].tolist(), cu_seq_lens_q[1:].tolist()):
        out[:, :, a:b] = F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b],
                                                        is_causal=True, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def test_flash_varlen_inputs_give_each_document_its_own_loss(packed_batches, tiny_tokenizer):
    """The flash path on CPU: flattened rows + cu_seq_lens reach the attention kernel through transformers, and a
    kernel that honours them (the varlen contract, in torch) gives every token its document-alone loss."""
    from transformers import AttentionInterface

    AttentionInterface.register("longext_varlen_reference", _varlen_reference)
    model, alone_model = _model(tiny_tokenizer, "longext_varlen_reference"), _model(tiny_tokenizer, "sdpa")
    for batch in packed_batches:
        inputs = model_inputs(batch, "flash_attention_2")
        assert inputs["input_ids"].shape == (1, 2 * SEQ) and inputs["attention_mask"] is None
        with torch.no_grad():
            logits = model(**inputs).logits
        packed = _token_losses(logits, inputs["labels"]).view(2, SEQ)
        assert torch.allclose(packed, _alone_losses(alone_model, batch), atol=1e-5, rtol=0)


def test_flash_kwargs_match_transformers_own_from_restarting_positions(packed_batches):
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    for batch in packed_batches:
        ours = flash_varlen_kwargs(batch["segment_ids"])
        (cu, _), (longest, _) = prepare_fa_kwargs_from_position_ids(flatten_rows(batch)["position_ids"])
        assert torch.equal(ours["cu_seq_lens_q"], cu) and ours["max_length_q"] == int(longest)
        assert ours["cu_seq_lens_q"].dtype == torch.int32


def test_block_causal_mask_against_a_dense_loop():
    segments = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 1, 1]])
    mask = block_causal_mask(segments)
    for b in range(2):
        for i in range(6):
            for j in range(6):
                assert mask[b, 0, i, j] == (j <= i and segments[b, i] == segments[b, j])


def test_positions_restart_and_first_tokens_are_not_targets(packed_batches):
    for batch in packed_batches:
        seg, pos, labels = batch["segment_ids"], batch["position_ids"], batch["labels"]
        starts = torch.ones_like(seg, dtype=torch.bool)
        starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
        assert (pos[starts] == 0).all() and (pos[~starts] > 0).all()
        assert (pos[:, 1:][~starts[:, 1:]] == pos[:, :-1][~starts[:, 1:]] + 1).all()
        assert (labels[starts] == -100).all() and (labels[~starts] != -100).all()


def test_rows_of_one_document_piece_each_keep_the_plain_inputs(packed_batches):
    batch = {**packed_batches[0], "segment_ids": torch.zeros_like(packed_batches[0]["segment_ids"])}
    for attn in ("sdpa", "eager", "flash_attention_2", "flex_attention"):
        inputs = model_inputs(batch, attn)
        assert inputs.keys() == {"input_ids", "attention_mask", "labels", "position_ids"}
        assert all(inputs[k] is batch[k] for k in inputs)


def test_other_kernels_are_refused_in_one_line(packed_batches):
    from longext.errors import LongextError

    with pytest.raises(LongextError, match="no document mask for attention 'flex_attention' yet"):
        model_inputs(packed_batches[0], "flex_attention")


@pytest.mark.parametrize("tiled_loss", [False, True])
def test_train_logs_the_loss_of_the_documents_alone(tmp_path, short_docs, tiny_model_dir, tiled_loss):
    """End to end: `longext train` with document_mask auto (on for the standard method) logs, at step 1 (LoRA B = 0),
    the mean token loss of the stock model run on each document piece alone; also through the tiled loss path."""
    from helpers import losses, write_recipe
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from longext.cli import main
    from longext.data.prepare import build_train_data
    from longext.resolve import resolve
    from longext.recipe import load_recipe

    path = write_recipe(tmp_path, tiny_model_dir, short_docs, train={"steps": 1, "tiled_loss": tiled_loss},
                        data={"seq_len": SEQ})
    recipe = resolve(load_recipe(path)).recipe
    assert recipe.data.document_mask is True
    assert main(["train", str(path)]) == 0
    got = losses(recipe.run_dir)[1]
    batch = build_train_data(recipe, AutoTokenizer.from_pretrained(tiny_model_dir)).micro_batch(0)
    assert int(batch["segment_ids"].max()) >= 1  # the first micro-batch packs several documents
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 1.0e4}  # target_len 256 / L0 128
    stock = AutoModelForCausalLM.from_pretrained(tiny_model_dir, config=config, dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    alone = _alone_losses(stock, batch)
    counted = batch["labels"][:, 1:] != -100
    assert got == pytest.approx(alone[:, :-1][counted].mean().item(), rel=1e-5)
    with torch.no_grad():
        whole = stock(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels", "position_ids")}).loss.item()
    assert abs(whole - got) > 1e-5  # the unmasked row would have logged something else


def test_the_kernel_under_ulysses_masks_documents_from_the_whole_sequence_ids():
    """longext.data.masks.document_attention, the kernel Ulysses calls after its all-to-all (q/k/v of the whole
    sequence, no mask, whole-sequence document_ids): sdpa gets the block-causal mask; flash gets the rows flattened
    with their varlen boundaries (through the reference varlen kernel). Both equal sdpa under the 4D mask."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from longext.data.masks import DOCUMENT_KEY, document_attention

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 12, 8, generator=gen) for h in (4, 2, 2))
    ids = torch.tensor([[0] * 5 + [1] * 7, [0] * 9 + [1] * 2 + [2]])
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal, module.training = 2, True, False
    want, _ = sdpa_attention_forward(module, q, k, v, block_causal_mask(ids))
    for core, flash in ((sdpa_attention_forward, False), (_varlen_reference, True)):
        got, _ = document_attention(core, flash)(module, q, k, v, None, **{DOCUMENT_KEY: ids})
        assert torch.allclose(got, want, atol=1e-6), (core.__name__, (got - want).abs().max())
    plain, _ = document_attention(sdpa_attention_forward, False)(module, q, k, v, None)  # no ids: the kernel as is
    assert torch.equal(plain, sdpa_attention_forward(module, q, k, v, None)[0])
