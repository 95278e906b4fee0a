"""Memory budgets: sizes as users write them, this machine's budget, and `train`'s refusal line."""

from __future__ import annotations

from longext.plan.shapes import GiB, Estimate
from longext.plan.switches import switch_text

REFUSE_RATIO = 1.1  # `train` refuses (memory_check: refuse) when the estimate exceeds the budget by more than this
BUDGET_ENV = "LONGEXT_MEMORY_BUDGET"  # forces train's budget, e.g. 2GB (tests; or a machine shared with others)
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """Bytes from '80GB', '80GiB', '24 gb', '512MiB', '1e9'; ValueError otherwise."""
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        raise ValueError("expected a memory size such as 80GB, 80GiB or 512MiB")
    return int(float(match.group(1)) * _UNITS[unit])


def gib(x: float) -> str:
    return f"{x / GiB:,.2f} GiB"


def budget_problem(est: Estimate, switches) -> str | None:
    """The one-line refusal of `train` (memory_check: refuse) when the estimate is over REFUSE_RATIO x budget."""
    if est.budget is None or est.total <= REFUSE_RATIO * est.budget:
        return None
    fix = f"set {switch_text(switches)}" if switches else "use more devices or a shorter data.seq_len"
    return (f"train.memory_check: the estimated peak {gib(est.total)} per device is over the {gib(est.budget)} "
            f"available ({est.total / est.budget:.1f}x); {fix} (details: `longext plan`; or memory_check: warn)")


def device_budget(ranks: int = 1) -> tuple[str, int]:
    """(device, bytes per rank): the GPU's memory on CUDA, else the available RAM shared by this node's ranks.
    LONGEXT_MEMORY_BUDGET (e.g. 2GB) overrides the bytes."""
    import os

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    forced = os.environ.get(BUDGET_ENV)
    if forced:
        try:
            return device, parse_size(forced)
        except ValueError as err:
            from longext.errors import LongextError

            raise LongextError(f"{BUDGET_ENV}: {err} (got {forced!r})") from None
    if device == "cuda":
        return device, torch.cuda.get_device_properties(0).total_memory
    import psutil

    return device, psutil.virtual_memory().available // max(1, ranks)


def default_budget(cpu: bool, ranks: int) -> int:
    """`plan` without --gpu-memory: available RAM / ranks for --cpu; else this machine's GPU, else 80 GB."""
    import psutil
    import torch

    if cpu:
        return psutil.virtual_memory().available // max(1, ranks)
    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 80 * 10**9
