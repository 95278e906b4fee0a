"""What a model folder must hold before anything loads it: a readable config.json, tokenizer files and complete
weights. Each missing or damaged part is one line naming the file, found without importing torch or transformers
(a truncated model.safetensors would otherwise end in a SafetensorError traceback minutes into a run, a folder
without tokenizer files in transformers' "install sentencepiece or tiktoken" traceback).

The weights are checked from their headers: a safetensors file is an 8-byte header length, a JSON header that gives
every tensor's dtype, shape and byte range, then the data; the header's last byte range must end where the file
ends. Sharded weights are checked through their index (every shard it names present and complete).
"""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

CONFIG = "config.json"
SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
TORCH_BIN, TORCH_BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tiktoken.model", "tokenizer.tiktoken")
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
               "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}
MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header


def model_problems(folder: Path | str, field: str, tokenizer: bool = True, weights: bool = True) -> list[str]:
    """`field: problem` lines for a model folder (config.json, tokenizer files, weights); empty when it can load."""
    folder = Path(folder)
    if not folder.is_dir():
        return [f"{field}: no such model directory: {str(folder)!r}"]
    problems = [f"{field}: {p}" for p in config_problems(folder)]
    if tokenizer:
        problems += [f"{field}: {p}" for p in tokenizer_problems(folder)]
    if weights:
        problems += [f"{field}: {p}" for p in weight_problems(folder)]
    return problems


def adapter_problems(folder: Path, field: str) -> list[str]:
    """A peft adapter folder: adapter_config.json and complete adapter weights."""
    config, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    problems = [_json_problem(config)] if config.is_file() else [f"{config} is missing"]
    if weights.is_file():
        problems.append(safetensors_problem(weights))
    elif (folder / "adapter_model.bin").is_file():
        problems.append(torch_bin_problem(folder / "adapter_model.bin"))
    else:
        problems.append(f"{folder} has no adapter weights ({weights.name})")
    return [f"{field}: {p}" for p in problems if p]


def config_problems(folder: Path) -> list[str]:
    path = folder / CONFIG
    if not path.is_file():
        return [f"{folder} has no {CONFIG} (expected a transformers model directory)"]
    problem = _json_problem(path)
    if problem:
        return [problem]
    config = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(config, dict):
        return [f"{path} is not a JSON object of settings"]
    auto_map = config.get("auto_map")
    refs = auto_map.values() if isinstance(auto_map, dict) else ()
    modules = sorted({ref.rsplit(".", 1)[0] for ref in refs  # "repo--module.Class" lives in another repository
                      if isinstance(ref, str) and "--" not in ref})
    return [f"{folder / (m + '.py')} is missing (config.json's auto_map names it)" for m in modules
            if not (folder / f"{m}.py").is_file()]


def tokenizer_problems(folder: Path) -> list[str]:
    """A fast tokenizer (tokenizer.json), a sentencepiece or tiktoken model, or a BPE vocabulary with its merges."""
    found = [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        found.append(folder / "vocab.json")
    if not found:
        return [f"{folder} has no tokenizer files (tokenizer.json, tokenizer.model, or vocab.json + merges.txt); "
                f"copy them from the model the weights came from"]
    problems = [f"{path} is empty" for path in found if path.stat().st_size == 0]
    problems += [p for path in found if path.suffix == ".json" and path.stat().st_size for p in [_json_problem(path)] if p]
    config = folder / "tokenizer_config.json"
    if config.is_file():
        problems += [p for p in [_json_problem(config)] if p]
    return problems


def weight_problems(folder: Path) -> list[str]:
    """Complete weights: an index with every shard it names, or one model.safetensors / pytorch_model.bin."""
    for index in (SAFETENSORS_INDEX, TORCH_BIN_INDEX):
        if (folder / index).is_file():
            return index_problems(folder / index)
    if (folder / SAFETENSORS).is_file():
        return [p for p in [safetensors_problem(folder / SAFETENSORS)] if p]
    if (folder / TORCH_BIN).is_file():
        return [p for p in [torch_bin_problem(folder / TORCH_BIN)] if p]
    return [f"{folder} has no weights ({SAFETENSORS}, sharded model-*.safetensors with {SAFETENSORS_INDEX}, or "
            f"{TORCH_BIN}); a folder with only config.json serves `longext plan`, not training or eval"]


def index_problems(index: Path) -> list[str]:
    """Every shard the index's weight_map names is there and complete."""
    try:
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        if not all(isinstance(name, str) for name in shards):
            raise TypeError("weight_map values are not file names")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return [f"{index} is not a readable weight index ({type(err).__name__}: {str(err)[:80]})"]
    check = safetensors_problem if index.name == SAFETENSORS_INDEX else torch_bin_problem
    problems = []
    for name in shards:
        shard = index.parent / name
        problems.append(f"{shard} is missing (named by {index.name})" if not shard.is_file() else check(shard))
    return [p for p in problems if p]


def safetensors_problem(path: Path) -> str | None:
    """None when the header is readable and the byte ranges it gives fit the file exactly."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little") if size >= 8 else -1
            if not 0 < length <= min(MAX_HEADER, size - 8):
                return f"{path} is truncated or not a safetensors file ({size:,} bytes, no complete header)"
            header = json.loads(f.read(length))
    except (OSError, ValueError) as err:
        return f"{path} has an unreadable safetensors header ({type(err).__name__})"
    try:
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        end = max((v["data_offsets"][1] for v in tensors.values()), default=0)
        wrong = [k for k, v in tensors.items() if v["dtype"] in DTYPE_BYTES
                 and v["data_offsets"][1] - v["data_offsets"][0] != math.prod(v["shape"]) * DTYPE_BYTES[v["dtype"]]]
    except (AttributeError, KeyError, TypeError, IndexError):
        return f"{path} has a safetensors header without dtype, shape and data_offsets for every tensor"
    if wrong:
        return f"{path}: tensor {wrong[0]} has a byte range that does not match its dtype and shape (damaged header)"
    expected = 8 + length + end
    if expected != size:
        cut = "truncated" if size < expected else "longer than its header says"
        return f"{path} is {cut}: {size:,} bytes, its header describes {expected:,}"
    return None


def torch_bin_problem(path: Path) -> str | None:
    """A torch zip checkpoint (the format since torch 1.6) has its directory at the end: a cut file has none."""
    if path.stat().st_size == 0:
        return f"{path} is empty"
    with open(path, "rb") as f:
        zipped = f.read(2) == b"PK"
    if zipped and not zipfile.is_zipfile(path):
        return f"{path} is truncated (its zip directory is missing)"
    return None


def _json_problem(path: Path) -> str | None:
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return f"{path} is not valid JSON ({str(err)[:80]})"
    return None
