"""The proof an export gives: the folder reloads with plain transformers (its own modeling code for methods that
ship one) and its logits on fixed probe tokens match the model longext evaluated. Three comparisons, all in
float32 compute (longext/export.py runs them):

    merge     merged model (float32)           vs unmerged in-tool model    tight  (FP32_RTOL; 0 for a full run)
    artifact  reloaded OUT                     vs merged model at --dtype   tight  (FP32_RTOL)
    result    reloaded OUT (max_abs_diff)      vs unmerged in-tool model    tight for float32,
                                                                            LOW_PRECISION_RTOL else
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from longext.errors import LongextError
from longext.methods import trained_method
from longext.models import reference_attention
from longext.rope import RopeState, is_layered

# Bounds on max |Δlogit| are relative to the logit scale: bound = RTOL * max(1, max |logit|).
# float32 changes only summation order: ~3e-7 on the tiny test model, 3.5e-3 on SmolLM2-135M (30 layers,
# max |logit| 34; 1e-4 relative, the size of its own float32 error against float64).
FP32_RTOL = 1e-3
# bf16 keeps 8 significant bits: SmolLM2-135M on the probes, median 0.13, worst position 3.2 (9% of the
# scale, one random-token outlier). A guard against gross damage; the artifact check stays tight.
LOW_PRECISION_RTOL = 0.25
PROBE_TOKENS = 64  # tokens per probe segment
PROBE_KEEP = 128  # logits compared per probe row, at most
LONG_PROBE_BUDGET = 2e11  # parameters x tokens of the optional contiguous probe past L0 (seconds on CPU)


@dataclass(frozen=True)
class Probe:
    """[rows, n] token ids with their position ids; `keep` = positions whose logits are compared."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    keep: torch.Tensor

    def describe(self) -> str:
        pos = self.position_ids[0].tolist()
        spans, start = [], pos[0]
        for a, b in zip(pos, pos[1:] + [None]):
            if b != a + 1:
                spans.append(f"{start}-{a}")
                start = b
        rows, n = self.input_ids.shape
        return f"{rows}x{n} tokens at positions {', '.join(spans)}"


# ------------------------------------------------------------------------------------- probes
def build_probes(vocab_size: int, state: RopeState, num_params: int = 0, n: int = PROBE_TOKENS) -> list[Probe]:
    """Fixed random tokens (seed 0), 2 rows per probe:

    - n tokens at positions 0..n-1 (inside L0: the regime dynamic scaling leaves alone);
    - n tokens at 0..n-1 plus n at L-n..L-1, one causal sequence with a position jump: attention
      across distances up to L-1 and positions up to the target, for the price of 2n tokens;
    - one contiguous sequence of L0+n tokens (capped at L), longer than the base's window, when
      the target is past L0 and the model is small enough (LONG_PROBE_BUDGET).
    """
    gen = torch.Generator().manual_seed(0)
    L0, L = state.original_context, state.target_len
    n = min(n, L // 2)
    segments = [[(0, n)]]
    if L > 2 * n:
        segments.append([(0, n), (L - n, n)])
    long_len = min(L, L0 + n)
    if L > L0 and num_params * long_len <= LONG_PROBE_BUDGET:
        segments.append([(0, long_len)])
    probes = []
    for parts in segments:
        positions = torch.cat([torch.arange(start, start + length) for start, length in parts])
        total = positions.numel()
        keep = torch.linspace(0, total - 1, min(total, PROBE_KEEP)).round().long().unique()
        ids = torch.randint(0, vocab_size, (2, total), generator=gen)
        probes.append(Probe(ids, positions.expand(2, -1).clone(), keep))
    return probes


@torch.no_grad()
def probe_logits(model, probes: list[Probe]) -> list[torch.Tensor]:
    """[rows, len(keep), vocab] float32 logits per probe. The explicit attention mask keeps
    transformers from reading a position jump as a packed-sequence boundary."""
    model.eval()
    out = []
    for p in probes:
        logits = model(
            input_ids=p.input_ids, position_ids=p.position_ids, attention_mask=torch.ones_like(p.input_ids),
            logits_to_keep=p.keep, use_cache=False,
        ).logits
        out.append(logits.float())
    return out


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


# ------------------------------------------------------------------------------------ checking
def verify_export(folder: Path, state: RopeState, merged) -> tuple[float, float]:
    """Reload `folder` with plain transformers in float32; (max |Δlogit| vs in-tool, vs merged) or LongextError.
    `merged` (longext.export.Merged) holds the probes and the logits they are compared with."""
    from transformers import AutoConfig, AutoModelForCausalLM

    method = trained_method(state)
    # the modeling code written next to the weights (HARPE, LongGen, an extended Gemma 2): auto_map names it
    remote = "auto_map" in json.loads((Path(folder) / "config.json").read_text())
    config = AutoConfig.from_pretrained(folder, trust_remote_code=remote)
    problem = method.reload_check(config, state)
    if problem:
        raise LongextError(problem)
    got = reloaded_rope_parameters(getattr(config, "layer_rope_parameters", None) or config.rope_parameters)
    if got != state.parameters or config.max_position_embeddings != state.max_position_embeddings:
        raise LongextError(
            f"export check failed: the written config reloads as rope_parameters={got}, max_position_embeddings="
            f"{config.max_position_embeddings}; expected {state.parameters}, {state.max_position_embeddings} "
            f"(nothing was published)"
        )
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation=reference_attention(config), trust_remote_code=remote
    )
    logits = probe_logits(model, merged.probes)
    del model
    artifact_diff = max_abs_diff(logits, merged.saved)
    check_diff("export check failed: the reloaded export and the merged model", artifact_diff,
           FP32_RTOL * max(1.0, merged.scale), "nothing was published")
    diff = max_abs_diff(logits, merged.reference)
    check_diff(f"export check failed: the reloaded {merged.dtype} export and the in-tool model", diff,
           result_bound(merged.dtype, merged.scale), "nothing was published")
    return diff, artifact_diff


def result_bound(dtype: str, scale: float) -> float:
    return (FP32_RTOL if dtype == "float32" else LOW_PRECISION_RTOL) * max(1.0, scale)


def check_diff(what: str, diff: float, bound: float, consequence: str) -> None:
    if not diff < bound:  # also catches NaN
        raise LongextError(f"{what} differ by max |Δlogit| {diff:.3g}, more than {bound:.3g} ({consequence})")


def reloaded_rope_parameters(params: dict | None) -> dict:
    """transformers 5 prefers the legacy `rope_scaling` over `rope_parameters` when both are present,
    and so carries over its alias `type`; drop that alias when it agrees with `rope_type` (in each layer type's
    setting when they are nested)."""
    params = dict(params or {})
    if is_layered(params):
        return {kind: reloaded_rope_parameters(sub) for kind, sub in params.items()}
    if "type" in params and params["type"] == params.get("rope_type"):
        del params["type"]
    return params
