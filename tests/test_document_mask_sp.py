"""The document mask under sequence parallelism 2 (DeepSpeed Ulysses, sdpa, CPU): every token's loss in a packed row
equals the same document's loss run alone with the same positions (fp32, <= 1e-5), for contiguous, PoSE, E2-LLM and
LongRecipe positions, HARPE and LongGen (attn_sink, block_sparse); the logged loss (tiled) is their mean, and the LoRA
gradients equal one rank's on the same masked micro-batch (relative 1e-4).

One torchrun launch of this file (`__main__` below is the worker): every rank first computes the references with
stock sdpa (each document piece alone; the packed micro-batch with the 4D mask, its loss and gradients), then
registers Ulysses and runs the micro-batch sharded over the two ranks through a real DeepSpeed engine, the document
ids given whole to both ranks (longext.data.masks.document_attention builds the mask after the all-to-all)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

SEQ, BATCH, L0, TARGET = 64, 2, 64, 256
PIECES = ([10, 25, 29], [40, 7, 17])  # document pieces of the two rows; rank 1's shard starts inside a document
LOSS_TOL, GRAD_TOL = 1e-5, 1e-4
KINDS = ["contiguous", "pose", "e2llm", "longrecipe", "harpe", "longgen-sink", "longgen-block"]


# ------------------------------------------------------------------------------ the 2-rank worker
class _Rows:
    """Two packed rows in memory, with their document pieces and sentences of 6 tokens (LongRecipe)."""

    seq_len = SEQ

    def __init__(self):
        import torch

        gen = torch.Generator().manual_seed(17)
        self.block = {"input_ids": torch.randint(0, 400, (BATCH, SEQ), generator=gen),
                      "real": torch.ones(BATCH, SEQ, dtype=torch.bool)}
        segments, sentences = [], []
        for pieces in PIECES:
            segments.append(torch.repeat_interleave(torch.arange(len(pieces)), torch.tensor(pieces)))
            sentences.append(torch.cat([torch.arange(n) // 6 + 100 * i for i, n in enumerate(pieces)]))
        self.block["segments"], self.block["sentences"] = torch.stack(segments), torch.stack(sentences)

    def __len__(self) -> int:
        return BATCH

    def rows(self, indices):
        return {k: v[indices] for k, v in self.block.items()}


def _batch(kind: str) -> dict:
    from longext.data.batches import TrainData
    from longext.methods.e2llm import scale_set_sampler
    from longext.methods.longrecipe.data import LongRecipeData
    from longext.methods.pose import pose_sampler

    if kind == "longrecipe":
        data = LongRecipeData(_Rows(), BATCH, 5, TARGET, "composition", None, True, document_mask=True)
    else:
        samplers = {"pose": pose_sampler(TARGET, 3), "e2llm": scale_set_sampler(L0, [1.0, 2.0], 2)}
        kwargs = {"positions": samplers[kind]} if kind in samplers else {}
        data = TrainData(_Rows(), BATCH, 5, document_mask=True, **kwargs)
    batch = data.micro_batch(0)
    batch["labels"][:, 20:23] = -100  # a few tokens not learned, e.g. a chat row's prompt
    return batch


def _model(kind: str):
    """Tiny Llama (sdpa) + the method's patch + LoRA with non-zero B, as in tests/test_sp.py."""
    import torch
    from conftest import build_tiny_model
    from test_document_mask_methods import LONGGEN

    from longext.models import add_lora
    from longext.recipe import LoraSpec

    model = build_tiny_model("llama", vocab_size=400, initializer_range=0.2)
    model.set_attn_implementation("sdpa")
    if kind == "harpe":
        from longext.methods.harpe import apply_harpe

        apply_harpe(model, [1.0e4, 5.0e5])
    if kind == "e2llm":
        from longext.rotary import apply_scaled_rotary

        apply_scaled_rotary(model)
    if kind.startswith("longgen"):
        from longext.methods.longgen.modeling_longext_longgen import LongGenSpec, apply_longgen

        apply_longgen(model, LongGenSpec(**LONGGEN[kind]))
    model = add_lora(model, LoraSpec(r=4, alpha=8.0, targets=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.train()


def _trainable(model) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _references(kind: str) -> dict:
    """Stock sdpa, one rank: each document piece alone (token losses), and the packed masked micro-batch (loss and
    LoRA gradients)."""
    import torch
    from test_document_mask_methods import alone_losses, set_scale

    from longext.data.masks import model_inputs

    batch, model = _batch(kind), _model(kind)
    alone = alone_losses(model, batch, kind)
    set_scale(model, kind, batch.get("rope_scale"))
    loss = model(**model_inputs(batch, model.config._attn_implementation, torch.float32)).loss
    loss.backward()
    counted = batch["labels"][:, 1:] != -100
    return {"alone": alone, "alone_mean": alone[:, :-1][counted].mean().item(), "loss": loss.item(),
            "grads": {n: p.grad.detach().clone() for n, p in _trainable(model).items()}}


def _sequence_parallel(kind: str, rank: int, world: int, ref: dict) -> dict:
    import torch
    import torch.nn.functional as F
    from deepspeed.utils import safe_get_full_grad
    from test_document_mask_methods import set_scale

    from longext.data.masks import DOCUMENT_KEY, model_inputs
    from longext.engine import make_engine
    from longext.recipe import TrainSpec
    from longext.sp import apply_sequence_parallel, layout, micro_batch_loss, shard_batch

    model = _model(kind)
    lay = apply_sequence_parallel(model, layout(rank, world, 2), BATCH)
    engine = make_engine(model, TrainSpec(steps=1, zero_stage=2, precision="fp32", micro_batch_size=BATCH,
                                          grad_clip=None), lay.dp, lay.mpu)
    batch = _batch(kind)
    set_scale(engine.module, kind, batch.get("rope_scale"))
    shard = shard_batch(model_inputs(batch, engine.module.config._attn_implementation, torch.float32, lay.sp), lay)
    assert shard[DOCUMENT_KEY].shape == (BATCH, SEQ) and shard["input_ids"].shape[1] == SEQ // 2  # ids stay whole
    with torch.no_grad():  # every token's loss on this rank's shard, gathered over the group
        hidden = engine(input_ids=shard["input_ids"], attention_mask=shard["attention_mask"],
                        position_ids=shard["position_ids"], document_ids=shard[DOCUMENT_KEY],
                        output_hidden_states=True).hidden_states[-1]
        logits = engine.module.get_output_embeddings()(hidden).float()
        mine = F.cross_entropy(logits.transpose(1, 2), shard["shift_labels"], ignore_index=-100, reduction="none")
        pieces = [torch.empty_like(mine) for _ in range(world)]
        torch.distributed.all_gather(pieces, mine)
    tokens = torch.cat(pieces, dim=1)
    loss, logged = micro_batch_loss(engine, shard, lay, tiled=True)
    engine.backward(loss)
    grads = {n: safe_get_full_grad(p) for n, p in _trainable(engine.module).items()}
    engine.destroy()
    rel = max(float((grads[n] - g).norm() / g.norm()) for n, g in ref["grads"].items())
    return {"token_abs": float((tokens - ref["alone"]).abs().max()),
            "logged_abs": abs(float(logged) - ref["alone_mean"]), "reference_abs": abs(ref["loss"] - ref["alone_mean"]),
            "grad_rel": rel, "grads": len(ref["grads"])}


def _worker(out: Path) -> None:
    import torch

    import longext.sp
    from longext.engine import init_distributed

    rank, world = init_distributed()
    longext.sp.LOGITS_PER_TILE = 2**13  # 2 x 32 tokens x 400 logits -> 4 loss tiles per rank
    references = {kind: _references(kind) for kind in KINDS}  # stock sdpa: before Ulysses replaces it
    results = {}
    for kind in KINDS:
        r = _sequence_parallel(kind, rank, world, references[kind])
        worst = torch.tensor([r["token_abs"], r["logged_abs"], r["grad_rel"]])
        torch.distributed.all_reduce(worst, op=torch.distributed.ReduceOp.MAX)  # both ranks' view
        results[kind] = {**r, "token_abs": float(worst[0]), "logged_abs": float(worst[1]), "grad_rel": float(worst[2])}
    if rank == 0:
        out.write_text(json.dumps(results, indent=1))


# ------------------------------------------------------------------------------------------ tests
@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    import subprocess

    from conftest import free_port
    from test_sp import _env

    out = tmp_path_factory.mktemp("docs-sp") / "results.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(Path(__file__)), str(out)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("kind", KINDS)
def test_sequence_parallel_2_gives_every_token_the_loss_of_its_document_alone(results, kind):
    r = results[kind]
    assert r["token_abs"] < LOSS_TOL, r  # every token, gathered from both ranks' shards
    assert r["reference_abs"] < LOSS_TOL and r["logged_abs"] < LOSS_TOL, r  # the loss train logs (tiled)
    assert r["grads"] > 0 and r["grad_rel"] < GRAD_TOL, r  # LoRA gradients of the masked one-rank micro-batch


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
