"""Every standard RoPE kind: the model longext builds gives the same cos/sin as stock transformers for the
same config, and both agree with the formulas written out independently here (methods.md §2)."""

from __future__ import annotations

import math

import pytest
import torch

from longext.recipe import validate_recipe
from longext.rope import apply_rope_config, legacy_rope_keys, ntk_theta, rope_state

L0, TARGET, DIM, THETA = 128, 512, 16, 10000.0


def recipe(rope: dict, target: int = TARGET):
    return validate_recipe(
        {"name": "r", "model": {"path": "unused"}, "method": {"kind": "standard", "target_len": target},
         "rope": rope, "train": {"steps": 1}},
        "test.yaml",
    )


def stock_config(**rope_parameters):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, num_hidden_layers=1,
        vocab_size=64, max_position_embeddings=L0, rope_parameters={"rope_type": "default", "rope_theta": THETA, **rope_parameters},
    )


def longext_model(rope: dict):
    """The model as longext builds it: rope_state -> config -> model."""
    from transformers import LlamaForCausalLM

    config = stock_config()
    state = rope_state(recipe(rope), config)
    apply_rope_config(config, state)
    return LlamaForCausalLM(config), state


def cos_sin(model, positions: torch.Tensor):
    x = torch.zeros(1, positions.shape[-1], DIM)
    return model.model.rotary_emb(x, positions[None])


def reference_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, scale: float = 1.0):
    angles = positions[:, None].double() * inv_freq[None, :].double()
    emb = torch.cat([angles, angles], dim=-1)
    return (emb.cos() * scale).float(), (emb.sin() * scale).float()


def default_inv_freq(theta: float = THETA) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, DIM, 2, dtype=torch.float64) / DIM)


def yarn_inv_freq(s: float, beta_fast: float = 32, beta_slow: float = 1) -> torch.Tensor:
    """NTK-by-parts, YaRN paper §3.2 in the form of its reference code (methods.md §2.4)."""
    base = default_inv_freq()

    def pair(rotations: float) -> float:
        return DIM * math.log(L0 / (rotations * 2 * math.pi)) / (2 * math.log(THETA))

    low, high = max(math.floor(pair(beta_fast)), 0), min(math.ceil(pair(beta_slow)), DIM - 1)
    ramp = ((torch.arange(DIM // 2, dtype=torch.float64) - low) / max(high - low, 1e-3)).clamp(0, 1)
    keep = 1 - ramp
    return base / s * (1 - keep) + base * keep


def llama3_inv_freq(s: float, low_f: float = 1.0, high_f: float = 4.0) -> torch.Tensor:
    base = default_inv_freq()
    wavelength = 2 * math.pi / base
    out = torch.where(wavelength > L0 / low_f, base / s, base)
    w = (L0 / wavelength - low_f) / (high_f - low_f)
    blended = (1 - w) * base / s + w * base
    middle = (wavelength >= L0 / high_f) & (wavelength <= L0 / low_f)
    return torch.where(middle, blended, out)


POSITIONS = torch.arange(0, TARGET, 7)

CASES = {
    "linear": ({"kind": "linear"}, lambda: (default_inv_freq() / 4, 1.0)),
    "ntk": ({"kind": "ntk"}, lambda: (default_inv_freq(THETA * 4 ** (DIM / (DIM - 2))), 1.0)),
    "yarn": ({"kind": "yarn"}, lambda: (yarn_inv_freq(4.0), 0.1 * math.log(4.0) + 1)),
    "llama3": ({"kind": "llama3", "factor": 4.0}, lambda: (llama3_inv_freq(4.0), 1.0)),
    "none+theta": ({"kind": "none", "theta": 5.0e5}, lambda: (default_inv_freq(5.0e5), 1.0)),
    "linear x2.5": ({"kind": "linear", "factor": 2.5}, lambda: (default_inv_freq() / 2.5, 1.0)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_longext_rope_equals_the_formula(name):
    rope, reference = CASES[name]
    model, _ = longext_model(rope)
    inv_freq, scale = reference()
    cos, sin = cos_sin(model, POSITIONS)
    want_cos, want_sin = reference_cos_sin(inv_freq, POSITIONS, scale)
    torch.testing.assert_close(cos[0], want_cos, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(sin[0], want_sin, atol=2e-5, rtol=1e-5)


STOCK = {
    "linear": ({"kind": "linear"}, {"rope_type": "linear", "factor": 4.0}, TARGET),
    "yarn": ({"kind": "yarn"}, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": L0}, TARGET),
    "llama3": (
        {"kind": "llama3"},
        {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": L0},
        TARGET,
    ),
    "dynamic": ({"kind": "dynamic"}, {"rope_type": "dynamic", "factor": 4.0}, L0),
}


@pytest.mark.parametrize("name", list(STOCK))
def test_longext_rope_equals_stock_transformers_for_the_same_config(name):
    from transformers import LlamaForCausalLM

    rope, stock_params, max_positions = STOCK[name]
    ours, state = longext_model(rope)
    config = stock_config(**stock_params)
    config.max_position_embeddings = max_positions
    stock = LlamaForCausalLM(config)
    assert state.max_position_embeddings == max_positions
    for length in (L0 // 2, L0, TARGET):  # dynamic only changes past L0
        positions = torch.arange(length)
        for a, b in zip(cos_sin(ours, positions), cos_sin(stock, positions)):
            torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_dynamic_ntk_grows_the_base_past_the_original_window_only():
    model, state = longext_model({"kind": "dynamic"})
    assert state.max_position_embeddings == L0  # raising it to the target would switch scaling off
    short = tuple(t[0] for t in cos_sin(model, torch.arange(L0)))
    torch.testing.assert_close(short, reference_cos_sin(default_inv_freq(), torch.arange(L0)), atol=2e-5, rtol=1e-5)
    length = TARGET
    theta = THETA * ((4.0 * length / L0) - 3.0) ** (DIM / (DIM - 2))  # HF's dynamic rule, methods.md §2.3
    torch.testing.assert_close(
        tuple(t[0] for t in cos_sin(model, torch.arange(length))), reference_cos_sin(default_inv_freq(theta), torch.arange(length)), atol=2e-5, rtol=1e-5
    )


def test_worked_numbers_from_the_methods_spec():
    assert ntk_theta(1e4, 4, 128) == pytest.approx(40_890, rel=1e-4)  # Llama-2, s=4
    assert ntk_theta(1e4, 32, 128) == pytest.approx(338_097, rel=1e-4)


def test_legacy_keys_describe_the_same_setting():
    keys = legacy_rope_keys({"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e5, "original_max_position_embeddings": 8192})
    assert keys["rope_theta"] == 1e5
    assert keys["rope_scaling"] == {"rope_type": "yarn", "type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8192}
    assert legacy_rope_keys({"rope_type": "default", "rope_theta": 1e4}) == {"rope_theta": 1e4, "rope_scaling": None}


def test_stacking_a_scaling_on_an_already_scaled_model_is_refused():
    from longext.errors import LongextError

    config = stock_config()
    config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": THETA}
    with pytest.raises(LongextError, match="already uses rope_type 'linear'"):
        rope_state(recipe({"kind": "yarn"}), config)


def test_factor_auto_is_target_over_original_window():
    _, state = longext_model({"kind": "linear"})
    assert state.factor == TARGET / L0
    assert state.parameters == {"rope_type": "linear", "factor": 4.0, "rope_theta": THETA}
