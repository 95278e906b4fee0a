"""`longext analyze BASE REFERENCE --out FILE`: load both models (model directories, exported models or run
directories), score LongRecipe's impactful tokens on windows of the texts (longext.methods.longrecipe.analysis),
write the ranking that `method.selection.analysis` reads."""

from __future__ import annotations

from pathlib import Path

from longext.errors import LongextError
from longext.methods.longrecipe.analysis import logit_change, ranking, sample_windows
from longext.methods.longrecipe.selection import FORMAT, is_analysis_file


def run_analysis(base: Path, reference: Path, texts: list[str], length: int, samples: int, out: Path) -> Path:
    """Load both models (model directories, exported models or run directories), score, write the JSON."""
    from longext.data import load_documents, tokenize_documents
    from longext.files import check_writable, write_json
    from longext.materials import resolve_texts
    from longext.methods.longrecipe.selection import token_texts
    from longext.models import quiet_libraries
    from longext.rundir import is_run_dir
    from longext.targets import check_target_files, load_target

    quiet_libraries()  # no weight-loading bars or deprecation chatter between our lines
    for name, path in (("BASE", base), ("REFERENCE", reference)):  # both, before any weights are loaded
        if not Path(path).is_dir():
            raise LongextError(f"{name}: no such model or run directory: {str(path)!r}")
        if not is_run_dir(Path(path)) and not (Path(path) / "config.json").is_file():
            raise LongextError(f"{name}: {path} is neither a model directory (no config.json) nor a run directory")
        check_target_files(Path(path), field=name)
    check_writable(out, "--out", folder=False)
    if out.is_file() and not is_analysis_file(out):
        raise LongextError(f"--out: {out} exists and is not a file written by `longext analyze`; choose another path")
    loaded = [load_target(Path(p)) for p in (base, reference)]
    sizes = [m.model.get_output_embeddings().weight.shape[0] for m in loaded]
    if sizes[0] != sizes[1]:
        raise LongextError(f"REFERENCE: vocabulary of {sizes[1]} tokens, the base has {sizes[0]}; they must share a tokenizer")
    tokenizer = loaded[0].tokenizer
    docs = load_documents(resolve_texts(texts, "eval", "--texts"))
    windows = sample_windows(tokenize_documents(docs, tokenizer), tokenizer.eos_token_id, length, samples)
    for m in loaded:
        m.set_length(length)
        m.model.eval()
    total, count = logit_change(loaded[0].model, loaded[1].model, windows, sizes[0])
    report = {
        "format": FORMAT, "base": str(base), "reference": str(reference), "tokenizer_size": len(tokenizer),
        "length": length, "windows": len(windows), "tokens": int(count.sum()),
        "ranking": ranking(total, count, token_texts(tokenizer)),
    }
    write_json(out, report, indent=1)
    return out
