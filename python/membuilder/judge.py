"""An LLM judge in the LoCoMo style: is a generated answer CORRECT or WRONG against the gold one?

Two wordings (``style``), chosen by the protocol (``judge_style``):

* ``strict`` (the ``membuilder`` protocol): generous on paraphrase, length and date formats;
  strict on substance and on "not answerable" (such an answer is correct only when the gold answer
  itself says the information is not there). The reply is a JSON object only; :func:`parse_judge_label`
  reads it robustly.
* ``generous`` (the ``paper`` protocol, after the reference code's ``eval/llm_judge.py``, in our own
  words): any answer on the same topic as the gold one counts, relative time expressions that land
  on the gold date count; the reply is one sentence of reasoning, then the JSON label. It is read
  the way the reference reads it (:func:`read_generous_label`): a JSON object whose ``label`` is
  exactly ``CORRECT`` or ``WRONG``; anything else is unreadable.

An unreadable reply is asked again (up to ``max_attempts`` calls); if it stays unreadable the result
records a failure (``correct is None``) — a label is never made up here. Whether a failure then
counts as WRONG or leaves the denominator is the protocol's ``judge_unreadable``, applied by the
caller (the eval runner).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from membuilder._text import loads_shallow

__all__ = [
    "JUDGE_GENEROUS_SYSTEM",
    "JUDGE_STYLES",
    "JUDGE_SYSTEM",
    "JUDGE_TAG",
    "Judge",
    "JudgeResult",
    "build_judge_messages",
    "parse_judge_label",
    "read_generous_label",
]

JUDGE_STYLES = ("strict", "generous")

JUDGE_TAG = "judge"

JUDGE_SYSTEM = """You grade answers given by a memory-based assistant. For each item you get a question \
about people's past conversations, the gold answer, and the generated answer. Label the generated answer \
CORRECT or WRONG.

Be generous about form:
- A longer answer, a paraphrase, or an answer with extra detail is CORRECT when it contains or clearly \
means the same thing as the gold answer.
- Dates and times are CORRECT when they name the same day, month, year or period, whatever the format \
("7 May 2023", "May 7th", "2023-05-07", or "the Sunday before 14 May 2023" for 7 May 2023).
Be strict about substance:
- An answer about a different person, event or thing than the gold answer is WRONG, even if some words match.
- An answer that says the information is unavailable ("not answerable", "not mentioned", "no \
information", "cannot be determined") is CORRECT only when the gold answer also says the information is \
unavailable; when the gold answer gives any specific information, such an answer is WRONG.
- When the gold answer says the information is unavailable, an answer that asserts a specific fact is WRONG.

Reply with one JSON object and nothing else: {"label": "CORRECT"} or {"label": "WRONG"}."""


JUDGE_GENEROUS_SYSTEM = """You check the answers a memory-based assistant gave to questions about \
what people said in their earlier conversations. Each item has the question, the gold answer and \
the generated answer. Label the generated answer CORRECT or WRONG.

Grade generously. The gold answer is usually a few words; the generated answer may be much longer \
or put differently. If it is about the same thing as the gold answer, it is CORRECT.
For questions about time the gold answer names a date, month, year or period. A generated answer \
that points to the same one is CORRECT, whatever the format ("14 June 2023", "June 14th", \
"2023-06-14") and even when it is put relatively ("two weeks ago", "the Friday before") as long as \
it lands on it.

Answers saying the information is not there ("Not answerable", "the memories do not say", \
"nothing is recorded about it", "it is unknown", and the like):
- if the gold answer also says the information is not there, such an answer is CORRECT;
- if the gold answer gives anything specific (a name, a date, a fact, an opinion), such an answer is \
WRONG, however it is explained.
An answer that gives the right content but about a different person or thing than the question \
asks about is WRONG.

Write one sentence saying why, then end with the label as a JSON object with the key "label": \
{"label": "CORRECT"} or {"label": "WRONG"}. Put only one of the two labels in that object."""


_PROMPT_TAG = re.compile(r"<(/?)(question|gold_answer|generated_answer)\b", re.IGNORECASE)


def _one_line(text: object) -> str:
    # The prompt's own tags inside a field are defused (``<`` -> ``&lt;``) so that an answer
    # cannot close its block and pose as the gold answer.
    return _PROMPT_TAG.sub(r"&lt;\1\2", " ".join(str(text).split()))


def build_judge_messages(
    question: str, gold: object, answer: str, style: str = "strict"
) -> list[dict[str, str]]:
    """The judge prompt for one item in ``style`` (``strict`` or ``generous``). ``gold`` may be a
    non-string (LoCoMo has integer answers). Pure and deterministic. A user's judge template
    (``--prompt-templates``) replaces the built-in wording of either style."""
    if style not in JUDGE_STYLES:
        raise ValueError(f"judge style must be one of {', '.join(JUDGE_STYLES)}, got {style!r}")
    from membuilder.prompt_templates import render_template

    custom = render_template("judge", {"question": question, "gold_answer": gold, "generated_answer": answer})
    if custom is not None:
        return custom
    user = (
        f"<question>{_one_line(question)}</question>\n"
        f"<gold_answer>{_one_line(gold)}</gold_answer>\n"
        f"<generated_answer>{_one_line(answer)}</generated_answer>\n\n"
        "Label the generated answer."
    )
    system = JUDGE_SYSTEM if style == "strict" else JUDGE_GENEROUS_SYSTEM
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


_THINK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_LABEL_FIELD = re.compile(r'"?label"?\s*[:=]\s*"?\s*(CORRECT|WRONG|INCORRECT)\b', re.IGNORECASE)
_WORD = re.compile(r"\b(CORRECT|WRONG|INCORRECT)\b", re.IGNORECASE)
# "not CORRECT", "isn't correct", "never wrong": a negated label says the opposite of its word.
_NEGATED = re.compile(
    r"\b(?:not|no|never|isn't|isnt|aren't|wasn't|hardly)\b\W+(?:\w+\W+){0,2}?(?:CORRECT|WRONG|INCORRECT)\b",
    re.IGNORECASE,
)


def _label_to_bool(label: str) -> bool | None:
    label = label.strip().upper()
    if label == "CORRECT":
        return True
    if label in ("WRONG", "INCORRECT"):
        return False
    return None


def parse_judge_label(text: str | None) -> bool | None:
    """``True`` for CORRECT, ``False`` for WRONG, ``None`` when the reply does not say which.

    Reads, in order: a JSON object's ``label`` (code fences and reasoning blocks ignored), a
    ``label: X`` field in otherwise broken JSON, and finally a reply that names exactly one of the
    two labels as a word. A reply that names both (and no label field), or negates the label it
    names ("It is not CORRECT"), is ``None``.
    """
    if not text:
        return None
    s = _THINK.sub("", text).strip()
    start, end = s.find("{"), s.rfind("}")
    if 0 <= start < end:
        try:
            obj = loads_shallow(s[start : end + 1])
        except ValueError:  # not JSON, or nested deep enough to overflow the parser
            obj = None
        if isinstance(obj, dict):
            for key, value in obj.items():
                if str(key).lower() == "label" and isinstance(value, str):
                    verdict = _label_to_bool(value)
                    if verdict is not None:
                        return verdict
    fields = {m.group(1).upper().replace("INCORRECT", "WRONG") for m in _LABEL_FIELD.finditer(s)}
    if len(fields) == 1:
        return _label_to_bool(fields.pop())
    if _NEGATED.search(s):
        return None
    words = {m.group(1).upper().replace("INCORRECT", "WRONG") for m in _WORD.finditer(s)}
    if len(words) == 1:
        return _label_to_bool(words.pop())
    return None


def read_generous_label(text: str | None) -> bool | None:
    """The ``generous`` style's reading, as the reference reads its judge: the text from the first
    ``{`` to the last ``}`` must be a JSON object whose ``label`` is exactly ``"CORRECT"`` (``True``)
    or ``"WRONG"`` (``False``); anything else is unreadable (``None``). A reasoning sentence before
    the object is expected and ignored; a bare word without the JSON object is not read."""
    if not text:
        return None
    s = _THINK.sub("", text)
    start, end = s.find("{"), s.rfind("}")
    if not 0 <= start < end:
        return None
    try:
        obj = loads_shallow(s[start : end + 1])
    except ValueError:  # not JSON, or nested deep enough to overflow the parser
        return None
    if not isinstance(obj, dict):
        return None
    label = obj.get("label")
    return True if label == "CORRECT" else False if label == "WRONG" else None


@dataclass
class JudgeResult:
    """A verdict. ``correct`` is ``None`` when no readable label could be obtained (then ``error``
    says why); ``raw`` is the last reply (``None`` when no reply came back)."""

    correct: bool | None
    raw: str | None
    attempts: int = 0
    error: str | None = None
    outputs: list[str] = field(default_factory=list)
    usage: dict[str, int] = field(default_factory=lambda: {"prompt_tokens": 0, "completion_tokens": 0})

    @property
    def failed(self) -> bool:
        return self.correct is None


class Judge:
    """The LLM judge. ``max_attempts`` >= 1 calls per item when replies are unreadable;
    ``max_tokens`` caps each reply (``None``: no cap); ``style``: ``strict`` or ``generous``
    (wording and reading, see the module docstring)."""

    def __init__(
        self,
        llm: Any,
        *,
        model: str | None = None,
        max_attempts: int = 3,
        max_tokens: int | None = None,
        style: str = "strict",
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
        if style not in JUDGE_STYLES:
            raise ValueError(f"judge style must be one of {', '.join(JUDGE_STYLES)}, got {style!r}")
        self.style = style
        self.llm = llm
        self.model = model
        self.max_attempts = max_attempts
        # No cap by default: reasoning judges spend tokens before the label.
        self.max_tokens = max_tokens

    async def judge(self, question: str, gold: object, answer: str) -> JudgeResult:
        """Label ``answer``. Never raises for the model or endpoint: failures are recorded."""
        from membuilder.llm import LLMError

        messages = build_judge_messages(question, gold, answer, self.style)
        read = parse_judge_label if self.style == "strict" else read_generous_label
        result = JudgeResult(correct=None, raw=None)
        for _ in range(self.max_attempts):
            result.attempts += 1
            try:
                reply = await self.llm.chat(
                    messages,
                    model=self.model,
                    temperature=0.0,
                    max_tokens=self.max_tokens,
                    json_mode=True,
                    tag=JUDGE_TAG,
                )
            except LLMError as exc:
                result.error = f"llm_error: {exc}"
                return result
            result.usage["prompt_tokens"] += int(reply.prompt_tokens or 0)
            result.usage["completion_tokens"] += int(reply.completion_tokens or 0)
            result.raw = reply.text
            result.outputs.append(reply.text)
            verdict = read(reply.text)
            if verdict is not None:
                result.correct = verdict
                result.error = None
                return result
            result.error = (
                "unparseable: the reply named neither CORRECT nor WRONG unambiguously"
                if self.style == "strict"
                else 'unparseable: no JSON object with "label": "CORRECT" or "WRONG"'
            )
            # Ask again with the bad reply in view; the same messages would only replay the cache.
            messages = [
                *messages,
                {"role": "assistant", "content": reply.text},
                {
                    "role": "user",
                    "content": 'That reply could not be read. Answer with exactly {"label": "CORRECT"} '
                    'or {"label": "WRONG"}.',
                },
            ]
        return result
