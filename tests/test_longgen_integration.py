"""LongGen integration (issue 6): the recipe block and its one-line errors, a tiny `longext train` run with
LoRA on ZeRO-2, evaluation of the run with its sparse layout, and export -> reload in a fresh process where
longext cannot be imported, with the pruned KV cache in `generate`.

The kernel itself (patterns, fast paths, cache formula) is tested in the kernel's own test file; here the
question is whether train, eval and export all use the same layout as the recipe says.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import bad_input, run_fresh, tokens, write_recipe
from longext.cli import main
from longext.errors import LongextError, RecipeError
from longext.recipe import LongGenMethod, load_recipe

ROOT = Path(__file__).resolve().parent.parent
# 2-layer tiny Llama (L0 = 128): auto layout = round(2/3) = 1 full layer, centred at (2 - 1) // 2 = 0.
SPARSE = {"type": "attn_sink", "sink_tokens": 4, "window": 32}
LONGGEN = {"kind": "longgen", "target_len": 256, "sparse": SPARSE}


# ------------------------------------------------------------------------------------------ recipe
def test_defaults_are_the_methods_md_choices_and_seq_len_auto_is_the_target(tmp_path, tiny_model_dir, corpus_dir):
    method = LongGenMethod(kind="longgen", target_len="128k")
    assert method.layout.full_layers == "auto" and method.layout.placement == "middle"
    assert method.layout.full_fraction == pytest.approx(1 / 3)
    assert (method.sparse.type, method.sparse.sink_tokens, method.sparse.window) == ("attn_sink", 64, 1984)
    assert (method.sparse.block_size, method.sparse.local_blocks, method.sparse.vert_stride) == (64, 16, 8)
    assert method.sparse.homo_head and method.kernel == "auto"
    path = write_recipe(tmp_path, tiny_model_dir, corpus_dir, method=LONGGEN, rope={"kind": "none"},
                        data={"seq_len": "auto"})
    assert load_recipe(path).seq_len == 256


@pytest.mark.parametrize("method, line", [
    ({"sparse": {"window": 0}}, "method.sparse.window: Input should be greater than or equal to 1 (got 0)"),
    ({"layout": {"placement": "side"}},
     "method.layout.placement: Input should be 'middle', 'bottom', 'top' or 'interleaved' (got 'side')"),
    ({"layout": {"full_layers": [1, -1]}}, "method.layout.full_layers: layer indices are 0-based and >= 0 (got [1, -1])"),
    ({"layout": {"full_layers": [0, 0]}}, "method.layout.full_layers: each layer at most once (got [0, 0])"),
    ({"layout": {"full_layers": "all"}},
     "method.layout.full_layers: expected a list of 0-based layer indices such as [10, 11, 12], or 'auto' (got 'all')"),
    ({"kernel": "triton"}, "method.kernel: Input should be 'auto', 'block', 'flex' or 'dense' (got 'triton')"),
    ({"sparse": {"type": "strided"}}, "method.sparse.type: Input should be 'attn_sink' or 'block_sparse' (got 'strided')"),
], ids=["window", "placement", "negative-layer", "duplicate-layer", "layers-not-a-list", "kernel", "type"])
def test_bad_method_fields_are_one_line_each_with_exit_2(capsys, tmp_path, tiny_model_dir, corpus_dir, method, line):
    path = write_recipe(tmp_path, tiny_model_dir, corpus_dir, method={**LONGGEN, **method}, rope={"kind": "none"})
    [got] = bad_input(capsys, "recipes", "validate", path)
    assert got.startswith(f"error: {path}:") and got.endswith(line), got


def test_unknown_field_in_the_sparse_block_names_the_allowed_ones(capsys, tmp_path, tiny_model_dir, corpus_dir):
    method = {**LONGGEN, "sparse": {"type": "block_sparse", "homo_heads": False}}
    path = write_recipe(tmp_path, tiny_model_dir, corpus_dir, method=method, rope={"kind": "none"})
    [line] = bad_input(capsys, "recipes", "validate", path)
    assert line.endswith("method.sparse.homo_heads: unknown field, did you mean homo_head? (allowed: block_size, "
                         "homo_head, local_blocks, sink_tokens, type, vert_stride, window)"), line


def test_layer_out_of_range_is_refused_against_the_models_layer_count(capsys, tmp_path, tiny_model_dir, corpus_dir):
    method = {**LONGGEN, "layout": {"full_layers": [0, 2, 5]}}
    path = write_recipe(tmp_path, tiny_model_dir, corpus_dir, method=method, rope={"kind": "none"})
    load_recipe(path)  # the schema cannot know the layer count ...
    [line] = bad_input(capsys, "train", path, "--dry-run")  # ... the resolved plan can (model config only)
    assert line.startswith(f"error: {path}:")  # the recipe line of the field, as for schema errors
    assert line.endswith(" method.layout.full_layers: layer 2, 5 is out of range for this model's 2 layers "
                         "(allowed 0..1; got [0, 2, 5])")


def test_dry_run_shows_the_resolved_layout(capsys, tmp_path, tiny_model_dir, corpus_dir):
    path = write_recipe(tmp_path, tiny_model_dir, corpus_dir, method=LONGGEN, rope={"kind": "none", "theta": 5e4})
    assert main(["train", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    rope = json.loads(out.split("# RoPE state written to the run directory and the exported config\n")[1].split("\n\n")[0])
    assert rope["extra"]["method"] == "longgen" and rope["extra"]["longgen"]["full_layers"] == [0]
    assert rope["parameters"]["rope_theta"] == 5e4


@pytest.mark.parametrize("placement, layers", [
    ("middle", [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]), ("bottom", list(range(11))), ("top", list(range(21, 32)))])
def test_auto_layout_for_llama2_7b_is_the_centred_third(placement, layers):
    from transformers import LlamaConfig

    from longext.methods.longgen import longgen_spec

    method = LongGenMethod(kind="longgen", target_len="128k", layout={"placement": placement})
    spec = longgen_spec(method, LlamaConfig(num_hidden_layers=32))
    assert spec.full_layers == layers  # methods.md §6.1: k = round(32/3) = 11, layers 10-20 when centred


def test_every_recipe_field_reaches_the_spec_that_train_eval_and_export_share():
    from transformers import LlamaConfig

    from longext.methods.longgen import longgen_spec

    sparse = {"type": "block_sparse", "sink_tokens": 3, "window": 5, "block_size": 16, "local_blocks": 3,
              "vert_stride": 4, "homo_head": False}
    method = LongGenMethod(kind="longgen", target_len=512, sparse=sparse, kernel="dense",
                           layout={"full_fraction": 0.5, "placement": "interleaved"})
    spec = longgen_spec(method, LlamaConfig(num_hidden_layers=8))
    assert spec.full_layers == [1, 3, 5, 7]  # 4 layers spread evenly: floor((i + 1/2) * 8 / 4)
    assert spec.to_dict() == {"full_layers": [1, 3, 5, 7], "sparse_type": "block_sparse", "sink_tokens": 3, "window": 5,
                              "block_size": 16, "local_blocks": 3, "vert_stride": 4, "homo_head": False,
                              "kernel": "dense"}
    explicit = LongGenMethod(kind="longgen", target_len=512, layout={"full_layers": [6, 2]})
    assert longgen_spec(explicit, LlamaConfig(num_hidden_layers=8)).full_layers == [2, 6]


def test_flex_kernel_is_refused_for_training_without_cuda(capsys, tmp_path, tiny_model_dir, corpus_dir):
    if torch.cuda.is_available():
        pytest.skip("CUDA present: flex trains there")
    path = write_recipe(tmp_path, tiny_model_dir, corpus_dir, method={**LONGGEN, "kernel": "flex"}, rope={"kind": "none"})
    [line] = bad_input(capsys, "train", path)
    assert line.startswith(f"error: {path}:")
    assert line.endswith(" method.kernel: flex trains on CUDA only (FlexAttention has no backward on CPU in this "
                         "torch); use auto or block here (got 'flex')")


def test_shipped_longgen_recipes_validate():
    for name in ("longgen-llama2-7b-4k-to-128k", "longgen-smollm2-cpu", "longgen-toy"):
        recipe = load_recipe(ROOT / "recipes" / f"{name}.yaml")
        assert recipe.method.kind == "longgen"
    toy = load_recipe(ROOT / "recipes" / "longgen-toy.yaml")
    assert toy.seq_len == toy.method.target_len == 1024


# ---------------------------------------------------------------------------- train, eval, export
@pytest.fixture(scope="module")
def longgen_run(tmp_path_factory, tiny_model_dir, corpus_dir):
    from longext.train import run_training

    tmp = tmp_path_factory.mktemp("longgen")
    path = write_recipe(tmp, tiny_model_dir, corpus_dir, name="longgen", method=LONGGEN,
                        rope={"kind": "none", "theta": 5.0e4}, data={"seq_len": "auto"},
                        train={"steps": 3, "lr": 1.0e-2, "zero_stage": 2})
    return run_training(load_recipe(path))


def hand_built(run_dir: Path, longgen: bool):
    """The run's base + RoPE + adapter loaded with transformers and peft directly, with LongGen applied by hand
    from a spec written out here (not read from the run), or left all-full."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from longext.methods.longgen.modeling_longext_longgen import LongGenSpec, apply_longgen

    recipe = load_recipe(run_dir / "recipe.yaml")
    model = AutoModelForCausalLM.from_pretrained(recipe.model.path, dtype=torch.float32, attn_implementation="sdpa",
                                                 rope_parameters={"rope_type": "default", "rope_theta": 5.0e4},
                                                 max_position_embeddings=256)
    if longgen:
        apply_longgen(model, LongGenSpec(full_layers=[0], sparse_type="attn_sink", sink_tokens=4, window=32))
    return PeftModel.from_pretrained(model, run_dir / "adapter").eval()


def test_run_records_the_resolved_layout_and_trains_the_adapter(longgen_run):
    from safetensors.torch import load_file

    rope = json.loads((longgen_run / "rope.json").read_text())
    extra = rope["extra"]
    assert extra["method"] == "longgen" and extra["num_layers"] == 2
    spec = extra["longgen"]
    assert spec["full_layers"] == [0] and spec["sparse_type"] == "attn_sink"
    assert (spec["sink_tokens"], spec["window"], spec["kernel"]) == (4, 32, "auto")
    assert rope["parameters"]["rope_theta"] == 5.0e4
    assert load_recipe(longgen_run / "recipe.yaml").data.seq_len == 256  # one stage at the target length
    weights = load_file(longgen_run / "adapter" / "adapter_model.safetensors")
    lora_b = [w for name, w in weights.items() if "lora_B" in name]
    assert lora_b and all(w.abs().max() > 0 for w in lora_b)  # B starts at zero: nonzero means it trained
    losses = [json.loads(line)["loss"] for line in (longgen_run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3
    # LoRA B starts at zero: step 1 is the base model with the run's RoPE and the hybrid layout, applied by hand
    want, full = (first_batch_loss(longgen_run, longgen=g) for g in (True, False))
    assert losses[0] == pytest.approx(want, rel=1e-5)
    # the sparse layer drops keys on this batch: the all-full loss (~3e-4 relative away with this near-uniform tiny model)
    # is ten tolerances away, so a run that trained all-full would fail the match above
    assert abs(full - want) > 10 * 1e-5 * want


def first_batch_loss(run_dir: Path, longgen: bool) -> float:
    """Stock transformers' loss of the run's base model (RoPE theta 5e4) on the run's first micro-batch, with
    LongGen applied by hand from a spec written out here (not read from the run), or left all-full."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from longext.data import build_train_data
    from longext.methods.longgen.modeling_longext_longgen import LongGenSpec, apply_longgen
    from longext.resolve import resolve
    from longext.train import MODEL_INPUTS

    recipe = resolve(load_recipe(run_dir / "recipe.yaml")).recipe
    batch = build_train_data(recipe, AutoTokenizer.from_pretrained(recipe.model.path)).micro_batch(0)
    assert batch["input_ids"].shape == (1, 256)  # longer than sink + window: the sparse layer drops keys
    model = AutoModelForCausalLM.from_pretrained(recipe.model.path, dtype=torch.float32, attn_implementation="sdpa",
                                                 rope_parameters={"rope_type": "default", "rope_theta": 5.0e4},
                                                 max_position_embeddings=256).eval()
    if longgen:
        apply_longgen(model, LongGenSpec(full_layers=[0], sparse_type="attn_sink", sink_tokens=4, window=32))
    with torch.no_grad():
        return model(**{k: batch[k] for k in MODEL_INPUTS}).loss.item()


def test_eval_loads_the_run_with_its_sparse_layout(longgen_run):
    from longext.targets import load_target

    loaded = load_target(longgen_run, dtype=torch.float32)
    ids = tokens(200)  # longer than sink + window, so the sparse layer drops keys
    with torch.no_grad():
        got = loaded.model(ids).logits
        by_hand = hand_built(longgen_run, longgen=True)(ids).logits
        all_full = hand_built(longgen_run, longgen=False)(ids).logits
    assert (got - by_hand).abs().max() < 1e-5
    assert (got - all_full).abs().max() > 1e-3  # the layout is really in use
    with torch.no_grad():  # inside sink + window every query sees every key: the hybrid equals all-full there
        short = tokens(36)
        assert (loaded.model(short).logits - hand_built(longgen_run, longgen=False)(short).logits).abs().max() < 1e-4


def test_cli_eval_of_the_run_scores_the_sparse_model(longgen_run, corpus_dir, tmp_path):
    from longext.evaluate.perplexity import document_token_ids, perplexity_at_lengths
    from longext.models import load_tokenizer
    from longext.recipe import PerplexitySpec

    doc = corpus_dir / "doc0.txt"
    args = ["eval", longgen_run, "--lengths", "256", "--texts", doc, "--no-passkey", "--out", tmp_path / "eval",
            "-s", "perplexity.targets=64", "-s", "perplexity.windows=1"]
    assert main([str(a) for a in args]) == 0
    got = json.loads((tmp_path / "eval" / "eval.json").read_text())["models"][0]["perplexity"]["256"]["ppl"]
    ids = document_token_ids(load_tokenizer(str(load_recipe(longgen_run / "recipe.yaml").model.path)), [doc.read_text()])
    spec = PerplexitySpec(targets=64, windows=1)
    want, full = (perplexity_at_lengths(hand_built(longgen_run, longgen=g), ids, [256], spec)[256]["ppl"] for g in (True, False))
    assert got == pytest.approx(want, rel=1e-4) and got != pytest.approx(full, rel=1e-3)


FRESH = r"""
modeling = sys.modules[type(model).__module__]
with torch.no_grad():
    logits = model(ids).logits
    gen = model.generate(ids[:1, :64], max_new_tokens=40, do_sample=False, use_cache=True,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0)
torch.save({"logits": logits, "sequences": gen.sequences, "steps": torch.stack(gen.logits, 1),
            "refused": refused, "class": type(model).__name__, "cache": type(gen.past_key_values).__name__,
            "kv_bytes": modeling.kv_bytes(gen.past_key_values), "longgen": dict(model.config.longgen)}, out)
"""


def test_export_reloads_in_a_fresh_process_and_generates_with_the_pruned_cache(longgen_run, tmp_path):
    from longext.export import run_export
    from longext.targets import load_target

    out = tmp_path / "model"
    result = run_export(longgen_run, out)
    assert result.max_abs_diff < 1e-4 and result.dtype == "float32"
    config = json.loads((out / "config.json").read_text())
    spec = json.loads((longgen_run / "rope.json").read_text())["extra"]["longgen"]
    assert config["longgen"] == spec and config["rope_parameters"]["rope_theta"] == 5.0e4
    assert config["model_type"].startswith("longext_") and config["longext"]["method"] == "longgen"
    assert config["auto_map"]["AutoModelForCausalLM"] == f"modeling_longext_longgen.{config['architectures'][0]}"
    code = (out / "modeling_longext_longgen.py").read_text()
    assert "import longext" not in code and "from longext" not in code

    ids = tokens(200, seed=3)
    got = run_fresh(tmp_path, FRESH, out, ids)
    assert got["refused"] is not None and "trust_remote_code=True" in got["refused"]
    assert got["class"] == config["architectures"][0] and got["cache"] == "LongGenCache" and got["longgen"] == spec

    loaded = load_target(longgen_run, dtype=torch.float32)
    with torch.no_grad():
        forward = (got["logits"] - loaded.model(ids).logits).abs().max().item()
        # the in-tool model decodes with a plain DynamicCache (nothing evicted): the same logits prove that
        # the export's pruned cache drops only keys the pattern can no longer read
        want = loaded.model.generate(input_ids=ids[:1, :64], max_new_tokens=40, do_sample=False, use_cache=True,
                                     output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    decode = (got["steps"] - torch.stack(want.logits, 1)).abs().max().item()
    print(f"LongGen export parity: forward {forward:.3g}, 40 greedy decode steps {decode:.3g}")
    assert forward < 1e-4 and decode < 1e-4
    assert torch.equal(got["sequences"], want.sequences)

    # pruned: the full layer keeps every token, the sparse one at most sink + window; fp32, 2 kv heads x 16 dims
    total, per_token_layer = got["sequences"].shape[1] - 1, 2 * 2 * 16 * 4  # last token's KV is never written
    full_bytes = 2 * total * per_token_layer
    assert total > 4 + 32 + 8
    assert total * per_token_layer < got["kv_bytes"] <= (total + 4 + 32 + 1) * per_token_layer < full_bytes

    exported = load_target(out, dtype=torch.float32)  # `longext eval` on the export: its own code, trusted
    assert exported.original_context == 128
    with torch.no_grad():
        assert (exported.model(ids).logits - got["logits"]).abs().max().item() < 1e-5


# ------------------------------------------------------------------------------------------- bench
def test_bench_cases_pair_each_measurement_with_an_all_full_twin():
    from longext.bench.suites import longgen_cases

    quick, full = longgen_cases(quick=True), longgen_cases(quick=False)
    for cases in (quick, full):
        efficiency = [c for c in cases if c["kind"] == "longgen"]
        for case in efficiency:  # the twin differs in the arm only
            twin = next(c for c in efficiency if c["name"] == case["name"].rsplit("-", 1)[0] + "-full")
            assert {k: v for k, v in case.items() if k not in ("name", "arm")} == \
                   {k: v for k, v in twin.items() if k not in ("name", "arm")}
        lg, plain = (next(c for c in cases if c["name"] == f"longgen-toy-passkey-{arm}") for arm in ("longgen", "full"))
        assert lg["recipe"]["method"]["kind"] == "longgen" and plain["recipe"]["method"]["kind"] == "standard"
        assert {k: v for k, v in lg["recipe"].items() if k not in ("name", "method")} == \
               {k: v for k, v in plain["recipe"].items() if k not in ("name", "method")}  # same budget and rope
    assert {(c["model"], c["length"]) for c in full if c["kind"] == "longgen"} == {("toy", 1024), ("smollm2", 16384)}
    assert {c["model"] for c in quick if c["kind"] == "longgen"} == {"toy"}


def test_bench_kv_bytes_after_prefill_follow_the_formula_on_the_toy_base():
    from longext.bench.longgen import prefill_case
    from longext.bench.suites import TOY_SPARSE

    case = {"model": "toy", "length": 1024, "sparse": TOY_SPARSE, "repeats": 1}
    hybrid, full = (prefill_case({**case, "arm": arm}) for arm in ("longgen", "full"))
    k, n = len(hybrid["full_layers"]), hybrid["layers"]
    assert (k, n, hybrid["budget"]) == (1, 4, 128) and hybrid["cache"] == "LongGenCache"
    # fp32, 4 kv heads x 32 dims, keys and values: 1024 B per token per layer
    assert full["kv_bytes"] == n * 1024 * 1024
    want = k / n + (n - k) / n * hybrid["budget"] / 1024
    assert hybrid["kv_bytes"] / full["kv_bytes"] == pytest.approx(want, rel=0.01)


def test_bench_report_renders_ratios_and_the_issue_bars():
    from longext.bench.report import render

    def case(name, **result):
        model, measure, arm = name.split("-")[1:]
        c = {"kind": "longgen", "name": name, "model": model, "length": 1024, "measure": measure, "arm": arm,
             "sparse": {"type": "attn_sink", "sink_tokens": 4, "window": 124}}
        return {"case": c, "result": result}

    info = {"full_layers": [1], "layers": 4, "budget": 128}
    doc = {"suite": "longgen", "quick": True, "cases": [
        case("longgen-toy-prefill-longgen", kv_bytes=40 * 2**20, prefill_seconds=2.0, **info),
        case("longgen-toy-prefill-full", kv_bytes=100 * 2**20, prefill_seconds=3.0, **info),
        case("longgen-toy-train-longgen", step_seconds=1.0), case("longgen-toy-train-full", step_seconds=1.2)]}
    text = render({"longgen": doc})
    row = "| toy | 1k | [1] of 4 | sinks 4 + window 124 | 100.00 | 40.00 | 60.0 % | 65.6 % | 3.00 | 2.00 | 1.50 | 1.24 |"
    assert row in text and "| 1.20 | 1.34 |" in text  # FLOP ratios of the committed toy base (4 layers, 1 full)
    assert "- toy at 1k: KV saving 60.0 % (needs ≥ 55.0 %): holds" in text
    assert "- toy at 1k: prefill speed-up 1.50x (needs ≥ 1.50x): holds" in text
    assert "- toy at 1k: training-step speed-up 1.20x (needs ≥ 1.30x): fails\n" in text + "\n"
    doc["cases"][1]["result"]["prefill_seconds"] = 2.2
    assert ("- toy at 1k: prefill speed-up 1.10x (needs ≥ 1.50x): fails; the FLOP ratio is 1.24x, so no kernel "
            "reaches the bar on this model and length") in render({"longgen": doc})


def test_flop_ratios_follow_the_pattern_and_the_hand_count():
    """longext.bench.longgen.flop_ratios: 1 when the window covers the length; otherwise the hand count of a
    2-layer model with one sparse layer (sinks 2 + window 4 at length 8)."""
    from longext.bench.longgen import flop_ratios

    config = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2, "vocab_size": 10,
              "num_attention_heads": 2, "num_key_value_heads": 1}
    wide = flop_ratios(config, {"sink_tokens": 2, "window": 64}, 1, 8, False)
    assert wide == {"prefill": pytest.approx(1.0), "train": pytest.approx(1.0)}
    pairs_full, pairs_sparse = 36, 1 + 2 + 3 + 4 + 5 + 6 + 6 + 6  # per query q: k <= q and (k < 2 or q - k < 4)
    linear = 2 * 8 * (2 * 8 * 8 + 2 * 8 * 4 + 3 * 8 * 16)
    attention = 4 * 4 * 2  # 4 h per query head and pair, h = 4, 2 heads
    full = 2 * linear + 2 * attention * pairs_full + 2 * 8 * 10
    hybrid = 2 * linear + attention * (pairs_full + pairs_sparse) + 2 * 8 * 10
    assert flop_ratios(config, {"sink_tokens": 2, "window": 4}, 1, 8, False)["prefill"] == pytest.approx(full / hybrid)
