"""A deterministic stand-in for a model, for the scripted OpenAI-compatible server.

:class:`MemoryResponder` answers every call the package makes (routed on the ``X-Membuilder-Call``
tag, or on the system prompt when a request has no tag) with a sensible reply derived only from
the request, by parsing the tagged blocks of the package's own prompts:

- ``agent:core``: APPEND of the session's first line (SKIP when the block already has it);
- ``agent:episodic``: one ADD per turn, ``"<session date>: <speaker>: <text> | Details: ..."``;
- ``agent:semantic``: one ADD per speaker not yet in the listed memories, SKIP for the others;
- ``agent:procedural``: an ADD for each turn that spells out numbered steps, else no operation;
- ``compress:core``: the block cut to its target length at a sentence boundary;
- ``answer``: the retrieved memory that shares most words with the question, or "Not answerable";
- ``judge``: CORRECT iff every normalised gold token occurs in the answer;
- ``qa-gen``: :meth:`MemoryResponder.qa_gen` (pluggable: pass ``qa_gen=`` or subclass).

Content-level faults (the server injects HTTP-level ones) are queued with :meth:`inject`.
The responder is thread-safe: the server calls it from several threads.
"""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from membuilder.agents.compress import COMPRESS_SYSTEM, truncate_at_sentence
from membuilder.agents.prompts import SYSTEM_PROMPTS
from membuilder.answer import ANSWER_SYSTEM
from membuilder.judge import JUDGE_GENEROUS_SYSTEM, JUDGE_SYSTEM
from membuilder.metrics import normalize_answer

__all__ = ["CONTENT_FAULTS", "MemoryResponder", "ParsedTurn", "sample_conversation", "words"]

CONTENT_FAULTS = ("truncated_json", "wrong_schema", "prose", "empty", "unreadable_label")

_TURN = re.compile(r"^\[(?P<id>[^\]]*)\] (?P<speaker>[^:]+): (?P<text>.*)$")
_STOPWORDS = frozenset(
    [
        "a",
        "an",
        "the",
        "is",
        "are",
        "was",
        "were",
        "be",
        "been",
        "do",
        "does",
        "did",
        "what",
        "when",
        "where",
        "who",
        "whom",
        "which",
        "why",
        "how",
        "of",
        "in",
        "on",
        "at",
        "to",
        "for",
        "from",
        "with",
        "and",
        "or",
        "but",
        "not",
        "did",
        "has",
        "have",
        "had",
        "i",
        "you",
        "he",
        "she",
        "it",
        "we",
        "they",
        "my",
        "your",
        "his",
        "her",
        "their",
        "our",
        "me",
        "him",
        "them",
        "this",
        "that",
        "these",
        "those",
        "there",
        "as",
        "by",
        "about",
        "into",
        "than",
        "then",
        "so",
        "if",
    ]
)


def words(text: str) -> list[str]:
    """Normalised words with possessives and plural ``s`` removed, so that "Melanie's dogs" and
    "Melanie has a dog" share "melanie" and "dog"."""
    out = []
    for w in normalize_answer(re.sub(r"['\u2019]s\b", "", str(text))).split():
        out.append(w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w)
    return out


def sample_conversation() -> list[tuple[str, list[dict[str, str]]]]:
    """A small three-session conversation ``[(timestamp, messages), ...]`` for tests: relative
    dates, an image caption, a numbered procedure, and facts for a few questions (Melanie's dog is
    Max; Caroline's cold brew steeps 16 hours; Caroline went to a support group on 2023-05-07)."""
    return [
        (
            "1:56 pm on 8 May, 2023",
            [
                {
                    "role": "user",
                    "speaker": "Caroline",
                    "turn_id": "D1:1",
                    "content": "I went to a LGBTQ support group yesterday and it was so powerful.",
                },
                {
                    "role": "assistant",
                    "speaker": "Melanie",
                    "turn_id": "D1:2",
                    "content": "That is wonderful! I painted a lake sunrise with my kids last weekend.",
                    "image_caption": "a painting of a sunrise over a lake",
                },
                {
                    "role": "user",
                    "speaker": "Caroline",
                    "turn_id": "D1:3",
                    "content": "I am researching adoption agencies because I want to be a mom.",
                },
            ],
        ),
        (
            "1:14 pm on 25 May, 2023",
            [
                {
                    "role": "user",
                    "speaker": "Caroline",
                    "turn_id": "D2:1",
                    "content": "My cold brew routine: 1. Grind the beans coarse. 2. Steep them 16 hours. "
                    "3. Strain through a cloth.",
                },
                {
                    "role": "assistant",
                    "speaker": "Melanie",
                    "turn_id": "D2:2",
                    "content": "We adopted a beagle puppy last week and named the dog Max.",
                },
            ],
        ),
        (
            "10:37 am on 27 June, 2023",
            [
                {
                    "role": "user",
                    "speaker": "Caroline",
                    "turn_id": "D3:1",
                    "content": "I ran a charity race for mental health last Saturday.",
                },
                {
                    "role": "assistant",
                    "speaker": "Melanie",
                    "turn_id": "D3:2",
                    "content": "Max chewed my pottery bowl, the black and white one I made in class.",
                },
            ],
        ),
    ]


@dataclass(frozen=True)
class ParsedTurn:
    turn_id: str
    speaker: str
    text: str


def _block(text: str, tag: str) -> tuple[dict[str, str], str] | None:
    """Attributes and body of the first ``<tag ...>body</tag>`` in ``text``."""
    m = re.search(rf"<{tag}(?P<attrs>[^>]*)>\n?", text)
    if not m:
        return None
    end = text.rfind(f"</{tag}>")
    if end < m.end():
        return None
    attrs = dict(re.findall(r'(\w+)="([^"]*)"', m.group("attrs")))
    return attrs, text[m.end() : end].rstrip("\n")


def _first_user(messages: list[dict[str, Any]], marker: str) -> str:
    for m in messages:
        if m.get("role") == "user" and marker in str(m.get("content", "")):
            return str(m["content"])
    return ""


def _numbered(body: str) -> list[str]:
    out = []
    for line in body.splitlines():
        m = re.match(r"^\d+\. (.*)$", line)
        if m:
            out.append(m.group(1))
    return out


class MemoryResponder:
    """Deterministic replies for every tag; see the module docstring.

    ``qa_gen``: a callable ``(request) -> str`` used for the ``qa-gen`` tag instead of the default.
    ``requests`` counts the calls per tag.
    """

    def __init__(self, *, qa_gen: Callable[[Any], str] | None = None) -> None:
        self._lock = threading.Lock()
        self._faults: list[list[Any]] = []  # [fault, tag or None, remaining]
        self._qa_gen = qa_gen
        self.requests: Counter[str] = Counter()
        self.faults_served: list[tuple[str, str]] = []

    # -- faults ----------------------------------------------------------------------------------

    def inject(self, fault: str, *, tag: str | None = None, times: int = 1) -> None:
        """Serve ``fault`` instead of the normal reply to the next ``times`` requests with ``tag``
        (any tag when ``None``). Faults: ``truncated_json`` (the JSON cut in the middle),
        ``wrong_schema`` (valid JSON of the wrong shape), ``prose`` (no JSON at all), ``empty``,
        ``unreadable_label`` (a judge reply naming both labels)."""
        if fault not in CONTENT_FAULTS:
            raise ValueError(f"unknown content fault {fault!r}; expected one of {CONTENT_FAULTS}")
        if times < 1:
            raise ValueError("times must be >= 1")
        with self._lock:
            self._faults.append([fault, tag, times])

    def pending_faults(self) -> int:
        with self._lock:
            return sum(f[2] for f in self._faults)

    def _take_fault(self, tag: str) -> str | None:
        with self._lock:
            for f in self._faults:
                if f[1] is None or f[1] == tag:
                    f[2] -= 1
                    if f[2] == 0:
                        self._faults.remove(f)
                    self.faults_served.append((f[0], tag))
                    return str(f[0])
        return None

    def _faulty(self, fault: str, tag: str, request: Any) -> str:
        if fault == "empty":
            return ""
        if fault == "prose":
            return "I have looked at the conversation and I think it is very interesting."
        if fault == "unreadable_label":
            return "It could be CORRECT or it could be WRONG."
        if fault == "wrong_schema":
            return json.dumps({"result": "done", "items": [1, 2, 3]})
        # truncated_json: the normal reply cut halfway (at least a character short).
        full = self._normal(tag, request)
        return full[: max(1, len(full) // 2)] if len(full) > 1 else "{"

    # -- routing ---------------------------------------------------------------------------------

    @staticmethod
    def infer_tag(request: Any) -> str:
        """The request's tag, or the tag implied by its system prompt when it has none."""
        tag = getattr(request, "tag", None)
        if tag:
            return str(tag)
        messages = list(getattr(request, "messages", None) or [])
        system = next((str(m.get("content", "")) for m in messages if m.get("role") == "system"), "")
        for agent, prompt in SYSTEM_PROMPTS.items():
            if system == prompt:
                return f"agent:{agent}"
        known = {
            COMPRESS_SYSTEM: "compress:core",
            ANSWER_SYSTEM: "answer",
            JUDGE_SYSTEM: "judge",
            JUDGE_GENEROUS_SYSTEM: "judge",
        }
        return known.get(system, "unknown")

    def __call__(self, request: Any) -> str:
        tag = self.infer_tag(request)
        with self._lock:
            self.requests[tag] += 1
        fault = self._take_fault(tag)
        if fault is not None:
            return self._faulty(fault, tag, request)
        return self._normal(tag, request)

    def _normal(self, tag: str, request: Any) -> str:
        messages = list(getattr(request, "messages", None) or [])
        if tag.startswith("agent:"):
            agent = tag.split(":", 1)[1]
            handler = getattr(self, f"_agent_{agent}", None)
            if handler is None:
                raise ValueError(f"MemoryResponder: unknown agent tag {tag!r}")
            return handler(messages)
        if tag == "compress:core":
            return self.compress(messages)
        if tag == "answer":
            return self.answer(messages)
        if tag == "judge":
            return self.judge(messages)
        if tag == "qa-gen":
            return self._qa_gen(request) if self._qa_gen is not None else self.qa_gen(request)
        raise ValueError(f"MemoryResponder has no reply for tag {tag!r}")

    # -- parsing the package's prompts ----------------------------------------------------------

    @staticmethod
    def session(messages: list[dict[str, Any]]) -> tuple[dict[str, str], list[ParsedTurn]]:
        """The ``<session>`` attributes and turns of an agent prompt."""
        user = _first_user(messages, "<session")
        found = _block(user, "session")
        if found is None:
            return {}, []
        attrs, body = found
        turns = []
        for line in body.splitlines():
            m = _TURN.match(line)
            if m:
                turns.append(ParsedTurn(m.group("id"), m.group("speaker").strip(), m.group("text")))
        return attrs, turns

    @staticmethod
    def existing(messages: list[dict[str, Any]]) -> list[str]:
        found = _block(_first_user(messages, "<existing_memories"), "existing_memories")
        return _numbered(found[1]) if found else []

    @staticmethod
    def _date(attrs: dict[str, str]) -> str:
        day = attrs.get("day", "unknown")
        return day.split(",")[0] if day != "unknown" else attrs.get("date", "unknown")

    # -- agents ----------------------------------------------------------------------------------

    def _agent_core(self, messages: list[dict[str, Any]]) -> str:
        attrs, turns = self.session(messages)
        found = _block(_first_user(messages, "<core_memory"), "core_memory")
        core = found[1] if found else ""
        if not turns:
            return json.dumps({"operation": "SKIP"})
        fact = f"{turns[0].speaker} said on {self._date(attrs)}: {turns[0].text}"
        if fact in core:
            return json.dumps({"operation": "SKIP"})
        return json.dumps({"operation": "APPEND", "content": fact})

    def _agent_episodic(self, messages: list[dict[str, Any]]) -> str:
        attrs, turns = self.session(messages)
        date = self._date(attrs)
        existing = set(self.existing(messages))
        ops = []
        for t in turns:
            memory = f"{date}: {t.speaker}: {t.text} | Details: Mentioned in the conversation on {date} ({t.turn_id})."
            if memory not in existing:
                ops.append({"action": "ADD", "memory": memory})
        return json.dumps({"operations": ops})

    def _agent_semantic(self, messages: list[dict[str, Any]]) -> str:
        _, turns = self.session(messages)
        existing = self.existing(messages)
        ops: list[dict[str, str]] = []
        seen: set[str] = set()
        for t in turns:
            if t.speaker in seen:
                continue
            seen.add(t.speaker)
            prefix = f"{t.speaker} - Person:"
            if any(m.startswith(prefix) for m in existing):
                ops.append({"action": "SKIP", "reason": f"{t.speaker} is already recorded"})
            else:
                ops.append(
                    {
                        "action": "ADD",
                        "memory": f"{prefix} takes part in the conversation | Details: first said: {t.text}",
                    }
                )
        return json.dumps({"operations": ops})

    def _agent_procedural(self, messages: list[dict[str, Any]]) -> str:
        _, turns = self.session(messages)
        ops = [
            {"action": "ADD", "memory": f"{t.speaker}'s procedure | Steps: {t.text}"}
            for t in turns
            if re.search(r"\b1\.\s", t.text) and re.search(r"\b2\.\s", t.text)
        ]
        return json.dumps({"operations": ops})

    # -- other calls -----------------------------------------------------------------------------

    def compress(self, messages: list[dict[str, Any]]) -> str:
        found = _block(_first_user(messages, "<core_memory"), "core_memory")
        if found is None:
            return json.dumps({"content": ""})
        attrs, body = found
        target = int(attrs.get("target") or attrs.get("limit") or len(body))
        return json.dumps({"content": truncate_at_sentence(body, target)})

    def answer(self, messages: list[dict[str, Any]]) -> str:
        user = _first_user(messages, "<question>")
        q = _block(user, "question")
        mem = _block(user, "memories")
        if q is None:
            return "Not answerable"
        wanted = {w for w in words(q[1]) if w not in _STOPWORDS}
        best, best_score = None, 0
        for line in _numbered(mem[1]) if mem else []:
            score = len(wanted & set(words(line)))
            if score > best_score:  # ties keep the earlier, better-ranked memory
                best, best_score = line, score
        return best if best is not None else "Not answerable"

    def judge(self, messages: list[dict[str, Any]]) -> str:
        user = _first_user(messages, "<gold_answer>")
        gold = _block(user, "gold_answer")
        gen = _block(user, "generated_answer")
        if gold is None or gen is None:
            return json.dumps({"label": "WRONG"})
        gold_tokens, answer_tokens = set(words(gold[1])), set(words(gen[1]))
        correct = bool(gold_tokens) and gold_tokens <= answer_tokens
        return json.dumps({"label": "CORRECT" if correct else "WRONG"})

    def qa_gen(self, request: Any, n: int = 5) -> str:
        """Default synthetic QA: for up to ``n`` turns found in the prompt (lines
        ``[id] Speaker: text``), ask what the speaker said, with the turn's text as the answer.
        Only the ``<session>`` block is read when there is one. Shape: ``{"questions":
        [{"question", "answer", "type", "evidence"}]}`` (type always ``single-session``). Override
        for another shape (``qa_gen=`` or a subclass)."""
        messages = list(getattr(request, "messages", None) or [])
        text = "\n".join(str(m.get("content", "")) for m in messages if m.get("role") == "user")
        session = _block(text, "session")
        if session is not None:  # only the session's turns, never lines quoted from memories
            text = session[1]
        questions = []
        for line in text.splitlines():
            m = _TURN.match(line.strip())
            if not m:
                continue
            content = [w for w in words(m.group("text")) if w not in _STOPWORDS]
            topic = " ".join(content[:3]) or "that"
            questions.append(
                {
                    "question": f"What did {m.group('speaker').strip()} say about {topic}?",
                    "answer": m.group("text"),
                    "type": "single-session",
                    "evidence": [m.group("id")],
                }
            )
            if len(questions) >= n:
                break
        return json.dumps({"questions": questions})
