"""HARPE (issue 5): per-head RoPE bases against stock transformers, the base strategies, and a tiny run
through train → eval → export, the export reloaded in a fresh process where longext cannot be imported."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, LlamaConfig

from conftest import build_tiny_model
from helpers import losses, run_fresh, write_recipe
from longext.errors import LongextError, RecipeError
from longext.methods.harpe import bases as hb
from longext.methods.harpe.modeling_longext_harpe import HARPE_ATTENTION, apply_harpe_rotary
from longext.methods.harpe import apply_harpe, head_bases
from longext.recipe import HarpeMethod, load_recipe

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
# HARPE Table 2 (millions, heads 1..32), typed from the paper (arXiv 2412.07171), not from the code.
PAPER_TABLE_M = [
    1.00, 1.15, 1.30, 1.45, 2.17, 2.20, 2.23, 2.47, 2.50, 2.65, 2.68, 2.71, 2.74, 2.80, 2.83, 2.92,
    3.01, 3.04, 3.10, 3.13, 3.16, 3.22, 3.43, 3.46, 3.61, 3.88, 4.09, 4.15, 4.39, 4.45, 4.51, 4.54,
]


def stock_model(arch: str, theta: float, **kw):
    return build_tiny_model(arch, rope_parameters={"rope_type": "default", "rope_theta": theta}, **kw)


def tokens(n: int = 48, rows: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 400, (rows, n), generator=torch.Generator().manual_seed(seed))


def method(**kw) -> HarpeMethod:
    return HarpeMethod(kind="harpe", target_len=kw.pop("target_len", 4096), **kw)


# ------------------------------------------------------------------------------ against stock
@pytest.mark.parametrize("arch", FAMILIES)
def test_equal_bases_give_the_stock_model_with_that_base(arch):
    model = stock_model(arch, 5e4)
    with torch.no_grad():
        reference = model(tokens()).logits
        apply_harpe(model, [5e4, 5e4])
        got = model(tokens()).logits
    assert type(model.model.layers[0].self_attn) in HARPE_ATTENTION.values()
    assert (got - reference).abs().max() < 1e-5


@pytest.mark.parametrize("bases", [[1e4, 3e5], [1e4, 5e4, 3e5, 2e6]], ids=["gqa-4q-2kv", "mha-4-heads"])
def test_each_head_rotates_with_its_own_base_head_by_head(bases):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    g = len(bases)  # GQA: q heads 0,1 -> base 0, q heads 2,3 -> base 1; MHA: head h -> base h
    model = stock_model("llama", 1e4, num_key_value_heads=g)
    apply_harpe(model, bases)
    q, k = torch.randn(2, 4, 40, 16), torch.randn(2, g, 40, 16)
    pos = torch.arange(100, 140).expand(2, -1)
    cos, sin = model.model.rotary_emb(q, pos)  # the installed rotary: [b, g, s, d]
    assert cos.shape == (2, g, 40, 16)
    q_rot, k_rot = apply_harpe_rotary(q, k, cos, sin)
    for head in range(4):
        group = head // (4 // g)
        config = stock_model("llama", bases[group]).config
        c, s = LlamaRotaryEmbedding(config)(q, pos)
        want_q, want_k = apply_rotary_pos_emb(q[:, head : head + 1], k[:, group : group + 1], c, s)
        torch.testing.assert_close(q_rot[:, head : head + 1], want_q, rtol=0, atol=1e-6)
        torch.testing.assert_close(k_rot[:, group : group + 1], want_k, rtol=0, atol=1e-6)


@pytest.mark.parametrize("group", [0, 1])
def test_with_gqa_a_groups_query_heads_see_their_key_heads_base(group):
    """Only group `group`'s query heads reach the output (o_proj columns of the others zeroed): the whole
    HARPE model then equals the stock model whose single base is that group's base."""
    bases = [2e3, 4e5]
    harpe, own, other = (stock_model("llama", theta) for theta in (1e4, bases[group], bases[1 - group]))
    for model in (harpe, own, other):
        for layer in model.model.layers:
            keep = torch.zeros(4, 16)
            keep[2 * group : 2 * group + 2] = 1  # query heads 2g, 2g+1 belong to kv head g
            layer.self_attn.o_proj.weight.data *= keep.flatten()
    apply_harpe(harpe, bases)
    with torch.no_grad():
        got = harpe(tokens(64)).logits
        assert (got - own(tokens(64)).logits).abs().max() < 1e-5
        assert (got - other(tokens(64)).logits).abs().max() > 1e-3  # the test can tell the bases apart


def test_swap_keeps_parameter_names_and_lora_targets():
    from longext.models import add_lora
    from longext.recipe import LoraSpec

    model = stock_model("qwen3", 1e4)
    before = {name: p for name, p in model.named_parameters()}
    apply_harpe(model, [1e4, 2e4])
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)  # same tensors too
    peft_model = add_lora(model, LoraSpec(r=2))
    assert sum("lora_A" in n for n, _ in peft_model.named_parameters()) == 4 * 2  # q/k/v/o in both layers


def test_swap_is_on_this_instance_only():
    from transformers.models.llama.modeling_llama import LlamaAttention

    patched, other = stock_model("llama", 1e4), stock_model("llama", 1e4)
    apply_harpe(patched, [1e4, 2e4])
    assert type(other.model.layers[0].self_attn) is LlamaAttention
    assert LlamaAttention.forward is not type(patched.model.layers[0].self_attn).forward


# ------------------------------------------------------------------------------------- bases
def test_table_on_a_32_head_model_is_the_papers_set():
    config = LlamaConfig(hidden_size=32 * 4, num_attention_heads=32, num_key_value_heads=32)
    got = head_bases(method(), config)
    assert got == pytest.approx([m * 1e6 for m in PAPER_TABLE_M], rel=1e-12)
    assert all(abs((b - 1e6) / 3e4 - round((b - 1e6) / 3e4)) < 1e-6 for b in got)  # on the 30k grid
    assert head_bases(method(bases={"kind": "table", "order": "descending"}), config) == sorted(got, reverse=True)


def test_table_for_fewer_kv_groups_keeps_both_ends_and_refuses_more_than_32():
    config = LlamaConfig(hidden_size=32 * 4, num_attention_heads=32, num_key_value_heads=8)
    got = head_bases(method(), config)
    assert len(got) == 8 and got[0] == 1.0e6 and got[-1] == 4.54e6 and got == sorted(got)
    big = LlamaConfig(hidden_size=64 * 4, num_attention_heads=64, num_key_value_heads=64)
    with pytest.raises(LongextError, match="method.bases.table: the table has 32 bases, the model needs 64"):
        head_bases(method(), big)


def test_uniform_explicit_and_rescaled_table():
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    assert head_bases(method(bases={"kind": "uniform", "b_min": 1e5, "b_max": 5e5}), config) == [1e5, 5e5]
    descending = {"kind": "uniform", "b_min": 1e5, "b_max": 5e5, "order": "descending"}
    assert head_bases(method(bases=descending), config) == [5e5, 1e5]
    assert head_bases(method(bases={"kind": "explicit", "values": [3e5, 1e5]}), config) == [3e5, 1e5]
    assert head_bases(method(bases={"kind": "table", "rescale": [1e4, 1e5]}), config) == pytest.approx([1e4, 1e5])
    with pytest.raises(LongextError, match=r"method.bases.values: expected one base per key/value head \(2"):
        head_bases(method(bases={"kind": "explicit", "values": [1e5, 2e5, 3e5]}), config)


def test_peak_valley_is_deterministic_and_returns_distinct_grid_values():
    first = hb.peak_valley_bases.__wrapped__(1e4, 2e5, 1e4, 6, 16, 2048)
    again = hb.peak_valley_bases.__wrapped__(1e4, 2e5, 1e4, 6, 16, 2048)
    assert first == again and len(set(first)) == 6 and first[0] == 1e4
    grid = set(hb.candidate_grid(1e4, 2e5, 1e4).tolist())
    assert set(first) <= grid
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    spec = method(target_len=2048, bases={"kind": "peak_valley", "b_min": 1e4, "b_max": 2e5, "stride": 1e4})
    assert head_bases(spec, config) == sorted(first[:2])
    with pytest.raises(LongextError, match="method.bases.stride: the candidate grid has 2 bases"):
        head_bases(method(bases={"kind": "peak_valley", "b_min": 1e4, "b_max": 2e4, "stride": 1e4}),
                   LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=4))


def test_per_head_needs_a_model_without_gqa():
    gqa = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(LongextError, match="method.assign: per_head needs one key/value head per query head"):
        head_bases(method(assign="per_head", bases={"kind": "uniform"}), gqa)
    mha = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=4)
    assert len(head_bases(method(assign="per_head", bases={"kind": "uniform"}), mha)) == 4


def test_recipe_checks(tmp_path, tiny_model_dir, corpus_dir):
    harpe = {"kind": "harpe", "target_len": 256, "bases": {"kind": "uniform", "b_min": 5e5, "b_max": 1e5}}
    path = write_recipe(tmp_path, tiny_model_dir, corpus_dir, method=harpe, rope={"kind": "yarn"})
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    text = str(err.value)
    assert "rope.kind: HARPE sets a RoPE base per head itself" in text
    assert "method.bases.b_max: must be above b_min 500000 (got 100000)" in text
    path = write_recipe(tmp_path, tiny_model_dir, corpus_dir, method={"kind": "harpe", "target_len": 256},
                        rope={"kind": "none", "theta": 5e5})
    with pytest.raises(RecipeError, match="rope.theta: HARPE sets a RoPE base per head in method.bases"):
        load_recipe(path)


# ------------------------------------------------------------------------- train, eval, export
@pytest.fixture(scope="module")
def harpe_run(tmp_path_factory, tiny_model_dir, corpus_dir):
    from longext.train import run_training

    tmp = tmp_path_factory.mktemp("harpe")
    harpe = {"kind": "harpe", "target_len": 256, "bases": {"kind": "explicit", "values": [2.0e3, 2.0e5]}}
    path = write_recipe(tmp, tiny_model_dir, corpus_dir, name="harpe", method=harpe, rope={"kind": "none"},
                        data={"seq_len": "auto"}, train={"steps": 2, "lr": 1.0e-2})
    return run_training(load_recipe(path))


def test_run_records_its_bases_and_trains_at_the_target_length(harpe_run):
    rope = json.loads((harpe_run / "rope.json").read_text())
    assert rope["extra"] == {"method": "harpe", "bases": [2.0e3, 2.0e5], "assign": "per_kv_group",
                             "strategy": "explicit", "reconstructed": False}
    assert load_recipe(harpe_run / "recipe.yaml").data.seq_len == 256  # single stage at target_len
    assert (harpe_run / "adapter" / "adapter_model.safetensors").is_file()


def test_eval_loads_the_run_with_its_bases(harpe_run, corpus_dir):
    from longext.evaluate.perplexity import document_token_ids, perplexity_at_lengths
    from longext.targets import load_target
    from longext.recipe import PerplexitySpec
    from longext.rotary import ScaledRotary

    loaded = load_target(harpe_run, dtype=torch.float32)
    base = loaded.model.get_base_model()
    assert isinstance(base.model.rotary_emb, ScaledRotary) and base.model.rotary_emb.head_bases == [2.0e3, 2.0e5]
    assert all(type(layer.self_attn) in HARPE_ATTENTION.values() for layer in base.model.layers)
    docs = document_token_ids(loaded.tokenizer, [p.read_text() for p in sorted(corpus_dir.glob("*.txt"))][:1])
    ppl = perplexity_at_lengths(loaded.model, docs, [256], PerplexitySpec(targets=64, windows=1),
                                set_length=loaded.set_length)
    assert 1 < ppl[256]["ppl"] < 1e4
    with torch.no_grad():  # the bases matter: the same weights with one swapped base give other logits
        ids = tokens(128)
        harpe_logits = loaded.model(ids).logits
        base.model.rotary_emb.head_bases = [2.0e5, 2.0e5]
        assert (loaded.model(ids).logits - harpe_logits).abs().max() > 1e-3


@pytest.mark.parametrize("group", [0, 1])
def test_first_logged_loss_is_the_stock_loss_with_the_groups_base(tmp_path, tiny_tokenizer, corpus_dir, group):
    """Stock transformers has no per-head bases, so the reference is the o_proj trick of
    test_with_gqa_a_groups_query_heads_see_their_key_heads_base on the base model of a real run: only kv group
    `group`'s query heads reach the output, and LoRA B starts at zero, so the run's step-1 loss is stock
    transformers' loss with that group's single base on the same micro-batch."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from longext.data import build_train_data
    from longext.resolve import resolve
    from longext.train import run_training

    bases = [2.0e3, 2.0e5]
    model = stock_model("llama", 1.0e4, vocab_size=len(tiny_tokenizer), initializer_range=0.2)  # peaked attention
    keep = torch.zeros(4, 16)
    keep[2 * group : 2 * group + 2] = 1  # query heads 2g, 2g+1 share kv head g
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight.data *= keep.flatten()
    model_dir = tmp_path / "base"
    model.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    harpe = {"kind": "harpe", "target_len": 256, "bases": {"kind": "explicit", "values": bases}}
    path = write_recipe(tmp_path, model_dir, corpus_dir, name="h1", method=harpe, rope={"kind": "none"},
                        data={"seq_len": "auto"}, train={"steps": 1})
    got = losses(run_training(load_recipe(path)))[1]

    recipe = resolve(load_recipe(path)).recipe
    batch = build_train_data(recipe, AutoTokenizer.from_pretrained(model_dir)).micro_batch(0)
    assert batch["input_ids"].shape == (1, 256)

    def stock(theta: float) -> float:
        config = AutoConfig.from_pretrained(model_dir)
        config.rope_parameters = {"rope_type": "default", "rope_theta": theta}
        ref = AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=torch.float32,
                                                   attn_implementation="sdpa").eval()
        with torch.no_grad():
            return ref(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels", "position_ids")}).loss.item()

    want = stock(bases[group])
    assert got == pytest.approx(want, rel=1e-6)
    # the other group's base and the model's own base (HARPE not applied) give other losses
    assert abs(stock(bases[1 - group]) - want) > 1e-3 and abs(stock(1.0e4) - want) > 1e-3


FRESH = r"""
with torch.no_grad():
    logits = model(ids).logits
    gen = model.generate(ids[:1, :16], max_new_tokens=20, do_sample=False, use_cache=True,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0)
torch.save({"logits": logits, "sequences": gen.sequences, "steps": torch.stack(gen.logits, 1),
            "refused": refused, "class": type(model).__name__, "cache": type(gen.past_key_values).__name__}, out)
"""


def test_export_reloads_in_a_fresh_process_without_longext(harpe_run, tmp_path):
    from longext.export import run_export
    from longext.targets import load_target

    out = tmp_path / "model"
    result = run_export(harpe_run, out)
    assert result.max_abs_diff < 1e-4 and result.dtype == "float32"
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "longext_harpe_llama" and config["architectures"] == ["HarpeLlamaForCausalLM"]
    assert config["head_rope_thetas"] == [2.0e3, 2.0e5] and config["head_rope_assign"] == "per_kv_group"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_longext_harpe.HarpeLlamaForCausalLM"
    code = (out / "modeling_longext_harpe.py").read_text()
    assert "longext." not in code.replace("modeling_longext_harpe", "") and "import longext" not in code

    ids = tokens(256, rows=2, seed=3)
    got = run_fresh(tmp_path, FRESH, out, ids)
    assert got["class"] == "HarpeLlamaForCausalLM" and got["cache"] == "DynamicCache"
    assert got["refused"] is not None and "trust_remote_code=True" in got["refused"]

    loaded = load_target(harpe_run, dtype=torch.float32)
    with torch.no_grad():
        forward = (got["logits"] - loaded.model(ids).logits).abs().max().item()
        want = loaded.model.generate(input_ids=ids[:1, :16], max_new_tokens=20, do_sample=False, use_cache=True,
                                     output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    decode = (got["steps"] - torch.stack(want.logits, 1)).abs().max().item()
    print(f"HARPE export parity: forward {forward:.3g}, 20 greedy decode steps {decode:.3g}")
    assert forward < 1e-4 and decode < 1e-4
    assert torch.equal(got["sequences"], want.sequences)

    exported = load_target(out, dtype=torch.float32)  # `longext eval` on the export: its own code, trusted
    assert exported.original_context == 128
    with torch.no_grad():
        assert (exported.model(ids).logits - got["logits"]).abs().max().item() < 1e-5


@pytest.mark.parametrize("arch", FAMILIES)
def test_exported_modeling_code_reproduces_the_in_tool_model_for_every_family(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    from longext.methods.harpe import write_harpe_code

    model = stock_model(arch, 1e4)
    apply_harpe(model, [3e3, 3e5])
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(write_harpe_code(tmp_path, arch, {"bases": [3e3, 3e5], "assign": "per_kv_group"}))
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        AutoConfig.from_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True, dtype=torch.float32).eval()
    assert type(reloaded).__name__ == f"Harpe{type(model).__name__}"
    with torch.no_grad():
        assert (reloaded(tokens(200)).logits - model(tokens(200)).logits).abs().max() < 1e-5


TOKENIZER_PROBE = r"""
import json, sys
from transformers import AutoTokenizer
folder, text = sys.argv[1], "Passkey 31415 is hidden in the grass."
ids = {str(trust): AutoTokenizer.from_pretrained(folder, trust_remote_code=trust)(text)["input_ids"]
       for trust in (False, True)}
print(json.dumps(ids))
"""


def test_the_exported_tokenizer_needs_no_custom_code(harpe_run, tmp_path, tiny_model_dir):
    """The tokenizer files name no custom code (no auto_map), so it loads without trust_remote_code and without
    transformers' [y/N] question, in a fresh process whose stdin is closed; the model classes keep their auto_map.
    (A bare AutoTokenizer.from_pretrained(OUT) still reads config.json through AutoConfig first, and a custom
    AutoConfig makes transformers ask: docs/export.md.)"""
    import subprocess
    import sys

    from transformers import AutoTokenizer

    from longext.export import run_export

    out = tmp_path / "model"
    run_export(harpe_run, out)
    assert "auto_map" not in json.loads((out / "tokenizer_config.json").read_text())
    assert "AutoModelForCausalLM" in json.loads((out / "config.json").read_text())["auto_map"]
    result = subprocess.run([sys.executable, "-c", TOKENIZER_PROBE, str(out)], capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "trust_remote_code" not in result.stdout + result.stderr and "[y/N]" not in result.stdout
    want = AutoTokenizer.from_pretrained(tiny_model_dir)("Passkey 31415 is hidden in the grass.")["input_ids"]
    assert json.loads(result.stdout) == {"False": want, "True": want}
