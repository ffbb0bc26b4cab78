"""Compression of the core block when it grows past its character limit.

One LLM call (tag ``compress:core``) asks for a shorter block that keeps the most important facts.
The result is checked against the limit; an answer that is still too long (or unusable) is retried
with the reason fed back, and after the last attempt the block is cut at a sentence boundary so
that the state is never left over its limit. What happened is recorded in
:class:`CompressionResult`; nothing here raises for anything a model or the endpoint does.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

COMPRESS_TAG = "compress:core"

COMPRESS_SYSTEM = """You condense the CORE MEMORY of a long-running conversation: the block of facts about \
the people in it that the assistant sees in every conversation. The block has grown past its limit.

Write a shorter block that keeps, in this order of importance:
1. identity: names, roles, occupation, where they live;
2. key relationships (family, partners, close friends, pets) with names;
3. lasting preferences, values and personality traits;
4. long-term goals, ongoing projects and major life events.
Merge duplicates, drop passing details, examples and repetition, and write in short factual statements. \
Never add a fact that is not in the block.

Reply with one JSON object and nothing else: {"content": "<the condensed block>"}."""


def build_compress_messages(core: str, limit: int, target: int | None = None) -> list[dict[str, str]]:
    """Messages asking to condense ``core`` to at most ``target`` characters (default 60% of
    ``limit``, leaving room for the sessions to come). Pure."""
    from membuilder.prompt_templates import render_template

    target = int(limit * 0.6) if target is None else target
    custom = render_template(
        "compress",
        {"core_memory": core, "core_chars": len(core), "core_limit": limit, "target_chars": target},
    )
    if custom is not None:
        return custom
    user = (
        f'<core_memory chars="{len(core)}" limit="{limit}" target="{target}">\n{core}\n</core_memory>\n\n'
        f"Condense this block to at most {target} characters (hard limit {limit})."
    )
    return [{"role": "system", "content": COMPRESS_SYSTEM}, {"role": "user", "content": user}]


_FENCE = re.compile(r"^```[a-zA-Z]*\s*|\s*```$")
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)


def parse_compressed(text: str) -> str | None:
    """The ``content`` string of a compression reply, or ``None`` if the reply has none."""
    s = _THINK.sub("", text or "").strip()
    s = _FENCE.sub("", s).strip()
    start, end = s.find("{"), s.rfind("}")
    if start < 0 or end <= start:
        return None
    try:
        obj = json.loads(s[start : end + 1])
    except json.JSONDecodeError:
        return None
    content = obj.get("content") if isinstance(obj, dict) else None
    if not isinstance(content, str) or not content.strip():
        return None
    return content.strip()


_SENTENCE_END = re.compile(r"[.!?](?:[\"')\]]*)(?=\s|$)|\n")


def truncate_at_sentence(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters, at the last sentence end (or line break) that
    fits; at the last space when no sentence ends in range; hard at ``limit`` as a last resort."""
    if limit <= 0:
        return ""
    if len(text) <= limit:
        return text
    head = text[:limit]
    ends = [m.end() for m in _SENTENCE_END.finditer(head)]
    # A cut that would keep less than half of the room is worse than cutting mid-sentence.
    if ends and ends[-1] >= limit // 2:
        return head[: ends[-1]].rstrip()
    space = head.rfind(" ")
    if space >= limit // 2:
        return head[:space].rstrip()
    return head


@dataclass
class CompressionResult:
    """What one compression did.

    ``text`` is the new block (always at most ``limit`` characters); ``truncated`` is true when the
    block had to be cut by :func:`truncate_at_sentence` because no model answer fitted;
    ``outputs`` the raw model replies in order; ``error`` the last endpoint error, if any.
    """

    text: str
    before_chars: int
    limit: int
    attempts: int = 0
    truncated: bool = False
    outputs: list[str] = field(default_factory=list)
    messages: list[dict[str, str]] = field(default_factory=list)
    error: str | None = None
    usage: dict[str, int] = field(default_factory=lambda: {"prompt_tokens": 0, "completion_tokens": 0})

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "before_chars": self.before_chars,
            "after_chars": len(self.text),
            "limit": self.limit,
            "attempts": self.attempts,
            "truncated": self.truncated,
            "outputs": list(self.outputs),
            "error": self.error,
            "usage": dict(self.usage),
        }


async def compress_core(
    llm: Any,
    core: str,
    *,
    limit: int,
    model: str | None = None,
    max_attempts: int = 3,
    temperature: float = 0.0,
) -> CompressionResult:
    """Condense ``core`` to at most ``limit`` characters with ``llm`` (an ``LLMClient``-like object
    with an async ``chat``). Never raises for model or endpoint failures: they end in a
    sentence-boundary truncation recorded in the result. ``max_attempts`` >= 1."""
    from membuilder.llm import LLMError

    if limit <= 0:
        raise ValueError(f"limit must be a positive number of characters, got {limit}")
    result = CompressionResult(text=core, before_chars=len(core), limit=limit)
    messages = build_compress_messages(core, limit)
    result.messages = [dict(m) for m in messages]
    for _ in range(max(1, max_attempts)):
        result.attempts += 1
        try:
            reply = await llm.chat(
                messages, model=model, temperature=temperature, json_mode=True, tag=COMPRESS_TAG
            )
        except LLMError as exc:
            result.error = str(exc)
            break
        result.usage["prompt_tokens"] += int(reply.prompt_tokens or 0)
        result.usage["completion_tokens"] += int(reply.completion_tokens or 0)
        result.outputs.append(reply.text)
        content = parse_compressed(reply.text)
        if content is not None and len(content) <= limit:
            result.text = content
            return result
        problem = (
            'the reply is not a JSON object with a non-empty "content" string'
            if content is None
            else f"the condensed block has {len(content)} characters; it must have at most {limit}"
        )
        messages = [
            *messages,
            {"role": "assistant", "content": reply.text},
            {
                "role": "user",
                "content": f"That cannot be used: {problem}. Reply again with the JSON object only.",
            },
        ]
    # Nothing usable came back: keep as much of the block as fits rather than leave it over limit.
    best = next((c for c in map(parse_compressed, reversed(result.outputs)) if c), None)
    result.text = truncate_at_sentence(best or core, limit)
    result.truncated = True
    return result
