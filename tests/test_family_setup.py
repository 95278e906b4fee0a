"""The model families' set-up around training (longext.families): LoRA targets per family and the experts switch,
the one-line refusals, the dry-run notes, LongRoPE's automatic factors, Gemma 2's soft-capped logits in the tiled
loss, and `longext plan` for mixtures of experts (the published sizes; the MoE block's saved tensors)."""

from __future__ import annotations

import pytest
import torch

from conftest import build_tiny_model
from helpers import tokens, write_recipe
from longext.errors import LongextError
from test_families import TARGET, saved_family_model


# ------------------------------------------------------------------------------ LoRA and refusals
@pytest.mark.parametrize("arch, targets", [("llama", QKVO := ["q_proj", "k_proj", "v_proj", "o_proj"]),
                                           ("mistral", QKVO), ("qwen2", QKVO), ("qwen3", QKVO), ("gemma2", QKVO),
                                           ("gemma3_text", QKVO), ("olmo2", QKVO), ("mixtral", QKVO),
                                           ("qwen3_moe", QKVO), ("phi3", ["qkv_proj", "o_proj"])])
def test_lora_targets_auto_are_the_attention_projections(arch, targets):
    """targets: auto (the default) is exactly q/k/v/o for the llama-like families (today's default list) and Phi-3's
    fused qkv_proj + o_proj; for a mixture of experts the experts and the router stay untouched."""
    from longext.families import lora_targets
    from longext.models import add_lora
    from longext.recipe import LoraSpec

    assert LoraSpec().targets == "auto"
    model = build_tiny_model(arch)
    assert lora_targets(model.config) == targets
    peft_model = add_lora(model, LoraSpec(r=2))
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in peft_model.named_parameters() if "lora_A" in n}
    assert adapted == set(targets)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert all("lora_" in n for n in trainable) and not any("experts" in n or ".gate." in n for n in trainable)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_lora_on_the_experts_is_a_switch_and_never_touches_the_router(arch):
    """lora.experts: true adapts every expert's gate_up_proj and down_proj through peft's target_parameters (one
    rank-r pair per expert weight, as the plan counts it); the router's weight stays frozen and unadapted; B = 0 at
    the start, so the model is unchanged until it trains."""
    from longext.models import add_lora
    from longext.plan import Dims, lora_params
    from longext.recipe import LoraSpec

    model = build_tiny_model(arch)
    ids = tokens(40)
    with torch.no_grad():
        before = model(ids).logits
    peft_model = add_lora(model, LoraSpec(r=2, experts=True))
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any("experts" in n for n in names) and not any(".gate." in n for n in names)
    with torch.no_grad():
        assert (peft_model(ids).logits - before).abs().max() < 1e-6
    dims = Dims.from_config(model.config)
    count = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert count == lora_params(dims, ["q_proj", "k_proj", "v_proj", "o_proj"], 2, experts=True)
    with pytest.raises(LongextError, match="lora.experts: Llama has no experts"):
        add_lora(build_tiny_model("llama"), LoraSpec(r=2, experts=True))


def test_one_line_refusals(capsys, tmp_path, corpus_dir):
    """LongGen on Gemma (already a local/global hybrid), SDPA on Gemma 2 (soft-capped scores), a RoPE scaling
    Phi-3's config cannot hold, the fused norm on a family whose RMSNorm is not Llama's: one line each, exit 2."""
    from helpers import bad_input

    gemma = saved_family_model(tmp_path, "gemma3_text")
    for arch in ("gemma2", "phi3", "olmo2"):
        saved_family_model(tmp_path, arch)
    capsys.readouterr()  # saving the models printed progress bars
    path = write_recipe(tmp_path, gemma, corpus_dir, name="lg", method={"kind": "longgen", "target_len": TARGET},
                        rope={"kind": "none"})
    (line,) = bad_input(capsys, "train", path, "--dry-run")
    assert "method.kind: longgen does not apply to Gemma 3: Gemma 3 already interleaves sliding-window" in line
    path = write_recipe(tmp_path, saved_family_model(tmp_path, "gemma2"), corpus_dir, name="sdpa",
                        model={"path": str(tmp_path / "model-gemma2"), "attn_implementation": "sdpa"})
    (line,) = bad_input(capsys, "train", path, "--dry-run")
    assert "model.attn_implementation: Gemma 2 cannot run sdpa" in line
    path = write_recipe(tmp_path, saved_family_model(tmp_path, "phi3"), corpus_dir, name="phi", rope={"kind": "yarn"})
    (line,) = bad_input(capsys, "train", path, "--dry-run")
    assert "rope.kind: yarn is not available for Phi-3: its config accepts rope_type default and longrope only" in line
    path = write_recipe(tmp_path, saved_family_model(tmp_path, "olmo2"), corpus_dir, name="norm", train={"fused_norm": True})
    (line,) = bad_input(capsys, "train", path, "--dry-run")
    assert "train.fused_norm: OLMo 2's RMSNorm (Olmo2RMSNorm) computes the norm differently" in line
    path = write_recipe(tmp_path, saved_family_model(tmp_path, "phi3"), corpus_dir, name="lr",
                        rope={"kind": "longrope", "long_factor": [2.0, 3.0]})
    (line,) = bad_input(capsys, "train", path, "--dry-run")
    assert "rope.long_factor: expected 8 numbers (one per rotary pair" in line


@pytest.mark.parametrize("arch, note", [
    ("gemma3_text", "the RoPE of the 1 full-attention layers (of 2) is extended; the 1 sliding-window layers"),
    ("mixtral", "LoRA on q_proj, k_proj, v_proj, o_proj: attention only (lora.experts: false); the router is not"),
])
def test_dry_run_says_which_layers_and_weights_the_run_changes(capsys, tmp_path, corpus_dir, arch, note):
    from longext.cli import main

    path = write_recipe(tmp_path, saved_family_model(tmp_path, arch), corpus_dir, rope={"kind": "yarn"})
    assert main(["train", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert note in out


# ------------------------------------------------------------------------------------ RoPE details
def test_longrope_auto_long_factors_are_yarns_frequencies():
    """longrope's long_factor auto = YaRN's per-pair divisors: base frequency / divisor equals transformers' YaRN
    inverse frequencies, for Llama-2-like and Llama-3-like settings."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from longext.rope import yarn_divisors

    for theta, L0_, factor, dim in ((1e4, 4096, 8.0, 128), (5e5, 8192, 16.0, 128), (1e4, 128, 2.0, 16)):
        config = LlamaConfig(hidden_size=dim * 4, num_attention_heads=4, max_position_embeddings=L0_ * int(factor),
                             rope_parameters={"rope_type": "yarn", "factor": factor, "rope_theta": theta,
                                              "original_max_position_embeddings": L0_})
        want, _ = ROPE_INIT_FUNCTIONS["yarn"](config)
        base = 1.0 / theta ** (torch.arange(0, dim, 2).float() / dim)
        got = base / torch.tensor(yarn_divisors(theta, factor, L0_, dim))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


def test_the_tiled_loss_soft_caps_gemma2_logits_as_transformers_does():
    """Gemma 2's final logit soft-capping inside longext.sp's tiled loss: the same loss as transformers'."""
    import torch.nn.functional as F

    from longext.sp import token_loss_sum

    model = build_tiny_model("gemma2", initializer_range=0.2)
    assert model.config.final_logit_softcapping == 30.0
    ids = tokens(96)
    with torch.no_grad():
        want = model(input_ids=ids, labels=ids).loss
        shifted = F.pad(ids[:, 1:], (0, 1), value=-100)
        hidden = model.model(input_ids=ids).last_hidden_state
        got = token_loss_sum(model.lm_head, hidden, shifted, 3, 30.0) / (shifted != -100).sum()
        plain = token_loss_sum(model.lm_head, hidden, shifted, 3) / (shifted != -100).sum()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert abs(plain - want) > 1e-4


# --------------------------------------------------------------------------------------- the plan
@pytest.mark.parametrize("recipe, total, active, experts", [
    ("recipes/mixtral-8x7b-plan.yaml", 46.70e9, 12.75e9, 45.10e9),
    ("recipes/qwen3-30b-a3b-plan.yaml", 30.53e9, 3.04e9, 28.99e9),
])
def test_plan_breaks_a_mixture_of_experts_down(recipe, total, active, experts):
    """The published sizes (Mixtral-8x7B 46.7B with 12.9B active, Qwen3-30B-A3B 30.5B with 3.3B active, both with
    the embeddings) from config.json alone: the experts hold almost everything, a token multiplies with its router
    and top-k experts only; LoRA adapts the attention (lora.experts: false)."""
    from pathlib import Path

    from longext.plan import plan_resolved
    from longext.recipe import load_recipe
    from longext.resolve import resolve

    root = Path(__file__).resolve().parent.parent
    est, _ = plan_resolved(resolve(load_recipe(root / recipe)), gpus=8, budget=80 * 10**9)
    parts = dict(est.breakdown)
    assert est.params == pytest.approx(total, rel=1e-3) and est.active == pytest.approx(active, rel=1e-3)
    assert parts["experts"] == pytest.approx(experts, rel=1e-3) and sum(parts.values()) == est.params
    assert parts["router"] < 1e-3 * est.params and est.fits
    assert est.trainable < 1e-3 * est.params  # LoRA on the attention only


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("experts", [False, True])
def test_the_plan_counts_what_a_moe_block_saves_for_backward(arch, experts):
    """The plan's per-token MoE terms (longext.plan.activations) against the tensors autograd really saves in a
    transformers 5 MoE block (saved_tensors_hooks), at two lengths, attention-only LoRA and LoRA on the experts."""
    from longext.models import add_lora
    from longext.plan import Dims, Setup
    from longext.plan.activations import expert_weights_with_lora, moe_saved
    from longext.recipe import LoraSpec

    model = add_lora(build_tiny_model(arch), LoraSpec(r=8, experts=experts)).train()
    block = model.base_model.model.model.layers[0].mlp
    params = {p.data_ptr() for p in model.parameters()}
    dims = Dims.from_config(model.config)
    for T in (64, 160):
        seen = {}

        def pack(t):
            if t.data_ptr() not in params:
                seen[t.data_ptr(), tuple(t.shape)] = t.numel() * t.element_size()
            return t

        x = torch.randn(1, T, dims.hidden, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            block(x)
        s = Setup(seq_len=T, device="cpu", precision="fp32", lora_experts=experts)
        want = T * sum(b for _, b, _ in moe_saved(dims, s)) + expert_weights_with_lora(dims, s)
        assert sum(seen.values()) == pytest.approx(want, rel=1e-3), (T, sorted(seen.items()))
