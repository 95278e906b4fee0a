"""E2-LLM and PoSE runs end to end on a tiny model: train, evaluate with the inference rule, export."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import losses, write_recipe
from longext.errors import LongextError
from longext.recipe import load_recipe
from longext.train import run_training


@pytest.fixture(scope="module")
def e2llm_run(tmp_path_factory, tiny_model_dir, corpus_dir):
    tmp = tmp_path_factory.mktemp("e2llm")
    path = write_recipe(
        tmp, tiny_model_dir, corpus_dir, name="e2", method={"kind": "e2llm", "target_len": 512},
        rope={"kind": "none"}, data={"seq_len": "auto"}, train={"steps": 3, "lr": 1.0e-2},
    )
    return run_training(load_recipe(path))


def test_e2llm_run_records_its_scales_and_rule(e2llm_run):
    rope = json.loads((e2llm_run / "rope.json").read_text())
    assert rope["extra"] == {"method": "e2llm", "scales": [1.0, 2.0, 3.0, 4.0], "eval_rule": "ceil", "sink_tokens": 4}
    recipe = load_recipe(e2llm_run / "recipe.yaml")
    assert recipe.data.seq_len == 128 and recipe.method.g_max == 4  # R = L0, g_max = ceil(512 / 128)


def test_eval_applies_the_inference_rule_per_length(e2llm_run):
    from longext.targets import load_target
    from longext.rotary import ScaledRotary

    loaded = load_target(e2llm_run)
    rotary = loaded.model.get_base_model().model.rotary_emb
    assert isinstance(rotary, ScaledRotary)
    for length, g in ((100, 1.0), (128, 1.0), (200, 2.0), (384, 3.0), (512, 4.0)):
        loaded.set_length(length)
        assert rotary.scale == g


def test_export_writes_standard_pi_for_the_chosen_window(e2llm_run, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from longext.export import run_export
    from longext.targets import load_target

    with pytest.raises(LongextError, match="--length: an E2-LLM run serves any window"):
        run_export(e2llm_run, tmp_path / "none")
    result = run_export(e2llm_run, tmp_path / "x384", length=384)
    config = AutoConfig.from_pretrained(tmp_path / "x384")
    assert config.rope_parameters["rope_type"] == "linear" and config.rope_parameters["factor"] == 3.0
    assert config.max_position_embeddings == 384
    assert result.max_abs_diff < 1e-4
    # independently: plain transformers on the export == longext's model at g = 3 on a long sequence
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "x384", dtype=torch.float32).eval()
    loaded = load_target(e2llm_run)
    loaded.set_length(384)
    ids = torch.randint(0, plain.config.vocab_size, (1, 384), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (plain(ids).logits - loaded.model(input_ids=ids).logits).abs().max()
    assert diff < 1e-4


def test_e2llm_refuses_a_second_rope_scaling(tmp_path, tiny_model_dir, corpus_dir):
    from longext.errors import RecipeError

    path = write_recipe(tmp_path, tiny_model_dir, corpus_dir, method={"kind": "e2llm", "target_len": 512}, rope={"kind": "yarn"})
    with pytest.raises(RecipeError, match="rope.kind: E2-LLM brings its own position interpolation"):
        load_recipe(path)


def test_pose_run_trains_at_the_short_window(tmp_path, tiny_model_dir, corpus_dir):
    path = write_recipe(
        tmp_path, tiny_model_dir, corpus_dir, name="pose", method={"kind": "pose", "target_len": 512, "chunks": 2},
        rope={"kind": "linear"}, data={"seq_len": "auto"}, train={"steps": 2},
    )
    run = run_training(load_recipe(path))
    rope = json.loads((run / "rope.json").read_text())
    assert rope["extra"] == {"method": "pose", "chunks": 2}
    assert rope["parameters"]["factor"] == 4.0
    assert load_recipe(run / "recipe.yaml").data.seq_len == 128
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


# ------------------------------------------------------------------ step-1 loss against stock transformers
# LoRA B starts at zero, so the model of a run's first step is the base model with the run's RoPE: its logged
# step-1 loss must be stock transformers' loss on the same micro-batch with that RoPE and those positions.
BATCH_KEYS = ("input_ids", "attention_mask", "labels", "position_ids")


@pytest.fixture(scope="module")
def peaked_model_dir(tmp_path_factory, tiny_tokenizer):
    """The tiny Llama with larger weights (as in test_sp): attention is peaked, so positions move the loss."""
    from conftest import build_tiny_model

    d = tmp_path_factory.mktemp("peaked-llama")
    build_tiny_model("llama", vocab_size=len(tiny_tokenizer), initializer_range=0.2).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


def first_micro_batch(path, sampler) -> dict:
    from transformers import AutoTokenizer

    from longext.data import build_train_data
    from longext.resolve import resolve

    recipe = resolve(load_recipe(path)).recipe
    return build_train_data(recipe, AutoTokenizer.from_pretrained(recipe.model.path), sampler).micro_batch(0)


def stock_loss(model_dir, rope_parameters: dict, batch: dict, position_ids=None) -> float:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    config.rope_parameters = rope_parameters
    model = AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    inputs = {k: batch[k] for k in BATCH_KEYS}
    inputs["position_ids"] = batch["position_ids"] if position_ids is None else position_ids
    with torch.no_grad():
        return model(**inputs).loss.item()


def test_pose_first_loss_is_transformers_loss_with_the_skipped_positions(tmp_path, peaked_model_dir, corpus_dir):
    from longext.methods.pose import pose_sampler

    path = write_recipe(
        tmp_path, peaked_model_dir, corpus_dir, name="pose1", method={"kind": "pose", "target_len": 512, "chunks": 2},
        rope={"kind": "linear"}, data={"seq_len": "auto"}, train={"steps": 1},
    )
    got = losses(run_training(load_recipe(path)))[1]
    batch = first_micro_batch(path, pose_sampler(512, 2))
    positions = batch["position_ids"][0]
    assert positions.shape == (128,) and positions[0] == 0 and positions[-1] < 512
    assert positions[-1] > 127  # positions really skip: this batch can tell them from 0..127
    linear = {"rope_type": "linear", "factor": 4.0, "rope_theta": 1.0e4}  # factor target_len / L0 = 512 / 128
    want = stock_loss(peaked_model_dir, linear, batch)
    assert got == pytest.approx(want, rel=1e-6)
    contiguous = stock_loss(peaked_model_dir, linear, batch, position_ids=torch.arange(128)[None])
    unscaled = stock_loss(peaked_model_dir, {"rope_type": "default", "rope_theta": 1.0e4}, batch)
    assert abs(contiguous - want) > 1e-3 and abs(unscaled - want) > 1e-3  # dropped positions or rope would show


def test_e2llm_first_loss_is_transformers_pi_at_the_drawn_scale(tmp_path, peaked_model_dir, corpus_dir):
    from longext.methods.e2llm import e2llm_sampler

    path = write_recipe(
        tmp_path, peaked_model_dir, corpus_dir, name="e2first", method={"kind": "e2llm", "target_len": 512},
        rope={"kind": "none"}, data={"seq_len": "auto"}, train={"steps": 1},
    )
    got = losses(run_training(load_recipe(path)))[1]
    batch = first_micro_batch(path, e2llm_sampler(128, 128, 4, None, 4))  # L0, R, g_max, scales, sink tokens
    g = float(batch["rope_scale"][0])
    positions = batch["position_ids"][0]
    offset = int(positions[4] - 4)
    assert g in (2.0, 3.0, 4.0) and offset > 0  # a draw that can tell scaled, shifted positions from plain ones
    assert torch.equal(positions, torch.cat([torch.arange(4), torch.arange(4, 128) + offset]))
    # RoPE at (m + t) / g: stock linear PI with factor g multiplies every angle by 1/g, the same thing (no
    # longext rotary module needed on the reference)
    want = stock_loss(peaked_model_dir, {"rope_type": "linear", "factor": g, "rope_theta": 1.0e4}, batch)
    assert got == pytest.approx(want, rel=1e-6)
    plain = {"rope_type": "default", "rope_theta": 1.0e4}
    contiguous = stock_loss(peaked_model_dir, plain, batch, position_ids=torch.arange(128)[None])
    unscaled = stock_loss(peaked_model_dir, plain, batch)  # the offset kept, the scale (before_forward) dropped
    assert abs(contiguous - want) > 1e-3 and abs(unscaled - want) > 1e-3
