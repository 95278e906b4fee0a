"""Where longext prints: rich consoles whose lines survive redirection.

A printed line is never cut at the console width (soft_wrap), so paths and figures stay whole for grep and scripts.
When the output is not a terminal, tables are as wide as their content instead of the 80 columns (or $COLUMNS) rich
would assume, so a cell holding a path is never folded either; on a terminal they fit its width. Colour and other
ANSI codes only go to a terminal, or where FORCE_COLOR asks for them (rich's own rule).
"""

from __future__ import annotations

UNLIMITED = 100_000  # columns of a console that is not a terminal: no table cell is ever wrapped


def console(stderr: bool = False):
    """A rich Console on stdout (or stderr) with longext's rules."""
    from rich.console import Console

    out = Console(stderr=stderr, highlight=False, emoji=False, soft_wrap=True)
    if not out.is_terminal:
        out.width = UNLIMITED
    return out
