"""User-facing errors. A `LongextError` ends the program with one line per problem and exit code 2;
anything else is a bug and keeps its traceback."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class LongextError(Exception):
    """A problem with what the user gave us (recipe, path, length, flag). Exit code 2."""

    exit_code = 2

    def lines(self) -> list[str]:
        return [str(self)]


class Problems(LongextError):
    """Several problems found at once (flags, several files): one line each."""

    def __init__(self, lines: list[str]):
        self._lines = lines
        super().__init__("\n".join(lines))

    def lines(self) -> list[str]:
        return self._lines


@dataclass(frozen=True)
class Issue:
    """One problem in a recipe: where it is and what is wrong."""

    field: str  # dotted field path, e.g. "train.lr"; "<yaml>" for syntax errors and limits; "" for the whole file
    message: str
    line: int | None = None  # 1-based line in the recipe file, when known


class RecipeError(LongextError):
    """Every problem found in one recipe file, reported at once as `file:line field: message`."""

    def __init__(self, path: Path | str, issues: list[Issue]):
        self.path = str(path)
        self.issues = issues
        super().__init__("\n".join(self.lines()))

    def lines(self) -> list[str]:
        out = []
        for issue in self.issues:
            where = f"{self.path}:{issue.line}" if issue.line else self.path
            out.append(f"{where} {issue.field}: {issue.message}" if issue.field else f"{where}: {issue.message}")
        return out


class TrainingStopped(LongextError):
    """Training ended early for a reason the user must see (non-finite loss, ...). Exit code 3."""

    exit_code = 3

    def __init__(self, message: str, exit_code: int = 3):
        super().__init__(message)
        self.exit_code = exit_code
