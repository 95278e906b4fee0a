"""Chat rows: the tokenizer's chat template, and which characters the loss learns (data.loss_on).

Assistant-only loss works for any template, with or without `{% generation %}` markers, by rendering prefixes
(TRL and LLaMA-Factory also cut conversations turn by turn): for assistant message i, the text of messages[:i] with
the generation prompt ends where the assistant's answer starts, and the text of messages[:i+1] ends where its
turn ends (end-of-turn token included, so the model learns to stop). Both must be prefixes of the whole
conversation's text; a template that rewrites earlier turns (some drop past reasoning) is reported for that row.
The conversation is then tokenized once, and a token is learned when it starts inside such a span.
"""

from __future__ import annotations

import numpy as np

from longext.errors import LongextError


class ChatProblem(Exception):
    """A conversation the template cannot render or cannot cut into turns (a bad row)."""


def require_chat_template(tokenizer, field: str, model_path: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise LongextError(f"{field}: has chat rows (data.messages_field), but the tokenizer of model.path "
                           f"{model_path} has no chat template (tokenizer_config.json chat_template or "
                           f"chat_template.jinja); use a chat model's tokenizer or plain text rows")


def render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as err:  # jinja raises TemplateError (e.g. "roles must alternate"), KeyError, ...
        raise ChatProblem(f"the chat template refuses it: {str(err).splitlines()[0] if str(err) else type(err).__name__}")


def chat_text(tokenizer, messages: list[dict], loss_on: str) -> tuple[str, list[tuple[int, int]]]:
    """(the conversation's text, character spans the loss learns)."""
    full = render(tokenizer, messages)
    if loss_on == "all":
        return full, [(0, len(full))]
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_prompt_before(tokenizer, messages, i, full))
        turn = render(tokenizer, messages[: i + 1])
        if not full.startswith(turn) or len(turn) < start:
            raise ChatProblem(f"the chat template renders messages[{i}] differently once later turns follow, so its "
                              f"tokens cannot be found (use data.loss_on: all)")
        if len(turn) > start:
            spans.append((start, len(turn)))
    if not spans:
        raise ChatProblem("no assistant message to learn (data.loss_on: assistant)")
    return full, spans


def _prompt_before(tokenizer, messages: list[dict], i: int, full: str) -> str:
    """The text up to where assistant message i starts: messages[:i] with the generation prompt."""
    try:
        prompt = render(tokenizer, messages[:i], generation_prompt=True)
    except ChatProblem:
        if i:
            raise
        prompt = ""  # templates that index messages[0] fail on an empty conversation
    if not full.startswith(prompt):
        raise ChatProblem(f"the chat template's prompt before messages[{i}] is not how the conversation starts, so "
                          f"its tokens cannot be found (use data.loss_on: all)")
    return prompt


def loss_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> np.ndarray:
    """uint8 [tokens]: 1 for tokens whose first character lies in a span (spans sorted and disjoint)."""
    starts = np.fromiter((s for s, _ in offsets), dtype=np.int64, count=len(offsets))
    bounds = np.asarray(spans, dtype=np.int64).reshape(-1)
    return (np.searchsorted(bounds, starts, side="right") % 2).astype(np.uint8)  # odd: after a start, before its end
