"""What the reward scorer consumes and returns: one policy rollout and its ground truth.

The ground truth of an RL sample is written by the RL export (``membuilder export-rl``) into the
parquet's ``reward_model.ground_truth`` column as JSON text (see
:class:`membuilder.data.schemas.RLGroundTruth`). It describes one (session, agent) prompt: the
base state before the session (a path relative to the parquet file's directory), the session's
synthetic QA, and the expert's outputs for all four agents (used for length penalties and, in
``expert`` pairing, as the other agents' actions).

Such text is decoded with the schema that wrote it (one typed msgspec pass per rollout); other
shapes (a mapping, a plain ``expert_outputs`` mapping, hand-written ground truths with only the
fields the scorer reads) go through the general reader, which gives the same object for an
exported row and names the field when something is missing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from membuilder._core import AGENTS, BANK_KINDS
from membuilder.data.schemas import RL_VERSION, RLGroundTruth
from membuilder.errors import GroundTruthError
from membuilder.protocol import PROTOCOLS

PAIRINGS = ("expert", "joint")
#: ``protocol_id`` in the reward metrics: 0 = paper, 1 = membuilder (-1: none recorded).
PROTOCOL_IDS = {name: float(i) for i, name in enumerate(PROTOCOLS)}


@dataclass(frozen=True)
class QAPair:
    question: str
    answer: str
    type: str | None = None
    asked_at: str | None = None


@dataclass(frozen=True)
class ExpertFacts:
    """What the RL export recorded about the expert's output of one agent (``experts[i]``): its
    format gate and its new content joined with newlines, as the recording's parse gave them
    (``ParseResult.ok`` and ``ParseResult.content_text()`` of that raw output)."""

    ok: bool
    content_text: str


@dataclass(frozen=True)
class GroundTruth:
    """Everything the reward of one (session, agent) prompt depends on, apart from the rollout.

    ``state_before`` is the path of the state file saved before the session (relative paths are
    resolved against the scorer's ``state_root``). ``expert_outputs`` maps each agent to the
    expert's raw output for this session; ``expert_content_chars`` is a fallback for the expert's
    content length (characters) when its raw output is not given. ``expert_facts`` holds, per
    agent, what the export recorded about that raw output (gate and content), so that the scorer
    parses an expert's output only to apply its actions.
    """

    conversation_id: str
    session_index: int
    agent: str
    qa: tuple[QAPair, ...]
    state_before: str
    expert_outputs: Mapping[str, str] = field(default_factory=dict)
    expert_content_chars: int | None = None
    timestamp: str | None = None
    embedder: str | None = None
    expert_facts: Mapping[str, ExpertFacts] = field(default_factory=dict)

    @property
    def session_key(self) -> tuple[str, int]:
        return (self.conversation_id, self.session_index)

    @staticmethod
    def from_obj(obj: Any) -> GroundTruth:
        """Build from the parquet's ground truth: a mapping or its JSON text.

        Raises :class:`GroundTruthError` naming the missing or malformed field.
        """
        if isinstance(obj, (str, bytes)):
            exported = _from_export(obj)
            if exported is not None:
                return exported
            try:
                obj = json.loads(obj)
            except json.JSONDecodeError as exc:
                raise GroundTruthError(f"ground truth is not valid JSON: {exc}") from exc
        if hasattr(obj, "items") and not isinstance(obj, Mapping):
            obj = dict(obj.items())
        if not isinstance(obj, Mapping):
            raise GroundTruthError(f"ground truth must be a mapping or JSON text, got {type(obj).__name__}")

        version = obj.get("version")
        if version is not None and int(version) != RL_VERSION:
            raise GroundTruthError(
                f"ground truth version {version}, this membuilder reads version {RL_VERSION}; "
                "re-export the RL data with this version"
            )

        def need(name: str) -> Any:
            if name not in obj or obj[name] is None:
                raise GroundTruthError(f"ground truth has no {name!r} (keys: {sorted(obj)})")
            return obj[name]

        agent = str(need("agent"))
        if agent not in AGENTS:
            raise GroundTruthError(f"ground truth agent {agent!r} is not one of {AGENTS}")
        qa_raw = need("qa")
        if isinstance(qa_raw, str):
            qa_raw = json.loads(qa_raw)
        qa: list[QAPair] = []
        for i, item in enumerate(list(qa_raw)):
            if not hasattr(item, "get") or item.get("question") is None or item.get("answer") is None:
                raise GroundTruthError(f"ground truth qa[{i}] needs 'question' and 'answer'")
            asked = item.get("asked_at")
            qa.append(
                QAPair(
                    str(item["question"]),
                    str(item["answer"]),
                    item.get("type"),
                    None if asked is None else str(asked),
                )
            )
        if not qa:
            raise GroundTruthError("ground truth has an empty 'qa' list; a session needs questions to score")
        # The export writes ``experts`` (a list of records with agent and raw_output); a plain
        # ``expert_outputs`` mapping {agent: raw} is accepted too.
        experts: dict[str, str] = {}
        facts: dict[str, ExpertFacts] = {}
        for rec in obj.get("experts") or ():
            if not hasattr(rec, "get") or rec.get("agent") is None or rec.get("raw_output") is None:
                raise GroundTruthError("ground truth experts[] entries need 'agent' and 'raw_output'")
            experts[str(rec["agent"])] = str(rec["raw_output"])
            if rec.get("ok") is not None and rec.get("content_text") is not None:
                facts[str(rec["agent"])] = ExpertFacts(bool(rec["ok"]), str(rec["content_text"]))
            else:
                facts.pop(str(rec["agent"]), None)
        experts_raw = obj.get("expert_outputs") or {}
        if isinstance(experts_raw, str):
            experts_raw = json.loads(experts_raw)
        override = {str(k): str(v) for k, v in dict(experts_raw).items() if v is not None}
        experts.update(override)
        # Facts describe the recorded raw output; a raw output given in their place has none.
        facts = {a: f for a, f in facts.items() if a not in override}
        unknown = set(experts) - set(AGENTS)
        if unknown:
            raise GroundTruthError(f"ground truth expert_outputs has unknown agents {sorted(unknown)}")
        chars = obj.get("expert_content_chars")
        if hasattr(chars, "get"):  # a per-agent mapping: keep this agent's value
            chars = chars.get(agent)
        state = need("state_before")
        return GroundTruth(
            conversation_id=str(need("conversation_id")),
            session_index=int(need("session_index")),
            agent=agent,
            qa=tuple(qa),
            state_before=str(state),
            expert_outputs=experts,
            expert_content_chars=None if chars is None else int(chars),
            timestamp=None if obj.get("timestamp") is None else str(obj["timestamp"]),
            embedder=None if obj.get("embedder") is None else str(obj["embedder"]),
            expert_facts=facts,
        )

    def resolve_state(self, state_root: str | Path | None) -> Path:
        path = Path(self.state_before)
        if not path.is_absolute() and state_root is not None:
            path = Path(state_root) / path
        return path


def _from_export(text: str | bytes) -> GroundTruth | None:
    """An exported row's ground truth, decoded with the export's own schema in one typed pass;
    ``None`` for anything else (another version, missing fields, an ``expert_outputs`` mapping,
    no questions): :meth:`GroundTruth.from_obj`'s general reader then reads it or names the fault.
    """
    if (b'"expert_outputs"' if isinstance(text, bytes) else '"expert_outputs"') in text:
        return None  # not a field of the schema; the general reader applies it
    try:
        truth = msgspec.json.decode(text, type=RLGroundTruth)
    except msgspec.DecodeError:  # invalid JSON or another shape (ValidationError is a DecodeError)
        return None
    if truth.version != RL_VERSION or not truth.qa:
        return None
    experts = {e.agent: e.raw_output for e in truth.experts}
    facts = {e.agent: ExpertFacts(e.ok, e.content_text) for e in truth.experts}
    return GroundTruth(
        conversation_id=truth.conversation_id,
        session_index=truth.session_index,
        agent=truth.agent,
        qa=tuple(QAPair(q.question, q.answer, q.type, q.asked_at) for q in truth.qa),
        state_before=truth.state_before,
        expert_outputs=experts,
        expert_content_chars=truth.expert_content_chars,
        timestamp=truth.timestamp,
        embedder=truth.embedder,
        expert_facts=facts,
    )


@dataclass(frozen=True)
class RewardSample:
    """One policy rollout for one (session, agent) prompt.

    ``rollout_index`` is the rollout's position among the n rollouts of its prompt (0..n-1); the
    ``joint`` pairing applies the r-th rollouts of a session's four agents together.
    """

    ground_truth: GroundTruth
    output: str
    rollout_index: int = 0

    @property
    def agent(self) -> str:
        return self.ground_truth.agent


@dataclass(frozen=True)
class SampleReward:
    """The reward of one sample and everything it was computed from.

    ``valid`` is False when the reward could not be computed (a call failed after its retries, a
    judge's label was unreadable, the base state could not be read); then ``reward`` and
    ``weight`` are 0 and ``error`` says why. Nothing is ever estimated in its place.
    """

    reward: float
    weight: float
    valid: bool
    format_ok: bool
    task: float
    length_penalty: float
    policy_tokens: float
    expert_tokens: float
    retrieved: tuple[int, int, int]
    dominant: str | None
    paired_with_expert: int
    error: str | None = None
    sparse_dropped: bool = False  # the sparse ablation gave this rollout the default task reward
    protocol: str = ""  # the reward's protocol name (see membuilder.protocol)
    protocol_overridden: bool = False  # some setting of that protocol was overridden

    def to_verl(self) -> dict[str, float]:
        """The dict a verl reward function returns: ``score`` plus the same extra keys for every sample."""
        kinds = BANK_KINDS
        return {
            "score": float(self.reward),
            "adrpo_weight": float(self.weight),
            "reward_valid": float(self.valid),
            "format_ok": float(self.format_ok),
            "task": float(self.task),
            "length_penalty": float(self.length_penalty),
            "policy_tokens": float(self.policy_tokens),
            "expert_tokens": float(self.expert_tokens),
            "retrieved_episodic": float(self.retrieved[0]),
            "retrieved_semantic": float(self.retrieved[1]),
            "retrieved_procedural": float(self.retrieved[2]),
            "dominant_kind": float(kinds.index(self.dominant)) if self.dominant in kinds else -1.0,
            "paired_with_expert": float(self.paired_with_expert),
            "sparse_dropped": float(self.sparse_dropped),
            # verl's metrics are numbers: the protocol as its index among the shipped ones.
            "protocol_id": float(PROTOCOL_IDS.get(self.protocol, -1)),
            "protocol_overridden": float(self.protocol_overridden),
        }
