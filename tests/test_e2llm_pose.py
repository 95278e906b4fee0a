"""E2-LLM and PoSE runs end to end on a tiny model: train, evaluate with the inference rule, export."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import write_recipe
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
    from longext.models import load_target
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
    from longext.models import load_target

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
