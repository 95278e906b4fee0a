"""`longext plan` (longext/plan/): its formulas against independent numbers (the real model's numel, peft's
trainable count, the bytes autograd really saves, DeepSpeed's own ZeRO-2 estimator), the directions every switch
must move the estimate, the verdict and the fixing switches, and the CLI contract (`plan`, and `train` refusing
before any weights load). CPU, seconds; nothing trains except the one `memory_check: warn` run."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from helpers import write_recipe
from longext.cli import main
from longext.plan import (GiB, Dims, Setup, backward_moments, budget_problem, estimate, fixing_switches,
                             layer_backward, lora_params, parse_size, step_flops)
from longext.models import add_lora
from longext.recipe import LoraSpec

from conftest import build_tiny_model, tiny_config

LLAMA3_8B = Dims(layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128, vocab=128256,
                 tied=False)


def term(est, name: str) -> int:
    return next(t.bytes for t in est.terms if t.name == name)


# ------------------------------------------------------------------------------------- formulas
@pytest.mark.parametrize("arch,extra", [("llama", {}), ("llama", {"tie_word_embeddings": True}), ("qwen2", {}),
                                        ("qwen3", {}), ("mistral", {})])
def test_parameter_count_equals_the_real_models_numel(arch, extra):
    model = build_tiny_model(arch, **extra)
    real = sum(p.numel() for p in model.parameters())  # tied weights are one Parameter
    assert Dims.from_config(model.config).params == real


def test_llama3_8b_parameter_count_is_the_published_one():
    assert LLAMA3_8B.params == 8_030_261_248  # meta-llama/Meta-Llama-3-8B: 8.03B


@pytest.mark.parametrize("targets,save", [
    (["q_proj", "k_proj", "v_proj", "o_proj"], []),
    (["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"], ["embed_tokens", "norm"]),
])
def test_lora_parameter_count_equals_peft_trainable_count(targets, save):
    model = add_lora(build_tiny_model("llama"), LoraSpec(r=4, targets=targets, modules_to_save=save))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert lora_params(Dims.from_config(model.config), targets, 4, save) == trainable


def test_kept_activations_match_the_bytes_autograd_saves():
    """The plan's per-layer bytes against every tensor autograd saves in a real forward (fp32, sdpa, LoRA q/k/v/o):
    non-parameter storages kept by saved-tensor hooks = kept activations + the loss's log-softmax (4 T V)."""
    L = 256
    model = add_lora(build_tiny_model("llama", vocab_size=512, max_position_embeddings=L), LoraSpec(r=8))
    model.train()
    ids = torch.randint(0, 512, (1, L), generator=torch.Generator().manual_seed(0))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, position_ids=torch.arange(L)[None])
    dims = Dims.from_config(model.config)
    est = estimate(dims, Setup(seq_len=L, device="cpu", precision="fp32", zero_stage=0, lora_r=8))
    expected = term(est, "kept activations") + 4 * L * dims.vocab
    assert sum(saved.values()) == pytest.approx(expected, rel=0.03)


def test_logits_term_is_three_fp32_copies_of_tokens_by_vocab_divided_by_sequence_parallel():
    s = Setup(seq_len=32768, gpus=8, zero_stage=3, tiled_loss=False)
    assert term(estimate(LLAMA3_8B, s), "loss (logits)") == 12 * 32768 * 128256
    assert term(estimate(LLAMA3_8B, replace(s, sequence_parallel=8)), "loss (logits)") == 12 * 4096 * 128256


def test_full_finetune_model_states_equal_deepspeeds_zero2_estimator():
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    s = Setup(seq_len=1024, gpus=8, zero_stage=2, lora_r=None)
    est = estimate(LLAMA3_8B, s)
    ours = term(est, "weights") + term(est, "trainable state")
    _, theirs = estimate_zero2_model_states_mem_needs(LLAMA3_8B.params, num_gpus_per_node=8, cpu_offload=False)
    assert ours == pytest.approx(theirs, rel=1e-6)


def test_zero_partitions_divide_by_the_device_count():
    lora = Setup(seq_len=1024, gpus=4, zero_stage=0)
    n = lora_params(LLAMA3_8B, lora.lora_targets, 8)
    assert term(estimate(LLAMA3_8B, lora), "trainable state") == 18 * n
    assert term(estimate(LLAMA3_8B, replace(lora, zero_stage=1)), "trainable state") == 2 * n + 16 * n // 4
    assert term(estimate(LLAMA3_8B, replace(lora, zero_stage=2)), "trainable state") == 2 * n // 4 + 16 * n // 4
    z3 = term(estimate(LLAMA3_8B, replace(lora, zero_stage=3)), "weights")
    norms = (2 * 32 + 1) * 4096  # under DeepSpeed's 1e5-element persistence threshold: never partitioned
    # a quarter of the partitioned weights, plus DeepSpeed's default 1e9 live gathered parameters, plus the norms
    assert z3 == (LLAMA3_8B.params - norms) * 2 // 4 + (10**9 + norms) * 2


def test_step_flops_full_finetune_is_six_n_plus_attention():
    L, s = 4096, Setup(seq_len=4096, lora_r=None)
    flops, parts = step_flops(LLAMA3_8B, s, LLAMA3_8B.params)
    attention = 4 * LLAMA3_8B.layers * L * L * 4096
    assert flops == 6 * LLAMA3_8B.matmul_params * L + 3 * attention
    lora, _ = step_flops(LLAMA3_8B, replace(s, lora_r=8), 6_815_744)
    assert lora < flops  # LoRA skips the frozen weights' gradients


# --------------------------------------------------------------------------------------- directions
def test_every_switch_lowers_the_estimate_where_it_should():
    base = Setup(seq_len=65536, gpus=8, zero_stage=2)
    acts = lambda s: term(estimate(LLAMA3_8B, s), "kept activations")  # noqa: E731
    assert acts(replace(base, gradient_checkpointing=True)) < acts(base)
    assert acts(replace(base, sequence_parallel=8)) < acts(replace(base, sequence_parallel=2)) < acts(base)
    assert acts(replace(base, tiled_mlp=True)) < acts(base)
    weights = lambda s: term(estimate(LLAMA3_8B, s), "weights")  # noqa: E731
    assert weights(replace(base, zero_stage=3)) < weights(base)
    assert weights(replace(base, zero_stage=3, gpus=1)) > weights(base)  # one device: nothing to partition over
    assert weights(replace(base, zero_stage=3, offload_params=True)) < weights(replace(base, zero_stage=3))
    total = lambda s: estimate(LLAMA3_8B, s).total  # noqa: E731
    assert total(replace(base, tiled_loss=True)) < total(base)
    assert total(replace(base, attn="eager")) > total(base)
    assert total(replace(base, seq_len=131072)) > total(base)


# --------------------------------------------------------------------------------- verdict, switches
def test_the_fixing_switches_make_it_fit_and_come_cheapest_first():
    budget = 80 * 10**9
    s = Setup(seq_len=131072, gpus=8, zero_stage=2)
    assert estimate(LLAMA3_8B, s).total > budget
    switches = fixing_switches(LLAMA3_8B, s, budget)
    assert switches and switches[0] == ("gradient_checkpointing", True)
    fixed = replace(s, **dict(switches))
    assert estimate(LLAMA3_8B, fixed).total <= budget
    order = ["gradient_checkpointing", "tiled_loss", "tiled_mlp", "sequence_parallel", "zero_stage",
             "offload_optimizer", "offload_params", "checkpoint_offload"]
    assert [order.index(k) for k, _ in switches] == sorted(order.index(k) for k, _ in switches)
    assert fixing_switches(LLAMA3_8B, fixed, budget) == []
    assert fixing_switches(LLAMA3_8B, replace(s, seq_len=16 * 2**20, gpus=1), budget) is None  # 16M on one GPU


def test_refusal_only_when_clearly_over_the_budget():
    s = Setup(seq_len=8192, gpus=1, zero_stage=0)
    total = estimate(LLAMA3_8B, s).total
    assert budget_problem(estimate(LLAMA3_8B, s, budget=int(total / 1.05)), []) is None  # 5 % over: not clearly
    line = budget_problem(estimate(LLAMA3_8B, s, budget=total // 2), [("gradient_checkpointing", True)])
    assert "train.gradient_checkpointing=true" in line and "\n" not in line


@pytest.mark.parametrize("text,value", [("80GB", 80 * 10**9), ("80GiB", 80 * GiB), ("512 mib", 512 * 2**20),
                                        ("1e9", 10**9)])
def test_memory_sizes(text, value):
    assert parse_size(text) == value


# -------------------------------------------------------------------------------------------- CLI
def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def tiny_recipe(tmp_path, tiny_model_dir, corpus_dir):
    return write_recipe(tmp_path, tiny_model_dir, corpus_dir, train={"steps": 1, "memory_check": "refuse"})


def test_plan_prints_the_terms_and_the_verdict(capsys, tiny_recipe):
    import re

    from longext.plan import plan_resolved
    from longext.resolve import resolve
    from longext.recipe import load_recipe

    # the tiny model's estimate is ~1 GiB (the stated fixed overhead): 80 GB fits, 0.5 GiB does not
    for flag, budget in (("80GB", 80 * 10**9), ("0.5GiB", GiB // 2)):
        code, out, _ = run(capsys, "plan", tiny_recipe, "--gpus", "2", "--gpu-memory", flag)
        assert code == (0 if flag == "80GB" else 3)  # 3: does NOT fit, for scripts (docs/cli.md)
        rows = {cells[0]: cells[1] for line in out.splitlines()
                if len(cells := [c.strip() for c in line.split("│")[1:-1]]) >= 2}
        for name in ("weights", "trainable state", "kept activations", "fixed overhead", "total"):
            assert name in rows, out
        est, _ = plan_resolved(resolve(load_recipe(tiny_recipe)), gpus=2, budget=budget, device="cuda")
        total = f"{est.total / GiB:,.2f}"
        assert rows["total"] == total
        verdict = [line for line in out.splitlines() if line.startswith("total ")]
        fits = est.total <= budget
        assert fits == (flag == "80GB")  # the two budgets straddle the estimate
        assert verdict == [f"total {total} GiB of {budget / GiB:,.2f} GiB per device ({est.total / budget:.0%}): "
                           f"{'fits' if fits else 'does NOT fit'}"], out
        assert ("would fit with" in out or "does not fit even with every switch" in out) == (not fits)


def test_plan_json_names_the_switches_that_fix_a_small_budget(capsys, tiny_recipe):
    code, out, _ = run(capsys, "plan", tiny_recipe, "--gpu-memory", "1.4GiB", "--json", "-s", "method.target_len=64k",
                         "-s", "data.seq_len=64k", "-s", "train.zero_stage=0")
    doc = json.loads(out)
    assert code == 3 and doc["fits"] is False and doc["total_bytes"] > doc["budget_bytes"]
    assert doc["fixing_switches"][0] == ["gradient_checkpointing", True]


@pytest.mark.parametrize("argv,start", [
    (["--gpu-memory", "80XB"], "error: --gpu-memory: expected a memory size"),
    (["--gpus", "0"], "error: --gpus: must be at least 1 (got 0)"),
])
def test_plan_bad_flags_are_one_line_exit_2(capsys, tiny_recipe, argv, start):
    code, out, err = run(capsys, "plan", tiny_recipe, *argv)
    assert code == 2 and err.startswith(start) and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("gpus, message", [
    (1, "8 needs 8 ranks or a multiple; launch with --gpus 8"),
    (3, "8 does not divide the 3 ranks of this launch (use --gpus 8 or a sequence_parallel that divides 3)"),
])
def test_plan_refuses_a_sequence_parallel_the_gpus_cannot_hold(capsys, monkeypatch, gpus, message):
    """As train refuses it (launch.preflight: sp.world_problems), instead of planning sp 8 on 1 or 3 GPUs."""
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parent.parent)  # model.path is relative to the checkout
    code, out, err = run(capsys, "plan", "recipes/llama3-8b-plan.yaml", "--gpus", gpus, "--gpu-memory", "24GB")
    assert (code, out) == (2, "")
    assert err == f"error: recipes/llama3-8b-plan.yaml:24 train.sequence_parallel: {message}\n"
    code, out, _ = run(capsys, "plan", "recipes/llama3-8b-plan.yaml", "--gpus", 8, "--gpu-memory", "80GB", "--json")
    assert code == 0 and json.loads(out)["fits"] is True and json.loads(out)["setup"]["sequence_parallel"] == 8


def test_plan_missing_recipe_is_one_line_exit_2(capsys, tmp_path):
    code, _, err = run(capsys, "plan", tmp_path / "nope.yaml")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no such recipe file" in err


def test_train_refuses_before_loading_weights_when_clearly_over_budget(capsys, tiny_recipe, monkeypatch, tmp_path):
    monkeypatch.setenv("LONGEXT_MEMORY_BUDGET", "1MB")  # documented in docs/scaling.md
    code, _, err = run(capsys, "train", tiny_recipe)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "train.memory_check" in err and "train.gradient_checkpointing=true" not in err  # nothing fits in 1 MB
    assert not (tmp_path / "runs" / "t").exists()  # refused before the run directory or any weights


def test_train_warns_and_runs_with_memory_check_warn(capsys, tmp_path, tiny_model_dir, corpus_dir, monkeypatch):
    monkeypatch.setenv("LONGEXT_MEMORY_BUDGET", "1MB")
    path = write_recipe(tmp_path, tiny_model_dir, corpus_dir, name="w", train={"steps": 1, "memory_check": "warn"})
    code, _, err = run(capsys, "train", path)
    assert code == 0 and "warning: train.memory_check" in err
    assert (tmp_path / "runs" / "w" / "adapter").is_dir()


def test_the_shipped_llama3_8b_plan_runs_offline_and_names_the_fix(capsys, monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parent.parent)  # the recipe's model.path is relative to the repo
    code, out, _ = run(capsys, "plan", "recipes/llama3-8b-plan.yaml", "--gpus", "8", "--gpu-memory", "80GB", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["fits"] is True and doc["params"] == 8_030_261_248
    code, out, _ = run(capsys, "plan", "recipes/llama3-8b-plan.yaml", "--gpus", "8", "--gpu-memory", "80GB", "--json",
                       "-s", "train.sequence_parallel=1", "-s", "train.gradient_checkpointing=false",
                       "-s", "train.tiled_loss=false", "-s", "data.seq_len=32k", "-s", "method.target_len=32k")
    doc = json.loads(out)
    assert doc["fits"] is False and doc["fixing_switches"] == [["gradient_checkpointing", True]]


def test_the_benchmarks_page_compares_measured_peaks_with_the_plan():
    from longext.bench.memory import case_estimate
    from longext.bench.report import render

    case = {"kind": "memory", "name": "mem-x", "model": "tiny", "seq_len": 1024, "zero_stage": 2,
            "gradient_checkpointing": False, "steps": 1}
    config = tiny_config().to_dict()
    est = case_estimate(case, config)
    expected_mb = (est.total - est.terms[-1].bytes) / 2**20
    result = {"measured_mb": 1.05 * expected_mb, "baseline_mb": 500.0, "model_config": config}
    doc = {"suite": "memory", "cases": [{"case": case, "result": result}], "machine": {}, "versions": {}}
    page = render({"memory": doc})
    row = next(line for line in page.splitlines() if line.startswith("| tiny | 1k | 2 | no |"))
    assert f"| {expected_mb:,.0f} |" in row and "| 1.05 |" in row


def test_train_refusal_names_the_switch_that_would_fit(capsys, tiny_recipe, monkeypatch):
    from longext.plan import device_budget
    from longext.plan import plan_resolved
    from longext.resolve import resolve
    from longext.recipe import load_recipe

    device = device_budget()[0]  # what train will plan for: cuda on a GPU machine, else cpu
    long = ["method.target_len=64k", "data.seq_len=64k"]
    fixed, _ = plan_resolved(resolve(load_recipe(tiny_recipe, [*long, "train.gradient_checkpointing=true"])), device=device)
    plain, _ = plan_resolved(resolve(load_recipe(tiny_recipe, long)), device=device)
    assert plain.total > 1.1 * fixed.total  # clearly over a budget the checkpointed run fits in
    monkeypatch.setenv("LONGEXT_MEMORY_BUDGET", str(fixed.total))
    code, _, err = run(capsys, "train", tiny_recipe, *(x for item in long for x in ("-s", item)))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "set train.gradient_checkpointing=true (details" in err


def test_the_document_mask_is_one_b_l_squared_tensor_per_rank(tiny_recipe):
    """sdpa: a [b, 1, L, L] bool per micro-batch, whole on each sequence-parallel rank; eager: 4-byte floats;
    document_mask false: nothing."""
    from longext.plan import plan_resolved
    from longext.recipe import load_recipe
    from longext.resolve import resolve

    def plan(*sets, gpus=1):
        long = ["method.target_len=16k", "data.seq_len=16k", "train.micro_batch_size=2", *sets]
        est, _ = plan_resolved(resolve(load_recipe(tiny_recipe, long)), gpus=gpus, device="cpu")
        return est, {t.name: t.bytes for t in est.terms}

    on, terms = plan()
    off, off_terms = plan("data.document_mask=false")
    assert terms["document mask"] == 2 * 16384**2 and "document mask" not in off_terms
    assert on.total - off.total == terms["document mask"]
    assert plan("train.sequence_parallel=2", gpus=2)[1]["document mask"] == 2 * 16384**2
    assert plan("model.attn_implementation=eager", "data.document_mask=true")[1]["document mask"] == 4 * 2 * 16384**2


# ------------------------------------------------------------------------------ one layer's backward
SMALL = Dims(layers=2, hidden=64, intermediate=160, heads=8, kv_heads=2, head_dim=16, vocab=100, tied=False)


def part_bytes(term_) -> dict[str, int]:
    return {p.name: p.bytes for p in term_.parts}


def test_backward_moments_are_the_hand_formulas_for_a_small_gqa_layer():
    """bf16 on a GPU, checkpointing, LoRA r8 on q/k/v/o, ZeRO-2: every part of the three moments by hand."""
    T, a, d, i, H, G, h, r = 1000, 2, 64, 160, 8, 2, 16, 8
    s = Setup(seq_len=T, zero_stage=2, gradient_checkpointing=True)
    m = {k: {p.name: p.bytes for p in v} for k, v in backward_moments(SMALL, s).items()}
    saved = {"input norm: fp32 input": T * 4 * d, "q/k/v input (norm output)": T * a * d,
             "q, k, v after RoPE (kernel layout)": T * a * (H * h + 2 * G * h),
             "attention output + log-sum-exp": T * (a * H * h + 4 * H), "LoRA A outputs (attention)": T * 4 * a * r}
    assert m["attention kernel's backward"] == {
        **saved, "gradient of the residual stream": T * a * d, "gradient of the attention output": T * a * H * h,
        "dq, dk, dv": T * a * (H * h + 2 * G * h),
        "flash backward: fp32 dq accumulator + softmax_d": T * (4 * H * h + 4 * H),
        "flash backward: dk, dv at every query head (GQA)": T * 2 * a * H * h}
    held = sum(saved.values())
    assert m["MLP's backward"] == {
        "attention block's saved tensors (as above)": held, "post-attention norm: fp32 input": T * 4 * d,
        "gate, SiLU(gate), up": T * 3 * a * i, "gradient of the layer output": T * a * d,
        "gradients of down input, SiLU(gate), up": T * 3 * a * i}
    assert m["post-attention norm's backward"] == {
        "attention block's saved tensors (as above)": held, "post-attention norm: fp32 input": T * 4 * d,
        "gradient of the layer output": T * a * d, "post-attention norm: fp32 backward tensors": T * 20 * d}
    total = layer_backward(SMALL, s)
    assert total.bytes == max(sum(v.values()) for v in m.values()) == sum(part_bytes(total).values())


def test_backward_with_tiled_mlp_holds_one_tile_and_without_checkpointing_only_gradients():
    T, a, d, i = 1000, 2, 64, 160
    s = Setup(seq_len=T, zero_stage=2, gradient_checkpointing=True, tiled_mlp=True)
    mlp = {p.name: p.bytes for p in backward_moments(SMALL, s)["MLP's backward"]}
    tile = math.ceil(T / math.ceil(T / d))  # TiledMLP's shards of about hidden_size tokens (longext.sp)
    assert mlp["TiledMLP input"] == mlp["TiledMLP input gradient"] == T * a * d
    assert mlp["one MLP tile: recomputed gate, SiLU, up, output and their gradients"] == tile * (6 * a * i + a * d)
    assert "gate, SiLU(gate), up" not in mlp
    plain = backward_moments(SMALL, replace(s, gradient_checkpointing=False))
    assert all("saved" not in p.name and "input" not in p.name for p in plain["attention kernel's backward"])
    tile_part = "one MLP tile: recomputed gate, SiLU, up, output and their gradients"
    assert {p.name for p in plain["MLP's backward"]} == {"gradient of the layer output", "TiledMLP input gradient",
                                                          tile_part}


def test_gqa_and_sequence_parallelism_change_the_attention_terms_as_expected():
    T, a, H, h = 4096, 2, 8, 16
    s = Setup(seq_len=T, gpus=8, zero_stage=3, gradient_checkpointing=True)

    def attention(setup, dims=SMALL):
        return {p.name: p.bytes for p in backward_moments(dims, setup)["attention kernel's backward"]}

    mha = replace(SMALL, kv_heads=H)
    assert "flash backward: dk, dv at every query head (GQA)" not in attention(s, mha)  # MHA: no expansion
    assert attention(s, mha)["dq, dk, dv"] - attention(s)["dq, dk, dv"] == T * a * 2 * (H - 2) * h
    # Ulysses sp 2 (= G): T halves, k/v at G heads per local token, o_proj's input is a separate all-to-all output
    sp2 = attention(replace(s, sequence_parallel=2))
    assert sp2["dq, dk, dv"] == T // 2 * a * (H * h + 2 * 2 * h)
    assert sp2["o_proj input (a copy of the output)"] == T // 2 * a * H * h
    assert "o_proj input (a copy of the output)" not in attention(s)
    # sp 8 > G = 2: DeepSpeed repeats the kv heads, one per rank over the whole sequence = 8 heads per local token
    sp8 = attention(replace(s, sequence_parallel=8))
    assert sp8["q, k, v after RoPE (kernel layout)"] == T // 8 * a * (H * h + 2 * 8 * h)
    assert "flash backward: dk, dv at every query head (GQA)" not in sp8  # H/sp = 1 query head per kv head
    # the CPU kernel has no flash workspace
    assert not any(k.startswith("flash") for k in attention(replace(s, device="cpu", precision="fp32")))


def test_the_500k_single_gpu_backward_is_dominated_by_the_attention_block():
    """ALST's 1 x H100 set-up at 500K: the old one-layer term (a T (2d + 3i per tile) + the recomputed layer) said
    6.3 GiB. What the recomputed attention block holds is far more: its saved tensors, gradients and the flash
    kernel's workspace alone are 55 GiB, and with TiledMLP the peak is the post-attention norm's fp32 backward
    while those saved tensors are still alive."""
    s = Setup(seq_len=512_000, gpus=1, zero_stage=3, lora_r=None, offload_params=True, offload_optimizer=True,
              gradient_checkpointing=True, checkpoint_offload=True, tiled_loss=True, tiled_mlp=True)
    T, a, d, q = 512_000, 2, 4096, 4096
    moments = backward_moments(LLAMA3_8B, s)
    attention = {p.name: p.bytes for p in moments["attention kernel's backward"]}
    block = sum(attention.values()) - attention["layer input, back from CPU"]
    assert block > 50 * GiB and attention["flash backward: fp32 dq accumulator + softmax_d"] >= T * 4 * q
    old = T * a * 2 * d + d * a * 3 * LLAMA3_8B.intermediate  # the old formula without the recomputed layer
    backward = term(estimate(LLAMA3_8B, s), "one layer's backward")
    assert backward >= sum(attention.values()) > 5 * old
    norm = {p.name: p.bytes for p in moments["post-attention norm's backward"]}
    assert norm["attention block's saved tensors (as above)"] == sum(
        attention[k] for k in ("input norm: fp32 input", "input norm: normalized input (the weight trains)",
                               "q/k/v input (norm output)", "q, k, v after RoPE (kernel layout)",
                               "attention output + log-sum-exp"))


@pytest.mark.parametrize("length, gpus, extra", [
    (500_000, 1, {"offload_params": True}),  # ALST's 1 x H100 maximum
    (3_700_000, 8, {"sequence_parallel": 8}),  # ALST's 8 x H100 maximum
])
def test_alsts_published_maxima_fit_80gb_with_the_fused_norm_alst_ran_them_with(length, gpus, extra):
    """ALST's recipes load the model through Liger-Kernel (fused RMSNorm). With fused_norm both published maxima fit
    in 80 GB; with transformers' RMSNorm the plan puts them about 10 % over; `auto` picks the fused norm there."""
    s = Setup(seq_len=length, gpus=gpus, zero_stage=3, lora_r=None, offload_optimizer=True, gradient_checkpointing=True,
              checkpoint_offload=True, tiled_loss=True, tiled_mlp=True, **extra)
    stock, fused = (estimate(LLAMA3_8B, replace(s, fused_norm=f)).total for f in (False, True))
    assert fused < 0.75 * 80e9 < 80e9 < stock < 1.15 * 80e9
    from longext.plan import resolve_auto

    assert resolve_auto(LLAMA3_8B, replace(s, fused_norm="auto")).fused_norm is True
    assert resolve_auto(LLAMA3_8B, replace(s, seq_len=4096 * gpus, fused_norm="auto")).fused_norm is False


class _LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of the storages created inside the mode that are still alive, after every op: the peak, and the
    total just after the first op whose name contains `mark`. Tensors that existed before (weights, the layer's
    input and output) are not counted."""

    def __init__(self, existing, mark: str):
        super().__init__()
        self.skip = {t.untyped_storage().data_ptr() for t in existing}
        self.live, self.peak, self.mark, self.at_mark = {}, 0, mark, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.multiprocessing.reductions import StorageWeakRef

        out = func(*args, **(kwargs or {}))
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        for t in torch.utils._pytree.tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.skip:
                self.live.setdefault(t.untyped_storage().data_ptr(),
                                     (StorageWeakRef(t.untyped_storage()), t.untyped_storage().nbytes()))
        now = sum(n for _, n in self.live.values())
        self.peak = max(self.peak, now)
        if self.at_mark is None and self.mark in str(func):
            self.at_mark = now
        return out


@pytest.mark.parametrize("T,targets,tiled,dtype,fused", [
    (2048, ("q_proj", "k_proj", "v_proj", "o_proj"), False, torch.float32, False),
    (2048, ("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"), False, torch.bfloat16, False),
    (2048, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), True, torch.float32, False),
    (2048, ("q_proj", "v_proj"), True, torch.bfloat16, False),
    (2048, ("q_proj", "k_proj", "v_proj", "o_proj"), True, torch.float32, True),
    (2048, ("q_proj", "v_proj"), True, torch.bfloat16, True),
    (2048, ("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"), False, torch.bfloat16, True),
])
def test_one_layers_backward_equals_the_live_tensors_of_a_real_checkpointed_layer(T, targets, tiled, dtype, fused,
                                                                                 monkeypatch):
    """A real decoder layer (GQA, sdpa, peft LoRA, non-reentrant checkpointing as `train` runs it) on CPU: the peak
    of the bytes alive during its backward equals the plan's term, and the bytes alive once the attention kernel's
    backward has run equal the attention moment (CPU kernel: no flash workspace)."""
    from torch.utils.checkpoint import checkpoint

    from longext.savers import apply_fused_norm, apply_tiled_mlp

    model = add_lora(build_tiny_model("llama", hidden_size=256, intermediate_size=704, num_hidden_layers=1,
                                      vocab_size=64, max_position_embeddings=T), LoraSpec(r=8, targets=list(targets)))
    model.train()
    if tiled:
        apply_tiled_mlp(model)
    if fused:  # row chunks of 256 tokens: 8 per norm backward
        monkeypatch.setattr("longext.savers.NORM_CHUNK_ELEMENTS", 256 * 256)
        apply_fused_norm(model)
    model.to(dtype)
    base = model.get_base_model().model
    x = torch.randn(1, T, 256, dtype=dtype, requires_grad=True)
    pos = torch.arange(T)[None]
    pe = base.rotary_emb(x, pos)
    y = checkpoint(lambda hs: base.layers[0](hs, position_ids=pos, position_embeddings=pe), x, use_reentrant=False)
    weights = torch.randn_like(y)
    loss = (y * weights).sum()  # the layer output's gradient comes from autograd, as from the next layer
    with _LiveBytes([*model.parameters(), *model.buffers(), *pe, x, y, weights], "attention_for_cpu_backward") as live:
        loss.backward()
    s = Setup(seq_len=T, device="cpu", precision="fp32" if dtype == torch.float32 else "bf16", zero_stage=0,
              gradient_checkpointing=True, tiled_mlp=tiled, fused_norm=fused, lora_r=8, lora_targets=targets)
    dims = Dims.from_config(model.config)
    assert live.peak == pytest.approx(layer_backward(dims, s).bytes, rel=0.01)
    attention = sum(p.bytes for p in backward_moments(dims, s)["attention kernel's backward"])
    assert live.at_mark == pytest.approx(attention, rel=0.01)


def test_the_gradient_bucket_is_what_deepspeed_allocates_capped_at_the_trainable_count():
    """DeepSpeed allocates its whole reduce bucket (contiguous_gradients, its default) however few gradients there
    are; longext caps reduce_bucket_size at the trainable count, so a LoRA of 3,584 parameters gets a buffer of
    3,584 elements, not 5e8 (0.93 GiB in bf16), and the plan's term is that buffer on GPU and CPU alike. Full
    fine-tuning of a large model keeps DeepSpeed's 5e8."""
    from longext.engine import deepspeed_config, init_distributed, make_engine
    from longext.engine import REDUCE_BUCKET
    from longext.recipe import TrainSpec

    init_distributed()
    model = add_lora(build_tiny_model("llama"), LoraSpec(r=4))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    engine = make_engine(model, TrainSpec(steps=1, zero_stage=3, precision="fp32"), world_size=1)
    (buffer,) = [b.buffer for b in engine.optimizer.ipg_buckets.values()]
    assert trainable < 10_000 and buffer.numel() == trainable
    s = Setup(seq_len=64, zero_stage=3, precision="fp32", lora_r=4)
    dims = Dims.from_config(model.config)
    for device in ("cuda", "cpu"):
        assert term(estimate(dims, replace(s, device=device)), "gradient bucket") == buffer.numel() * 4
    assert deepspeed_config(TrainSpec(steps=1, zero_stage=2), 1, 8_000_000_000)["zero_optimization"]["reduce_bucket_size"] == REDUCE_BUCKET
    assert deepspeed_config(TrainSpec(steps=1, zero_stage=0), 1, 10)["zero_optimization"] == {"stage": 0}
