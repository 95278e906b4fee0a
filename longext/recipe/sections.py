"""The recipe's sections (model, rope, lora, data, train, eval, output) and the Recipe that holds them with the
method block (longext/recipe/methods.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import Field, field_validator

from longext.recipe.base import Auto, Length, Section
from longext.recipe.data import DataSpec
from longext.recipe.methods import MethodSpec


# ----------------------------------------------------------------------------------------- model
class ModelSpec(Section):
    """The base model."""

    path: str = Field(description="Local model directory (config.json + weights) or a hub name (needs network).")
    original_context: Length | None = Field(
        None,
        description="L0, the window the base model was trained with, in tokens. Default: read from the "
        "model config (rope original_max_position_embeddings, else max_position_embeddings).",
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="Attention kernel. auto = flash_attention_2 on CUDA when flash-attn is installed, else sdpa."
    )


# ------------------------------------------------------------------------------------------ rope
class _RopeBase(Section):
    theta: float | None = Field(None, gt=0, description="New RoPE base (rope_theta) before scaling. Default: the model's.")


class NoRope(_RopeBase):
    """No scaling; optionally a new base (ABF / base change when `theta` is set)."""

    kind: Literal["none"]


class LinearRope(_RopeBase):
    """Position interpolation (PI): every position is divided by `factor`."""

    kind: Literal["linear"]
    factor: float | Auto = Field("auto", description="Scale s. auto = method.target_len / L0.")


class NtkRope(_RopeBase):
    """Static NTK-aware scaling: base b' = b * s^(d/(d-2)), positions unchanged."""

    kind: Literal["ntk"]
    factor: float | Auto = Field("auto", description="Scale s. auto = method.target_len / L0.")


class DynamicRope(_RopeBase):
    """Dynamic NTK: the base grows with the current length past L0 (inference-time rule of transformers)."""

    kind: Literal["dynamic"]
    factor: float | Auto = Field("auto", description="Scale s in b' = b((s*len/L0) - (s-1))^(d/(d-2)). auto = target/L0.")


class YarnRope(_RopeBase):
    """YaRN (NTK-by-parts + attention temperature)."""

    kind: Literal["yarn"]
    factor: float | Auto = Field("auto", description="Scale s. auto = method.target_len / L0.")
    beta_fast: float = Field(32.0, gt=0, description="Ramp end: pairs with more rotations than this inside L0 are kept.")
    beta_slow: float = Field(1.0, gt=0, description="Ramp start: pairs with fewer rotations are fully interpolated.")
    attention_factor: float | None = Field(None, gt=0, description="cos/sin multiplier. Default 0.1 ln(s) + 1.")


class Llama3Rope(_RopeBase):
    """Llama-3.1 wavelength-banded interpolation."""

    kind: Literal["llama3"]
    factor: float | Auto = Field("auto", description="Scale s. auto = method.target_len / L0.")
    low_freq_factor: float = Field(1.0, gt=0, description="Wavelengths above L0/low_freq_factor are divided by s.")
    high_freq_factor: float = Field(4.0, gt=0, description="Wavelengths below L0/high_freq_factor are kept.")


class LongRope(_RopeBase):
    """LongRoPE's per-pair rescaling (`longrope`, the setting of Phi-3's 128k models): pair j's frequency is divided
    by short_factor[j] while the sequence fits in L0 and by long_factor[j] past it, cos/sin times attention_factor."""

    kind: Literal["longrope"]
    factor: float | Auto = Field("auto", description="Scale s (sets the default attention factor). auto = target/L0.")
    long_factor: list[float] | float | Auto = Field(
        "auto", description="Divisor per rotary pair past L0: a list (one per pair, head_dim/2 of them), one number for "
        "every pair (= PI), or auto = YaRN's per-pair divisors for s (NTK-by-parts ramp, beta_fast 32, beta_slow 1).")
    short_factor: list[float] | float = Field(
        1.0, description="Divisor per rotary pair within L0 (a list or one number); 1.0 = the base model unchanged.")
    attention_factor: float | None = Field(
        None, gt=0, description="cos/sin multiplier past L0. Default sqrt(1 + ln(s) / ln(L0)) (transformers' rule).")

    @field_validator("long_factor", "short_factor")
    @classmethod
    def _positive(cls, value):
        values = value if isinstance(value, list) else [value]
        if value != "auto" and any(v <= 0 for v in values):
            raise ValueError("every factor is a divisor > 0")
        return value


RopeSpec = Annotated[
    Union[NoRope, LinearRope, NtkRope, DynamicRope, YarnRope, Llama3Rope, LongRope], Field(discriminator="kind")
]
ROPE_KINDS = ("none", "linear", "ntk", "dynamic", "yarn", "llama3", "longrope")


# ------------------------------------------------------------------------------------------ lora
class LoraSpec(Section):
    """LoRA adapters through peft (not used with train.full_finetune: true)."""

    r: int = Field(8, ge=1, description="Rank.")
    alpha: float = Field(16.0, gt=0, description="Scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    targets: list[str] | Auto = Field(
        "auto",
        description="Module names that get adapters. auto = the model family's attention projections: q_proj, "
        "k_proj, v_proj, o_proj (Llama, Mistral, Qwen, Gemma, OLMo 2, Mixtral, Qwen3-MoE); qkv_proj, o_proj (Phi-3).",
    )
    experts: bool = Field(
        False,
        description="Mixture-of-experts models: also adapt every expert's weights (gate_up_proj, down_proj; peft "
        "target_parameters, needs dropout 0). Off: attention-only LoRA. The router is never adapted.",
    )

    @field_validator("targets")
    @classmethod
    def _some_targets(cls, value):
        if value != "auto" and not value:
            raise ValueError("name at least one module, or auto")
        return value
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="Modules trained in full and saved with the adapter, e.g. [embed_tokens, norm] (LongLoRA).",
    )


# ----------------------------------------------------------------------------------------- train
class TrainSpec(Section):
    """Optimisation and the DeepSpeed engine."""

    steps: int = Field(ge=1, description="Optimizer steps.")
    micro_batch_size: int = Field(1, ge=1, description="Samples per rank per forward pass.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(2.0e-5, gt=0, description="Peak learning rate.")
    schedule: Literal["constant", "cosine", "linear"] = Field("constant", description="After warmup.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup from 0 to lr, in optimizer steps.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine/linear end at lr * min_lr_ratio.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.95), strict=False, description="AdamW betas.")
    eps: float = Field(1.0e-8, gt=0, description="AdamW epsilon.")
    grad_clip: float | None = Field(1.0, gt=0, description="Gradient norm clip; null = none.")
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage.")
    offload_optimizer: bool = Field(False, description="ZeRO optimizer state on CPU (DeepSpeedCPUAdam; builds a C++ op once).")
    offload_params: bool = Field(False, description="ZeRO-3 parameters on CPU.")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto",
        description="bf16 (fp32 master weights) or fp32; auto = bf16 on GPUs that support it and on CPUs with native "
        "bf16 (avx512_bf16/AMX), else fp32 (bf16 is emulated, ~100x slower, on plain AVX2 CPUs). fp16 is not offered.",
    )
    optimizer: Literal["auto", "torch_adamw", "deepspeed_adamw"] = Field(
        "auto", description="auto = DeepSpeed fused AdamW on CUDA, torch AdamW on CPU (no C++ build)."
    )
    full_finetune: bool = Field(
        False, description="Every weight trains instead of LoRA adapters (the papers' setting; the `lora` section is "
        "then not used). The run directory gets the whole trained model in model/ instead of adapter/."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward: less memory, ~30% slower.")
    checkpoint_offload: bool = Field(
        False, description="With gradient_checkpointing: keep the saved layer inputs in pinned CPU memory until "
        "backward (less GPU memory, slower). A no-op on CPU, where they already are."
    )
    sequence_parallel: int = Field(
        1, ge=1, description="Ulysses sequence parallelism: ranks that share one sample's sequence (DeepSpeed ALST). "
        "Must divide the world size, the attention heads and the training length."
    )
    tiled_loss: bool | Auto = Field(
        "auto", description="Cross-entropy over sequence tiles, never the full [length, vocab] logits. "
        "auto = on when (length / sequence_parallel) x vocab reaches 256M logits, or sequence_parallel > 1."
    )
    tiled_mlp: bool | Auto = Field(
        "auto", description="DeepSpeed TiledMLP: the MLP over sequence tiles with recompute in backward. auto = on from 64k tokens per rank."
    )
    fused_norm: bool | Auto = Field(
        "auto", description="RMSNorm with a hand-written backward (as Liger-Kernel's fused norm, which ALST uses): keeps "
        "its input in the activation dtype instead of an fp32 copy, and computes the gradient in row chunks instead of "
        "holding five fp32 [length, hidden] tensors. auto = on from 64k tokens per rank."
    )
    memory_check: Literal["refuse", "warn", "off"] = Field(
        "refuse", description="Before training, the `longext plan` estimate: refuse a run that clearly does not fit, warn, or skip."
    )
    seed: int = Field(1234, description="Seeds weights init of adapters, data order and samplers.")
    log_every: int = Field(1, ge=1, description="Optimizer steps between metric lines.")
    save_every: int | None = Field(None, ge=1, description="Optimizer steps between checkpoints (always one at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="Newest checkpoints kept on disk.")


# ------------------------------------------------------------------------------------------ eval
class PerplexitySpec(Section):
    """Perplexity against context length on long local texts (docs/eval.md)."""

    enabled: bool = Field(True, description="Run perplexity against length.")
    texts: list[str] = Field(default_factory=lambda: ["books"], description="Files/folders like data.train, or `books`.")
    mode: Literal["fixed", "sliding"] = Field(
        "fixed",
        description="fixed: the same final `targets` tokens scored with growing context; sliding: windows of "
        "the length moved by `stride`, each scoring its last stride tokens.",
    )
    targets: int = Field(512, ge=1, description="Scored tokens per window (fixed mode).")
    stride: int = Field(256, ge=1, description="Window step (sliding mode).")
    windows: int = Field(2, ge=1, description="Windows per length (fixed mode); spread over the texts.")


class PasskeySpec(Section):
    """Passkey retrieval (Mohtashami & Jaggi): a random key hidden in filler, asked for at the end."""

    enabled: bool = Field(True, description="Run passkey retrieval at each length.")
    trials: int = Field(6, ge=1, description="Trials per length.")
    depths: list[float] = Field(
        default_factory=lambda: [0.1, 0.5, 0.9], min_length=1, description="Relative depths of the key (0 = start)."
    )
    digits: int = Field(5, ge=1, le=20, description="Digits in the key.")


class NiahSpec(Section):
    """Multi-key needle in a haystack (RULER's niah_multikey_1): several key -> number needles in filler, the
    number of one key asked for at the end. Off by default: it costs as many forward passes as passkey."""

    enabled: bool = Field(False, description="Run needle-in-a-haystack retrieval at each length (`--niah`).")
    trials: int = Field(6, ge=1, description="Trials per length.")
    depths: list[float] = Field(
        default_factory=lambda: [0.1, 0.5, 0.9], min_length=1,
        description="Relative depths of the asked-for needle (0 = start); the distractors go anywhere.",
    )
    needles: int = Field(4, ge=1, le=32, description="Needles per prompt: the asked-for one plus distractors.")
    digits: int = Field(7, ge=1, le=20, description="Digits of each needle's number (RULER: 7).")


# RULER's 13 task names (the schema's list; longext.evaluate.ruler.tasks defines each task under the same names, a
# test holds the two equal)
RULER_TASK_NAMES = ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
                    "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa_1", "qa_2")
RulerTaskName = Literal[RULER_TASK_NAMES]  # type: ignore[valid-type]


class RulerSpec(Section):
    """RULER's synthetic tasks (Hsieh et al. 2024) at each length, scored like RULER (docs/eval.md#ruler). Off by
    default (`--suite ruler`): 11 tasks x `samples` generations per length."""

    enabled: bool = Field(False, description="Run the RULER suite at each length (`--suite ruler`).")
    tasks: list[RulerTaskName] = Field(
        default_factory=list,
        description="Tasks to run (`--tasks`). Empty = the 11 synthetic ones, plus qa_1 / qa_2 when `qa` has "
                    "SQuAD / HotpotQA.",
    )
    samples: int = Field(10, ge=1, description="Samples per task and length (`--samples`; RULER: 500).")
    qa: str | None = Field(
        None, min_length=1,
        description="Local SQuAD 2.0 dev / HotpotQA dev-distractor JSON (RULER's squad.json, hotpotqa.json), or a "
                    "folder of them, for qa_1 / qa_2 (`--ruler-qa`).",
    )
    haystack: str = Field(
        "books", min_length=1,
        description="Texts of the essay haystack (RULER: Paul Graham's essays) and extra words for cwe: books (the "
                    "eval split of the offline books) or text files / a folder.",
    )
    chat: bool = Field(False, description="Wrap each task in the tokenizer's chat template (instruct models). "
                                          "RULER's `base` template is the default.")


class LmEvalSpec(Section):
    """Tasks handed to lm-evaluation-harness with the loaded model (optional extra `longext[lm-eval]`)."""

    tasks: list[str] = Field(
        default_factory=list,
        description="lm-eval task names, or paths of task YAML files (`--lm-eval`). Empty = off.",
    )
    limit: int | None = Field(None, ge=1, description="Examples per task (lm-eval's --limit). Default: all.")
    num_fewshot: int | None = Field(None, ge=0, description="Few-shot examples (lm-eval's --num_fewshot). "
                                                            "Default: each task's own.")
    batch_size: int = Field(1, ge=1, description="lm-eval batch size.")


class EvalSpec(Section):
    """What `longext eval` measures by default for this run; its flags override these."""

    lengths: list[Length] = Field(
        default_factory=list, description="Context lengths. Empty = a ladder of powers of two up to --length."
    )
    perplexity: PerplexitySpec = Field(default_factory=PerplexitySpec)
    passkey: PasskeySpec = Field(default_factory=PasskeySpec)
    niah: NiahSpec = Field(default_factory=NiahSpec)
    ruler: RulerSpec = Field(default_factory=RulerSpec)
    lm_eval: LmEvalSpec = Field(default_factory=LmEvalSpec)
    filler: str = Field(
        "classic", min_length=1,
        description="Haystack of the passkey and needle prompts: classic (the passkey paper's grass/sky/sun lines, "
                    "repeated), books (the eval split of the offline books), or text files / a folder (sentences "
                    "cycled from a seeded offset per trial).",
    )
    seed: int = Field(0, description="Seeds passkey keys, needles, filler offsets and RULER samples.")


class OutputSpec(Section):
    """Where the run directory goes."""

    dir: str | None = Field(None, description="Run directory. Default runs/<name>.")
    overwrite: bool = Field(False, description="Replace an existing run directory. Only a folder `longext train` wrote "
                                               "(recipe.yaml or status.json in it) is ever replaced; any other non-empty folder is refused.")


class Recipe(Section):
    """One file = one run."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Run name (letters, digits, _ . -).")
    description: str = Field("", description="Free text shown by `longext recipes list`.")
    model: ModelSpec
    method: MethodSpec
    rope: RopeSpec = Field(default_factory=lambda: NoRope(kind="none"), description="RoPE setting (kind: none = unchanged).")
    lora: LoraSpec = Field(default_factory=LoraSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    train: TrainSpec
    eval: EvalSpec = Field(default_factory=EvalSpec, description="Defaults for `longext eval` on this run.")
    output: OutputSpec = Field(default_factory=OutputSpec, description="Run directory.")

    @property
    def run_dir(self) -> Path:
        from longext.files import expand_path

        return Path(expand_path(self.output.dir or f"runs/{self.name}"))

    @property
    def seq_len(self) -> int | None:
        """Training length R; None while it waits for L0 (auto for PoSE/E2-LLM before the model config is read)."""
        if self.data.seq_len != "auto":
            return self.data.seq_len
        return self.method.default_seq_len(self.model.original_context)
