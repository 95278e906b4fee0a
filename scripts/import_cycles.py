"""Import circles among a package's modules, read from their import statements (no module is executed).

    python scripts/import_cycles.py [PACKAGE_DIR]      (default: longext/ next to this script's folder)

Every `import` and `from ... import` counts, at module level or inside a function: a lazy import still ties the
two modules together (one cannot be understood, moved or tested without the other). `from a.b import c` is an
edge to the module a.b.c when that module exists, else to a.b; importing a submodule is not an edge to its
parent package. Prints each circle as `a -> b -> a` (one shortest circle per group of modules that reach one
another, and the whole group when it is larger) and exits 1; prints `no import circles in <package>` and exits 0
otherwise.

Then the same at the level of the package's parts: a part is a top-level module or a first-level subpackage
(everything under `pkg/sub/` counts as `pkg.sub`). Two parts that import each other through any of their modules
are a circle between parts (`parts circle: pkg.a -> pkg.sub -> pkg.a`, with one import that makes each step) and
also exit 1: a subpackage is one idea, and it sits above or below each other part, never both.
"""

from __future__ import annotations

import ast
import sys
from collections import deque
from pathlib import Path


def module_names(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under `package` (a folder with __init__.py)."""
    root = package.parent
    out = {}
    for path in sorted(package.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imported_modules(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that `name` (at `path`) imports anywhere in its body."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, name, is_package)
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {_owner(m, known) for m in found if _owner(m, known)} - {name}


def _absolute(node: ast.ImportFrom, name: str, is_package: bool) -> str:
    """The absolute module of `from X import ...`, relative imports included."""
    if not node.level:
        return node.module or ""
    here = name.split(".") if is_package else name.split(".")[:-1]
    base = here[: len(here) - node.level + 1]
    return ".".join([*base, node.module] if node.module else base)


def _owner(module: str, known: dict[str, Path]) -> str | None:
    """`module` itself when it is one of the package's modules, else its nearest known ancestor (an import of
    `pkg.mod.func`-like dotted names), else None (outside the package)."""
    parts = module.split(".")
    while parts:
        if ".".join(parts) in known:
            return ".".join(parts)
        parts.pop()
    return None


def import_graph(package: Path) -> dict[str, set[str]]:
    known = module_names(package)
    return {name: imported_modules(name, path, known) for name, path in known.items()}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Groups of modules that all reach one another (Tarjan), each sorted; only groups of two or more."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(groups)


def shortest_cycle(graph: dict[str, set[str]], group: list[str]) -> list[str]:
    """A shortest circle through the group's first module, staying inside the group (breadth-first)."""
    start, members = group[0], set(group)
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(graph[v] & members):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [*reversed(path), start]
            if w not in parent:
                parent[w] = v
                queue.append(w)
    return [start]


def part_of(module: str, package: str) -> str:
    """`pkg.sub` for any module under pkg/sub/, the module itself for a top-level one."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def part_graph(graph: dict[str, set[str]], package: str) -> tuple[dict[str, set[str]], dict[tuple[str, str], str]]:
    """(part -> parts it imports, (part, part) -> one module import that makes that step)."""
    parts: dict[str, set[str]] = {}
    witness: dict[tuple[str, str], str] = {}
    for module, imported in graph.items():
        a = part_of(module, package)
        if a == package:  # the package's face (__init__) hands names on only
            continue
        parts.setdefault(a, set())
        for other in sorted(imported):
            b = part_of(other, package)
            if a != b and b != package:
                parts[a].add(b)
                witness.setdefault((a, b), f"{module} imports {other}")
    return parts, witness


def main(argv: list[str]) -> int:
    package = Path(argv[0]) if argv else Path(__file__).resolve().parents[1] / "longext"
    if not (package / "__init__.py").is_file():
        print(f"error: {package} is not a package (no __init__.py)", file=sys.stderr)
        return 2
    graph = import_graph(package)
    groups = strongly_connected(graph)
    for group in groups:
        print("import circle: " + " -> ".join(shortest_cycle(graph, group)))
        if len(group) > 2:
            print(f"  modules tied together ({len(group)}): {', '.join(group)}")
    if groups:
        print(f"{len(groups)} import circle(s) in {package.name}/ ({len(graph)} modules)")
        return 1
    parts, witness = part_graph(graph, package.name)
    part_groups = strongly_connected(parts)
    for group in part_groups:
        cycle = shortest_cycle(parts, group)
        print("parts circle: " + " -> ".join(cycle))
        for a, b in zip(cycle, cycle[1:]):
            print(f"  {witness[(a, b)]}")
    if part_groups:
        print(f"{len(part_groups)} circle(s) between the parts of {package.name}/ ({len(parts)} parts)")
        return 1
    print(f"no import circles in {package.name}/ ({len(graph)} modules), nor between its {len(parts)} parts")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
