"""The `method` section: one block per method, each with its default training length and its cross-field checks
(the method's code is in longext/methods/, one module or folder each)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BeforeValidator, Field

from longext.recipe.base import Auto, Length, Section
from longext.recipe.data import TrainSource


class MethodSection(Section):
    """What every method block answers: its default training length and its rules that span fields."""

    def default_seq_len(self, original: int | None) -> int | None:
        return self.target_len

    def checks(self, recipe) -> list[tuple[str, str]]:
        """Rules between this block and the rest of the `recipe` (the whole Recipe) that need no model config:
        (field path, message) pairs."""
        return []


class StandardMethod(MethodSection):
    """Plain fine-tuning with contiguous positions at data.seq_len, using the `rope` setting."""

    kind: Literal["standard"]
    target_len: Length = Field(description="L, the window the extended model must serve, in tokens.")


class PoseMethod(MethodSection):
    """PoSE (Zhu et al. 2023): train at a short window whose position ids skip ahead so they span target_len."""

    kind: Literal["pose"]
    target_len: Length = Field(description="L, the window the position ids span and the model must serve, in tokens.")
    chunks: int = Field(2, ge=1, description="Contiguous pieces per sample, each after a random skip (paper: 2).")
    sample_scope: Literal["row", "step"] = Field(
        "row", description="Draw new skips for every sample (row) or once per optimizer step (step)."
    )

    def default_seq_len(self, original: int | None) -> int | None:
        return original  # R = L0: the paper trains at the original window


class E2LLMMethod(MethodSection):
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

    def checks(self, recipe) -> list[tuple[str, str]]:
        out = []
        if recipe.rope.kind != "none":
            out.append(("rope.kind", f"E2-LLM brings its own position interpolation; use rope.kind none (got {recipe.rope.kind!r})"))
        if self.scales and any(g < 1 for g in self.scales):
            out.append(("method.scales", f"every scale is >= 1 (got {self.scales})"))
        return out


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


class HarpeMethod(MethodSection):
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

    def checks(self, recipe) -> list[tuple[str, str]]:
        """HARPE sets the bases itself; checks on the base set that need no model config."""
        out, bases = [], self.bases
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


class LongRecipeMethod(MethodSection):
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

    def checks(self, recipe) -> list[tuple[str, str]]:
        out = []
        if recipe.rope.kind != "none":
            out.append(("rope.kind", f"LongRecipe sets its own enlarged RoPE base (method.rope_factor, or rope.theta); "
                                     f"use rope.kind none (got {recipe.rope.kind!r})"))
        if isinstance(self.rope_factor, float) and self.rope_factor < 1.0:
            out.append(("method.rope_factor", f"must be >= 1 (got {self.rope_factor})"))
        if self.selection.mode == "logit_change" and self.selection.analysis is None:
            out.append(("method.selection.analysis", "logit_change selection needs the file of `longext analyze` (got null)"))
        if self.positions.gap_mode == "bounded" and self.positions.max_gap is None:
            out.append(("method.positions.max_gap", "bounded gap mode needs max_gap (got null)"))
        if self.replay and self.replay.seq_len != "auto" and self.replay.seq_len > self.target_len:
            out.append(("method.replay.seq_len", f"must not exceed method.target_len {self.target_len} "
                                                 f"(got {self.replay.seq_len})"))
        if recipe.data.packing != "concat":
            out.append(("data.packing", f"LongRecipe fills every sample with whole selected sentences; use concat "
                                        f"(got {recipe.data.packing!r})"))
        return out


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


class LongGenMethod(MethodSection):
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

    def checks(self, recipe) -> list[tuple[str, str]]:
        """LongGen rules that need no model config; layer indices against the layer count are checked in
        longext.methods.longgen.longgen_spec (resolve.resolve, i.e. `train --dry-run` and the start of training)."""
        out, layers = [], self.layout.full_layers
        if layers != "auto":
            if any(i < 0 for i in layers):
                out.append(("method.layout.full_layers", f"layer indices are 0-based and >= 0 (got {layers})"))
            if len(set(layers)) != len(layers):
                out.append(("method.layout.full_layers", f"each layer at most once (got {layers})"))
        return out


MethodSpec = Annotated[
    Union[StandardMethod, PoseMethod, E2LLMMethod, HarpeMethod, LongRecipeMethod, LongGenMethod],
    Field(discriminator="kind"),
]
