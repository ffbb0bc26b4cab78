"""Prompts of the four memory agents and the pure function that renders them.

Every prompt is two messages: a ``system`` message that says what the agent keeps and the exact JSON
it must return, and a ``user`` message that carries the data in tagged blocks::

    <session date="2023-05-08 13:56" day="2023-05-08, Monday">
    [D1:3] Caroline: I went to a support group yesterday.
    </session>
    <existing_memories kind="episodic" count="2">
    1. ...
    </existing_memories>

The tags keep the data apart from the instructions for the model, and give deterministic tools (the
scripted test responder, trajectory inspection) a structure to parse. :func:`render_agent_messages`
is pure: the same inputs always give the same messages, byte for byte, which trajectory recording
and the RL export rely on (a prompt is part of a cache key and of a training sample). A user's
template file (:mod:`membuilder.prompt_templates`) in force replaces an agent's prompt; it is an
input too, recorded by hash in every output.
"""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Mapping, Sequence
from typing import Any

from membuilder._core import AGENTS

DEFAULT_CORE_LIMIT = 5000

# ---------------------------------------------------------------------------------------------
# Timestamps
# ---------------------------------------------------------------------------------------------

_MONTHS = {
    m: i + 1
    for i, names in enumerate(
        [
            ("january", "jan"),
            ("february", "feb"),
            ("march", "mar"),
            ("april", "apr"),
            ("may",),
            ("june", "jun"),
            ("july", "jul"),
            ("august", "aug"),
            ("september", "sep", "sept"),
            ("october", "oct"),
            ("november", "nov"),
            ("december", "dec"),
        ]
    )
    for m in names
}
_ISO_DATE = re.compile(r"(\d{4})[-/.](\d{1,2})[-/.](\d{1,2})")
_DAY_MONTH_YEAR = re.compile(r"\b(\d{1,2})(?:st|nd|rd|th)?\s+([A-Za-z]+)\.?,?\s+(\d{4})\b")
_MONTH_DAY_YEAR = re.compile(r"\b([A-Za-z]+)\.?\s+(\d{1,2})(?:st|nd|rd|th)?,?\s+(\d{4})\b")


def session_date(timestamp: str | None) -> _dt.date | None:
    """The calendar date in a dataset timestamp, or ``None`` when none can be read.

    Understands ISO-like dates (``2023-05-08 13:56``, LongMemEval's ``2023/05/20 (Sat) 02:21``) and
    LoCoMo's ``1:56 pm on 8 May, 2023`` / ``May 8, 2023``. Never raises.
    """
    if not timestamp:
        return None
    candidates: list[tuple[int, int, int]] = []
    m = _ISO_DATE.search(timestamp)
    if m:
        candidates.append((int(m.group(1)), int(m.group(2)), int(m.group(3))))
    m = _DAY_MONTH_YEAR.search(timestamp)
    if m and m.group(2).lower() in _MONTHS:
        candidates.append((int(m.group(3)), _MONTHS[m.group(2).lower()], int(m.group(1))))
    m = _MONTH_DAY_YEAR.search(timestamp)
    if m and m.group(1).lower() in _MONTHS:
        candidates.append((int(m.group(3)), _MONTHS[m.group(1).lower()], int(m.group(2))))
    for y, mo, d in candidates:
        try:
            return _dt.date(y, mo, d)
        except ValueError:
            continue
    return None


def describe_date(timestamp: str | None) -> str:
    """``"2023-05-08, Monday"`` for a readable timestamp, ``"unknown"`` otherwise."""
    d = session_date(timestamp)
    return f"{d.isoformat()}, {d.strftime('%A')}" if d else "unknown"


# ---------------------------------------------------------------------------------------------
# Rendering the data blocks
# ---------------------------------------------------------------------------------------------


def _one_line(text: str) -> str:
    # A memory or a turn is rendered on one line so that numbered lists and turn lists stay
    # unambiguous; the model loses nothing by seeing a newline as a space.
    return " ".join(str(text).split())


def _attr(value: str) -> str:
    return _one_line(value).replace('"', "'")


def message_speaker(message: Mapping[str, Any]) -> str:
    """The name shown for a message: its ``speaker`` if given, else ``User`` / ``Assistant``."""
    speaker = message.get("speaker")
    if speaker:
        return _one_line(str(speaker))
    role = str(message.get("role") or "user")
    return role.capitalize()


def format_turn(message: Mapping[str, Any], index: int) -> str:
    """One turn as ``[turn_id] Speaker: text [shares an image: caption]``."""
    turn_id = message.get("turn_id") or f"t{index + 1}"
    line = f"[{_one_line(str(turn_id))}] {message_speaker(message)}: {_one_line(message.get('content', ''))}"
    caption = message.get("image_caption")
    if caption:
        line += f" [shares an image: {_one_line(str(caption))}]"
    return line


def render_session(session_messages: Sequence[Mapping[str, Any]], timestamp: str | None) -> str:
    """The ``<session>`` block: the date as given, the parsed day, one line per turn."""
    lines = [
        f'<session date="{_attr(timestamp or "unknown")}" day="{describe_date(timestamp)}">',
        *(format_turn(m, i) for i, m in enumerate(session_messages)),
        "</session>",
    ]
    return "\n".join(lines)


def session_query_text(session_messages: Sequence[Mapping[str, Any]]) -> str:
    """The text used as the retrieval query for a session (speaker: content, one per line)."""
    return "\n".join(f"{message_speaker(m)}: {_one_line(m.get('content', ''))}" for m in session_messages)


def render_memories(kind: str, memories: Sequence[str]) -> str:
    """The ``<existing_memories>`` block, numbered from 1, or a note that there are none."""
    if not memories:
        return f'<existing_memories kind="{kind}" count="0">\n(none yet)\n</existing_memories>'
    body = "\n".join(f"{i}. {_one_line(m)}" for i, m in enumerate(memories, 1))
    return f'<existing_memories kind="{kind}" count="{len(memories)}">\n{body}\n</existing_memories>'


def render_core(core: str, limit: int) -> str:
    """The ``<core_memory>`` block with its size and limit in characters."""
    body = core if core.strip() else "(empty)"
    return f'<core_memory chars="{len(core)}" limit="{limit}">\n{body}\n</core_memory>'


# ---------------------------------------------------------------------------------------------
# System prompts (written for this project; they describe the paper's four agents)
# ---------------------------------------------------------------------------------------------

_JSON_ONLY = (
    "Reply with one JSON object and nothing else: no prose before or after it, no code fences, "
    "no comments. Every string must be valid JSON (escape inner double quotes)."
)

CORE_SYSTEM = f"""You maintain the CORE MEMORY of a long-running conversation: a single block of text that \
is shown to the assistant in every future conversation, so it must hold what matters most about the \
person (or people) it talks with.

Keep in the block, as short factual statements:
- identity: name, age, gender identity, where they live, occupation or studies, background;
- preferences and values: likes, dislikes, beliefs, what they care about;
- relationships: family, partners, friends, colleagues, pets, with names and one detail each;
- goals and long-term projects, plans, aspirations;
- habits, personality traits, and major life events.
Leave out small talk, passing moods and one-off details that will not matter later (those belong to other \
memories). Write about the people by name; never invent facts that the conversation does not support.

The block has a character limit (shown as `limit` on <core_memory>). Choose exactly ONE operation:
- APPEND: add new facts at the end of the block. Use it while the block is well below its limit.
- REPLACE: change one passage that is now outdated or wrong; `old_text` must be copied exactly from the block.
- REWRITE: return the whole block reorganised and deduplicated, with the new facts merged in. Use it when \
the block is near its limit (about 90%) or has become disorganised; the result must stay under the limit.
- SKIP: nothing in this session belongs in the core memory.

Shapes (pick one):
{{"operation": "APPEND", "content": "<new facts>"}}
{{"operation": "REPLACE", "old_text": "<exact passage from the block>", "new_text": "<its replacement>"}}
{{"operation": "REWRITE", "content": "<the complete new block>"}}
{{"operation": "SKIP"}}

{_JSON_ONLY}"""

EPISODIC_SYSTEM = f"""You maintain the EPISODIC MEMORY of a long-running conversation: a diary of events — \
things that happened to, were done by, or are planned by the people in the conversation — each tied to a \
point in time.

Rules for each memory:
1. One event per memory, at one point in time. A turn that mentions three events gives three memories.
2. Every memory starts with an ABSOLUTE date, then ": ", a short summary naming who did what, then \
" | Details: " and the details. Format: "YYYY-MM-DD: <summary> | Details: <details>". Use "YYYY-MM" or \
"YYYY" when only that much is known; use "YYYY-MM-DD to YYYY-MM-DD: ..." for a span. Never put a relative \
expression ("yesterday", "last week") in the date.
3. Convert relative time against the session date (the `day` attribute of <session>): "yesterday" on \
2023-05-08 is 2023-05-07; "last week" is the week before; "last year" is the year before. When nothing \
says when it happened, use the session date.
4. Keep the original time expression in the details, e.g. "Details: Said on 2023-05-08 that this \
happened 'yesterday'; ...", or "Details: Mentioned on 2023-05-08; ..." when no time was given.
5. Put every concrete detail in the details: names, places, objects, colours, numbers, feelings, reasons, \
and what is planned next. Say whose event it is.

Operations (the existing memories most related to this session are listed for reference):
- ADD: a new event.
- UPDATE: a new event that continues an existing one; `old_memory` is copied exactly from the list and \
`new_memory` is a complete memory in the format above (the old memory is kept for history).
- MERGE: several existing events that form one story; `old_memories` are copied exactly from the list and \
`new_memory` summarises them as a timeline with a date range, drawing only conclusions the events support.

Shape:
{{"operations": [
  {{"action": "ADD", "memory": "YYYY-MM-DD: ... | Details: ..."}},
  {{"action": "UPDATE", "old_memory": "<exact existing memory>", "new_memory": "YYYY-MM-DD: ... | Details: ..."}},
  {{"action": "MERGE", "old_memories": ["<exact>", "<exact>"], "new_memory": "YYYY-MM-DD to YYYY-MM-DD: ... | Details: ..."}}
]}}
Record every event of the session; an empty list means the session held no event.

{_JSON_ONLY}"""

SEMANTIC_SYSTEM = f"""You maintain the SEMANTIC MEMORY of a long-running conversation: knowledge about the \
particular people, places, objects, organisations and ideas in these people's lives.

What to keep:
- facts specific to these people: who someone is to them, their job, family, pets, hobbies, possessions, \
places that matter to them, the books, shows or projects they talk about and what they think of them;
- one topic per memory. Split a person into several focused memories ("Melanie - Family: ...", "Melanie - \
Hobbies: ..."), never one large profile;
- who said or believes what: never mix up statements from different speakers.
What to leave out: general knowledge anyone already knows (famous people, cities, common software, \
dictionary definitions), and events with a date (those are episodic).

Each memory: "<Name or title> - <aspect>: <one-line summary> | Details: <all specific details>".

Operations (the existing memories most related to this session are listed for reference):
- ADD: a new topic.
- UPDATE: new information about a topic already listed; `old_memory` is copied exactly from the list and \
`new_memory` is the complete, updated memory.
- SKIP: something you considered but that is general knowledge or already fully recorded; give a `reason`.

Shape:
{{"operations": [
  {{"action": "ADD", "memory": "<Name> - <aspect>: ... | Details: ..."}},
  {{"action": "UPDATE", "old_memory": "<exact existing memory>", "new_memory": "..."}},
  {{"action": "SKIP", "reason": "..."}}
]}}

{_JSON_ONLY}"""

PROCEDURAL_SYSTEM = f"""You maintain the PROCEDURAL MEMORY of a long-running conversation: how-to knowledge — \
processes, routines, recipes, workflows and fixes that someone in the conversation follows or explains.

Each memory: "<what the procedure achieves, and whose it is> | Steps: 1. ... 2. ... 3. ... | Context: <when \
or why it is used>". Number every step, in order, and keep the specifics (quantities, times, \
temperatures, tools, names). The Context part may be left out.

Operations (the existing memories most related to this session are listed for reference):
- ADD: a new procedure.
- UPDATE: a better or changed version of a listed procedure; `old_memory` is copied exactly from the list \
and `new_memory` is the complete new version.

Shape:
{{"operations": [
  {{"action": "ADD", "memory": "... | Steps: 1. ... 2. ... | Context: ..."}},
  {{"action": "UPDATE", "old_memory": "<exact existing memory>", "new_memory": "..."}}
]}}
Most sessions describe no procedure: then return {{"operations": []}}.

{_JSON_ONLY}"""

SYSTEM_PROMPTS: dict[str, str] = {
    "core": CORE_SYSTEM,
    "episodic": EPISODIC_SYSTEM,
    "semantic": SEMANTIC_SYSTEM,
    "procedural": PROCEDURAL_SYSTEM,
}

_TASK = {
    "core": "Decide the one core-memory operation for this session.",
    "episodic": "List the episodic-memory operations for this session.",
    "semantic": "List the semantic-memory operations for this session.",
    "procedural": "List the procedural-memory operations for this session.",
}


def render_agent_messages(
    agent: str,
    *,
    core: str,
    retrieved: Sequence[str],
    session_messages: Sequence[Mapping[str, Any]],
    timestamp: str | None,
    core_limit: int = DEFAULT_CORE_LIMIT,
) -> list[dict[str, str]]:
    """The chat messages for one agent's call on one session.

    ``core`` is the current core block (shown to the core agent only); ``retrieved`` the existing
    memories of the agent's own kind, most relevant first (ignored for the core agent);
    ``session_messages`` dicts with ``content`` and optionally ``role``, ``speaker``, ``turn_id``,
    ``image_caption``; ``timestamp`` the session's date as the dataset gives it; ``core_limit`` the
    core block's limit in characters. Deterministic (given the prompt templates in force, see
    :mod:`membuilder.prompt_templates`). Raises ``ValueError`` for an unknown
    agent.
    """
    if agent not in SYSTEM_PROMPTS:
        raise ValueError(f"unknown agent {agent!r}; expected one of {', '.join(AGENTS)}")
    custom = _from_template(agent, core, retrieved, session_messages, timestamp, core_limit)
    if custom is not None:
        return custom
    blocks = [render_session(session_messages, timestamp)]
    if agent == "core":
        blocks.append(render_core(core, core_limit))
    else:
        blocks.append(render_memories(agent, list(retrieved)))
    blocks.append(_TASK[agent])
    return [
        {"role": "system", "content": SYSTEM_PROMPTS[agent]},
        {"role": "user", "content": "\n\n".join(blocks)},
    ]


def _from_template(
    agent: str,
    core: str,
    retrieved: Sequence[str],
    session_messages: Sequence[Mapping[str, Any]],
    timestamp: str | None,
    core_limit: int,
) -> list[dict[str, str]] | None:
    """The agent's prompt from a user template (:mod:`membuilder.prompt_templates`), if one is in force."""
    from membuilder.prompt_templates import active_templates, render_template

    templates = active_templates()
    if templates is None or not templates.has(agent):
        return None
    memories = list(retrieved)
    return render_template(
        agent,
        {
            "session": "\n".join(format_turn(m, i) for i, m in enumerate(session_messages)),
            "session_date": timestamp or "unknown",
            "session_day": describe_date(timestamp),
            "core_memory": core,
            "core_chars": len(core),
            "core_limit": core_limit,
            "existing_memories": "\n".join(f"{i}. {_one_line(m)}" for i, m in enumerate(memories, 1)),
            "memory_count": len(memories),
        },
    )


def render_rejection_feedback(reasons: Sequence[str]) -> str:
    """The follow-up user message sent after an output failed the format gate."""
    listed = "\n".join(f"- {r}" for r in reasons) or "- the output could not be used"
    return (
        "Your reply could not be used:\n"
        f"{listed}\n"
        "Send the corrected reply now: one JSON object in the shape described above, and nothing else."
    )
