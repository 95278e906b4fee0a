"""The DeepSpeed engine: config derived from the recipe (never a second file to keep in sync),
distributed set-up for one process or many, on CPU (gloo) and GPU (nccl) alike."""

from __future__ import annotations

import math
import os
import socket
import sys

import torch

from longext.recipe import TrainSpec

REDUCE_BUCKET = 500_000_000  # DeepSpeed's default reduce_bucket_size (elements)

if not torch.cuda.is_available():
    # Before anything imports deepspeed (transformers' save path may): pick the CPU accelerator
    # quietly instead of DeepSpeed's guess-and-warn.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def on_gpu() -> bool:
    return torch.cuda.is_available()


def native_bf16() -> bool:
    """bf16 matmuls run in hardware: a bf16-capable GPU, or a CPU with avx512_bf16 / AMX."""
    if on_gpu():
        return torch.cuda.is_bf16_supported()
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:  # not Linux: assume the slow path and stay in fp32
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str) -> str:
    if precision != "auto":
        return precision
    return "bf16" if native_bf16() else "fp32"


def uses_deepspeed_optimizer(train: TrainSpec) -> bool:
    """DeepSpeed's own AdamW (fused on GPU, CPUAdam with offload); torch AdamW otherwise (no C++ build on CPU)."""
    if train.offload_optimizer or train.optimizer == "deepspeed_adamw":
        return True
    return train.optimizer == "auto" and on_gpu()


def reduce_bucket(trainable: int | None) -> int:
    """ZeRO's gradient reduce bucket in elements, as longext configures it: DeepSpeed allocates the whole bucket
    however few the trainable gradients are (5e8 by default: 0.93 GiB in bf16 for a LoRA of a few million
    parameters); it never needs more than all of them (a larger gradient bypasses it), so longext caps it at their
    count. `longext plan` counts the same buffer."""
    return REDUCE_BUCKET if not trainable else int(min(REDUCE_BUCKET, max(trainable, 1)))


def deepspeed_config(train: TrainSpec, world_size: int, trainable: int | None = None) -> dict:
    """The DeepSpeed config of a run; `trainable` (parameter count) caps the reduce bucket (reduce_bucket)."""
    zero: dict = {"stage": train.zero_stage}
    if train.zero_stage >= 1:
        zero["reduce_bucket_size"] = reduce_bucket(trainable)
    if train.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if train.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu()}
    if train.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu()}
    config = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.micro_batch_size * train.grad_accum * world_size,
        "gradient_clipping": train.grad_clip or 0.0,
        "bf16": {"enabled": resolve_precision(train.precision) == "bf16"},
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if uses_deepspeed_optimizer(train):
        config["optimizer"] = {"type": "AdamW", "params": _adam_params(train)}
    return config


def _adam_params(train: TrainSpec) -> dict:
    return {"lr": train.lr, "betas": list(train.betas), "eps": train.eps, "weight_decay": train.weight_decay}


def lr_lambda(train: TrainSpec, then_lr: float | None = None):
    """Multiplier of train.lr at optimizer step `step`: linear warmup, then constant/cosine/linear decay over
    train.steps; with `then_lr` (a second stage in the same engine, LongRecipe's replay), that constant rate from
    step train.steps on (a multiplier of train.lr, like every LambdaLR factor)."""

    def factor(step: int) -> float:
        if then_lr is not None and step >= train.steps:
            return then_lr / train.lr
        if step < train.warmup_steps:
            return (step + 1) / (train.warmup_steps + 1)
        if train.schedule == "constant":
            return 1.0
        span = max(1, train.steps - train.warmup_steps)
        progress = min(1.0, (step - train.warmup_steps) / span)
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if train.schedule == "cosine" else 1.0 - progress
        return train.min_lr_ratio + (1 - train.min_lr_ratio) * shape

    return factor


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int]:
    """Join (or create, for a single process) the process group. Returns (rank, world_size)."""
    if not on_gpu():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # must precede `import deepspeed`
    if "RANK" not in os.environ:  # a plain `longext train`: a world of one, in this process
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed

    if not on_gpu():
        # DeepSpeed JIT-compiles a shared-memory comm op on every CPU init (~60 s, 1.5 GB of
        # compiler); gloo does the same collectives without it. Private name: deepspeed is pinned.
        import deepspeed.comm.torch  # noqa: F401

        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu() else "gloo", verbose=False)
    if on_gpu():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def make_engine(model, train: TrainSpec, world_size: int, mpu=None, then_lr: float | None = None):
    """deepspeed.initialize over the trainable parameters; returns the engine. With sequence parallelism,
    `world_size` is the data-parallel degree (ranks / sequence_parallel) and `mpu` DeepSpeed's SP groups.
    `then_lr`: the constant rate of a second stage after train.steps (lr_lambda)."""
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    config = deepspeed_config(train, world_size, sum(p.numel() for p in params))
    optimizer = None
    if "optimizer" not in config:
        optimizer = torch.optim.AdamW(params, **_adam_params(train))
    schedule = lr_lambda(train, then_lr)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=params,
        optimizer=optimizer,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
        config=config,
        mpu=mpu,
    )
    return engine


def gathered(engine, params):
    """Context that makes ZeRO-3 partitioned `params` whole on every rank (a no-op below stage 3)."""
    import contextlib

    import deepspeed

    if engine.zero_optimization_stage() == 3:
        return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)
    return contextlib.nullcontext()


def release_zero3_linear() -> None:
    """Give torch.nn.functional.linear back. A ZeRO-3 engine replaces it process-wide with DeepSpeed's
    memory-efficient version and leaves it so ("This will persist unless manually reset"): whatever runs next in
    the process (an eval, another run, a test) would save every linear's input for backward, frozen or not."""
    zero = sys.modules.get("deepspeed.runtime.zero.partition_parameters")
    original = getattr(getattr(zero, "InsertPostInitMethodToModuleSubClasses", None), "linear_bk", None)
    if original is not None:
        torch.nn.functional.linear = original
