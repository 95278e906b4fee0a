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
    """Training ended early for a reason the user must see (non-finite loss, a signal, a run folder that cannot be
    written). Exit code 3 unless given. `resumable`: the run continues with `--resume`, and the message ends with the
    command that does it (`resume_command`, which the CLI sets to the exact command the user gave)."""

    exit_code = 3

    def __init__(self, message: str, exit_code: int = 3, resumable: bool = False):
        super().__init__(message)
        self.exit_code, self.resumable = exit_code, resumable
        self.resume_command = "longext train RECIPE --resume"

    def lines(self) -> list[str]:
        return [f"{self}; continue with `{self.resume_command}`" if self.resumable else str(self)]


class WriteFailed(LongextError):
    """A file or folder of the run directory could not be written (a read-only folder, a full disk). Training turns
    it into a TrainingStopped that names the last good checkpoint."""

    def __init__(self, path: Path | str, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"cannot write {path} ({reason})")


def warn(message: str) -> None:
    """One `warning:` line on stderr, for a problem longext recovered from (a damaged checkpoint passed over, a torn
    metrics line dropped). Under a launcher only rank 0 speaks."""
    import os
    import sys

    if os.environ.get("RANK", "0") == "0":
        print(f"warning: {message}", file=sys.stderr, flush=True)
