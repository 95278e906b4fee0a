"""In-process checks of the environment: versions against longext's requirements, the device, bf16, the attention
kernels (each against a plain fp32 reference), the device's bf16 matmul peak (for MFU) and DeepSpeed's fused Adam
(built and compared with torch's AdamW). Each returns a report.Check; timing is added by the caller."""

from __future__ import annotations

import importlib.metadata as metadata
import importlib.util
import os
import platform
import time

import torch

from longext.doctor.report import Check, failed, passed, skipped

PACKAGES = ("torch", "transformers", "peft", "deepspeed", "datasets", "pydantic", "typer", "rich", "safetensors",
            "pyyaml", "accelerate", "numpy", "pyarrow", "flash-attn", "pytest", "matplotlib", "tensorboard")


def cuda() -> bool:
    return torch.cuda.is_available()


def versions() -> Check:
    """Installed versions, and each of longext's requirements checked against them."""
    from packaging.requirements import Requirement

    found = {name: _version(name) for name in PACKAGES}
    figures = {"python": platform.python_version(), "longext": _version("longext"), **found,
               "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda() else None,
               "nccl": _nccl_version() if cuda() else None}
    try:
        required = [Requirement(r) for r in metadata.requires("longext") or []]
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return passed("versions", "longext is not installed (running from source): requirements not checked", **figures)
    problems = []
    for req in required:
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # an extra (plots, tensorboard, tests)
        have = _version(req.name)
        if have is None:
            problems.append(f"{req.name} missing (needs {req.specifier})")
        elif not req.specifier.contains(have.split("+")[0], prereleases=True):
            problems.append(f"{req.name} {have} (needs {req.specifier})")
    if problems:
        return failed("versions", "; ".join(problems), **figures)
    return passed("versions", **figures)


def _nccl_version() -> str | None:
    try:
        found = torch.cuda.nccl.version()
    except Exception:  # a torch built without NCCL
        return None
    return ".".join(map(str, found)) if isinstance(found, tuple) else str(found)


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def device() -> Check:
    if cuda():
        p = torch.cuda.get_device_properties(0)
        return passed("device", model=p.name, memory_gib=p.total_memory / 2**30, capability=f"{p.major}.{p.minor}",
                      multiprocessors=p.multi_processor_count, gpus=torch.cuda.device_count(), cpus=os.cpu_count())
    import psutil

    return passed("device", "no CUDA device: the CPU subset runs", model=cpu_name(), cpus=os.cpu_count(),
                  torch_threads=torch.get_num_threads(), memory_gib=psutil.virtual_memory().total / 2**30,
                  available_gib=psutil.virtual_memory().available / 2**30, load_average=os.getloadavg()[0])


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def native_bf16() -> bool:
    """What `train.precision: auto` keys on: a bf16 GPU, or a CPU with avx512_bf16 / amx_bf16."""
    if cuda():
        return torch.cuda.is_bf16_supported()
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16() -> Check:
    """bf16 in hardware, and a bf16 matmul against its fp32 reference (relative error of bf16 rounding: ~1e-2)."""
    where = "cuda" if cuda() else "cpu"
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(512, 512, generator=gen), torch.randn(512, 512, generator=gen)
    reference = a @ b
    got = (a.to(where, torch.bfloat16) @ b.to(where, torch.bfloat16)).float().cpu()
    error = float((got - reference).norm() / reference.norm())
    native = native_bf16()
    figures = {"native": native, "precision_auto": "bf16" if native else "fp32", "relative_error": error}
    if error > 2e-2:
        return failed("bf16", f"bf16 matmul is {error:.2e} off its fp32 reference (bf16 rounding gives ~4e-3)", **figures)
    reason = "" if native else "no native bf16: train.precision auto trains in fp32 here (emulated bf16 is ~100x slower)"
    return passed("bf16", reason, **figures)


def _attention_inputs(length: int, dtype, where: str, heads: int = 8, dim: int = 64):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(1, heads, length, dim, generator=gen).to(where, dtype) for _ in range(3)]


def _reference_attention(q, k, v):
    """softmax(q k^T / sqrt(d) + causal mask) v in fp32 on the CPU: the reference both kernels are held against."""
    q, k, v = (x.float().cpu() for x in (q, k, v))
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1) @ v


def sdpa() -> Check:
    """torch's scaled_dot_product_attention (transformers' `sdpa`), causal, against the fp32 reference; on CUDA in
    bf16 with the backends torch has enabled, plus its speed at 16k tokens."""
    import torch.nn.functional as F

    where, dtype = ("cuda", torch.bfloat16) if cuda() else ("cpu", torch.float32)
    q, k, v = _attention_inputs(1024, dtype, where)
    diff = float((F.scaled_dot_product_attention(q, k, v, is_causal=True).float().cpu() - _reference_attention(q, k, v))
                 .abs().max())
    figures = {"dtype": str(dtype).removeprefix("torch."), "max_abs_diff": diff}
    if cuda():
        backends = torch.backends.cuda
        figures.update(flash=backends.flash_sdp_enabled(), mem_efficient=backends.mem_efficient_sdp_enabled(),
                       cudnn=backends.cudnn_sdp_enabled(), tflops=_attention_tflops(F.scaled_dot_product_attention))
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-4
    if diff > tolerance:
        problem = f"max |diff| {diff:.2e} against the fp32 reference (allowed {tolerance:g})"
        return failed("attention sdpa", problem, **figures)
    return passed("attention sdpa", **figures)


def _attention_tflops(kernel, length: int = 16384, heads: int = 9) -> float:
    """Causal attention forward at `length` tokens: 2 matmuls x 2 L^2 d / 2 (causal) FLOPs per head."""
    q, k, v = _attention_inputs(length, torch.bfloat16, "cuda", heads)
    kernel(q, k, v, is_causal=True)
    torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(5):
        kernel(q, k, v, is_causal=True)
    torch.cuda.synchronize()
    return 5 * 2 * length * length * 64 * heads / (time.perf_counter() - began) / 1e12


def flash_attention() -> Check:
    """flash-attn (transformers' `flash_attention_2`, which `model.attn_implementation: auto` picks when installed)
    against the fp32 reference and sdpa, in bf16."""
    name = "attention flash_attention_2"
    if not cuda():
        return skipped(name, "CUDA only (flash-attn has no CPU kernel)")
    if importlib.util.find_spec("flash_attn") is None:
        return skipped(name, "flash-attn is not installed: sdpa is used (auto picks flash_attention_2 once it is)")
    try:
        from flash_attn import flash_attn_func
    except Exception as err:  # installed but built for another torch/CUDA: say so instead of dying
        return failed(name, f"flash-attn is installed but does not import: {type(err).__name__}: {err}")
    q, k, v = _attention_inputs(1024, torch.bfloat16, "cuda")
    got = flash_attn_func(*(x.transpose(1, 2) for x in (q, k, v)), causal=True).transpose(1, 2)
    diff = float((got.float().cpu() - _reference_attention(q, k, v)).abs().max())
    def kernel(q, k, v, is_causal):  # [b, h, s, d] in, as sdpa takes them
        return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=is_causal)

    figures = {"version": _version("flash-attn"), "max_abs_diff": diff, "tflops": _attention_tflops(kernel)}
    if diff > 2e-2:
        return failed(name, f"max |diff| {diff:.2e} against the fp32 reference (allowed 2e-2)", **figures)
    return passed(name, **figures)


def matmul_peak() -> Check:
    """The device's matmul rate in the training precision: the MFU denominator of the measured steps."""
    if cuda():
        n, dtype, warm, timed = 8192, torch.bfloat16, 3, 10
    else:
        n, dtype, warm, timed = 2048, torch.bfloat16 if native_bf16() else torch.float32, 1, 3
    where = "cuda" if cuda() else "cpu"
    a, b = (torch.randn(n, n, device=where).to(dtype) for _ in range(2))
    for _ in range(warm):
        a @ b
    if cuda():
        torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(timed):
        a @ b
    if cuda():
        torch.cuda.synchronize()
    tflops = timed * 2 * n**3 / (time.perf_counter() - began) / 1e12
    return passed(f"matmul peak {str(dtype).removeprefix('torch.')}", tflops=tflops, n=n,
                  threads=None if cuda() else torch.get_num_threads())


def fused_adam() -> Check:
    """DeepSpeed's fused AdamW (what `train.optimizer: auto` uses on CUDA), JIT-built on first use, against torch's
    AdamW over three steps of the same gradients."""
    name = "deepspeed fused adam"
    if not cuda():
        return skipped(name, "CUDA only: on CPU train.optimizer auto uses torch AdamW")
    try:
        from deepspeed.ops.adam import FusedAdam
        from deepspeed.ops.op_builder import FusedAdamBuilder

        began = time.perf_counter()
        FusedAdamBuilder().load()
        build_seconds = time.perf_counter() - began
    except Exception as err:
        return failed(name, f"cannot build/load it ({type(err).__name__}: {str(err).splitlines()[0][:200]}); it needs "
                            "nvcc and ninja; the doctor's steps use train.optimizer=torch_adamw instead")
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(4096, generator=gen)
    grads = [torch.randn(4096, generator=gen) for _ in range(3)]
    ours, theirs = start.cuda().requires_grad_(), start.cuda().requires_grad_()
    settings = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    fused, plain = FusedAdam([ours], adam_w_mode=True, **settings), torch.optim.AdamW([theirs], **settings)
    for g in grads:
        ours.grad, theirs.grad = g.cuda(), g.cuda()
        fused.step()
        plain.step()
    diff = float((ours - theirs).abs().max())
    if diff > 1e-5:
        return failed(name, f"fused AdamW is {diff:.2e} off torch AdamW after 3 steps", build_seconds=build_seconds)
    return passed(name, build_seconds=build_seconds, max_abs_diff=diff)
