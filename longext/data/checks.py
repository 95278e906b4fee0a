"""What counts as a bad row, and text that is not text.

A bad row (invalid JSON, a missing or non-text field, empty text, a malformed chat) is skipped and counted; past
data.max_bad_rows the run stops with one line per bad row (file:line, what was found, what is allowed). A .txt file
that is not UTF-8 or is mostly control/replacement characters is refused as a whole: it is not text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from longext.errors import Problems

# C0/C1 controls except tab, newline, vertical tab, form feed and carriage return; U+FFFD (what `replace` puts
# for undecodable bytes); lone surrogates; private-use characters
NON_PRINTABLE = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x9f\ufffd\ud800-\udfff\ue000-\uf8ff]")
MAX_NON_PRINTABLE = 0.10  # share of characters; real text has a few per thousand at most
SAMPLE_WINDOWS, SAMPLE_CHARS = 16, 1 << 16  # the share is measured on evenly spread windows of a long text
SHOWN_BAD_ROWS = 10  # bad rows listed in the error; the rest are counted


@dataclass(frozen=True)
class BadRow:
    where: str  # file:line
    problem: str

    def line(self, field: str) -> str:
        return f"{field}: {self.where}: {self.problem}"


def non_printable_share(text: str) -> float:
    """Share of non-printable characters, measured on up to SAMPLE_WINDOWS windows spread over the text."""
    if len(text) <= SAMPLE_WINDOWS * SAMPLE_CHARS:
        windows = [text]
    else:
        step = (len(text) - SAMPLE_CHARS) // (SAMPLE_WINDOWS - 1)
        windows = [text[i * step: i * step + SAMPLE_CHARS] for i in range(SAMPLE_WINDOWS)]
    bad = sum(sum(1 for _ in NON_PRINTABLE.finditer(w)) for w in windows)
    return bad / max(1, sum(map(len, windows)))


def text_problem(text: str) -> str | None:
    """Why `text` cannot be a training document, or None."""
    if not text.strip():
        return "empty text" if not text else "text is only whitespace"
    share = non_printable_share(text)
    if share > MAX_NON_PRINTABLE:
        first = NON_PRINTABLE.search(text).start()
        offset = len(text[:first].encode("utf-8", "surrogatepass"))  # the characters before it decoded cleanly
        return (f"mostly non-printable ({share:.0%} control or replacement characters, the first at byte offset "
                f"{offset}; at most {MAX_NON_PRINTABLE:.0%} allowed)")
    return None


def document_of(value: Any, text_field: str, messages_field: str) -> tuple[str, Any] | str:
    """("text", str) or ("chat", messages) for a row, or what is wrong with it."""
    if isinstance(value, str):
        return ("text", value) if (p := text_problem(value)) is None else p
    chat = value.get(messages_field)
    if chat is not None:
        problem = messages_problem(chat, messages_field)
        return ("chat", chat) if problem is None else problem
    if text_field not in value:
        fields = ", ".join(map(str, value)) or "none"
        return f"no field {text_field!r} (data.text_field) or {messages_field!r} (data.messages_field); fields: {fields}"
    text = value[text_field]
    if not isinstance(text, str):
        return f"field {text_field!r} is {_what(text)} (got {_short(text)}); expected text"
    problem = text_problem(text)
    return ("text", text) if problem is None else f"field {text_field!r}: {problem}"


def messages_problem(chat: Any, field: str) -> str | None:
    """What is wrong with a chat, or None: a non-empty list of {role: text, content: text}."""
    if not isinstance(chat, list) or not chat:
        return f"field {field!r} is {_what(chat)} (got {_short(chat)}); expected a list of {{role, content}} messages"
    for i, message in enumerate(chat):
        if not isinstance(message, dict):
            return f"{field}[{i}] is {_what(message)} (got {_short(message)}); expected {{role, content}}"
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                got = "missing" if key not in message else f"{_what(message[key])} (got {_short(message[key])})"
                return f"{field}[{i}].{key} is {got}; expected text"
    return None


def bad_rows_error(bad: list[BadRow], total: int, allowed: int, field: str) -> Problems:
    """The error for more bad rows than data.max_bad_rows: the first ones named, the count, the way out."""
    lines = [b.line(field) for b in bad[:SHOWN_BAD_ROWS]]
    more = f" ({total - SHOWN_BAD_ROWS} more not shown)" if total > SHOWN_BAD_ROWS else ""
    lines.append(f"data.max_bad_rows: {total} bad row{'s' if total != 1 else ''}{more}, more than the {allowed} "
                 f"allowed (fix them, or raise data.max_bad_rows to skip them)")
    return Problems(lines)


def _what(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "text", bool: "true/false", int: "a number", float: "a number",
            type(None): "null"}.get(type(value), type(value).__name__)


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
