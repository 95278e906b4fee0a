"""The model families of issue 19 (Gemma 2/3, Phi-3, OLMo 2, Mixtral, Qwen3-MoE; longext.families) against stock
transformers: every method's patch at neutral settings gives the stock logits, every family x method trains a
first step whose loss equals the stock model with the method applied by hand, and every such run exports to a folder
that a fresh process without longext reloads with the same logits. Tiny models built from a config, CPU, fp32."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from conftest import build_tiny_model, tiny_config
from helpers import losses, tokens, write_recipe
from longext.errors import LongextError
from longext.families import FULL, SLIDING

NEW = ("gemma2", "gemma3_text", "phi3", "olmo2", "mixtral", "qwen3_moe")
LAYERED = ("gemma2", "gemma3_text")
L0, TARGET = 128, 256


def methods_for(arch: str) -> list[str]:
    return ["standard", "pose", "e2llm", "harpe", "longrecipe"] + ([] if arch in LAYERED else ["longgen"])


MATRIX = [(arch, method) for arch in NEW for method in methods_for(arch)]


def theta_of(config) -> float:
    params = config.rope_parameters
    return (params.get(FULL) or params)["rope_theta"]


# ------------------------------------------------------------------------ neutral settings = stock
@pytest.mark.parametrize("arch", NEW)
def test_every_patch_at_neutral_settings_gives_the_stock_logits(arch):
    """Per-layer-type RoPE with the model's own setting (Gemma 2's patch), the scaled rotary at scale 1 (E2-LLM),
    HARPE with every base equal to the model's, LongGen with every layer full: each equals stock within 1e-5."""
    from longext.families import apply_family_rope
    from longext.methods.harpe import apply_harpe
    from longext.methods.longgen.modeling_longext_longgen import LongGenSpec, apply_longgen
    from longext.rotary import apply_scaled_rotary, set_rope_scale

    ids = tokens(80)  # longer than Gemma's 32-token sliding window
    model = build_tiny_model(arch, initializer_range=0.2)
    with torch.no_grad():
        stock = model(ids).logits
    params = copy.deepcopy(model.config.rope_parameters)
    layered = params if FULL in params else {SLIDING: params, FULL: params}

    def diff() -> float:
        with torch.no_grad():
            return (model(ids).logits - stock).abs().max().item()

    apply_family_rope(model, layered)
    assert diff() < 1e-5
    apply_scaled_rotary(model)
    set_rope_scale(model, 1.0)
    assert diff() < 1e-5
    set_rope_scale(model, None)
    theta = theta_of(model.config)
    apply_harpe(model, [theta, theta])
    assert diff() < 1e-5
    if arch not in LAYERED:
        longgen = build_tiny_model(arch, initializer_range=0.2)
        apply_longgen(longgen, LongGenSpec(full_layers=[0, 1]))
        with torch.no_grad():
            assert (longgen(ids).logits - stock).abs().max().item() < 1e-5


@pytest.mark.parametrize("arch", NEW)
@pytest.mark.parametrize("group", [0, 1])
def test_harpe_heads_of_a_kv_group_rotate_with_its_base(arch, group):
    """Only kv group `group`'s query heads reach the output (the o_proj columns of the others zeroed): the HARPE model
    equals the stock model whose (full-attention layers') base is that group's base, for every family's attention
    (Phi-3's fused qkv_proj, the q/k norms of OLMo 2 and Gemma 3, Gemma 2's soft-capped scores)."""
    from longext.methods.harpe import apply_harpe

    bases = [2e3, 4e5]
    models = [build_tiny_model(arch, initializer_range=0.2) for _ in range(3)]
    for model, theta in zip(models[1:], (bases[group], bases[1 - group])):
        _set_full_theta(model, theta)
    for model in models:
        for layer in model.model.layers:
            keep = torch.zeros(4, 16)
            keep[2 * group: 2 * group + 2] = 1  # query heads 2g, 2g+1 belong to kv head g
            layer.self_attn.o_proj.weight.data *= keep.flatten()
    harpe, own, other = models
    apply_harpe(harpe, bases)
    ids = tokens(64)
    with torch.no_grad():
        got = harpe(ids).logits
        assert (got - own(ids).logits).abs().max() < 1e-5
        assert (got - other(ids).logits).abs().max() > 1e-4  # the test tells the bases apart


def _set_full_theta(model, theta: float) -> None:
    """Stock model whose full-attention layers (all layers but Gemma's sliding ones) use base `theta`."""
    from longext.families import apply_family_rope

    params = copy.deepcopy(model.config.rope_parameters)
    if FULL in params:  # Gemma 3: the stock rotary reads its per-type buffers once: rebuild it
        from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding

        model.config.rope_parameters[FULL]["rope_theta"] = theta
        model.model.rotary_emb = Gemma3RotaryEmbedding(model.config)
    elif model.config.model_type == "gemma2":
        apply_family_rope(model, {SLIDING: params, FULL: {**params, "rope_theta": theta}})
    else:
        config = copy.deepcopy(model.config)
        config.rope_parameters = {**params, "rope_theta": theta}
        model.model.rotary_emb = type(model.model.rotary_emb)(config)


# ------------------------------------------------------------------ the layer types of Gemma 2/3
@pytest.mark.parametrize("arch", LAYERED)
def test_only_the_full_attention_layers_are_extended(arch, tmp_path, corpus_dir):
    """build_model with YaRN on a Gemma model equals a forward written out here: stock layers, the sliding-window
    layers with the model's own cos/sin, the full-attention layer with YaRN's (stock rotary modules)."""
    from longext.models import build_model
    from longext.recipe import load_recipe
    from longext.resolve import resolve

    model_dir = saved_family_model(tmp_path, arch)
    path = write_recipe(tmp_path, model_dir, corpus_dir, rope={"kind": "yarn"}, method={"kind": "standard", "target_len": TARGET})
    resolved = resolve(load_recipe(path))
    assert resolved.rope.parameters[SLIDING] == _stock_params(model_dir)[SLIDING]
    assert resolved.rope.parameters[FULL]["rope_type"] == "yarn"
    ours = build_model(resolved).eval()
    stock = _stock(model_dir)
    ids = tokens(TARGET)
    batch = {"input_ids": ids, "position_ids": torch.arange(TARGET).expand(2, -1), "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        want = by_hand(stock, _yarn(model_dir), batch)
        got = ours(**batch).logits
        plain = stock(**batch).logits
    assert (got - want).abs().max() < 1e-5
    assert (got - plain).abs().max() > 1e-3  # the full-attention layer's RoPE did change


def by_hand(model, full_params: dict, batch: dict):
    """A stock Gemma 2/3 forward written out: the sliding-window layers get the model's own cos/sin, the
    full-attention layers cos/sin of a stock rotary module built on `full_params`. Returns logits (or the loss when
    the batch has labels)."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    inner, config = model.model, model.config
    hidden = inner.embed_tokens(batch["input_ids"])
    pos = batch["position_ids"]
    full_config = copy.deepcopy(config)
    if FULL in config.rope_parameters:  # Gemma 3's rotary takes a layer type
        full_config.rope_parameters = {**config.rope_parameters, FULL: full_params}
        rotary = type(inner.rotary_emb)(full_config)
        cos_sin = {kind: rotary(hidden, pos, kind) for kind in (SLIDING, FULL)}
    else:
        full_config.rope_parameters = full_params
        cos_sin = {SLIDING: inner.rotary_emb(hidden, pos), FULL: type(inner.rotary_emb)(full_config)(hidden, pos)}
    args = dict(config=config, inputs_embeds=hidden, attention_mask=batch["attention_mask"], past_key_values=None,
                position_ids=pos)
    masks = {FULL: create_causal_mask(**args), SLIDING: create_sliding_window_causal_mask(**args)}
    for layer, kind in zip(inner.layers, config.layer_types):
        hidden = layer(hidden, attention_mask=masks[kind], position_embeddings=cos_sin[kind], position_ids=pos)
    logits = model.lm_head(inner.norm(hidden))
    if config.final_logit_softcapping is not None:
        logits = torch.tanh(logits / config.final_logit_softcapping) * config.final_logit_softcapping
    if "labels" in batch:
        return model.loss_function(logits, batch["labels"], config.vocab_size)
    return logits


def _yarn(model_dir) -> dict:
    return {"rope_type": "yarn", "factor": TARGET / L0, "rope_theta": theta_of(_config(model_dir)),
            "original_max_position_embeddings": L0, "beta_fast": 32.0, "beta_slow": 1.0}


# ------------------------------------------------------------------------------------ helpers
def _config(model_dir):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir)


def _stock_params(model_dir) -> dict:
    params = _config(model_dir).rope_parameters
    return params if FULL in params else {SLIDING: params, FULL: params}


def _stock(model_dir, rope_parameters: dict | None = None, max_positions: int = TARGET):
    """Stock transformers' model of `model_dir`, with `rope_parameters` for the whole config if given."""
    from transformers import AutoModelForCausalLM

    config = _config(model_dir)
    if rope_parameters is not None:
        config.rope_parameters = rope_parameters
    config.max_position_embeddings = max_positions
    if getattr(config, "head_dim", 0) is None:  # Mixtral: transformers' yarn multiplies config.head_dim (None) otherwise
        config.head_dim = config.hidden_size // config.num_attention_heads
    attn = "eager" if config.model_type == "gemma2" else "sdpa"
    return AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=torch.float32,
                                                attn_implementation=attn).eval()


def saved_family_model(tmp_path, arch: str):
    """A saved tiny model of the family with the test tokenizer (larger weights: peaked attention, so RoPE moves
    the loss)."""
    from conftest import build_tokenizer, synthetic_text

    folder = tmp_path / f"model-{arch}"
    if not folder.exists():
        tokenizer = build_tokenizer([synthetic_text(3000, s) for s in range(2)])
        build_tiny_model(arch, vocab_size=len(tokenizer), initializer_range=0.2).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("families")
    out = {}
    for arch in NEW:
        out[arch] = root / arch
        build_tiny_model(arch, vocab_size=len(tiny_tokenizer), initializer_range=0.2).save_pretrained(out[arch])
        tiny_tokenizer.save_pretrained(out[arch])
    return out


# ------------------------------------------------------------------------- one step per method
HARPE_BASE = 3.0e4  # every head one base, unlike the model's: the reference is the stock model with that base


def method_recipe(arch: str, method: str) -> dict:
    """The recipe sections of a family x method run: RoPE past L0 = 128 at target 256 wherever the method has one."""
    longrope = {"kind": "longrope"}  # Phi-3's config takes no linear/yarn: LongRoPE with YaRN's divisors
    ropes = {"standard": longrope if arch == "phi3" else {"kind": "yarn"},
             "pose": {"kind": "longrope", "long_factor": 2.0} if arch == "phi3" else {"kind": "linear"},
             "longgen": {"kind": "none", "theta": 5.0e4}}
    blocks = {"standard": {"kind": "standard"}, "pose": {"kind": "pose"}, "e2llm": {"kind": "e2llm"},
              "harpe": {"kind": "harpe", "bases": {"kind": "explicit", "values": [HARPE_BASE, HARPE_BASE]}},
              "longrecipe": {"kind": "longrecipe"},
              "longgen": {"kind": "longgen", "layout": {"full_layers": [0]},
                          "sparse": {"type": "attn_sink", "sink_tokens": 4, "window": 32}}}
    seq_len = {"standard": TARGET, "longgen": TARGET}.get(method, "auto")
    return {"method": {**blocks[method], "target_len": TARGET}, "rope": ropes.get(method, {"kind": "none"}),
            "data": {"seq_len": seq_len}, "train": {"steps": 1, "lr": 1.0e-2}}


@pytest.fixture(scope="module")
def family_runs(tmp_path_factory, family_dirs, corpus_dir):
    """Every family x method run, trained for one step on first use."""
    from longext.recipe import load_recipe
    from longext.train import run_training

    root, runs = tmp_path_factory.mktemp("family-runs"), {}

    def get(arch: str, method: str):
        key = (arch, method)
        if key not in runs:
            path = write_recipe(root, family_dirs[arch], corpus_dir, name=f"{arch}-{method}", **method_recipe(arch, method))
            runs[key] = (path, run_training(load_recipe(path)))
        return runs[key]

    return get


def first_batch(path):
    """The resolved recipe, its RoPE state and the run's first micro-batch, built as training builds it."""
    from transformers import AutoTokenizer

    from longext.data import build_train_data
    from longext.methods import method_for
    from longext.recipe import load_recipe
    from longext.resolve import resolve

    resolved = resolve(load_recipe(path))
    recipe = resolved.recipe
    setup = method_for(recipe.method.kind).setup(recipe, resolved.rope)
    tokenizer = AutoTokenizer.from_pretrained(resolved.model_dir)
    data = setup.build_data(recipe, tokenizer) if setup.build_data else build_train_data(recipe, tokenizer, setup.positions)
    return resolved, data.micro_batch(0)


def reference_loss(arch: str, method: str, model_dir, resolved, batch) -> float:
    """Stock transformers' loss on the batch with the method applied by hand: the RoPE setting written out here
    for the full-attention layers (all layers outside Gemma), LongGen from a spec written out here."""
    from longext.methods.longgen.modeling_longext_longgen import LongGenSpec, apply_longgen
    from longext.rope import yarn_divisors
    from longext.train import MODEL_INPUTS

    config = _config(model_dir)
    theta, s = theta_of(config), TARGET / L0
    settings = {
        "standard": _yarn(model_dir),
        "pose": {"rope_type": "linear", "factor": s, "rope_theta": theta},
        "harpe": {"rope_type": "default", "rope_theta": HARPE_BASE},
        "longgen": {"rope_type": "default", "rope_theta": 5.0e4},
    }
    if method == "e2llm":  # PI by the sample's scale g: positions (m + t) / g
        g = float(batch["rope_scale"])
        settings["e2llm"] = {"rope_type": "linear", "factor": g, "rope_theta": theta} if g != 1 else \
            {"rope_type": "default", "rope_theta": theta}
    if method == "longrecipe":  # its enlarged base, b (s L/L0 - (s - 1))^(d/(d-2)) at L = target, s = round(L/L0)
        d = 16
        settings["longrecipe"] = {"rope_type": "default", "rope_theta": theta * (2 * TARGET / L0 - 1) ** (d / (d - 2))}
    full = settings[method]
    if arch == "phi3" and full["rope_type"] in ("yarn", "linear"):  # LongRoPE stating the same frequencies
        long = yarn_divisors(theta, s, L0, 16) if method == "standard" else [s] * 8
        full = {"rope_type": "longrope", "rope_theta": theta, "factor": s, "original_max_position_embeddings": L0,
                "short_factor": [1.0] * 8, "long_factor": long}
    inputs = {k: batch[k] for k in MODEL_INPUTS}
    with torch.no_grad():
        if arch == "gemma2":
            return by_hand(_stock(model_dir), full, inputs).item()
        if arch == "gemma3_text":
            return _stock(model_dir, {**config.rope_parameters, FULL: full})(**inputs).loss.item()
        model = _stock(model_dir, full)
        if method == "longgen":
            apply_longgen(model, LongGenSpec(full_layers=[0], sparse_type="attn_sink", sink_tokens=4, window=32))
        return model(**inputs).loss.item()


@pytest.mark.parametrize("arch, method", MATRIX)
def test_first_step_loss_equals_the_stock_model_with_the_method_by_hand(family_runs, family_dirs, arch, method):
    """LoRA B starts at zero: the first logged loss is the base model's with the method's positions and RoPE on the
    run's first micro-batch; it must equal stock transformers with the method applied by hand."""
    path, run = family_runs(arch, method)
    resolved, batch = first_batch(path)
    got = losses(run)[1]
    want = reference_loss(arch, method, family_dirs[arch], resolved, batch)
    assert math.isfinite(got) and got == pytest.approx(want, rel=1e-5)


# ------------------------------------------------------------------------------------ export
FRESH_ALL = r"""
import json, sys
sys.path.append(sys.argv[1])  # site-packages only: no cwd, no editable finder, no PYTHONPATH
try:
    import longext
except ImportError:
    pass
else:
    raise SystemExit("longext is importable in the fresh process")
import torch
from transformers import AutoModelForCausalLM
folders, ids = json.loads(open(sys.argv[2]).read()), torch.load(sys.argv[3])
out = {}
for key, folder in folders.items():
    try:
        AutoModelForCausalLM.from_pretrained(folder)
        refused = None
    except Exception as err:
        refused = f"{type(err).__name__}: {err}"
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        out[key] = {"refused": refused, "class": type(model).__name__, "logits": model(ids).logits}
torch.save(out, sys.argv[4])
"""


# PoSE and LongRecipe export the way `standard` does (a RoPE setting in the config, nothing else): their round trips
# run with the slow tests, the rest in the fast suite
SAME_EXPORT_AS_STANDARD = ("pose", "longrecipe")
FAST_EXPORTS = [(a, m) for a, m in MATRIX if m not in SAME_EXPORT_AS_STANDARD]
SLOW_EXPORTS = [(a, m) for a, m in MATRIX if m in SAME_EXPORT_AS_STANDARD]


@pytest.fixture(scope="module")
def exported(family_runs, tmp_path_factory):
    """Exports of the family x method runs (E2-LLM for the window 256) on first use, a group at a time, each group
    reloaded in ONE fresh process where longext cannot be imported: {(arch, method): (folder, what it saw)}."""
    done = {}

    def get(arch: str, method: str):
        if (arch, method) not in done:
            group = FAST_EXPORTS if (arch, method) in FAST_EXPORTS else SLOW_EXPORTS
            done.update(_export_group(group, family_runs, tmp_path_factory.mktemp("family-exports")))
        return done[(arch, method)]

    return get


def _export_group(group, family_runs, root) -> dict:
    import subprocess
    import sys
    import sysconfig

    from longext.export import run_export

    folders = {}
    for arch, method in group:
        _, run = family_runs(arch, method)
        folders[f"{arch}-{method}"] = str(run_export(run, root / f"{arch}-{method}",
                                                     length=TARGET if method == "e2llm" else None).out_dir)
    (root / "folders.json").write_text(json.dumps(folders))
    torch.save(tokens(200), root / "ids.pt")
    (root / "fresh.py").write_text(FRESH_ALL)
    proc = subprocess.run([sys.executable, "-I", "-S", str(root / "fresh.py"), sysconfig.get_paths()["purelib"],
                           str(root / "folders.json"), str(root / "ids.pt"), str(root / "got.pt")],
                          cwd=root, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(root / "got.pt")
    return {(arch, method): (folders[f"{arch}-{method}"], got[f"{arch}-{method}"]) for arch, method in group}


OWN_CODE = {"harpe": "longext_harpe_", "longgen": "longext_longgen_"}


@pytest.mark.parametrize("arch, method", FAST_EXPORTS + [pytest.param(*x, marks=pytest.mark.slow) for x in SLOW_EXPORTS])
def test_export_reloads_in_a_fresh_process_with_the_in_tool_logits(exported, family_runs, arch, method):
    """Plain transformers in a process without longext reloads the export (its own modeling code for HARPE, LongGen
    and an extended Gemma 2, which it refuses without trust_remote_code) with the logits of the run as
    `longext eval` loads it; the config holds the v5 and, where the family has them, the legacy RoPE keys."""
    from longext.targets import load_target

    folder, fresh = exported(arch, method)
    config = json.loads(open(f"{folder}/config.json").read())
    loaded = load_target(family_runs(arch, method)[1], dtype=torch.float32)
    loaded.set_length(TARGET)
    with torch.no_grad():
        want = loaded.model(tokens(200)).logits
    assert (fresh["logits"] - want).abs().max().item() < 1e-4
    own = OWN_CODE.get(method) or ("longext_" if arch == "gemma2" else None)
    if own:  # modeling code next to the weights; transformers alone refuses the folder
        assert config["model_type"] == own + arch and fresh["refused"] and "trust_remote_code" in fresh["refused"]
    else:
        assert config["model_type"] == arch and fresh["refused"] is None
    params = config["rope_parameters"]
    if arch == "gemma2" and method != "harpe":  # its own config holds one setting: the sliding-window layers'
        assert FULL in config["layer_rope_parameters"] and params == config["layer_rope_parameters"][SLIDING]
    if arch == "gemma3_text":  # Gemma 3's v5 form, and its legacy keys: the full-attention layers' and the local base
        assert set(params) == {SLIDING, FULL} and params[SLIDING]["rope_theta"] == 1.0e4
        if method != "harpe":
            assert config["rope_theta"] == params[FULL]["rope_theta"] and config["rope_local_base_freq"] == 1.0e4
        if method == "standard":
            assert config["rope_scaling"]["rope_type"] == "yarn" == params[FULL]["rope_type"]
    if arch == "phi3":  # PI and YaRN as LongRoPE, the only scaling Phi-3's config takes; its top-level L0
        assert config["original_max_position_embeddings"] == L0
        if method in ("standard", "pose", "e2llm"):
            assert params["rope_type"] == "longrope" and config["rope_scaling"]["type"] == "longrope"
