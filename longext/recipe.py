"""The recipe: one strict, typed schema for a whole run, and the loader that reports every problem
at once as `file:line field.path: message (got X)`.

Nothing here imports torch; `longext recipes validate` and `longext train --dry-run` stay instant.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from longext.data.spec import DataSpec, TrainSource, data_checks
from longext.errors import Issue, LongextError, Problems, RecipeError
from longext.lengths import ALLOWED as LENGTH_ALLOWED
from longext.lengths import parse_length

class YamlLoader(yaml.SafeLoader):
    """YAML 1.1 with `1e-5` read as a float (plain PyYAML wants `1.0e-5` and would give the string '1e-5')."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def load_yaml(text: str):
    return yaml.load(text, Loader=YamlLoader)


Length = Annotated[int, BeforeValidator(parse_length)]
Auto = Literal["auto"]


class Section(BaseModel):
    # Unknown keys are errors: a typo like `lora.rnak` must never fall back to a default quietly. Strict types:
    # `steps: true` or `lr: "1e-5"` is an error, not 1 or a parsed string (lengths like "4k" go through Length).
    # Floats are finite: `lr: .inf` passes `gt=0` but is never meant.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


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


RopeSpec = Annotated[
    Union[NoRope, LinearRope, NtkRope, DynamicRope, YarnRope, Llama3Rope], Field(discriminator="kind")
]
ROPE_KINDS = ("none", "linear", "ntk", "dynamic", "yarn", "llama3")


# ---------------------------------------------------------------------------------------- method
class StandardMethod(Section):
    """Plain fine-tuning with contiguous positions at data.seq_len, using the `rope` setting."""

    kind: Literal["standard"]
    target_len: Length = Field(description="L, the window the extended model must serve, in tokens.")

    def default_seq_len(self, original: int | None) -> int | None:
        return self.target_len


class PoseMethod(Section):
    """PoSE (Zhu et al. 2023): train at a short window whose position ids skip ahead so they span target_len."""

    kind: Literal["pose"]
    target_len: Length = Field(description="L, the window the position ids span and the model must serve, in tokens.")
    chunks: int = Field(2, ge=1, description="Contiguous pieces per sample, each after a random skip (paper: 2).")
    sample_scope: Literal["row", "step"] = Field(
        "row", description="Draw new skips for every sample (row) or once per optimizer step (step)."
    )

    def default_seq_len(self, original: int | None) -> int | None:
        return original  # R = L0: the paper trains at the original window


class E2LLMMethod(Section):
    """E2-LLM (Liu et al. 2024): train at L0 with a random PI scale g and offset t per sample; serve any window
    up to about g_max * L0 with PI factor g chosen from the length at inference."""

    kind: Literal["e2llm"]
    target_len: Length = Field(description="L, the largest window the run is meant to serve (for eval and docs).")
    g_max: int | Auto = Field("auto", description="Scales {1..g_max}. auto = ceil(target_len / L0) (paper: 20 for 4k->80k).")
    scales: list[float] | None = Field(
        None, min_length=1, description="Explicit scale set G instead of {1..g_max}, e.g. [1, 2, 4, 8]."
    )
    sink_tokens: int = Field(4, ge=0, description="First tokens that get no offset t (still divided by g).")
    sample_scope: Literal["row", "step"] = Field(
        "row", description="New (g, t) for every sample (row, methods.md's recommendation) or once per step."
    )
    eval_rule: Literal["exact", "ceil", "pow2"] = Field(
        "ceil", description="g at inference for window L: exact L/L0, ceil(L/L0) or the next power of two (>= 1)."
    )

    def default_seq_len(self, original: int | None) -> int | None:
        return original  # R = L0 (paper's result tables)

    def resolved_g_max(self, original: int) -> int:
        return self.g_max if self.g_max != "auto" else max(1, -(-self.target_len // original))


class TableBases(Section):
    """A published base set (HARPE Table 2: 32 bases, 1.00M-4.54M, for Llama-2-7B 4k->128k). Fewer bases (GQA):
    the entries at evenly spaced ranks, smallest and largest kept; more than 32 is an error."""

    kind: Literal["table"]
    table: Literal["harpe_llama2_32h"] = Field("harpe_llama2_32h", description="Which published set.")
    rescale: tuple[float, float] | None = Field(
        None, strict=False, description="[low, high]: map the table's range onto these bases, keeping its shape. null = as published."
    )
    order: Literal["ascending", "descending", "as_is"] = Field("ascending", description="Base order over the heads.")


class UniformBases(Section):
    """Evenly spaced bases b_min + h (b_max - b_min)/(n - 1)."""

    kind: Literal["uniform"]
    b_min: float = Field(1.0e6, gt=0, description="Smallest base.")
    b_max: float = Field(5.0e6, gt=0, description="Largest base.")
    order: Literal["ascending", "descending", "as_is"] = Field("ascending", description="Base order over the heads.")


class PeakValleyBases(Section):
    """HARPE's greedy peak-valley search on the grid b_min + i*stride (waveform definition reconstructed)."""

    kind: Literal["peak_valley"]
    b_min: float = Field(1.0e6, gt=0, description="Smallest base, the search's first pick.")
    b_max: float = Field(5.0e6, gt=0, description="Largest candidate base.")
    stride: float = Field(3.0e4, gt=0, description="Candidate grid step (paper: 30k).")
    order: Literal["ascending", "descending", "as_is"] = Field(
        "ascending", description="Base order over the heads; as_is = the order the search picked them."
    )


class ExplicitBases(Section):
    """Bases given one by one: one per key/value head (per attention head for multi-head models)."""

    kind: Literal["explicit"]
    values: list[float] = Field(min_length=1, description="The bases, e.g. [1.0e6, 2.5e6, 5.0e6].")
    order: Literal["ascending", "descending", "as_is"] = Field("as_is", description="Base order over the heads.")


HarpeBases = Annotated[Union[TableBases, UniformBases, PeakValleyBases, ExplicitBases], Field(discriminator="kind")]


class HarpeMethod(Section):
    """HARPE (Lian et al. 2024): a RoPE base per attention head (per key/value group with GQA), trained once,
    directly at target_len."""

    kind: Literal["harpe"]
    target_len: Length = Field(description="L, the window the model is trained at and serves, in tokens.")
    bases: HarpeBases = Field(
        default_factory=lambda: TableBases(kind="table"),
        description="Base set: kind table | uniform | peak_valley | explicit.",
    )
    assign: Literal["per_kv_group", "per_head"] = Field(
        "per_kv_group",
        description="per_kv_group: query heads sharing a key/value head share its base (any model); per_head: one "
        "base per query head, only for models without grouped-query attention (where both are the same).",
    )

    def default_seq_len(self, original: int | None) -> int | None:
        return self.target_len  # single stage, directly at the target length


class LongRecipeSelection(Section):
    """Which sentences of the training text are kept (methods.md §4.1.1-4.1.2)."""

    mode: Literal["digits", "logit_change", "none"] = Field(
        "digits",
        description="digits: keep every sentence with a digit (the released code's proxy for the paper's numeral "
        "finding); logit_change: every sentence with a top-ranked token type of `analysis` (the paper's); other "
        "sentences are kept with probability keep_other. none: keep every sentence.",
    )
    keep_other: float = Field(0.5, ge=0, le=1, description="Probability of keeping any other sentence (code: 0.5).")
    analysis: str | None = Field(None, description="logit_change mode: the JSON file written by `longext analyze`.")
    top_fraction: float = Field(
        0.2, gt=0, le=1, description="logit_change mode: the share of ranked token types that count as impactful (paper: 0.2)."
    )


class LongRecipePositions(Section):
    """Position index transformation: contiguous inside a sentence, random gaps between (methods.md §4.1.4)."""

    gap_mode: Literal["composition", "bounded"] = Field(
        "composition",
        description="composition: all target_len - seq_len skipped positions split at random over the gaps, so "
        "every sample spans the whole target window; bounded (paper): independent gaps in {0..max_gap}.",
    )
    max_gap: int | None = Field(None, ge=0, description="Largest gap M in bounded mode (required there).")
    contiguous_prefix: bool = Field(
        True,
        description="First r ~ U{1..(seq_len+1)//2} tokens, extended to the end of their sentence, keep positions "
        "0..r-1 (code).",
    )


class LongRecipeReplay(Section):
    """Stage 2: more steps in the same run on general text at a short length, contiguous positions, lower lr."""

    steps: int = Field(ge=1, description="Optimizer steps of the replay stage (after train.steps of extension).")
    lr: float | None = Field(None, gt=0, description="Constant learning rate. Default train.lr / 10 (paper: 5e-5 -> 5e-6).")
    data: list[TrainSource] | None = Field(
        None, min_length=1, description="Sources like data.train (paper: instruction data). Default: data.train."
    )
    seq_len: Length | Auto = Field("auto", description="Tokens per replay sample. auto = L0.")


class LongRecipeMerge(Section):
    """Stage 3: average with the original model, theta = w theta_original + (1 - w) theta_tuned."""

    weight_original: float = Field(0.5, ge=0, le=1, description="w (paper: 0.5).")


class LongRecipeMethod(Section):
    """LongRecipe (Hu et al. 2024): train on selected sentences at a fraction of target_len with position ids that
    span target_len, and an enlarged RoPE base computed once from the target length."""

    kind: Literal["longrecipe"]
    target_len: Length = Field(description="L, the window the position ids span and the model must serve, in tokens.")
    train_len_ratio: float = Field(0.3, gt=0, le=1, description="data.seq_len auto = round(ratio * target_len) (paper: 0.3).")
    rope_factor: float | Auto = Field(
        "auto",
        description="s in the base b' = b (s L/L0 - (s - 1))^(d/(d-2)) at L = target_len. auto = round(target_len / L0) "
        "(paper: 10 for 8k->80k, 16 for 8k->128k). rope.theta, when set, is used as the base instead.",
    )
    selection: LongRecipeSelection = Field(default_factory=LongRecipeSelection, description="Sentence selection.")
    positions: LongRecipePositions = Field(default_factory=LongRecipePositions, description="Position transform.")
    replay: LongRecipeReplay | None = Field(None, description="Replay stage after extension; null = none.")
    merge: LongRecipeMerge | None = Field(None, description="Merge with the original weights at the end; null = none.")

    def default_seq_len(self, original: int | None) -> int | None:
        return round(self.train_len_ratio * self.target_len)


def _layer_indices(value: Any) -> Any:
    """One clean error for a layer list, instead of one per member of `list[int] | 'auto'`."""
    if value == "auto" or (isinstance(value, list) and all(type(i) is int for i in value)):
        return value
    raise ValueError("expected a list of 0-based layer indices such as [10, 11, 12], or 'auto'")


class LongGenLayout(Section):
    """Which decoder layers keep full attention; every other layer is sparse (methods.md §6.1, layout [choice])."""

    full_layers: Annotated[list[int] | Auto, BeforeValidator(_layer_indices)] = Field(
        "auto",
        description="0-based indices of the full-attention layers, e.g. [10, 11, 12]; [] = every layer sparse. "
        "auto = round(N * full_fraction) layers placed by `placement` (N = the model's layer count).",
    )
    full_fraction: float = Field(
        1 / 3, ge=0, le=1, description="Share of full layers when full_layers is auto (paper: about 1/3)."
    )
    placement: Literal["middle", "bottom", "top", "interleaved"] = Field(
        "middle",
        description="Where the auto full layers go: middle = one centred block (paper's best), bottom / top = the "
        "first / last layers, interleaved = evenly spread (ablations).",
    )


class LongGenSparse(Section):
    """The static pattern of the sparse layers (methods.md §6.1; every constant is a [choice], the paper's are unknown)."""

    type: Literal["attn_sink", "block_sparse"] = Field(
        "attn_sink",
        description="attn_sink: a query sees the first sink_tokens keys and the `window` most recent ones; "
        "block_sparse: blocks of block_size, the local_blocks nearest plus every vert_stride-th earlier block.",
    )
    sink_tokens: int = Field(64, ge=0, description="attn_sink: first tokens every query sees.")
    window: int = Field(1984, ge=1, description="attn_sink: keys at distance < window (the query itself included) are seen.")
    block_size: int = Field(64, ge=1, description="block_sparse: tokens per block.")
    local_blocks: int = Field(16, ge=1, description="block_sparse: blocks at block distance < local_blocks are seen.")
    vert_stride: int = Field(8, ge=1, description="block_sparse: earlier block K is seen when (K + 1 + shift) % vert_stride == 0.")
    homo_head: bool = Field(
        True,
        description="block_sparse: the same strided blocks on every head (true) or shifted per head (false, Phi-3-small's "
        "rule). The KV cache keeps a block while any head can read it, so false saves compute but little KV memory.",
    )


class LongGenMethod(Section):
    """LongGen (Ge et al. 2024): about a third of the layers keep full attention, the rest use a static sparse pattern,
    and the hybrid is fine-tuned directly at target_len (one stage; the extension itself comes from `rope`,
    methods.md §6.3 suggests rope.kind none with theta 5e6 for Llama-2 4k -> 128k)."""

    kind: Literal["longgen"]
    target_len: Length = Field(description="L, the window the hybrid model is trained at and serves, in tokens.")
    layout: LongGenLayout = Field(default_factory=LongGenLayout, description="Which layers stay full.")
    sparse: LongGenSparse = Field(default_factory=LongGenSparse, description="The sparse layers' pattern.")
    kernel: Literal["auto", "block", "flex", "dense"] = Field(
        "auto",
        description="Sparse attention kernel: block = the pattern's fast path, cost ~ the sparse budget, with a backward "
        "(CPU/any: chunked fused SDPA over contiguous key slices for attn_sink; gathered key blocks for block_sparse "
        "training); "
        "flex = FlexAttention with a block mask (CUDA); dense = SDPA with the full boolean mask (reference, O(L^2)); "
        "auto = flex on CUDA when available, else block.",
    )

    def default_seq_len(self, original: int | None) -> int | None:
        return self.target_len  # trained in its deployment architecture at the target length


MethodSpec = Annotated[
    Union[StandardMethod, PoseMethod, E2LLMMethod, HarpeMethod, LongRecipeMethod, LongGenMethod],
    Field(discriminator="kind"),
]


# ------------------------------------------------------------------------------------------ lora
class LoraSpec(Section):
    """LoRA adapters through peft (not used with train.full_finetune: true)."""

    r: int = Field(8, ge=1, description="Rank.")
    alpha: float = Field(16.0, gt=0, description="Scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    targets: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        min_length=1,
        description="Module names that get adapters.",
    )
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


class EvalSpec(Section):
    """What `longext eval` measures by default for this run; its flags override these."""

    lengths: list[Length] = Field(
        default_factory=list, description="Context lengths. Empty = a ladder of powers of two up to --length."
    )
    perplexity: PerplexitySpec = Field(default_factory=PerplexitySpec)
    passkey: PasskeySpec = Field(default_factory=PasskeySpec)
    niah: NiahSpec = Field(default_factory=NiahSpec)
    filler: str = Field(
        "classic", min_length=1,
        description="Haystack of the passkey and needle prompts: classic (the passkey paper's grass/sky/sun lines, "
                    "repeated), books (the eval split of the offline books), or text files / a folder (sentences "
                    "cycled from a seeded offset per trial).",
    )
    seed: int = Field(0, description="Seeds passkey keys, depths and filler.")


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
        from longext.materials import expand_path

        return Path(expand_path(self.output.dir or f"runs/{self.name}"))

    @property
    def seq_len(self) -> int | None:
        """Training length R; None while it waits for L0 (auto for PoSE/E2-LLM before the model config is read)."""
        if self.data.seq_len != "auto":
            return self.data.seq_len
        return self.method.default_seq_len(self.model.original_context)


# --------------------------------------------------------------------------------------- loading
def load_recipe(path: Path | str, overrides: Sequence[str] = ()) -> Recipe:
    """Read, override (`a.b=value`, value parsed as YAML) and validate a recipe file."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(path, [Issue("<file>", "no such recipe file")])
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise RecipeError(path, [Issue("<file>", f"not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
                                               f"{err.start}); a recipe is a YAML text file")]) from None
    try:
        raw = load_yaml(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise RecipeError(path, [Issue("<yaml>", problem, mark.line + 1 if mark else None)]) from None
    duplicates = _duplicate_keys(_compose(text))
    if duplicates:
        raise RecipeError(path, duplicates)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(path, [Issue("<root>", f"a recipe is a mapping of sections (got {type(raw).__name__})", 1)])
    issues: list[Issue] = []
    for item in overrides:
        issue = _apply_override(raw, item)
        if issue:
            issues.append(issue)
    if issues:
        raise RecipeError(path, issues)
    return validate_recipe(raw, path, text, overridden={o.split("=", 1)[0].strip() for o in overrides})


def validate_recipe(raw: dict, path: Path | str, text: str = "", overridden: set[str] = frozenset()) -> Recipe:
    root = _compose(text)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        raise RecipeError(path, [_to_issue(e, raw, root, overridden) for e in err.errors()]) from None
    issues = [
        Issue(field, message, _line_of(root, field.split(".")))
        for field, message in cross_checks(recipe)
    ]
    if issues:
        raise RecipeError(path, issues)
    return recipe


def cross_checks(recipe: Recipe) -> list[tuple[str, str]]:
    """Rules that span fields. Returns (field path, message) pairs."""
    out = []
    t = recipe.train
    if t.checkpoint_offload and not t.gradient_checkpointing:
        out.append(("train.checkpoint_offload",
                    "offloads the activation checkpoints, so it needs train.gradient_checkpointing: true (got false)"))
    if t.full_finetune and "lora" in recipe.model_fields_set:
        out.append(("lora", "LoRA is not used when train.full_finetune is true (every weight trains); "
                            "remove the lora section or set full_finetune: false"))
    if t.offload_params and t.zero_stage != 3:
        out.append(("train.offload_params", f"parameter offload needs train.zero_stage 3 (got zero_stage {t.zero_stage})"))
    if recipe.data.seq_len != "auto" and recipe.data.seq_len > recipe.method.target_len:
        out.append(("data.seq_len", f"must not exceed method.target_len {recipe.method.target_len} (got {recipe.data.seq_len})"))
    factor = getattr(recipe.rope, "factor", None)
    if isinstance(factor, float) and factor < 1.0:
        out.append(("rope.factor", f"must be >= 1 (got {factor})"))
    if recipe.method.kind == "e2llm" and recipe.rope.kind != "none":
        out.append(("rope.kind", f"E2-LLM brings its own position interpolation; use rope.kind none (got {recipe.rope.kind!r})"))
    if recipe.method.kind == "harpe":
        out += _harpe_checks(recipe)
    if recipe.method.kind == "longrecipe":
        out += _longrecipe_checks(recipe)
    if recipe.method.kind == "longgen":
        out += _longgen_checks(recipe)
    out += data_checks(recipe)
    if getattr(recipe.method, "scales", None) and any(g < 1 for g in recipe.method.scales):
        out.append(("method.scales", f"every scale is >= 1 (got {recipe.method.scales})"))
    for i, depth in enumerate(recipe.eval.passkey.depths):
        if not 0.0 <= depth <= 1.0:
            out.append((f"eval.passkey.depths.{i}", f"a depth is between 0 and 1 (got {depth})"))
    return out


def _harpe_checks(recipe: Recipe) -> list[tuple[str, str]]:
    """HARPE sets the bases itself; checks on the base set that need no model config."""
    out, bases = [], recipe.method.bases
    if recipe.rope.kind != "none":
        out.append(("rope.kind", f"HARPE sets a RoPE base per head itself; use rope.kind none (got {recipe.rope.kind!r})"))
    elif recipe.rope.theta is not None:
        out.append(("rope.theta", f"HARPE sets a RoPE base per head in method.bases; remove it (got {recipe.rope.theta:g})"))
    if bases.kind in ("uniform", "peak_valley") and not bases.b_min < bases.b_max:
        out.append(("method.bases.b_max", f"must be above b_min {bases.b_min:g} (got {bases.b_max:g})"))
    if bases.kind == "peak_valley" and bases.b_min < bases.b_max and bases.stride > bases.b_max - bases.b_min:
        span = bases.b_max - bases.b_min
        out.append(("method.bases.stride", f"must be at most b_max - b_min = {span:g} (got {bases.stride:g})"))
    if bases.kind == "explicit" and any(not b > 0 for b in bases.values):
        out.append(("method.bases.values", f"every base is > 0 (got {bases.values})"))
    if bases.kind == "table" and bases.rescale is not None and not 0 < bases.rescale[0] < bases.rescale[1]:
        out.append(("method.bases.rescale", f"expected [low, high] with 0 < low < high (got {list(bases.rescale)})"))
    return out


def _longrecipe_checks(recipe: Recipe) -> list[tuple[str, str]]:
    out, method = [], recipe.method
    if recipe.rope.kind != "none":
        out.append(("rope.kind", f"LongRecipe sets its own enlarged RoPE base (method.rope_factor, or rope.theta); "
                                 f"use rope.kind none (got {recipe.rope.kind!r})"))
    if isinstance(method.rope_factor, float) and method.rope_factor < 1.0:
        out.append(("method.rope_factor", f"must be >= 1 (got {method.rope_factor})"))
    if method.selection.mode == "logit_change" and method.selection.analysis is None:
        out.append(("method.selection.analysis", "logit_change selection needs the file of `longext analyze` (got null)"))
    if method.positions.gap_mode == "bounded" and method.positions.max_gap is None:
        out.append(("method.positions.max_gap", "bounded gap mode needs max_gap (got null)"))
    if method.replay and method.replay.seq_len != "auto" and method.replay.seq_len > method.target_len:
        out.append(("method.replay.seq_len", f"must not exceed method.target_len {method.target_len} "
                                             f"(got {method.replay.seq_len})"))
    if recipe.data.packing != "concat":
        out.append(("data.packing", f"LongRecipe fills every sample with whole selected sentences; use concat "
                                    f"(got {recipe.data.packing!r})"))
    return out


def _longgen_checks(recipe: Recipe) -> list[tuple[str, str]]:
    """LongGen rules that need no model config; layer indices against the layer count are checked in
    longext.methods.longgen.longgen_spec (plan.resolve, i.e. `train --dry-run` and the start of training)."""
    out, layers = [], recipe.method.layout.full_layers
    if layers != "auto":
        if any(i < 0 for i in layers):
            out.append(("method.layout.full_layers", f"layer indices are 0-based and >= 0 (got {layers})"))
        if len(set(layers)) != len(layers):
            out.append(("method.layout.full_layers", f"each layer at most once (got {layers})"))
    return out


def _apply_override(raw: dict, item: str) -> Issue | None:
    if "=" not in item:
        return Issue("--set", f"expected KEY=VALUE such as train.lr=1e-5 (got {item!r})")
    key, value = (s.strip() for s in item.split("=", 1))
    parts = key.split(".")
    if not all(parts):
        return Issue("--set", f"expected a dotted field path such as train.lr (got {key!r})")
    try:
        parsed = load_yaml(value) if value else None
    except yaml.YAMLError:
        parsed = value
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            return Issue(".".join(parts[: i + 1]), f"is not a section, cannot set {key} (got {child!r})")
        node = child
    node[parts[-1]] = parsed
    return None


_FIELD_LINE = re.compile(r"^([a-z][a-z0-9_]*(?:\.[a-z0-9_]+)+): (.+)$")


def located(path: Path | str, err: LongextError, overrides: Sequence[str] = ()) -> LongextError:
    """A problem found after validation (a missing model.path, texts, the memory refusal ...) with the recipe file
    and line in front, like the schema's own errors: `file:line field: message`, for fields the file or a --set
    gave. Other lines (a field from a flag such as --out, no field at all), and errors that are not plain bad input
    (TrainingStopped, ...), come back as they were."""
    if type(err) not in (LongextError, Problems):
        return err
    try:
        root = _compose(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        root = None
    overridden = {o.split("=", 1)[0].strip() for o in overrides}
    lines, changed = [], False
    for line in err.lines():
        m = _FIELD_LINE.match(line)
        field = m.group(1) if m else ""
        from_set = any(field == o or field.startswith(o + ".") for o in overridden)
        if m and (from_set or _has_path(root, field.split("."))):
            lines.append(f"{path}:{_line_of(root, field.split('.'))} {line}" + (" [from --set]" if from_set else ""))
            changed = True
        else:
            lines.append(line)
    return Problems(lines) if changed else err


def _has_path(root: yaml.Node | None, parts: Sequence[str]) -> bool:
    node = root
    for part in parts:
        if isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
            node = node.value[int(part)]  # a list entry, e.g. data.train.2
            continue
        if not isinstance(node, yaml.MappingNode):
            return False
        node = next((v for k, v in node.value if k.value == part), None)
        if node is None:
            return False
    return True


def _compose(text: str) -> yaml.Node | None:
    try:
        return yaml.compose(text, Loader=YamlLoader) if text else None
    except yaml.YAMLError:
        return None


def _duplicate_keys(node: yaml.Node | None, path: tuple[str, ...] = ()) -> list[Issue]:
    """A key given twice in one mapping (YAML keeps the last one silently; we refuse)."""
    issues: list[Issue] = []
    if isinstance(node, yaml.MappingNode):
        first: dict[str, int] = {}
        for key, value in node.value:
            name, line = str(key.value), key.start_mark.line + 1
            if name in first:
                field = ".".join((*path, name))
                issues.append(Issue(field, f"given twice (first on line {first[name]}); keep one", line))
            else:
                first[name] = line
            issues += _duplicate_keys(value, (*path, name))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            issues += _duplicate_keys(item, (*path, str(i)))
    return issues


def _to_issue(error: dict, raw: dict, root: yaml.Node | None, overridden: set[str]) -> Issue:
    """One pydantic error as `field.path: message (got X)`, with the line of the field in the YAML."""
    loc, member = _user_loc(error["loc"], raw)
    kind, got = error["type"], error.get("input")
    message = error["msg"].removeprefix("Value error, ")
    show_got = kind not in ("missing", "extra_forbidden")
    if member:
        # `float | "auto"` fails once per member; every member error becomes the same single line.
        message = f"expected {_expected(_field_annotation(loc, raw))}"
    elif kind == "extra_forbidden":
        allowed = _allowed_fields(loc[:-1], raw)
        close = difflib.get_close_matches(loc[-1], allowed, n=1)
        message = "unknown field" + (f", did you mean {close[0]}?" if close else "")
        message += f" (allowed: {', '.join(allowed)})" if allowed else ""
    elif kind in ("union_tag_invalid", "union_tag_not_found"):
        kinds = ", ".join(repr(k) for k in _kinds(_field_annotation(loc, raw)))
        loc = [*loc, "kind"]
        if kind == "union_tag_invalid":
            message, got = f"must be one of {kinds}", error.get("ctx", {}).get("tag")
        else:
            message, show_got = f"Field required, one of {kinds}", False
    elif kind in ("model_type", "model_attributes_type", "dict_type"):
        message = "expected a section of `key: value` fields"
    if show_got and "input" in error and f"(got {got!r})" not in message:
        message += f" (got {got!r})"
    field = ".".join(loc) or "<root>"
    if field in overridden or any(field.startswith(o + ".") for o in overridden):
        message += " [from --set]"
    return Issue(field, message, _line_of(root, loc))


def _user_loc(loc: tuple, raw: Any) -> tuple[list[str], bool]:
    """pydantic's location as the user wrote it, and whether it pointed inside a union member.

    Discriminator tags are dropped ('rope', 'yarn', 'factor' -> rope.factor), and so are the member
    names pydantic appends below a plain value ('rope.factor.float', "rope.factor.literal['auto']").
    """
    out, node, member = [], raw, False
    for part in loc:
        if isinstance(node, dict) and part not in node and node.get("kind") == part:
            continue  # discriminator tag
        if out and not isinstance(node, (dict, list)):
            member = True  # below a scalar: a union member's name, not something the user wrote
            break
        out.append(str(part))
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            node = None
    return out, member


def _allowed_fields(loc: list[str], raw: Any) -> list[str]:
    """Field names of the section at `loc`, for 'unknown field' messages."""
    return sorted(getattr(_section_at(loc, raw), "model_fields", {}))


def _section_at(loc: Sequence[str], raw: Any) -> Any:
    """The schema class of the section at `loc` (the variant named by `kind` for unions), or None."""
    cls: Any = Recipe
    node = raw
    for part in loc:
        if isinstance(node, list) and str(part).isdigit():  # an entry of a list of sections (data.train.2)
            node = node[int(part)] if int(part) < len(node) else None
            continue
        node = node.get(part) if isinstance(node, dict) else None
        info = getattr(cls, "model_fields", {}).get(part)
        if info is None:
            return None
        cls = _section_class(info.annotation, node)
        if cls is None:
            return None
    return cls


def _field_annotation(loc: Sequence[str], raw: Any) -> Any:
    info = getattr(_section_at(loc[:-1], raw), "model_fields", {}).get(loc[-1]) if loc else None
    return info.annotation if info is not None else None


def _kinds(annotation: Any) -> list[str]:
    """The `kind` values of a discriminated union of sections (rope -> none, linear, ...)."""
    members = get_args(annotation) or (annotation,)
    return [
        tag for m in members if isinstance(m, type) and issubclass(m, BaseModel) and "kind" in m.model_fields
        for tag in get_args(m.model_fields["kind"].annotation)
    ]


def _expected(annotation: Any) -> str:
    """What a union field accepts, in words: `float | "auto"` -> "a number, or 'auto'"."""
    words = []
    for arg in get_args(annotation) or (annotation,):
        if get_origin(arg) is Literal:
            words += [repr(v) for v in get_args(arg)]
        elif any(getattr(m, "func", None) is parse_length for m in getattr(arg, "__metadata__", ())):
            words.append(LENGTH_ALLOWED)
        else:
            words.append({bool: "true or false", float: "a number", int: "a whole number", str: "text",
                          type(None): "null"}.get(arg, str(arg)))
    return ", or ".join(words)


def _section_class(annotation: Any, node: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            kind = arg.model_fields.get("kind")
            if kind is None or (isinstance(node, dict) and node.get("kind") in getattr(kind.annotation, "__args__", ())):
                return arg
        elif (found := _section_class(arg, node)) is not None:
            return found
    return None


def _line_of(root: yaml.Node | None, loc: Sequence[str]) -> int | None:
    """1-based line of the deepest node along `loc` that exists in the YAML text."""
    if root is None:
        return None
    node, line = root, None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == part), None)
            if match is None:
                break
            key_node, node = match
            line = key_node.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and str(part).isdigit() and int(part) < len(node.value):
            node = node.value[int(part)]
            line = node.start_mark.line + 1
        else:
            break
    return line


def dump_recipe(recipe: Recipe) -> str:
    """YAML text of a (resolved) recipe, every field written out; a full fine-tune has no `lora` section, so the
    text loads again (cross_checks refuses one next to train.full_finetune: true)."""
    exclude = {"lora"} if recipe.train.full_finetune else None
    return yaml.safe_dump(recipe.model_dump(mode="json", exclude=exclude), sort_keys=False)
