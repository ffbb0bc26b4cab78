"""The one shape every benchmark is loaded into.

A :class:`Dataset` holds :class:`Conversation` objects (the history that memory is built from,
as ordered :class:`Session` objects of :class:`Turn` objects) and :class:`Question` objects that
point back to a conversation by id. LoCoMo has 10 conversations with ~200 questions each;
LongMemEval has one conversation (its "haystack") per question; PerLTQA has one conversation per
protagonist.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from membuilder._core import InvalidArgumentError


@dataclass(frozen=True, slots=True)
class Turn:
    """One utterance.

    ``id`` is unique within its conversation (LoCoMo: the official ``dia_id`` such as ``"D3:14"``;
    LongMemEval: ``"<session id>:<position>"``; PerLTQA: ``"<dialogue id>:<position>"``).
    ``role`` is ``"user"`` or ``"assistant"`` (for two-person chats such as LoCoMo the first
    speaker is the user). ``image_caption`` is the caption of a photo shared with the turn.
    """

    id: str
    speaker: str
    role: str
    text: str
    image_caption: str | None = None

    def content(self) -> str:
        """The text a memory agent sees: the utterance plus the shared photo's caption, if any."""
        if self.image_caption:
            return f"{self.text} [shares a photo: {self.image_caption}]"
        return self.text


@dataclass(frozen=True, slots=True)
class Session:
    """One conversation session, in build order.

    ``index`` is 0-based and is what memory provenance records (``Provenance.session``); ``id``
    is the dataset's own name for the session (LoCoMo ``"session_3"``, LongMemEval's haystack
    session id, PerLTQA's dialogue key). ``timestamp`` is the date-time string exactly as the
    dataset gives it (``"1:56 pm on 8 May, 2023"``, ``"2023/05/20 (Sat) 02:21"``...), or ``None``.
    """

    index: int
    id: str
    timestamp: str | None
    turns: tuple[Turn, ...]

    def messages(self) -> list[dict[str, str]]:
        """The session as agent input: ``{"role", "content", "speaker", "turn_id"}`` per turn,
        plus ``"image_caption"`` for a turn that shares a photo (the agents render it)."""
        out: list[dict[str, str]] = []
        for t in self.turns:
            m = {"role": t.role, "content": t.text, "speaker": t.speaker, "turn_id": t.id}
            if t.image_caption:
                m["image_caption"] = t.image_caption
            out.append(m)
        return out


@dataclass(frozen=True, slots=True)
class Conversation:
    """A history to build memory from. ``meta`` holds dataset-specific extras (speaker names,
    PerLTQA's profile and relationships, LongMemEval's original session order...)."""

    id: str
    sessions: tuple[Session, ...]
    meta: Mapping[str, Any] = field(default_factory=dict)

    def session_index(self) -> dict[str, int]:
        """Session id -> build index."""
        return {s.id: s.index for s in self.sessions}

    def turn_session(self) -> dict[str, int]:
        """Turn id -> index of the session that holds it."""
        return {t.id: s.index for s in self.sessions for t in s.turns}

    @property
    def num_turns(self) -> int:
        return sum(len(s.turns) for s in self.sessions)


@dataclass(frozen=True, slots=True)
class Question:
    """One benchmark question about one conversation.

    ``category`` is a readable name (LoCoMo ``"multi-hop"``...; LongMemEval the question type;
    PerLTQA the memory type) and ``category_id`` LoCoMo's number (1-5) or ``None``.
    ``evidence_turns`` / ``evidence_sessions`` are turn ids / session ids (as in
    :attr:`Session.id`) that hold the answer; either may be empty. ``asked_at`` is the date the
    question is asked (LongMemEval's ``question_date``; LoCoMo and PerLTQA give none, so the
    last session's timestamp is used). ``is_abstention``: the correct response is that the
    conversation does not say (LoCoMo category 5, LongMemEval ``_abs``). ``adversarial_answer``
    is LoCoMo's trap answer for category 5.
    """

    id: str
    conversation_id: str
    question: str
    answer: str
    category: str
    category_id: int | None = None
    evidence_turns: tuple[str, ...] = ()
    evidence_sessions: tuple[str, ...] = ()
    asked_at: str | None = None
    is_abstention: bool = False
    adversarial_answer: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Dataset:
    """Conversations and the questions about them. ``name`` is ``"locomo"``, ``"longmemeval"`` or
    ``"perltqa"``; ``source`` the file (or directory) it came from."""

    name: str
    conversations: tuple[Conversation, ...]
    questions: tuple[Question, ...]
    source: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict)

    def conversation(self, conversation_id: str) -> Conversation:
        for c in self.conversations:
            if c.id == conversation_id:
                return c
        raise KeyError(conversation_id)

    def questions_for(self, conversation_id: str) -> list[Question]:
        return [q for q in self.questions if q.conversation_id == conversation_id]

    def select(
        self,
        conversation_ids: Iterable[str] | None = None,
        *,
        max_sessions: int | None = None,
        max_questions: int | None = None,
    ) -> Dataset:
        """A smaller dataset: only the named conversations (in the order given; an unknown id
        raises InvalidArgumentError listing some known ones), their first ``max_sessions``
        sessions, and at most ``max_questions`` questions per conversation.

        With ``max_sessions`` the questions are kept as they are: evidence outside the kept
        sessions simply cannot be found (the runner reports it that way).
        """
        convs = list(self.conversations)
        if conversation_ids is not None:
            by_id = {c.id: c for c in convs}
            wanted = list(dict.fromkeys(conversation_ids))
            unknown = [i for i in wanted if i not in by_id]
            if unknown:
                known = ", ".join(list(by_id)[:8])
                raise InvalidArgumentError(
                    f"{self.name}: unknown id(s) {', '.join(unknown)}; known ids include {known}"
                )
            convs = [by_id[i] for i in wanted]
        if max_sessions is not None:
            if max_sessions < 1:
                raise InvalidArgumentError(f"max_sessions must be >= 1, got {max_sessions}")
            convs = [Conversation(c.id, c.sessions[:max_sessions], c.meta) for c in convs]
        keep = {c.id for c in convs}
        questions: list[Question] = []
        per_conv: dict[str, int] = {}
        for q in self.questions:
            if q.conversation_id not in keep:
                continue
            n = per_conv.get(q.conversation_id, 0)
            if max_questions is not None and n >= max_questions:
                continue
            per_conv[q.conversation_id] = n + 1
            questions.append(q)
        return Dataset(self.name, tuple(convs), tuple(questions), self.source, self.meta)
