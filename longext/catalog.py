"""The recipes shipped in the repository's `recipes/` folder: listing and lookup by name."""

from __future__ import annotations

from pathlib import Path

from longext.errors import LongextError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


def shipped_recipes() -> list[Path]:
    return sorted(RECIPES_DIR.glob("*.yaml")) if RECIPES_DIR.is_dir() else []


def find_recipe(name: str) -> Path:
    """A shipped recipe by name (`demo`, `demo.yaml`) or any existing file path."""
    as_path = Path(name)
    if as_path.is_file():
        return as_path
    for path in shipped_recipes():
        if name in (path.stem, path.name):
            return path
    names = ", ".join(p.stem for p in shipped_recipes()) or "none found"
    raise LongextError(f"NAME: no recipe named {name!r} (shipped: {names})")


def recipe_table():
    """rich Table: name, method, RoPE, target length, training length, model, description."""
    from rich.table import Table

    from longext.errors import RecipeError
    from longext.lengths import format_length
    from longext.recipe import load_recipe

    table = Table(title=f"recipes in {RECIPES_DIR}")
    for column in ("name", "method", "rope", "target", "train len", "model", "description"):
        table.add_column(column, overflow="fold")
    for path in shipped_recipes():
        try:
            r = load_recipe(path)
        except RecipeError as err:
            table.add_row(path.stem, "[red]invalid[/]", "", "", "", "", err.lines()[0])
            continue
        factor = getattr(r.rope, "factor", "")
        rope = f"{r.rope.kind} x{factor}" if factor not in ("", None) else r.rope.kind
        table.add_row(
            path.stem, r.method.kind, rope, format_length(r.method.target_len),
            format_length(r.seq_len) if r.seq_len else "L0", r.model.path, r.description,
        )
    return table
