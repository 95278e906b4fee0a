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


def recipe_table(width: int = 200):
    """rich Table: name, method, RoPE, target length, training length, model, description; on a console
    narrower than 140 columns without the model, narrower than 100 also without RoPE and training length."""
    from rich.table import Table

    from longext.errors import RecipeError
    from longext.lengths import format_length
    from longext.recipe import load_recipe

    columns = ["name", "method", "rope", "target", "train len", "model", "description"]
    if width < 140:
        columns.remove("model")
    if width < 100:
        columns = [c for c in columns if c not in ("rope", "train len")]
    table = Table(title=f"recipes in {RECIPES_DIR}")
    table.add_column("name", no_wrap=True)  # a name is what users copy: never split it
    for column in columns[1:]:
        table.add_column(column, overflow="fold", no_wrap=column != "description" and column != "model")
    for path in shipped_recipes():
        try:
            r = load_recipe(path)
        except RecipeError as err:
            cells = {"name": path.stem, "method": "[red]invalid[/]", "description": err.lines()[0]}
        else:
            factor = getattr(r.rope, "factor", "")
            cells = {
                "name": path.stem, "method": r.method.kind,
                "rope": f"{r.rope.kind} x{factor}" if factor not in ("", None) else r.rope.kind,
                "target": format_length(r.method.target_len), "train len": format_length(r.seq_len) if r.seq_len else "L0",
                "model": r.model.path, "description": r.description,
            }
        table.add_row(*(cells.get(c, "") for c in columns))
    return table
