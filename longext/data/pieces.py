"""Long texts tokenized in pieces: the fast tokenizer holds about 120 bytes per character of the text it encodes
(offsets, normalized strings, pre-tokens), so a 40 MB `.txt` document took 5.2 GB in one call. A text longer than
PIECE_CHARS is cut into pieces of about that size and they are encoded PIECE_CHARS at a time; the ids are joined.

A cut is where the tokens of the whole text and those of its pieces provably agree: between a newline and a
visible character, after a visible one ("…end.\\nNext…"), and only once a window of text around it encodes to the
same ids whole and cut (a byte-level BPE never merges across such a newline; a tokenizer that marks the start of a
text, like SentencePiece's prefix space, fails the check). A text without such cuts, or whose tokenizer fails the
check again and again, is encoded whole, as before.
"""

from __future__ import annotations

import re

PIECE_CHARS = 1 << 20  # characters per piece (~120 MB of tokenizer memory)
CALL_CHARS = 1 << 21  # characters per tokenizer call (besides one text shorter than PIECE_CHARS)
CHECK_CHARS = 256  # text on each side of a cut that is encoded whole and cut, to prove the cut changes nothing
GIVE_UP = 8  # failed checks in a row after which a text is encoded whole
CUT = re.compile(r"\S\n(?=\S)")


def encode_texts(backend, texts: list[str]) -> list[list[int]]:
    """Token ids of each text (no special tokens), as backend.encode_batch_fast gives them, with long texts encoded
    in pieces."""
    pieces, owner = [], []
    for i, text in enumerate(texts):
        for piece in split_text(backend, text):
            pieces.append(piece)
            owner.append(i)
    out: list[list[int]] = [[] for _ in texts]
    batch: list[int] = []
    chars = 0
    for k, piece in enumerate(pieces):
        if batch and chars + len(piece) > CALL_CHARS:
            _encode(backend, pieces, owner, batch, out)
            batch, chars = [], 0
        batch.append(k)
        chars += len(piece)
    _encode(backend, pieces, owner, batch, out)
    return out


def _encode(backend, pieces: list[str], owner: list[int], batch: list[int], out: list[list[int]]) -> None:
    if not batch:
        return
    for k, encoding in zip(batch, backend.encode_batch_fast([pieces[k] for k in batch], add_special_tokens=False)):
        out[owner[k]].extend(encoding.ids)


def split_text(backend, text: str, every: int | None = None) -> list[str]:
    """`text` cut at checked places about `every` (PIECE_CHARS) characters apart; [text] when it is short or has
    no place where a cut provably changes nothing."""
    every = every or PIECE_CHARS
    if len(text) <= every:
        return [text]
    cuts, at, failed = [0], every, 0
    while at < len(text) - 1 and failed < GIVE_UP:
        found = CUT.search(text, at)
        if found is None:
            break
        cut = found.start() + 2  # after the newline
        if _same_tokens(backend, text[max(0, cut - CHECK_CHARS):cut], text[cut:cut + CHECK_CHARS]):
            cuts.append(cut)
            at, failed = cut + every, 0
        else:
            at, failed = cut, failed + 1
    return [text[a:b] for a, b in zip(cuts, [*cuts[1:], len(text)])]


def _same_tokens(backend, before: str, after: str) -> bool:
    whole, first, second = backend.encode_batch_fast([before + after, before, after], add_special_tokens=False)
    return whole.ids == first.ids + second.ids
