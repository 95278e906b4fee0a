"""The switches that would make a set-up fit a memory budget, cheapest first."""

from __future__ import annotations

from dataclasses import replace

from longext.plan.estimate import estimate
from longext.plan.shapes import Dims, Setup, resolve_auto


def fixing_switches(dims: Dims, s: Setup, budget: int) -> list[tuple[str, object]] | None:
    """The switches, cheapest first, that bring the estimate under `budget` ([] if it fits already, None if even
    all of them do not): each is added only when it lowers the estimate, and the search stops once it fits."""
    s = resolve_auto(dims, s)
    if estimate(dims, s).total <= budget:
        return []
    chosen: list[tuple[str, object]] = []
    current = s
    for name, value in _candidates(dims, s):
        trial, step = replace(current, **{name: value}), [(name, value)]
        if name == "offload_params" and current.zero_stage != 3:  # parameter offload is a ZeRO-3 feature
            trial, step = replace(trial, zero_stage=3), [("zero_stage", 3), (name, value)]
        if name == "checkpoint_offload" and not current.gradient_checkpointing:
            trial, step = replace(trial, gradient_checkpointing=True), [("gradient_checkpointing", True), (name, value)]
        if estimate(dims, trial).total < estimate(dims, current).total:
            current, chosen = trial, chosen + step
            if name == "sequence_parallel":  # the smallest degree that is enough
                for k in _sp_degrees(dims, s):
                    if k < value and estimate(dims, replace(current, sequence_parallel=k)).total <= budget:
                        current, chosen[-1] = replace(current, sequence_parallel=k), (name, k)
                        break
            if estimate(dims, current).total <= budget:
                return chosen
    return None


def _candidates(dims: Dims, s: Setup):
    if not s.gradient_checkpointing:
        yield "gradient_checkpointing", True
    if not s.tiled_loss:
        yield "tiled_loss", True
    if not s.tiled_mlp:
        yield "tiled_mlp", True
    if not s.fused_norm and dims.fusable_norm:
        yield "fused_norm", True
    degrees = [k for k in _sp_degrees(dims, s) if k > s.sequence_parallel]
    if degrees:
        yield "sequence_parallel", degrees[-1]
    if s.zero_stage < 3 and s.gpus > 1:
        yield "zero_stage", 3
    if not s.offload_optimizer:
        yield "offload_optimizer", True
    if not s.offload_params:
        yield "offload_params", True
    if s.device == "cuda" and not s.checkpoint_offload:
        yield "checkpoint_offload", True


def _sp_degrees(dims: Dims, s: Setup) -> list[int]:
    """Sequence-parallel degrees that can work: divide the devices, the heads, the length; kv heads compatible."""
    return [k for k in range(1, s.gpus + 1) if s.gpus % k == 0 and dims.heads % k == 0
            and (dims.kv_heads % k == 0 or k % dims.kv_heads == 0) and s.seq_len % k == 0]


def switch_text(switches: list[tuple[str, object]]) -> str:
    def value(v):
        return str(v).lower() if isinstance(v, bool) else str(v)

    return ", ".join(f"train.{k}={value(v)}" for k, v in switches)
