"""LongGen kernel half: layout, patterns, the chunked-SDPA / block / flex kernels against the dense reference,
the pruned KV cache against full sparse forwards, and the exported model class reloaded in a fresh process."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
from transformers import DynamicCache

from conftest import build_tiny_model
from helpers import run_fresh
from longext.methods.longgen import modeling_longext_longgen as lg
from longext.methods.longgen.modeling_longext_longgen import (
    LongGenCache,
    LongGenLlamaConfig,
    LongGenLlamaForCausalLM,
    LongGenSpec,
    apply_longgen,
    budget,
    full_layer_indices,
    kv_bytes,
    reference_mask,
)

VOCAB = 97
SINK = dict(sparse_type="attn_sink", sink_tokens=3, window=12)
BLOCK = dict(sparse_type="block_sparse", block_size=4, local_blocks=2, vert_stride=3)
PATTERNS = {
    "attn_sink": SINK,
    "block_homo": {**BLOCK, "homo_head": True},
    "block_shifted": {**BLOCK, "homo_head": False},
}


@pytest.fixture(autouse=True)
def small_sink_blocks(monkeypatch):
    """attn_sink's kernel block is 64 by default and the chunked kernel's query chunk 512; at 4 and 8 the short
    test sequences span many blocks and chunks, so the band / window and the separate sinks are both
    exercised (as at real lengths)."""
    monkeypatch.setattr(lg, "SINK_KERNEL_BLOCK", 4)
    monkeypatch.setattr(lg, "SDPA_CHUNK", 8)


def tiny(layers: int = 3, seed: int = 0):
    """3-layer GQA Llama (4 query heads over 2 kv heads), fp32, eval mode."""
    return build_tiny_model("llama", seed=seed, vocab_size=VOCAB, num_hidden_layers=layers,
                            max_position_embeddings=4096)


def tokens(n: int, rows: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, n), generator=torch.Generator().manual_seed(seed))


def padded_mask(rows: int, n: int, side: str | None, pads: int = 7) -> torch.Tensor:
    """[rows, n] attention mask: row 1 has `pads` pads on `side` (none if side is None)."""
    mask = torch.ones(rows, n, dtype=torch.long)
    if side == "left":
        mask[1, :pads] = 0
    elif side == "right":
        mask[1, -pads:] = 0
    return mask


# ------------------------------------------------------------------------------------------ layout
def test_full_layer_indices_placements():
    assert full_layer_indices(32) == list(range(10, 21))  # methods.md §6.1: Llama-2-7B, k = 11, layers 10-20
    assert full_layer_indices(80) == list(range(26, 53))
    assert full_layer_indices(30, placement="middle") == list(range(10, 20))
    assert full_layer_indices(6, 0.5, "bottom") == [0, 1, 2]
    assert full_layer_indices(6, 0.5, "top") == [3, 4, 5]
    assert full_layer_indices(6, 1 / 3, "interleaved") == [1, 4]
    assert full_layer_indices(12, 0.25, "interleaved") == [2, 6, 10]
    assert full_layer_indices(4, 0.0) == [] and full_layer_indices(4, 1.0) == [0, 1, 2, 3]


@pytest.mark.parametrize(("call", "words"), [
    (lambda: full_layer_indices(12, placement="center"), "placement got 'center', allowed middle"),
    (lambda: full_layer_indices(12, fraction=1.5), "full_fraction got 1.5"),
    (lambda: full_layer_indices(0), "num_layers got 0"),
    (lambda: LongGenSpec([1], "strided"), "sparse_type: got 'strided', allowed attn_sink, block_sparse"),
    (lambda: LongGenSpec([1], "attn_sink", window=0), "window: got 0, allowed an integer >= 1"),
    (lambda: LongGenSpec([1, 1]), "full_layers: got [1, 1]"),
    (lambda: LongGenSpec([1], kernel="triton"), "kernel: got 'triton'"),
    (lambda: LongGenSpec.from_dict({"full_layers": [], "windw": 3}), "unknown keys ['windw']"),
    (lambda: apply_longgen(tiny(), LongGenSpec([0, 3], **SINK)), "full_layers: got [3], allowed 0..2 (3 layers)"),
])
def test_layout_and_spec_errors_name_the_field(call, words):
    with pytest.raises(ValueError) as err:
        call()
    assert words in str(err.value)


def test_spec_round_trips_through_a_dict():
    spec = LongGenSpec([2, 0], **BLOCK, homo_head=False, kernel="dense")
    assert LongGenSpec.from_dict(spec.to_dict()) == spec and spec.full_layers == [0, 2]


def test_reference_masks_follow_the_definitions():
    q = k = torch.arange(40)
    sink = LongGenSpec([], **SINK)
    m = reference_mask(sink, q, k, 4)[0]
    qq, kk = q[:, None], k[None, :]
    assert torch.equal(m, (kk <= qq) & ((kk < 3) | (qq - kk < 12)))
    block = LongGenSpec([], **BLOCK, homo_head=False)
    m = reference_mask(block, q, k, 4)
    assert m.shape == (4, 40, 40)
    step = max(1, 3 // 4)  # methods.md §6.1: head_step = max(1, vert_stride // n_heads)
    for h in range(4):
        want = (kk <= qq) & ((qq // 4 - kk // 4 < 2) | ((kk // 4 + 1 + h * step) % 3 == 0))
        assert torch.equal(m[h], want)
    assert budget(sink, 1000) == 3 + 12 and budget(sink, 10) == 10
    # last query of 1000 tokens: block 249; local blocks 248, 249; vertical blocks K = 2, 5, ..., 245 (82 of them)
    assert budget(LongGenSpec([], **BLOCK), 1000) == 4 * 2 + 82 * 4


# ------------------------------------------------------------------------------- model-level parity
def hybrid(spec_kw: dict, full_layers=(1,), kernel: str = "block", seed: int = 0):
    model = tiny(seed=seed)
    apply_longgen(model, LongGenSpec(list(full_layers), **spec_kw, kernel=kernel))
    return model


@pytest.mark.parametrize("side", [None, "left", "right"])
def test_all_layers_full_equals_the_stock_model(side):
    stock, model = tiny(), tiny()
    apply_longgen(model, LongGenSpec([0, 1, 2], **SINK))
    ids, mask = tokens(50, rows=2), padded_mask(2, 50, side)
    with torch.no_grad():
        want, got = stock(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits
    assert model.config._attn_implementation == "longgen_sparse"
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["attn_sink", "block_homo"])
def test_pattern_covering_the_sequence_is_full_attention(name):
    wide = {"attn_sink": dict(SINK, window=64), "block_homo": dict(BLOCK, local_blocks=16)}[name]
    stock, model = tiny(), hybrid(wide, full_layers=())
    ids, mask = tokens(60, rows=2), padded_mask(2, 60, "left")
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask).logits[:, 7:],
                                   stock(ids, attention_mask=mask).logits[:, 7:], rtol=0, atol=1e-5)


def test_apply_is_idempotent_and_works_under_peft():
    from peft import LoraConfig, get_peft_model

    spec = LongGenSpec([1], **SINK)
    before, after = tiny(), tiny()
    apply_longgen(before, spec)
    apply_longgen(before, spec)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(3)
    before = get_peft_model(before, lora)
    torch.manual_seed(3)
    after = get_peft_model(after, lora)
    apply_longgen(after, spec)
    assert after.get_base_model().config.longgen == spec.to_dict()
    ids = tokens(40)
    with torch.no_grad():
        torch.testing.assert_close(after(ids).logits, before(ids).logits, rtol=0, atol=1e-6)


def logits_and_grads(model, ids, mask):
    model.zero_grad()
    out = model(ids, attention_mask=mask).logits
    keep = mask.bool()  # outputs at pad positions mean nothing: compare and train on real tokens only
    (out[keep].square().mean()).backward()
    return out[keep].detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


# which function kernel "block" (and "auto" on CPU) runs, without / with gradients: chunked SDPA where all heads
# share the pattern (block_sparse: only without gradients)
BLOCK_KERNEL_FN = {"attn_sink": "chunked_attention", "block_homo": "chunked_attention",
                   "block_shifted": "block_attention"}
BLOCK_KERNEL_FN_TRAIN = {**BLOCK_KERNEL_FN, "block_homo": "block_attention"}


@pytest.mark.parametrize("side", [None, "left", "right"])
@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_block_kernel_equals_the_dense_reference_with_gradients(name, side, monkeypatch):
    fast, dense = hybrid(PATTERNS[name], kernel="block"), hybrid(PATTERNS[name], kernel="dense")
    ids, mask = tokens(45, rows=2, seed=1), padded_mask(2, 45, side)
    calls = []
    for fn_name in ("chunked_attention", "block_attention"):
        fn = getattr(lg, fn_name)
        monkeypatch.setattr(lg, fn_name, lambda *args, fn=fn, n=fn_name: calls.append(n) or fn(*args))
    got, got_grads = logits_and_grads(fast, ids, mask)
    # both sparse layers ran the fast kernel (the padding mask did not force dense)
    assert calls == [BLOCK_KERNEL_FN_TRAIN[name]] * 2
    want, want_grads = logits_and_grads(dense, ids, mask)
    assert len(calls) == 2
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    for n in want_grads:
        torch.testing.assert_close(got_grads[n], want_grads[n], rtol=1e-4, atol=1e-6, msg=n)
    stock = tiny()  # and the pattern matters: the same weights with full attention differ
    with torch.no_grad():
        assert (stock(ids, attention_mask=mask).logits[mask.bool()] - want).abs().max() > 1e-3


@pytest.mark.parametrize("chunk", [None, 3000])
@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_kernels_on_raw_tensors_with_gqa(name, chunk, monkeypatch):
    """q/k/v gradients of the block kernel against the reference, 8 query heads over 2 kv heads, S not a
    multiple of the block, one row left-padded, in one chunk of query blocks or many (its forward and
    backward loop over chunks); and flex (forward only: CPU flex has no backward)."""
    if chunk:
        monkeypatch.setattr(lg, "CHUNK_ELEMENTS", chunk)
    spec = LongGenSpec([], **PATTERNS[name])
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 61, 16, generator=gen, requires_grad=True)
    k = torch.randn(2, 2, 61, 16, generator=gen, requires_grad=True)
    v = torch.randn(2, 2, 61, 16, generator=gen, requires_grad=True)
    valid = torch.ones(2, 61, dtype=torch.bool)
    valid[1, :9] = False
    slots = torch.arange(61)
    want = lg.dense_attention(spec, q, k, v, slots, slots, valid[:, None, None, :], 0.25)
    got = lg.block_attention(spec, q, k, v, valid, 0.25)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    upstream = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad((got * upstream).sum(), (q, k, v)),
                    torch.autograd.grad((want * upstream).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    pytest.importorskip("torch.nn.attention.flex_attention")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flex = lg.flex_attention_kernel(spec, q.detach(), k.detach(), v.detach(), valid, 0.25)
    torch.testing.assert_close(flex, want.detach(), rtol=0, atol=1e-5)


def test_attn_sink_kernel_at_its_default_block(monkeypatch):
    monkeypatch.setattr(lg, "SINK_KERNEL_BLOCK", 64)  # 4 blocks of 64: the last one reads the sinks apart
    spec = LongGenSpec([], "attn_sink", sink_tokens=5, window=70)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 230, 16, generator=gen, requires_grad=True) for h in (4, 2, 2))
    slots = torch.arange(230)
    want = lg.dense_attention(spec, q, k, v, slots, slots, None, 0.25)
    got = lg.block_attention(spec, q, k, v, None, 0.25)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    for a, b in zip(torch.autograd.grad(got.square().sum(), (q, k, v)),
                    torch.autograd.grad(want.square().sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


CHUNKED = {
    "attn_sink": SINK,
    "sink_0": dict(SINK, sink_tokens=0),
    "window_1": dict(SINK, window=1),  # each query sees the sinks and itself
    "block_homo": {**BLOCK, "homo_head": True},
}


def qkv(rows: int, heads: int, kv_heads: int, n: int, d: int = 16, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(rows, h, n, d, generator=gen, requires_grad=True) for h in (heads, kv_heads, kv_heads))


def assert_same_attention_and_grads(got, want, inputs):
    """Outputs and the q, k, v gradients (under a random upstream gradient) within fp32 rounding."""
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    upstream = torch.randn(want.shape, generator=torch.Generator().manual_seed(9))
    for a, b in zip(torch.autograd.grad((got * upstream).sum(), inputs),
                    torch.autograd.grad((want * upstream).sum(), inputs)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def backward_name(out: torch.Tensor) -> str:
    return type(out.grad_fn).__name__


@pytest.mark.parametrize("path", ["merged", "masked"])
@pytest.mark.parametrize("chunk", [8, 13, 1000])
@pytest.mark.parametrize("side", [None, "left", "right"])
@pytest.mark.parametrize("name", sorted(CHUNKED))
def test_chunked_kernel_equals_the_dense_reference(name, side, chunk, path, monkeypatch):
    """chunked_attention against the dense reference mask: batch 2, 8 query heads over 2 kv heads, 61 slots
    (not a multiple of the chunk; 1000 = one chunk), one row with 20 pads on `side` (left: that row's sinks
    and first queries see only pads, so their output is zero, as the reference's). path: attn_sink with no
    padding on CPU runs the merged maskless parts (`_MergedSinkWindowAttention`); "masked" forces the
    one-masked-SDPA-call-per-chunk form (the one for padding, block_sparse, other devices and dtypes)."""
    if path == "masked":
        monkeypatch.setattr(lg, "_flash_cpu_available", lambda query: False)
    monkeypatch.setattr(lg, "SDPA_CHUNK", chunk)
    spec = LongGenSpec([], **CHUNKED[name])
    q, k, v = qkv(2, 8, 2, 61)
    valid = None if side is None else padded_mask(2, 61, side, pads=20).bool()
    slots = torch.arange(61)
    want = lg.dense_attention(spec, q, k, v, slots, slots, None if valid is None else valid[:, None, None, :], 0.25)
    got = lg.chunked_attention(spec, q, k, v, valid, 0.25)
    merged = path == "merged" and side is None and spec.sparse_type == "attn_sink"
    assert (backward_name(got) == "_MergedSinkWindowAttentionBackward") == merged
    assert got.shape == (2, 61, 8, 16)
    if side == "left":
        assert got[1, :20].abs().max() == 0 and want[1, :20].abs().max() == 0
    assert_same_attention_and_grads(got, want, (q, k, v))


@pytest.mark.parametrize("path", ["merged", "masked"])
@pytest.mark.parametrize("sink", [0, 5])
def test_chunked_kernel_with_a_window_covering_the_sequence_is_causal_sdpa(sink, path, monkeypatch):
    """A different reference: with window >= length the pattern is plain causal attention (stock SDPA)."""
    if path == "masked":
        monkeypatch.setattr(lg, "_flash_cpu_available", lambda query: False)
    spec = LongGenSpec([], "attn_sink", sink_tokens=sink, window=70)
    q, k, v = qkv(2, 6, 3, 70)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25, enable_gqa=True)
    got = lg.chunked_attention(spec, q, k, v, None, 0.25)
    assert_same_attention_and_grads(got, want.transpose(1, 2), (q, k, v))


def test_chunked_kernel_at_its_default_chunk(monkeypatch):
    """SDPA_CHUNK 512 and 1100 slots: three chunks, the last one short; the last two read sinks and window
    as separate slices. Merged path: the middle chunk (longer than the window) runs as masked slices, the
    last one as four maskless parts; and the masked path."""
    monkeypatch.setattr(lg, "SDPA_CHUNK", 512)
    spec = LongGenSpec([], "attn_sink", sink_tokens=5, window=300)
    assert lg._chunk_pieces(spec, 1024, 1100) == [(0, 5, 1, 1), (725, 1100, 1, 1)]
    assert lg._sink_window_parts(spec, 512, 1024) is None
    assert lg._sink_window_parts(spec, 1024, 1100) == [(0, 5, "all"), (801, 1024, "all"), (725, 801, "edge"),
                                                        (1024, 1100, "causal")]
    q, k, v = qkv(1, 4, 2, 1100, d=8)
    slots = torch.arange(1100)
    want = lg.dense_attention(spec, q, k, v, slots, slots, None, 0.25)
    got = lg.chunked_attention(spec, q, k, v, None, 0.25)
    assert backward_name(got) == "_MergedSinkWindowAttentionBackward"
    assert_same_attention_and_grads(got, want, (q, k, v))
    monkeypatch.setattr(lg, "_flash_cpu_available", lambda query: False)
    want = lg.dense_attention(spec, q, k, v, slots, slots, None, 0.25)
    assert_same_attention_and_grads(lg.chunked_attention(spec, q, k, v, None, 0.25), want, (q, k, v))


def test_merged_parts_are_the_window_exactly():
    """For each chunk past the sinks the maskless parts cover each key once and, with their kinds ("all",
    "causal": j <= i, "edge": j >= i), give exactly the reference mask: nothing more is read than the
    pattern's sinks + window."""
    spec = LongGenSpec([], **SINK)
    for a in range(16, 200, 8):
        parts = lg._sink_window_parts(spec, a, a + 8)
        assert parts is not None
        cols, rows = [], []
        i = torch.arange(8)[:, None]
        for s, e, kind in parts:
            j = torch.arange(e - s)[None]
            cols.append(torch.arange(s, e))
            rows.append({"all": j >= 0, "causal": j <= i, "edge": j >= i}[kind].expand(8, e - s))
        cols = torch.cat(cols)
        assert torch.equal(cols.sort().values, cols.unique())
        got = torch.zeros(8, 200, dtype=torch.bool)
        got[:, cols] = torch.cat(rows, dim=1)
        assert torch.equal(got, reference_mask(spec, torch.arange(a, a + 8), torch.arange(200), 4)[0])


@pytest.mark.parametrize("name", ["attn_sink", "block_homo"])
def test_chunked_kernel_reads_a_bounded_number_of_keys(name):
    """Work and saved keys grow as S * (budget + chunk): no chunk reads more than the pattern's budget plus
    the chunk itself (attn_sink: sinks + window - 1 + chunk; block_sparse: the band plus the vertical
    blocks before it), and every slot is read at most once."""
    spec = LongGenSpec([], **PATTERNS[name])
    chunk, seq_len = 8, 400
    for a in range(0, seq_len, chunk):
        b = min(seq_len, a + chunk)
        pieces = lg._chunk_pieces(spec, a, b)
        slots = torch.cat([torch.arange(s, e).view(-1, u)[::t].flatten() for s, e, u, t in pieces])
        assert torch.equal(slots, slots.unique()) and int(slots.max()) == b - 1
        if name == "attn_sink":
            assert len(slots) <= spec.sink_tokens + spec.window - 1 + (b - a)
            parts = lg._sink_window_parts(spec, a, b)  # the merged path's maskless split reads the same bound
            assert parts is None or sum(e - s for s, e, _ in parts) <= spec.sink_tokens + spec.window - 1 + (b - a)
        else:
            assert len(slots) <= budget(spec, a + 1) + spec.block_size + (b - a)


def test_chunked_kernel_shares_one_mask_past_the_sinks(monkeypatch):
    """Autograd saves each SDPA call's mask: chunks past the sinks must reuse one mask tensor (else the saved
    masks would grow as S * keys-per-chunk floats), and those chunks must not read the middle keys."""
    monkeypatch.setattr(lg, "_flash_cpu_available", lambda query: False)  # the masked path (merged has no masks)
    spec = LongGenSpec([], **SINK)
    q, k, v = qkv(1, 4, 2, 200)
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, **kw):
        seen.append((attn_mask.data_ptr(), key.shape[2]))
        return sdpa(query, key, value, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(lg.F, "scaled_dot_product_attention", spy)
    lg.chunked_attention(spec, q, k, v, None, 0.25).sum().backward()
    assert len(seen) == 25  # 200 / 8 chunks
    assert len({ptr for ptr, _ in seen}) <= 3  # the first chunks (sinks inside the window) differ
    assert max(n for _, n in seen) == 3 + 12 - 1 + 8


def test_auto_on_cpu_runs_the_chunked_kernel_for_shared_patterns(monkeypatch):
    calls = []
    for fn_name in ("chunked_attention", "block_attention", "dense_attention"):
        fn = getattr(lg, fn_name)
        monkeypatch.setattr(lg, fn_name, lambda *args, fn=fn, n=fn_name: calls.append(n) or fn(*args))
    for name in sorted(PATTERNS):
        calls.clear()
        with torch.no_grad():
            hybrid(PATTERNS[name], kernel="auto")(tokens(30))
        assert calls == [BLOCK_KERNEL_FN[name]] * 2, name


# ------------------------------------------------------------------------------------------- cache
@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_prefill_and_50_decode_steps_with_the_pruned_cache_match_one_sparse_forward(name):
    model = hybrid(PATTERNS[name])
    ids = tokens(30 + 50, seed=2)
    with torch.no_grad():
        want = model(ids, use_cache=False).logits
        cache = LongGenCache(model.config)
        got = [model(ids[:, :30], past_key_values=cache, use_cache=True).logits]
        for t in range(30, 80):
            got.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(got, dim=1), want, rtol=0, atol=1e-5)
    assert cache.get_seq_length() == 80 and cache.layers[1].keys.shape[-2] == 80  # full layer keeps all
    kept = cache.layers[0].keys.shape[-2]
    # shifted heads: 4 heads' vertical offsets cover every block mod vert_stride, so nothing can be evicted
    # (methods.md §6.2 caveat); the homogeneous patterns evict
    assert kept == 80 if name == "block_shifted" else kept < 80
    if name == "attn_sink":  # sinks + the last window - 1 keys, at their absolute slots
        assert cache.layers[0].slots.tolist() == [0, 1, 2, *range(80 - 11, 80)]


@pytest.mark.parametrize("name", ["attn_sink", "block_homo"])
def test_chunked_prefill_over_the_pruned_cache_matches_one_sparse_forward(name):
    """Queries of several tokens over a pruned cache (prefill in chunks of 13) with a right-padded row."""
    model = hybrid(PATTERNS[name])
    ids, mask = tokens(65, rows=2, seed=6), padded_mask(2, 65, "right", pads=4)
    with torch.no_grad():
        want = model(ids, attention_mask=mask, use_cache=False).logits
        cache = LongGenCache(model.config)
        got = [model(ids[:, t : t + 13], attention_mask=mask[:, : t + 13], past_key_values=cache).logits
               for t in range(0, 65, 13)]
    torch.testing.assert_close(torch.cat(got, dim=1)[mask.bool()], want[mask.bool()], rtol=0, atol=1e-5)
    assert cache.layers[0].keys.shape[-2] < 65


@pytest.mark.parametrize(("name", "seq_len"), [("attn_sink", 2048), ("block_homo", 2049)])
def test_kv_bytes_follow_the_formula(name, seq_len):
    """KV bytes / all-full KV bytes = k/N + (N-k)/N * budget/S (methods.md §6.1). The cache keeps what
    queries after S can read, the budget counts what query S-1 read: for blocks these agree when the last
    query opens a new block (S = m * block + 1); for attn_sink they differ by one key."""
    model = hybrid({"attn_sink": dict(SINK, sink_tokens=8, window=120),
                    "block_homo": dict(BLOCK, block_size=16, local_blocks=4, vert_stride=16)}[name])
    spec = LongGenSpec.from_dict(model.config.longgen)
    ids = tokens(seq_len)
    with torch.no_grad():
        sparse_cache = LongGenCache(model.config)
        model(ids, past_key_values=sparse_cache, use_cache=True)
        full_cache = DynamicCache()  # the stock cache of the same model keeps everything
        model(ids, past_key_values=full_cache, use_cache=True)
    n, k = 3, 1
    formula = k / n + (n - k) / n * budget(spec, seq_len) / seq_len
    ratio = kv_bytes(sparse_cache) / kv_bytes(full_cache)
    assert abs(ratio / formula - 1) < 0.01, (ratio, formula)
    assert ratio < 0.5


@pytest.mark.parametrize("name", ["attn_sink", "block_homo"])
def test_generate_equals_stepwise_argmax_of_full_sparse_forwards(name):
    """LongGenLlamaForCausalLM: greedy generate (LongGenCache by default), batch 2 with a left-padded row."""
    config = LongGenLlamaConfig(**tiny().config.to_dict())
    config.longgen = LongGenSpec([1], **PATTERNS[name]).to_dict()
    torch.manual_seed(0)
    model = LongGenLlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None  # always 25 new tokens, in both rows
    ids, mask = tokens(24, rows=2, seed=4), padded_mask(2, 24, "left", pads=5)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=25, do_sample=False, pad_token_id=0,
                         return_dict_in_generate=True)
    assert type(out.past_key_values).__name__ == "LongGenCache"
    assert out.past_key_values.layers[0].keys.shape[-2] < 24 + 25 - 1
    seq, m = ids, mask
    with torch.no_grad():
        for _ in range(25):
            pos = (m.cumsum(-1) - 1).clamp(min=0)  # what generate gives a left-padded row
            nxt = model(seq, attention_mask=m, position_ids=pos, use_cache=False).logits[:, -1].argmax(-1)
            seq, m = torch.cat([seq, nxt[:, None]], 1), torch.cat([m, torch.ones_like(m[:, :1])], 1)
    assert torch.equal(out.sequences, seq)


# ------------------------------------------------------------------------------------------ export
FRESH = r"""
with torch.no_grad():
    logits = model(ids).logits
    gen = model.generate(ids[:1, :16], max_new_tokens=30, do_sample=False, pad_token_id=0,
                         return_dict_in_generate=True)
torch.save({"logits": logits, "sequences": gen.sequences, "class": type(model).__name__,
            "attn": model.config._attn_implementation, "cache": type(gen.past_key_values).__name__,
            "kept": gen.past_key_values.layers[0].keys.shape[-2]}, out)
"""


def test_exported_class_reloads_in_a_fresh_process_without_longext(tmp_path):
    config = LongGenLlamaConfig(**tiny().config.to_dict())
    config.longgen = LongGenSpec([1], **SINK).to_dict()
    config.auto_map = {"AutoConfig": "modeling_longext_longgen.LongGenLlamaConfig",
                       "AutoModelForCausalLM": "modeling_longext_longgen.LongGenLlamaForCausalLM"}
    torch.manual_seed(0)
    model = LongGenLlamaForCausalLM(config).eval()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    shutil.copyfile(lg.__file__, folder / "modeling_longext_longgen.py")
    ids = tokens(64, rows=2, seed=5)
    got = run_fresh(tmp_path, FRESH, folder, ids)
    assert (got["class"], got["attn"], got["cache"]) == ("LongGenLlamaForCausalLM", "longgen_sparse", "LongGenCache")
    with torch.no_grad():
        torch.testing.assert_close(got["logits"], model(ids).logits, rtol=0, atol=1e-5)
        want = model.generate(ids[:1, :16], max_new_tokens=30, do_sample=False, pad_token_id=0)
    assert torch.equal(got["sequences"], want)
    assert got["kept"] == 3 + 12 - 1  # sinks + window - 1: the reloaded model evicts as trained
