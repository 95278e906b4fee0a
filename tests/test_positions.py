"""PoSE / E2-LLM samplers, the scaled rotary module, and the packed-sequence trap (issue 4)."""

from __future__ import annotations

import pytest
import torch

from longext.data import TrainData, pack
from longext.methods.e2llm import e2llm_sampler
from longext.methods.pose import pose_sampler
from longext.positions import e2llm_eval_scale, e2llm_positions, e2llm_scales, pose_positions
from longext.rotary import ScaledRotary, apply_scaled_rotary, set_rope_scale


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------- samplers
@pytest.mark.parametrize("chunks", [1, 2, 3, 5])
def test_pose_positions_are_increasing_chunks_inside_the_target(chunks):
    for seed in range(200):
        p = pose_positions(64, 512, chunks, gen(seed))
        assert p.shape == (64,) and p.dtype == torch.long
        assert p[0] == 0 and p[-1] <= 511
        steps = p.diff()
        assert (steps >= 1).all()  # strictly increasing: contiguous pieces, skips >= 0 between them
        assert int((steps > 1).sum()) <= chunks - 1


def test_pose_relative_distances_cover_the_whole_target_window():
    seq, target = 64, 512
    longest = max(int(pose_positions(seq, target, 2, gen(s))[-1]) for s in range(400))
    assert longest == target - 1  # distance from the first token to the last reaches target - 1
    distances = torch.zeros(target, dtype=torch.bool)
    for s in range(400):
        p = pose_positions(seq, target, 2, gen(s))
        distances[(p[:, None] - p[None, :]).clamp(min=0).flatten()] = True
    assert distances.float().mean() > 0.9  # nearly every distance in [0, target) gets seen


def test_pose_is_reproducible_under_a_seed():
    assert torch.equal(pose_positions(64, 512, 3, gen(5)), pose_positions(64, 512, 3, gen(5)))
    assert not torch.equal(pose_positions(64, 512, 3, gen(5)), pose_positions(64, 512, 3, gen(6)))


def test_e2llm_positions_follow_the_paper():
    L0, R, sinks = 128, 128, 4
    scales = e2llm_scales(L0, R, 8)
    seen = set()
    for seed in range(300):
        p, g = e2llm_positions(R, L0, scales, sinks, gen(seed))
        seen.add(g)
        assert torch.equal(p[:sinks], torch.arange(sinks))  # sinks: no offset
        t = int(p[sinks] - sinks)
        assert 0 <= t <= g * L0 - R
        assert torch.equal(p[sinks:], torch.arange(sinks, R) + t)
        assert (p.diff() >= 1).all()
        assert float(p[-1]) / g < L0  # the largest position RoPE sees stays inside the pretrained window
    assert seen == set(scales) == {1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0}


def test_e2llm_scale_set_drops_scales_too_small_for_the_training_length():
    assert e2llm_scales(128, 256, 4) == [2.0, 3.0, 4.0]  # g * L0 >= R
    assert e2llm_scales(128, 128, 8, scales=[1, 4, 16]) == [1.0, 4.0, 16.0]
    with pytest.raises(ValueError):
        e2llm_scales(128, 1024, 4)


def test_e2llm_eval_rules():
    assert e2llm_eval_scale(1000, 4096, "ceil") == 1.0
    assert e2llm_eval_scale(12288, 4096, "ceil") == 3.0
    assert e2llm_eval_scale(10000, 4096, "ceil") == 3.0
    assert e2llm_eval_scale(10000, 4096, "exact") == pytest.approx(10000 / 4096)
    assert e2llm_eval_scale(12288, 4096, "pow2") == 4.0


def test_e2llm_batches_carry_a_fractional_scale_per_sample_and_replay_on_resume():
    samples = pack([list(range(2000))], 128, eos_id=0)
    data = TrainData(samples, micro_batch_size=4, seed=3, positions=e2llm_sampler(128, 128, 8, None, 4))
    batch = data.micro_batch(7)
    assert batch["rope_scale"].shape == (4,) and (batch["rope_scale"] >= 1).all()
    fed = batch["position_ids"].float() / batch["rope_scale"][:, None]  # what RoPE sees
    assert (fed.frac() != 0).any()  # fractions where g > 1, never rounded
    again = TrainData(samples, micro_batch_size=4, seed=3, positions=e2llm_sampler(128, 128, 8, None, 4))
    for key in batch:  # a resumed run rebuilds the data and asks for the same index: same batch
        assert torch.equal(batch[key], again.micro_batch(7)[key])


def test_step_scope_shares_one_draw_per_step():
    samples = pack([list(range(5000))], 64, eos_id=0)
    data = TrainData(samples, 2, seed=1, positions=pose_sampler(512, 2), draw_group=4)  # 2 micro-batches of 2 per step
    first, second, third = data.micro_batch(0), data.micro_batch(1), data.micro_batch(2)
    rows = torch.cat([first["position_ids"], second["position_ids"]])
    assert all(torch.equal(rows[0], r) for r in rows)
    assert not torch.equal(third["position_ids"][0], rows[0])


# -------------------------------------------------------------------------------------- rotary
ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 128},
    "llama3": {"rope_type": "llama3", "factor": 4.0, "rope_theta": 10000.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 128},
}


@pytest.mark.parametrize("kind", list(ROPES))
def test_scaled_rotary_without_a_scale_is_the_stock_module_for_every_type(kind, tiny_tokenizer):
    from conftest import build_tiny_model

    stock = build_tiny_model("llama", vocab_size=len(tiny_tokenizer), rope_parameters=ROPES[kind])
    ours = build_tiny_model("llama", vocab_size=len(tiny_tokenizer), rope_parameters=ROPES[kind])
    before = set(ours.state_dict())
    apply_scaled_rotary(ours)
    assert set(ours.state_dict()) == before  # checkpoints and LoRA targets still match
    ids = torch.randint(0, 300, (2, 300), generator=gen(0))  # past L0 = 128: dynamic rescales too
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, stock(ids).logits, atol=0, rtol=0)
        set_rope_scale(ours, 1.0)
        torch.testing.assert_close(ours(ids).logits, stock(ids).logits, atol=1e-6, rtol=1e-6)


def test_e2llm_with_g1_and_t0_equals_the_stock_model(tiny_tokenizer):
    from conftest import build_tiny_model

    stock = build_tiny_model("llama", vocab_size=len(tiny_tokenizer))
    ours = build_tiny_model("llama", vocab_size=len(tiny_tokenizer))
    apply_scaled_rotary(ours)
    set_rope_scale(ours, torch.tensor([1.0, 1.0]))
    ids = torch.randint(0, 300, (2, 96), generator=gen(1))
    positions = torch.arange(96).expand(2, 96)  # t = 0
    with torch.no_grad():
        diff = (ours(ids, position_ids=positions).logits - stock(ids, position_ids=positions).logits).abs().max()
    assert diff < 1e-5


def test_a_per_sample_scale_is_pi_with_that_factor(tiny_tokenizer):
    """Row i with scale g_i equals stock transformers' linear scaling with factor g_i (positions m + t)."""
    from conftest import build_tiny_model

    ours = build_tiny_model("llama", vocab_size=len(tiny_tokenizer))
    apply_scaled_rotary(ours)
    ids = torch.randint(0, 300, (2, 64), generator=gen(2))
    positions = torch.stack([torch.arange(64) + 37, torch.arange(64) + 200])
    set_rope_scale(ours, torch.tensor([2.0, 5.0]))
    with torch.no_grad():
        got = ours(ids, position_ids=positions, attention_mask=torch.ones_like(ids)).logits
        for row, g in enumerate((2.0, 5.0)):
            linear = build_tiny_model("llama", vocab_size=len(tiny_tokenizer),
                                      rope_parameters={"rope_type": "linear", "factor": g, "rope_theta": 10000.0})
            want = linear(ids[row : row + 1], position_ids=positions[row : row + 1]).logits
            torch.testing.assert_close(got[row : row + 1], want, atol=2e-5, rtol=1e-4)


def test_scaled_rotary_is_installed_on_this_instance_only(tiny_tokenizer):
    from conftest import build_tiny_model

    a = build_tiny_model("llama", vocab_size=len(tiny_tokenizer))
    b = build_tiny_model("llama", vocab_size=len(tiny_tokenizer))
    apply_scaled_rotary(a)
    assert isinstance(a.model.rotary_emb, ScaledRotary)
    assert not isinstance(b.model.rotary_emb, ScaledRotary)
    assert apply_scaled_rotary(a) is a.model.rotary_emb  # idempotent


# ------------------------------------------------------------------------ the packed-sequence trap
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("sampler", ["pose", "e2llm"])
def test_later_chunks_attend_to_earlier_ones_with_skipped_positions(tiny_tokenizer, attn, sampler):
    """transformers reads jumps in position ids as packed sequences when no mask is given (design.md §4);
    longext's batches always carry an explicit mask, so a token before a jump still influences tokens after it."""
    from conftest import build_tiny_model

    model = build_tiny_model("llama", vocab_size=len(tiny_tokenizer), attn_implementation=attn)
    apply_scaled_rotary(model)
    samples = pack([[i % 300 for i in range(1, 3000)]], 64, eos_id=0)
    positions = pose_sampler(1024, 2) if sampler == "pose" else e2llm_sampler(16, 64, 64, None, 4)
    batch = TrainData(samples, 1, seed=0, positions=positions).micro_batch(0)
    jumps = (batch["position_ids"][0].diff() > 1).nonzero()
    assert len(jumps), "the sampler should have produced a skip"
    cut = int(jumps[0]) + 1  # first token after the skip
    if "rope_scale" in batch:
        set_rope_scale(model, batch["rope_scale"])
    changed = batch["input_ids"].clone()
    changed[0, 0] = (changed[0, 0] + 1) % 300  # a token before the skip
    with torch.no_grad():
        kw = dict(position_ids=batch["position_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        a = model(batch["input_ids"], **kw).logits[0, cut:]
        b = model(changed, **kw).logits[0, cut:]
    assert (a - b).abs().max() > 1e-4
