"""Sequence parallelism (DeepSpeed Ulysses), tiled loss and TiledMLP against a one-rank, untiled reference.

The 2-rank cases run in one torchrun launch of this file (`__main__` below is the worker): every rank first computes
the reference (plain model + LoRA, whole sequence, transformers' own loss and plain autograd, stock sdpa), then
registers Ulysses (which replaces sdpa for the process) and runs the same micro-batch through longext's SP path in a
real DeepSpeed engine. A second launch of 4 ranks (sequence parallel 2 x data parallel 2) checks the data groups
against the mean of their micro-batches' losses. Tolerances (fp32): loss within 1e-5 absolute, every LoRA gradient
within 1e-4 relative (||g_sp - g_ref|| / ||g_ref||, per tensor); the sp-times-gradient trap would show as a
relative error of 1.0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SEQ = 256  # 128 tokens per rank: TiledMLP makes 2 tiles (hidden 64), the tiled loss 7 (LOGITS_PER_TILE below)
BATCH = 2  # two samples per micro-batch, with different positions / E2-LLM scales
LOSS_TOL, GRAD_TOL = 1e-5, 1e-4
# name: (positions, ZeRO stage, tiled loss, tiled MLP)
CASES = {
    "contiguous-z2": ("contiguous", 2, False, False),
    "contiguous-z0": ("contiguous", 0, False, False),
    "contiguous-z3": ("contiguous", 3, False, False),
    "padded-z2": ("padded", 2, False, False),
    "pose-z2-tiled-loss": ("pose", 2, True, False),
    "e2llm-z2": ("e2llm", 2, False, False),
    "longrecipe-z2": ("longrecipe", 2, False, False),
    "harpe-z2-tiled-mlp": ("harpe", 2, False, True),
    "e2llm-z3-tiled-loss-and-mlp": ("e2llm", 3, True, True),
    "longgen-attn-sink-z2": ("longgen-sink", 2, False, False),
    "longgen-block-sparse-z2-tiled-loss": ("longgen-block", 2, True, False),
    # every weight trains (train.full_finetune), with the fused RMSNorm on the SP side only (the reference is stock)
    "full-finetune-z2-fused-norm": ("full", 2, False, False),
    "full-finetune-z3-fused-norm-tiled": ("full", 3, True, True),
}
# 4 ranks, sequence parallel 2 x data parallel 2: each data group its own micro-batch; name: (positions, ZeRO stage)
DP_CASES = {"sp2-dp2-contiguous-z2": ("contiguous", 2), "sp2-dp2-e2llm-z3": ("e2llm", 3)}
# LongGen hybrids: layer 1 full, layer 0 sparse, patterns much narrower than the 256-token sequence
LONGGEN = {"longgen-sink": dict(full_layers=[1], sparse_type="attn_sink", sink_tokens=4, window=40),
           "longgen-block": dict(full_layers=[1], sparse_type="block_sparse", block_size=16, local_blocks=2,
                                 vert_stride=3, homo_head=True)}


# ------------------------------------------------------------------------------ the 2-rank worker
def _batch(kind: str, group: int = 0) -> dict:
    """A micro-batch like TrainData's: [BATCH, SEQ] ids, mask, labels, positions (+ rope_scale for E2-LLM); another
    one for each data-parallel `group`."""
    import torch

    from longext.positions import e2llm_positions, longrecipe_positions, pose_positions

    gen = torch.Generator().manual_seed(11 + group)
    ids = torch.randint(0, 400, (BATCH, SEQ), generator=gen)
    mask = torch.ones_like(ids)
    rows, extra = [], {}
    for row in range(BATCH):
        g = torch.Generator().manual_seed(100 + 10 * group + row)
        if kind in ("contiguous", "padded", "harpe", "full") or kind in LONGGEN:
            rows.append(torch.arange(SEQ))
        elif kind == "pose":
            rows.append(pose_positions(SEQ, 8 * SEQ, 3, g))
        elif kind == "e2llm":
            pos, scale = e2llm_positions(SEQ, SEQ, [1.0, 2.5, 4.0], 4, g)
            rows.append(pos)
            extra.setdefault("rope_scale", []).append(scale)
        elif kind == "longrecipe":
            rows.append(longrecipe_positions([40, 77, 3, 60, 76], 6 * SEQ, g))
    if kind == "padded":  # the second sample ends early: rank 1's shard has fewer real tokens than rank 0's
        mask[1, SEQ - 100:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100),
             "position_ids": torch.stack(rows)}
    if extra:
        batch["rope_scale"] = torch.tensor(extra["rope_scale"], dtype=torch.float32)
    return batch


def _model(kind: str, tiled_mlp: bool, fused_norm: bool = False):
    """Tiny Llama + method patch + LoRA on attention and MLP with non-zero B (so every LoRA gradient is non-zero);
    kind "full": every weight trains, no LoRA."""
    import torch
    from conftest import build_tiny_model

    from longext.methods.harpe import apply_harpe
    from longext.models import add_lora, apply_full_finetune
    from longext.recipe import LoraSpec
    from longext.rotary import apply_scaled_rotary
    from longext.savers import apply_fused_norm, apply_tiled_mlp

    # larger weights than the default init: attention is peaked, so a position off by a shard shows in the loss
    model = build_tiny_model("llama", vocab_size=400, initializer_range=0.2)
    model.set_attn_implementation("sdpa")
    if kind == "harpe":
        apply_harpe(model, [1.0e4, 5.0e5])
    if kind == "e2llm":
        apply_scaled_rotary(model)
    if kind in LONGGEN:
        from longext.methods.longgen.modeling_longext_longgen import LongGenSpec, apply_longgen

        apply_longgen(model, LongGenSpec(**LONGGEN[kind]))
    if kind == "full":
        apply_full_finetune(model)
    else:
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = add_lora(model, LoraSpec(r=4, alpha=8.0, targets=targets))
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    if tiled_mlp:
        apply_tiled_mlp(model)
    if fused_norm:
        apply_fused_norm(model)
    return model.train()


def _lora(model) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _before_forward(model, kind, batch):
    from longext.methods.e2llm import before_forward

    if kind == "e2llm":
        before_forward(model, batch)


def _reference(kind: str) -> tuple[float, dict]:
    model = _model(kind, tiled_mlp=False)
    batch = _batch(kind)
    _before_forward(model, kind, batch)
    loss = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels", "position_ids")}).loss
    loss.backward()
    return loss.item(), {n: p.grad.detach().clone() for n, p in _lora(model).items()}


def _reference_dp(kind: str) -> tuple[float, dict]:
    """What 2 data-parallel groups compute together: the mean of the two micro-batches' token-mean losses."""
    model = _model(kind, tiled_mlp=False)
    losses = []
    for group in range(2):
        batch = _batch(kind, group)
        _before_forward(model, kind, batch)
        losses.append(model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels", "position_ids")}).loss)
    loss = (losses[0] + losses[1]) / 2
    loss.backward()
    return loss.item(), {n: p.grad.detach().clone() for n, p in _lora(model).items()}


def _sequence_parallel(kind: str, stage: int, tiled_loss: bool, tiled_mlp: bool, rank: int, world: int):
    import torch
    from deepspeed.utils import safe_get_full_grad

    from longext.engine import make_engine
    from longext.recipe import TrainSpec
    from longext.sp import apply_sequence_parallel, layout, micro_batch_loss, shard_batch

    model = _model(kind, tiled_mlp, fused_norm=kind == "full")
    lay = apply_sequence_parallel(model, layout(rank, world, 2), BATCH)
    train = TrainSpec(steps=1, zero_stage=stage, precision="fp32", micro_batch_size=BATCH, grad_clip=None)
    engine = make_engine(model, train, lay.dp, lay.mpu)
    batch = _batch(kind, lay.dp_rank)
    _before_forward(engine.module, kind, batch)
    loss, logged = micro_batch_loss(engine, shard_batch(batch, lay), lay, tiled_loss)
    engine.backward(loss)
    grads = {n: safe_get_full_grad(p) for n, p in _lora(engine.module).items()}
    engine.destroy()
    torch.distributed.all_reduce(logged)  # the ranks of a data group log the same value: the mean over groups
    return float(logged) / world, grads


def _worker(out: Path) -> None:
    import torch

    import longext.sp
    from longext.engine import init_distributed

    rank, world = init_distributed()
    longext.sp.LOGITS_PER_TILE = 2**14  # 2 x 128 tokens x 400 logits -> 7 loss tiles per rank when tiled_loss is on
    cases = CASES if world == 2 else {name: (kind, stage, False, False) for name, (kind, stage) in DP_CASES.items()}
    kinds = sorted({kind for kind, *_ in cases.values()})
    reference = _reference if world == 2 else _reference_dp
    references = {kind: reference(kind) for kind in kinds}  # stock sdpa: before Ulysses replaces it
    results = {}
    for name, (kind, stage, tiled_loss, tiled_mlp) in cases.items():
        ref_loss, ref_grads = references[kind]
        loss, grads = _sequence_parallel(kind, stage, tiled_loss, tiled_mlp, rank, world)
        rel = [float((grads[n] - g).norm() / g.norm()) for n, g in ref_grads.items() if grads.get(n) is not None]
        worst = torch.tensor([abs(loss - ref_loss), max(rel)])
        torch.distributed.all_reduce(worst, op=torch.distributed.ReduceOp.MAX)  # both ranks' view
        results[name] = {"loss": loss, "reference_loss": ref_loss, "loss_abs": float(worst[0]),
                         "grad_rel": float(worst[1]), "grads": len(rel), "expected_grads": len(ref_grads),
                         "nonzero": all(float(g.abs().sum()) > 0 for g in ref_grads.values())}
    if rank == 0:
        out.write_text(json.dumps(results, indent=1))


# ------------------------------------------------------------------------------------------ tests
def _env() -> dict:
    dist_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in dist_vars}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}", DS_ACCELERATOR="cpu")
    return env


def _rank_logs(logs: Path) -> str:
    """What each rank printed (torchrun --log-dir keeps one stdout/stderr per rank): the lines a failure is read from,
    which the launcher's own summary (the tail of its output) does not show."""
    parts = []
    for f in sorted(logs.rglob("std*.log")):
        text = f.read_text(errors="replace").strip()
        if text:
            parts.append(f"--- {f.relative_to(logs)}\n{text[-3000:]}")
    return "\n".join(parts)


def _launch(tmp_path_factory, ranks: int) -> dict:
    """One torchrun launch of the worker. A launch whose rank was killed by a signal with no Python traceback in any
    rank's output (gloo's transport aborting on a loaded 2-core machine, seen once in CI with 4 ranks) is launched
    once more, with a warning that shows the first launch's output; an error of the code under test, or a second
    failure, fails the test with every rank's output."""
    from conftest import free_port

    folder = tmp_path_factory.mktemp("sp")
    out = folder / "results.json"
    for attempt in (1, 2):
        logs = folder / f"logs-{attempt}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
               str(free_port()), "--log-dir", str(logs), "--redirects", "3", str(Path(__file__)), str(out)]
        proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=400)
        if proc.returncode == 0:
            return json.loads(out.read_text())
        report = _rank_logs(logs) + "\n--- launcher\n" + proc.stderr[-3000:]
        signalled = "Signal" in proc.stderr and "Traceback (most recent call last)" not in _rank_logs(logs)
        if attempt == 1 and signalled:
            import warnings

            warnings.warn(f"{ranks}-rank launch killed by a signal, launched again:\n{report}", stacklevel=1)
            continue
        raise AssertionError(f"{ranks}-rank launch failed (exit {proc.returncode}):\n{report}")
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def sp_results(tmp_path_factory) -> dict:
    return _launch(tmp_path_factory, 2)


@pytest.fixture(scope="module")
def dp_results(tmp_path_factory) -> dict:
    return _launch(tmp_path_factory, 4)


@pytest.mark.parametrize("case", list(CASES))
def test_sequence_parallel_2_gives_the_loss_and_lora_gradients_of_one_rank(sp_results, case):
    r = sp_results[case]
    assert r["nonzero"] and r["grads"] == r["expected_grads"] > 0
    assert r["loss_abs"] < LOSS_TOL, r
    assert r["grad_rel"] < GRAD_TOL, r


@pytest.mark.parametrize("case", list(DP_CASES))
def test_sequence_parallel_2_by_data_parallel_2_gives_the_mean_of_the_two_micro_batches(dp_results, case):
    """4 ranks: two data groups of two sequence-parallel ranks, each group its own micro-batch. Loss and LoRA
    gradients equal one rank's on the mean of the two micro-batches' losses (a wrong data-parallel or sp factor
    would show as a relative error of 0.5 or 1)."""
    r = dp_results[case]
    assert r["nonzero"] and r["grads"] == r["expected_grads"] > 0
    assert r["loss_abs"] < LOSS_TOL, r
    assert r["grad_rel"] < GRAD_TOL, r


def test_train_with_sequence_parallel_2_matches_one_rank(tmp_path, tiny_model_dir, corpus_dir):
    """The whole `longext train` path: data given whole to both ranks of the group and sharded, PoSE positions,
    gradient checkpointing around the all-to-alls, the tiled loss (auto under SP), logging, a checkpoint of the
    2-rank engine and --resume from it. Same losses and the same gradient norm (the sp-times trap would double it)
    as one rank without SP."""
    from helpers import losses, write_recipe

    from longext.recipe import load_recipe
    from longext.train import run_training

    common = dict(method={"kind": "pose", "target_len": 512}, data={"seq_len": 128},
                  train={"steps": 2, "zero_stage": 2, "grad_accum": 2, "lr": 2.0e-3})
    one = run_training(load_recipe(write_recipe(tmp_path, tiny_model_dir, corpus_dir, name="one", **common)))
    path = write_recipe(tmp_path, tiny_model_dir, corpus_dir, name="sp", **common)
    cmd = [sys.executable, "-m", "longext", "train", str(path), "--nproc", "2",
           "-s", "train.sequence_parallel=2", "-s", "train.gradient_checkpointing=true"]
    for extra in (["-s", "train.steps=1"], ["--resume"]):  # step 2 after a resume from the SP checkpoint
        proc = subprocess.run(cmd + extra, env=_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    run = tmp_path / "runs" / "sp"
    a, b = losses(one), losses(run)
    assert a.keys() == b.keys() == {1, 2}
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5)
    norms = [[json.loads(line)["grad_norm"] for line in (r / "metrics.jsonl").read_text().splitlines()]
             for r in (one, run)]
    assert norms[1] == pytest.approx(norms[0], rel=1e-4)
    resolved = (run / "recipe.yaml").read_text()
    assert "sequence_parallel: 2" in resolved and "tiled_loss: true" in resolved
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_longgen_recipe_with_sequence_parallel_2_matches_one_rank(tmp_path, tiny_model_dir, corpus_dir):
    """`longext train --nproc 2` with train.sequence_parallel 2 on a LongGen recipe (its attention registered for
    Ulysses through the recipe path, one layer sparse, a window narrower than a shard) logs the losses of one rank."""
    from helpers import losses, write_recipe

    from longext.recipe import load_recipe
    from longext.train import run_training

    common = dict(method={"kind": "longgen", "target_len": 256,
                          "sparse": {"type": "attn_sink", "sink_tokens": 4, "window": 32}},
                  rope={"kind": "none"}, data={"seq_len": 128}, train={"steps": 2, "zero_stage": 2, "lr": 2.0e-3})
    one = run_training(load_recipe(write_recipe(tmp_path, tiny_model_dir, corpus_dir, name="one", **common)))
    path = write_recipe(tmp_path, tiny_model_dir, corpus_dir, name="sp", **common)
    cmd = [sys.executable, "-m", "longext", "train", str(path), "--nproc", "2", "-s", "train.sequence_parallel=2"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    a, b = losses(one), losses(tmp_path / "runs" / "sp")
    assert a.keys() == b.keys() == {1, 2}
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5)


@pytest.mark.parametrize("sets, nproc, expected", [
    (["train.sequence_parallel=3", "data.seq_len=66"], 3,
     "train.sequence_parallel: 3 does not divide the model's 4 attention heads"),
    (["train.sequence_parallel=2", "data.seq_len=65"], 2, "data.seq_len: 65 tokens do not split evenly over "
                                                          "train.sequence_parallel 2 ranks"),
    (["train.sequence_parallel=2", "model.attn_implementation=eager"], 2,
     "model.attn_implementation: eager cannot run under train.sequence_parallel 2"),
    (["train.sequence_parallel=2"], 1, "train.sequence_parallel: 2 needs 2 ranks or a multiple; launch with --nproc 2"),
    (["train.sequence_parallel=2"], 3, "train.sequence_parallel: 2 does not divide the 3 ranks of this launch"),
    (["train.checkpoint_offload=true"], 1, "train.checkpoint_offload: offloads the activation checkpoints"),
    (["train.sequence_parallel=2", "method={kind: longgen, target_len: 256, sparse: {type: block_sparse, "
      "homo_head: false}}", "rope={kind: none}"], 2, "method.sparse.homo_head: false (a pattern shifted per head) "
                                                     "cannot run under train.sequence_parallel 2"),
])
def test_a_combination_that_cannot_work_fails_before_training_with_one_line(
    tmp_path, tiny_model_dir, corpus_dir, capsys, sets, nproc, expected
):
    from helpers import write_recipe

    from longext.cli import main

    path = write_recipe(tmp_path, tiny_model_dir, corpus_dir, name="bad")
    args = ["train", str(path), "--nproc", str(nproc)]
    code = main([*args, *(x for s in sets for x in ("-s", s))])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not (tmp_path / "runs" / "bad" / "status.json").exists()  # stopped before the run started


@pytest.mark.parametrize("lm_head", ["frozen", "trainable"])
def test_tiled_loss_equals_transformers_loss_in_value_and_gradients(tiny_llama, lm_head):
    """token_loss_sum against transformers' causal-LM loss: the same mean and the same gradients for every trainable
    parameter; labels -100 skipped; uneven tiles fine. Frozen lm_head: DeepSpeed's TiledFusedLogitsLoss; trainable:
    the checkpointed tile loop (TiledFusedLogitsLoss would leave the lm_head gradient ~count times too large)."""
    import torch
    import torch.nn.functional as F

    from longext.sp import token_loss_sum

    model = tiny_llama.train()
    model.lm_head.weight.requires_grad_(lm_head == "trainable")
    ids = torch.randint(0, model.config.vocab_size, (2, 96), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[0, 10:30] = -100
    params = [p for p in model.parameters() if p.requires_grad]

    def run(loss_fn):  # gradients via .grad: TiledFusedLogitsLoss works inside its forward
        model.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in params]

    reference, want = run(lambda: model(input_ids=ids, labels=labels).loss)
    shifted = F.pad(labels[:, 1:], (0, 1), value=-100)
    count = (shifted != -100).sum()
    for tiles in (1, 7):
        def tiled():
            return token_loss_sum(model.lm_head, model.model(input_ids=ids).last_hidden_state, shifted, tiles) / count

        loss, got = run(tiled)
        torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-6)
        assert len(got) == len(want) > 10
        for g, ref in zip(got, want):
            torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-7)


def test_tiled_mlp_equals_the_plain_mlp(tiny_tokenizer):
    """DeepSpeed's TiledMLP on every layer (4 tiles of 64 tokens here): same logits, same LoRA gradients."""
    import torch
    from conftest import build_tiny_model

    from longext.models import add_lora
    from longext.recipe import LoraSpec
    from longext.savers import apply_tiled_mlp

    ids = torch.randint(0, 400, (1, 256), generator=torch.Generator().manual_seed(4))
    out = []
    for tiled in (False, True):
        lora = LoraSpec(targets=["gate_proj", "up_proj", "down_proj"])
        model = add_lora(build_tiny_model("llama", vocab_size=400), lora)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
        if tiled:
            apply_tiled_mlp(model)
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        out.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (plain, plain_grads), (tiled, tiled_grads) = out
    torch.testing.assert_close(tiled, plain)
    assert plain_grads.keys() == tiled_grads.keys() and len(plain_grads) == 12
    for name, grad in plain_grads.items():
        assert grad.abs().sum() > 0
        torch.testing.assert_close(tiled_grads[name], grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "phi3", "mixtral", "qwen3_moe"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_norm_equals_transformers_rmsnorm(family, dtype, monkeypatch):
    """RMSNormFunction against the family's own module under autograd (every family whose record says its norm is
    Llama's, longext.families): the same output bit for bit, and the same input and weight gradients (row chunks
    of 7 here, the last one ragged)."""
    import importlib

    import torch

    from longext import savers
    from longext.families import FAMILIES

    assert FAMILIES[family].fused_norm and FAMILIES[family].norm in savers.FUSED_NORM_CLASSES
    monkeypatch.setattr(savers, "NORM_CHUNK_ELEMENTS", 7 * 48)
    dt = getattr(torch, dtype)
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    norm = getattr(module, FAMILIES[family].norm)(48, eps=1e-5).to(dt)
    with torch.no_grad():
        norm.weight.normal_(1, 0.1, generator=torch.Generator().manual_seed(0))
    x = (torch.randn(2, 45, 48, generator=torch.Generator().manual_seed(1)) * 3).to(dt)
    dy = torch.randn(2, 45, 48, generator=torch.Generator().manual_seed(2)).to(dt)
    grads = []
    for fused in (False, True):
        if fused:
            savers.apply_fused_norm(norm)
        xi = x.clone().requires_grad_()
        norm.weight.grad = None
        y = norm(xi)
        y.backward(dy)
        grads.append((y.detach(), xi.grad, norm.weight.grad))
    (y0, dx0, dw0), (y1, dx1, dw1) = grads
    assert getattr(norm, "longext_fused", False)
    assert torch.equal(y1, y0)
    tol = dict(rtol=1e-5, atol=1e-6) if dt == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(dx1, dx0, **tol)
    torch.testing.assert_close(dw1, dw0, **tol)
    assert dx1.dtype == dt and dw1.dtype == dt and dx0.abs().sum() > 0


def test_fused_norm_model_gives_the_loss_and_lora_gradients_of_the_stock_model():
    """A tiny Qwen3 (decoder norms, final norm and q/k norms all replaced): the same loss and LoRA gradients."""
    import torch
    from conftest import build_tiny_model

    from longext.models import add_lora
    from longext.recipe import LoraSpec
    from longext.savers import apply_fused_norm

    ids = torch.randint(0, 400, (1, 128), generator=torch.Generator().manual_seed(5))
    out = []
    for fused in (False, True):
        model = add_lora(build_tiny_model("qwen3", vocab_size=400), LoraSpec(r=4))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
        if fused:
            apply_fused_norm(model)
            replaced = [m for m in model.modules() if getattr(m, "longext_fused", False)]
            assert len(replaced) == 1 + 4 * len(model.get_base_model().model.layers)  # final + 2 decoder + q/k
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        out.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (plain, plain_grads), (fused, fused_grads) = out
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=0)
    assert plain_grads.keys() == fused_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        assert grad.abs().sum() > 0
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-7)


def test_auto_switches_follow_the_per_rank_length(tmp_path, tiny_model_dir, corpus_dir):
    from helpers import write_recipe

    from longext.resolve import resolve
    from longext.recipe import load_recipe
    from longext.savers import AUTO_TILED_MLP_TOKENS, resolve_switches

    path = write_recipe(tmp_path, tiny_model_dir, corpus_dir)
    plain = resolve(load_recipe(path)).recipe.train
    assert (plain.tiled_loss, plain.tiled_mlp) == (False, False)
    sp = resolve(load_recipe(path, ["train.sequence_parallel=2"])).recipe.train
    assert (sp.tiled_loss, sp.tiled_mlp) == (True, False)
    kept = resolve(load_recipe(path, ["train.sequence_parallel=2", "train.tiled_loss=false"])).recipe.train
    assert kept.tiled_loss is False
    auto = {"tiled_loss": "auto", "tiled_mlp": "auto", "fused_norm": "auto"}
    sp4 = plain.model_copy(update={**auto, "sequence_parallel": 4})
    long = resolve_switches(sp4, 4 * AUTO_TILED_MLP_TOKENS, {"model_type": "llama", "vocab_size": 128_256})
    assert long.tiled_mlp is True and long.tiled_loss is True and long.fused_norm is True
    short = resolve_switches(plain.model_copy(update=auto), AUTO_TILED_MLP_TOKENS - 1,
                             {"model_type": "llama", "vocab_size": 1000})
    assert short.tiled_mlp is False and short.tiled_loss is False and short.fused_norm is False
    # Gemma's RMSNorm is not Llama's: auto leaves the fused norm off, true is refused in one line
    gemma = resolve_switches(sp4, 4 * AUTO_TILED_MLP_TOKENS, {"model_type": "gemma3_text", "vocab_size": 1000})
    assert gemma.tiled_mlp is True and gemma.fused_norm is False
    from longext.errors import LongextError

    with pytest.raises(LongextError, match="train.fused_norm: Gemma 3's RMSNorm"):
        resolve_switches(sp4.model_copy(update={"fused_norm": True}), 1024, {"model_type": "gemma3_text", "vocab_size": 10})


def test_tiled_loss_run_equals_the_plain_run(tmp_path, tiny_model_dir, corpus_dir):
    """One rank: train.tiled_loss true routes through longext.sp's loss (shifted labels, token sum / count), with
    TiledMLP and the fused norm on; the logged losses equal transformers' own loss and modules."""
    from helpers import losses, write_recipe

    from longext.recipe import load_recipe
    from longext.train import run_training

    runs = [run_training(load_recipe(write_recipe(tmp_path, tiny_model_dir, corpus_dir, name=f"t{flag}",
                                                  train={"steps": 3, "tiled_loss": flag, "tiled_mlp": flag,
                                                         "fused_norm": flag})))
            for flag in (False, True)]
    a, b = (losses(r) for r in runs)
    assert a.keys() == b.keys()
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
