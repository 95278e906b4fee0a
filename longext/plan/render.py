"""What `longext plan` prints: the terms table, the total against the budget, the verdict and the switches."""

from __future__ import annotations

from longext.plan.budget import gib
from longext.plan.shapes import GiB, Estimate
from longext.plan.switches import switch_text


def _count(n: int) -> str:
    """A parameter count for people: 46.70B, 1.05M, 4.1K."""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:,.2f}{unit}"
    return str(n)


def render_plan(est: Estimate, switches, name: str = "") -> list:
    """rich renderables: the terms table, the total against the budget, the verdict and the switches."""
    from rich.table import Table

    s = est.setup
    plural = "s" if s.gpus > 1 else ""
    where = f"{s.gpus} GPU{plural}" if s.device == "cuda" else f"{s.gpus} CPU rank{plural}"
    title = (f"{name}: {s.seq_len:,} tokens x {s.micro_batch}, {where}, {s.precision}, ZeRO-{s.zero_stage}, "
             f"{'full fine-tuning' if s.full else f'LoRA r{s.lora_r}'}, sp {s.sequence_parallel}")
    table = Table(title=title, title_justify="left")
    table.add_column("per device", style="bold")
    table.add_column("GiB", justify="right")
    table.add_column("formula")
    for t in est.terms:
        table.add_row(t.name, f"{t.bytes / GiB:,.2f}", t.formula)
        for part in t.parts:
            table.add_row(f"  {part.name}", f"{part.bytes / GiB:,.2f}", part.formula, style="dim")
    table.add_row("total", f"{est.total / GiB:,.2f}", "", style="bold")
    switches_on = [k for k in ("gradient_checkpointing", "tiled_loss", "tiled_mlp", "fused_norm", "checkpoint_offload",
                               "offload_optimizer", "offload_params") if getattr(s, k)]
    lines = [table, f"switches on: {', '.join(switches_on) or 'none'}"]
    if est.model:
        lines.append(est.model)
    if est.breakdown:
        parts = ", ".join(f"{name} {_count(n)}" for name, n in est.breakdown if n)
        moe = any(part == "experts" for part, _ in est.breakdown)
        active = f" (active per token {_count(est.active)})" if moe else ""
        lines.append(f"parameters {_count(est.params)}{active}: {parts}")
    lines += [f"parameters {est.params:,}, trainable {est.trainable:,}; step FLOPs {est.flops_per_step:.3e} "
             f"({est.flops_terms['samples_per_step']} sample(s) of {s.seq_len:,} tokens; "
             f"{est.flops_per_step / (est.flops_terms['samples_per_step'] * s.seq_len):.3e} per token)"]
    if est.budget is not None:
        verdict = "fits" if est.fits else "does NOT fit"
        share = f"{est.total / est.budget:.0%}"
        lines.append(f"total {gib(est.total)} of {gib(est.budget)} per device ({share}): {verdict}")
        if not est.fits:
            lines.append(f"would fit with: {switch_text(switches)}" if switches else
                         "does not fit even with every switch: use more devices or a shorter data.seq_len")
    return lines
