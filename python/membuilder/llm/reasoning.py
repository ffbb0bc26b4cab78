"""Separate a model's reasoning block (``<think>…</think>``, ``<thinking>…</thinking>``) from its answer.

Reasoning models put their chain of thought before the answer. Three shapes occur in practice:

* a closed block anywhere in the text: ``<think>…</think>{"operation": …}``;
* a block whose opening tag was part of the chat template, so the output starts mid-thought and only
  the closing tag appears: ``…reasoning…</think>{"operation": …}``;
* an unclosed leading block, when the model ran out of tokens while thinking: ``<think>…`` — there is
  no answer at all, and the stripped text is empty.

Only ``think`` and ``thinking`` tags are recognised (case-insensitive); anything else is left alone,
because agent outputs may legitimately contain angle brackets.
"""

from __future__ import annotations

import re

__all__ = ["split_reasoning", "strip_reasoning"]

_TAG = r"think(?:ing)?"
_CLOSED = re.compile(rf"<\s*({_TAG})\s*>.*?<\s*/\s*\1\s*>", re.IGNORECASE | re.DOTALL)
_OPEN_LEADING = re.compile(rf"^\s*<\s*{_TAG}\s*>", re.IGNORECASE)
_CLOSE = re.compile(rf"<\s*/\s*{_TAG}\s*>", re.IGNORECASE)


def split_reasoning(text: str) -> tuple[str, str]:
    """Return ``(reasoning, answer)``; both stripped of surrounding whitespace.

    ``reasoning`` joins the contents of every reasoning block found (blank-line separated); it is ``""``
    when there is none. ``answer`` is what remains. The function never raises on any string.

    >>> split_reasoning("<think>2+2 is 4</think> 4")
    ('2+2 is 4', '4')
    >>> split_reasoning("I should say 4.</think>4")
    ('I should say 4.', '4')
    >>> split_reasoning("<think>still thinking when the tokens ran out")
    ('still thinking when the tokens ran out', '')
    """
    if not isinstance(text, str):
        raise TypeError(f"split_reasoning expects str, got {type(text).__name__}")
    thoughts: list[str] = []

    # A dangling close tag with no opener before it: the opener was in the prompt (chat template).
    first_close = _CLOSE.search(text)
    if first_close is not None:
        head = text[: first_close.start()]
        if not re.search(rf"<\s*{_TAG}\s*>", head, re.IGNORECASE):
            thoughts.append(head.strip())
            text = text[first_close.end() :]

    def _collect(match: re.Match[str]) -> str:
        inner = match.group(0)
        inner = re.sub(rf"^<\s*{_TAG}\s*>", "", inner, flags=re.IGNORECASE)
        inner = _CLOSE.sub("", inner)
        thoughts.append(inner.strip())
        return ""

    text = _CLOSED.sub(_collect, text)

    # What is left may still open a block that never closes: everything after it is unfinished thought.
    opened = _OPEN_LEADING.match(text)
    if opened is not None:
        thoughts.append(text[opened.end() :].strip())
        text = ""

    reasoning = "\n\n".join(t for t in thoughts if t)
    return reasoning, text.strip()


def strip_reasoning(text: str) -> str:
    """The answer part of ``text`` (see :func:`split_reasoning`)."""
    return split_reasoning(text)[1]
