"""Answering a question from memory: the core block, the top-k retrieved memories, and the date.

One embedder call for the question, one search over all three banks, one LLM call (tag
``answer``). The prompt is built by :func:`build_answer_messages`, a pure function.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from membuilder._core import BANK_KINDS, InvalidArgumentError

__all__ = ["ANSWER_SYSTEM", "ANSWER_TAG", "AnswerResult", "Answerer", "build_answer_messages"]

ANSWER_TAG = "answer"

ANSWER_SYSTEM = """You answer questions about people from the memory an assistant has kept of its past \
conversations with them. You see the core memory (lasting facts about the people), the memories \
retrieved for the question, and the current date.

How to answer:
- Use only what the memories say, together with reasonable inferences from them. Related wording counts \
("support group" and "activist group" may be the same thing).
- Dates: the memories carry absolute dates; give dates as such (e.g. "7 May 2023"). Work out relative \
questions ("how long ago", "which came first") from those dates and the current date.
- When memories disagree, trust the most recent one.
- Questions asking what someone would, could or is likely to do may be answered by inference from what \
the memories say about them.
- If the memories hold nothing about what is asked, or only about a different person or a different \
event, answer exactly: Not answerable
- Be brief: a short phrase or one sentence, no explanation of your reasoning."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def build_answer_messages(
    core: str, memories: Sequence[str], question: str, now: str | None
) -> list[dict[str, str]]:
    """The answer prompt. ``memories`` best first; ``now`` the current date as the dataset gives
    it (``None``: unknown). Pure and deterministic."""
    from membuilder.prompt_templates import render_template

    mem = "\n".join(f"{i}. {_one_line(m)}" for i, m in enumerate(memories, 1)) or "(none)"
    custom = render_template(
        "answer",
        {"question": question, "memories": mem, "core_memory": core, "current_date": now or "unknown"},
    )
    if custom is not None:
        return custom
    user = (
        f"<core_memory>\n{core.strip() or '(empty)'}\n</core_memory>\n\n"
        f'<memories count="{len(memories)}">\n{mem}\n</memories>\n\n'
        f"<current_date>{_one_line(now) if now else 'unknown'}</current_date>\n\n"
        f"<question>{_one_line(question)}</question>\n\n"
        "Answer the question."
    )
    return [{"role": "system", "content": ANSWER_SYSTEM}, {"role": "user", "content": user}]


@dataclass
class AnswerResult:
    """An answer and what it was based on.

    ``retrieved_ids`` / ``retrieved_kinds`` / ``retrieved_texts``: the memories shown, best first
    (kinds as names: episodic, semantic, procedural); ``messages`` the prompt; ``usage`` tokens.
    """

    answer: str
    retrieved_ids: list[int]
    retrieved_kinds: list[str]
    retrieved_texts: list[str]
    messages: list[dict[str, str]]
    retrieved_scores: list[float] = field(default_factory=list)
    usage: dict[str, int] = field(default_factory=dict)
    cached: bool = False


class Answerer:
    """Answers questions against a memory state.

    ``llm``: an ``LLMClient``; ``embedder``: the embedder the state was built with; ``model``: the
    answer model (``None``: the client's default); ``top_k``: memories retrieved per question (the
    paper uses 10); ``max_tokens``: cap on the answer's length.
    """

    def __init__(
        self,
        llm: Any,
        embedder: Any,
        *,
        model: str | None = None,
        top_k: int = 10,
        temperature: float = 0.0,
        max_tokens: int | None = 256,
    ) -> None:
        if top_k < 0:
            raise InvalidArgumentError(f"top_k must be >= 0, got {top_k}")
        self.llm = llm
        self.embedder = embedder
        self.model = model
        self.top_k = top_k
        self.temperature = temperature
        self.max_tokens = max_tokens

    async def retrieve(
        self, state: Any, question: str, hits: Sequence[Any] | None = None
    ) -> tuple[list[int], list[float], list[str], list[str]]:
        """``(ids, scores, kinds, texts)`` of the top-k live memories for ``question``.

        ``hits``: ``(ids, scores, kinds)`` of a search already made for this question over
        ``state`` with at least ``top_k`` results, best first (e.g. one row of each of
        ``search_batch``'s arrays, padded with -1); its first ``top_k`` are used instead of
        embedding and searching again. The caller vouches that they are this search's top k.
        """
        if self.top_k == 0 or len(state) == 0:
            return [], [], [], []
        if hits is None:
            q = np.asarray(await self.embedder.aembed_queries([question]), dtype=np.float32)[0]
            found = state.search(np.ascontiguousarray(q), self.top_k)
            hits = (found.ids, found.scores, found.kinds)
        hit_ids, hit_scores, hit_kinds = (h[: self.top_k] for h in hits)
        ids = [int(i) for i in hit_ids if i >= 0]
        scores = [float(s) for s, i in zip(hit_scores, hit_ids) if i >= 0]
        kinds = [BANK_KINDS[int(k)] for k, i in zip(hit_kinds, hit_ids) if i >= 0]
        texts = [t for t in state.texts(ids) if t is not None]
        return ids, scores, kinds, texts

    async def answer(
        self, state: Any, question: str, now: str | None, *, hits: Sequence[Any] | None = None
    ) -> AnswerResult:
        """Retrieve (or take ``hits``, see :meth:`retrieve`) and answer. Raises ``LLMError`` when
        the endpoint fails for good (an answer is never invented) and InvalidArgumentError for an
        empty question."""
        if not isinstance(question, str) or not question.strip():
            raise InvalidArgumentError("question must be a non-empty string")
        ids, scores, kinds, texts = await self.retrieve(state, question, hits)
        messages = build_answer_messages(state.core, texts, question, now)
        reply = await self.llm.chat(
            messages,
            model=self.model,
            temperature=self.temperature,
            max_tokens=self.max_tokens,
            tag=ANSWER_TAG,
        )
        return AnswerResult(
            answer=reply.text.strip(),
            retrieved_ids=ids,
            retrieved_kinds=kinds,
            retrieved_texts=texts,
            messages=messages,
            retrieved_scores=scores,
            usage={
                "prompt_tokens": int(reply.prompt_tokens or 0),
                "completion_tokens": int(reply.completion_tokens or 0),
            },
            cached=bool(getattr(reply, "cached", False)),
        )
