"""The reward scorer: many rollouts in, one reward and one attribution weight per rollout out.

A reward batch is mostly waiting for an answer model and a judge, so the scorer's job is to send
as few calls as possible, all at once, and to do everything else in the Rust core:

1. parse and validate every output in one call (:func:`membuilder._core.parse_actions_batch`);
2. group rollouts by the memory they produce (``expert`` pairing: one rollout with the expert's
   actions for the other three agents; ``joint``: the r-th rollouts of a session's four agents),
   and drop groups that produce identical actions;
3. load each base state once (kept in an LRU cache across batches) and give every group a
   copy-free :class:`~membuilder._core.StateView`;
4. plan all views and embed every distinct question once;
5. in chunks of groups (the first about one round of the concurrency limit, each next twice the
   last): embed the chunk's distinct new memory texts not embedded yet, commit its views and
   retrieve for its (view, question) pairs in one :func:`~membuilder._core.search_views` call, then
   send its calls and go on to the next chunk, so that embedding overlaps the calls in flight;
6. send each distinct answer prompt once and each distinct (question, gold, answer) judge triple
   once per batch, all concurrently under the client's concurrency limit;
7. compute task reward, length penalties, reward, retrieval counts, dominant kind and attribution
   weight for the whole batch in :class:`~membuilder._core.RewardKernel`.

A sample whose reward cannot be computed (a call failed after the client's retries, a judge label
that could not be read, a base state that could not be loaded) gets ``valid=False``, reward 0 and
weight 0, and is counted in :attr:`RewardScorer.stats`. Nothing is estimated in its place.

What the reward means is set by a protocol (:mod:`membuilder.protocol`, default ``paper``, the
published code's reward): the pairing, the memory the QA sees (``rollout_only``: the core block and
the rollout's own new memories that reach the top 2k over the whole index, as the reference's
user-id filter leaves it; ``whole_state``: the top k over the base state and the new memories),
the format gate (:mod:`~membuilder.training.format_gate`), the kind tag on embedded memories, the
questions used, the models and the sparse-reward ablation. Each can be overridden on its own; the
resolved protocol is :attr:`ScorerConfig.resolved` and is recorded in :meth:`ScorerStats.as_dict`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from membuilder._core import BANK_KINDS  # the core's kind codes 0, 1, 2, in order
from membuilder.endpoint import Endpoint
from membuilder.protocol import Protocol, SparseReward, get_protocol
from membuilder.training.format_gate import FORMAT_GATES, strict_format_ok
from membuilder.training.samples import AGENTS, PAIRINGS, GroundTruth, RewardSample, SampleReward

logger = logging.getLogger(__name__)

JUDGES = ("llm", "exact", "f1")
QA_SCOPES = ("rollout_only", "whole_state")


@dataclass
class ScorerConfig:
    """Settings of the reward scorer.

    ``protocol`` names the protocol every setting left at ``None`` takes its value from
    (``paper`` or ``membuilder``); the others override it and are recorded as overrides
    (:attr:`resolved`). Protocol settings: ``pairing``, ``qa_scope``, ``format_gate``,
    ``kind_prefix``, ``max_questions`` (0 = all), ``answer_model``, ``judge_model``, ``embedder`` and
    the sparse ablation ``sparse_reward`` / ``sparse_drop_rate`` / ``sparse_default_reward`` /
    ``sparse_seed``.

    ``answer_model``/``judge_model`` name models on the OpenAI-compatible endpoint at
    ``base_url`` (``provider`` defaults to
    ``"compatible"`` with a ``base_url`` and ``"openai"`` without; the key comes from ``api_key``
    or ``OPENAI_API_KEY``; both models are called on that one endpoint). ``judge`` is ``"llm"`` (the
    LoCoMo-style judge), ``"exact"`` (normalised exact match) or ``"f1"`` (token F1 as a fractional
    score) — the last two need no judge calls, for cheap runs. ``top_k``: memories retrieved per
    question (the paper: 10). ``max_concurrency``: simultaneous LLM calls. ``max_states``: base
    states kept in memory between batches. ``reward``: fields of
    :class:`membuilder._core.RewardConfig` (e.g. ``{"attribution_alpha": 4.0}``). ``tokenizer``:
    a local Hugging Face tokenizer directory to count content tokens with; without one, both the
    policy's and the expert's lengths are characters / 4. ``state_root``: the directory relative
    ``state_before`` paths resolve against (``membuilder export-rl`` writes them relative to the
    parquet file's directory). Core compression is not run while scoring: answers see the core
    block as the rollout left it.
    """

    protocol: str = "paper"
    answer_model: str | None = None
    judge_model: str | None = None
    judge: str = "llm"
    base_url: str | None = None
    api_key: str | None = None
    provider: str | None = None
    pairing: str | None = None
    qa_scope: str | None = None
    format_gate: str | None = None
    kind_prefix: bool | None = None
    max_questions: int | None = None
    sparse_reward: bool | None = None
    sparse_drop_rate: float | None = None
    sparse_default_reward: float | None = None
    sparse_seed: int | None = None
    top_k: int = 10
    max_concurrency: int = 64
    max_retries: int = 6
    timeout: float = 120.0
    embedder: str | None = None
    embed_cache_dir: str | None = None
    llm_cache_dir: str | None = None
    state_root: str | None = None
    max_states: int = 256
    tokenizer: str | None = None
    reward: dict[str, float | bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.judge not in JUDGES:
            raise ValueError(f"judge must be one of {JUDGES}, got {self.judge!r}")
        base = get_protocol(self.protocol)
        sparse = None
        given = {
            "enabled": self.sparse_reward,
            "drop_rate": self.sparse_drop_rate,
            "default_reward": self.sparse_default_reward,
            "seed": self.sparse_seed,
        }
        if any(v is not None for v in given.values()):
            base_sparse = base.sparse_reward
            sparse = SparseReward(
                **{k: (getattr(base_sparse, k) if v is None else v) for k, v in given.items()}
            )
        #: The protocol with this config's overrides: what the reward means, as recorded.
        self.resolved: Protocol = base.with_overrides(
            reward_pairing=self.pairing,
            reward_qa_scope=self.qa_scope,
            format_gate=self.format_gate,
            reward_kind_prefix=self.kind_prefix,
            reward_max_questions=self.max_questions,
            reward_answer_model=self.answer_model,
            reward_judge_model=self.judge_model,
            reward_embedder=self.embedder,
            sparse_reward=sparse,
        )
        r = self.resolved
        self.pairing, self.qa_scope, self.format_gate = r.reward_pairing, r.reward_qa_scope, r.format_gate
        self.kind_prefix, self.max_questions = r.reward_kind_prefix, r.reward_max_questions
        self.answer_model, self.judge_model, self.embedder = (
            r.reward_answer_model,
            r.reward_judge_model,
            r.reward_embedder,
        )
        sr = r.sparse_reward
        self.sparse_reward, self.sparse_drop_rate = sr.enabled, sr.drop_rate
        self.sparse_default_reward, self.sparse_seed = sr.default_reward, sr.seed
        if self.pairing not in PAIRINGS:
            raise ValueError(f"pairing must be one of {PAIRINGS}, got {self.pairing!r}")
        if self.qa_scope not in QA_SCOPES:
            raise ValueError(f"qa_scope must be one of {QA_SCOPES}, got {self.qa_scope!r}")
        if self.format_gate not in FORMAT_GATES:
            raise ValueError(f"format_gate must be one of {FORMAT_GATES}, got {self.format_gate!r}")
        if self.max_questions < 0:
            raise ValueError(f"max_questions must be >= 0, got {self.max_questions}")
        if not 0.0 <= self.sparse_drop_rate <= 1.0:
            raise ValueError(f"sparse_drop_rate must be in [0, 1], got {self.sparse_drop_rate}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.max_states < 1:
            raise ValueError(f"max_states must be >= 1, got {self.max_states}")


@dataclass
class ScorerStats:
    """Counters over the scorer's life (reset with :meth:`reset`)."""

    batches: int = 0
    samples: int = 0
    groups: int = 0
    states_loaded: int = 0
    state_cache_hits: int = 0
    texts_embedded: int = 0
    answer_calls: int = 0
    judge_calls: int = 0
    failed_samples: int = 0
    sparse_dropped: int = 0  # session-rollouts given the ablation's default reward
    failures: dict[str, int] = field(default_factory=dict)
    #: The scorer's resolved protocol (:meth:`membuilder.protocol.Protocol.record`); kept by reset.
    protocol: dict[str, Any] = field(default_factory=dict)

    def reset(self) -> None:
        for name, value in ScorerStats().__dict__.items():
            if name != "protocol":
                setattr(self, name, value)

    def count_failure(self, reason: str) -> None:
        self.failures[reason] = self.failures.get(reason, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__, failures=dict(self.failures), protocol=dict(self.protocol))


class _CallFailed(Exception):
    """A call whose result is needed could not be made; the samples depending on it are invalid."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass
class _Group:
    """Rollouts that produce the same memory: one view, one set of QA results."""

    state_path: Path
    gt: GroundTruth  # any member's; the session's QA and timestamp are shared
    parses: list[Any]  # ParseResults applied together
    members: list[int] = field(default_factory=list)
    view: Any = None
    base: Any = None  # the state the view was made from (untouched by the rollout)
    error: str | None = None
    task: float = 0.0
    kinds: np.ndarray | None = None  # (n_questions * k,) int8
    dropped: bool = False  # every member's session-rollout was dropped by the sparse ablation
    new_kinds: dict[str, int] = field(default_factory=dict)  # new memory text -> kind code


class RewardScorer:
    """Scores batches of :class:`RewardSample`; safe to share across batches (not across event loops).

    ``llm`` and ``embedder`` may be given (tests, shared clients); otherwise they are built from
    the config on first use. Use :meth:`score` from async code or :meth:`score_sync` from sync
    code; :meth:`aclose` closes a client the scorer created.
    """

    def __init__(self, config: ScorerConfig | None = None, *, llm: Any = None, embedder: Any = None) -> None:
        from membuilder import _core

        self.config = config or ScorerConfig()
        self._core = _core
        self.kernel = _core.RewardKernel(_core.RewardConfig(**self.config.reward))
        self._llm = llm
        self._own_llm = llm is None
        self._embedder = embedder
        self._tokenizer: Any = None
        self._states: OrderedDict[Path, Any] = OrderedDict()
        self._state_lock = threading.Lock()
        self.stats = ScorerStats(protocol=self.config.resolved.record())
        # The ablation's generator is seeded once and drawn from across batches, as the reference's
        # process-wide generator is: the same seed gives the same drop sequence over a run.
        self._sparse_rng = random.Random(self.config.sparse_seed)
        logger.info("reward protocol %s: %s", self.config.resolved.label, json.dumps(self.stats.protocol))

    # -- lazily built collaborators ---------------------------------------------------------

    def _endpoint(self) -> Endpoint:
        # provider None: "compatible" with a base_url, else "openai" (Endpoint.resolved_provider).
        c = self.config
        return Endpoint(
            c.provider,
            c.base_url,
            c.api_key,
            timeout=c.timeout,
            max_retries=c.max_retries,
            max_concurrency=c.max_concurrency,
        )

    @property
    def llm(self) -> Any:
        # Every judge mode needs the answer model; only "llm" also needs judge calls.
        if self._llm is None:
            self._llm = self._endpoint().make_llm(
                self.config.answer_model,
                cache_dir=Path(self.config.llm_cache_dir) if self.config.llm_cache_dir else None,
            )
        return self._llm

    @property
    def embedder(self) -> Any:
        if self._embedder is None:
            cache = Path(self.config.embed_cache_dir) if self.config.embed_cache_dir else None
            self._embedder = self._endpoint().make_embedder(self.config.embedder, cache_dir=cache)
        return self._embedder

    def _count_tokens(self, text: str) -> float:
        if self.config.tokenizer is None:
            return float(len(text) // 4)  # _core.approx_tokens: code points / 4, as len() counts them
        if self._tokenizer is None:
            from transformers import AutoTokenizer  # only with the [train] extra

            self._tokenizer = AutoTokenizer.from_pretrained(self.config.tokenizer, local_files_only=True)
        return float(len(self._tokenizer.encode(text, add_special_tokens=False)))

    async def aclose(self) -> None:
        if self._own_llm and self._llm is not None:
            await self._llm.aclose()
            self._llm = None

    # -- states -----------------------------------------------------------------------------

    def _load_state(self, path: Path) -> Any:
        with self._state_lock:
            state = self._states.get(path)
            if state is not None:
                self._states.move_to_end(path)
                self.stats.state_cache_hits += 1
                return state
        state = self._core.MemoryState.load(path)  # raises StateFileError naming the file
        with self._state_lock:
            self._states[path] = state
            self._states.move_to_end(path)
            self.stats.states_loaded += 1
            while len(self._states) > self.config.max_states:
                self._states.popitem(last=False)
        return state

    # -- the batch --------------------------------------------------------------------------

    def score_sync(
        self, samples: Sequence[RewardSample], *, pairing: str | None = None
    ) -> list[SampleReward]:
        """:meth:`score` for synchronous callers (runs its own event loop)."""

        async def run() -> list[SampleReward]:
            try:
                return await self.score(samples, pairing=pairing)
            finally:
                await self.aclose()

        return asyncio.run(run())

    async def score(
        self, samples: Sequence[RewardSample], *, pairing: str | None = None
    ) -> list[SampleReward]:
        """Rewards for ``samples``, in order. ``pairing`` overrides the config's.

        Raises ``ValueError`` for an unknown pairing or an embedder whose dimension differs from
        a state's; every per-sample problem becomes an invalid :class:`SampleReward` instead.
        """
        pairing = pairing or self.config.pairing
        if pairing not in PAIRINGS:
            raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
        n = len(samples)
        self.stats.batches += 1
        self.stats.samples += n
        if n == 0:
            return []
        core = self._core
        agents = [s.agent for s in samples]
        parses = await asyncio.to_thread(core.parse_actions_batch, agents, [s.output for s in samples])
        if self.config.format_gate == "strict":
            # The gate decides the reward; an output that passes it but that our parser cannot
            # apply adds nothing to the memory (and one our parser could apply but the gate
            # refuses adds nothing either: the reference sends such an agent as empty).
            gate = [strict_format_ok(s.agent, s.output) for s in samples]
        else:
            gate = [bool(p.ok) for p in parses]
        usable = [g and bool(p.ok) for g, p in zip(gate, parses)]
        expert, expert_facts = await asyncio.to_thread(self._parse_experts, samples, usable, pairing)

        groups, sample_group, paired_with_expert = self._make_groups(
            samples, parses, gate, usable, expert, pairing
        )
        self.stats.groups += len(groups)
        dropped = self._sparse_drops(samples, gate)
        for g in groups:
            g.dropped = bool(g.members) and all(self._rollout_key(samples[m]) in dropped for m in g.members)
        live, plans = await self._build_views(groups)
        await self._answer_and_judge(live, plans)

        # Per-sample arrays for the kernel.
        format_ok = np.array(gate, dtype=bool)
        if self.config.tokenizer is None:
            policy_tokens = core.approx_content_tokens(parses)  # no text crosses the boundary
        else:
            policy_tokens = np.array([self._count_tokens(p.content_text()) for p in parses], dtype=np.float64)
        expert_tokens = np.zeros(n, dtype=np.float64)
        valid = np.ones(n, dtype=bool)
        task = np.zeros(n, dtype=np.float64)
        errors: list[str | None] = [None] * n
        width = max((g.kinds.shape[0] for g in groups if g.kinds is not None), default=1)
        kinds = np.full((n, max(width, 1)), -1, dtype=np.int8)
        expert_counts: dict[str, float] = {}  # expert content -> tokens, counted once per batch
        for i, s in enumerate(samples):
            tokens = self._expert_tokens(s.ground_truth, expert, expert_facts, expert_counts)
            if tokens is None:
                valid[i] = False
                errors[i] = (
                    f"no expert length for agent {s.agent!r} (needs expert_outputs or expert_content_chars)"
                )
                self.stats.count_failure("missing_expert_length")
            else:
                expert_tokens[i] = tokens
            if self._rollout_key(s) in dropped:
                task[i] = self.config.sparse_default_reward  # no QA, no retrieval: no dominant kind
                continue
            gi = sample_group[i]
            if gi is None:
                continue  # format gate failed in expert pairing: reward 0 without any QA
            g = groups[gi]
            if g.error is not None:
                valid[i] = False
                errors[i] = errors[i] or g.error
                continue
            task[i] = g.task
            if g.kinds is not None:
                kinds[i, : g.kinds.shape[0]] = g.kinds
        batch = self.kernel.score(
            agents, format_ok, task, policy_tokens, expert_tokens, retrieved_kinds=kinds, valid=valid
        )
        self.stats.failed_samples += int((~valid).sum())
        out: list[SampleReward] = []
        retrieved = batch.retrieved.tolist()  # the kernel's counts, the ones its dominant kind is from
        for i in range(n):
            out.append(
                SampleReward(
                    reward=float(batch.reward[i]),
                    weight=float(batch.weight[i]),
                    valid=bool(valid[i]),
                    format_ok=bool(format_ok[i]),
                    task=float(task[i]) if valid[i] else 0.0,
                    length_penalty=float(batch.length_penalty[i]),
                    policy_tokens=float(policy_tokens[i]),
                    expert_tokens=float(expert_tokens[i]),
                    retrieved=tuple(retrieved[i]),  # type: ignore[arg-type]
                    dominant=batch.dominant[i],
                    paired_with_expert=paired_with_expert[i],
                    error=errors[i],
                    sparse_dropped=self._rollout_key(samples[i]) in dropped,
                    protocol=self.config.resolved.name,
                    protocol_overridden=bool(self.config.resolved.overrides),
                )
            )
        return out

    # -- steps ------------------------------------------------------------------------------

    @staticmethod
    def _rollout_key(s: RewardSample) -> tuple[str, int, int]:
        return (s.ground_truth.conversation_id, s.ground_truth.session_index, s.rollout_index)

    def _sparse_drops(
        self, samples: Sequence[RewardSample], gate: Sequence[bool]
    ) -> set[tuple[str, int, int]]:
        """Session-rollouts the sparse ablation gives the default reward instead of their QA.

        One draw per session-rollout in order of first appearance, and only for those with at
        least one output past the format gate (the reference draws only where something parsed).
        """
        cfg = self.config
        if not cfg.sparse_reward or cfg.sparse_drop_rate <= 0.0:
            return set()
        order: dict[tuple[str, int, int], bool] = {}
        for s, ok in zip(samples, gate):
            key = self._rollout_key(s)
            order[key] = order.get(key, False) or ok
        rng, rate = self._sparse_rng, cfg.sparse_drop_rate
        dropped = {key for key, any_ok in order.items() if any_ok and rng.random() < rate}
        self.stats.sparse_dropped += len(dropped)
        return dropped

    def _parse_experts(
        self, samples: Sequence[RewardSample], usable: Sequence[bool], pairing: str
    ) -> tuple[dict[tuple[str, int, str], Any], dict[tuple[str, int, str], Any]]:
        """The expert's output for every (conversation, session, agent) the batch mentions: what
        the export recorded about it (:class:`~membuilder.training.samples.ExpertFacts`: gate and
        content) and, where its actions are applied, its parse. Returns ``(parses, facts)``.

        The recorded facts give the gate and the length, so an output is parsed only to apply it
        (in ``expert`` pairing the other agents' outputs of a usable sample, in ``joint`` the
        agents a session-rollout lacks; one that failed the gate adds nothing and is not parsed),
        or to measure it when the ground truth carries no facts.
        """
        first: dict[tuple[str, int, str], tuple[str, Any]] = {}  # the first sample's raw and facts
        for s in samples:
            gt = s.ground_truth
            for agent, raw in gt.expert_outputs.items():
                first.setdefault(
                    (gt.conversation_id, gt.session_index, agent), (raw, gt.expert_facts.get(agent))
                )
        wanted: set[tuple[str, int, str]] = set()

        def want(key: tuple[str, int, str], to_apply: bool) -> None:
            if key in first:
                facts = first[key][1]
                if facts is None or (to_apply and facts.ok):
                    wanted.add(key)

        rollouts: dict[tuple[str, int, int], set[str]] = {}
        for i, s in enumerate(samples):
            gt = s.ground_truth
            want((gt.conversation_id, gt.session_index, s.agent), to_apply=False)
            if pairing == "expert" and usable[i]:
                for a in AGENTS:
                    if a != s.agent:
                        want((gt.conversation_id, gt.session_index, a), to_apply=True)
            elif pairing == "joint":
                rollouts.setdefault(self._rollout_key(s), set()).add(s.agent)
        for (conv, sess, _r), present in rollouts.items():
            for a in AGENTS:
                if a not in present:
                    want((conv, sess, a), to_apply=True)
        keys = [k for k in first if k in wanted]
        raws = [first[k][0] for k in keys]
        parsed = self._core.parse_actions_batch([k[2] for k in keys], raws) if keys else []
        facts = {k: f for k, (_raw, f) in first.items() if f is not None}
        return dict(zip(keys, parsed)), facts

    def _expert_tokens(
        self,
        gt: GroundTruth,
        expert: dict[tuple[str, int, str], Any],
        facts: dict[tuple[str, int, str], Any],
        counted: dict[str, float],
    ) -> float | None:
        key = (gt.conversation_id, gt.session_index, gt.agent)
        recorded = facts.get(key)
        parse = expert.get(key)
        if recorded is not None or parse is not None:
            text = recorded.content_text if recorded is not None else parse.content_text()
            tokens = counted.get(text)
            if tokens is None:
                tokens = counted[text] = self._count_tokens(text)
            return tokens
        if gt.expert_content_chars is not None:
            # Only a character count is known: characters / 4 is the documented unit for this case.
            return float(gt.expert_content_chars // 4)
        if gt.agent == "core":
            return 0.0  # the core penalty does not use the expert's length
        return None

    def _make_groups(
        self,
        samples: Sequence[RewardSample],
        parses: Sequence[Any],
        gate: Sequence[bool],
        usable: Sequence[bool],
        expert: dict[tuple[str, int, str], Any],
        pairing: str,
    ) -> tuple[list[_Group], list[int | None], list[int]]:
        groups: list[_Group] = []
        by_key: dict[tuple, int] = {}
        sample_group: list[int | None] = [None] * len(samples)
        paired_with_expert = [0] * len(samples)

        def add(key_parts: dict[str, Any], gt: GroundTruth, members: list[int]) -> None:
            path = gt.resolve_state(self.config.state_root)
            used = [key_parts[a] for a in AGENTS if key_parts.get(a) is not None]
            # Identical actions on the same base give the same memory: compute it once.
            key = (str(path), gt.session_key, tuple(p.to_json() if p is not None else "" for p in used))
            key = key + (tuple(p.agent for p in used),)
            gi = by_key.get(key)
            if gi is None:
                gi = len(groups)
                by_key[key] = gi
                groups.append(_Group(state_path=path, gt=gt, parses=used))
            groups[gi].members.extend(members)
            for m in members:
                sample_group[m] = gi

        if pairing == "expert":
            for i, s in enumerate(samples):
                if not gate[i]:
                    continue  # the format gate sets the reward to 0; no memory to evaluate
                gt = s.ground_truth
                chosen = {
                    a: expert.get((gt.conversation_id, gt.session_index, a)) for a in AGENTS if a != s.agent
                }
                chosen = {a: p for a, p in chosen.items() if p is not None and p.ok}
                # Through the gate but not applicable by our parser (e.g. a core APPEND whose
                # content is an object): it adds nothing and the rest is still answered, as in
                # joint pairing.
                if usable[i]:
                    chosen[s.agent] = parses[i]
                add(chosen, gt, [i])
        else:
            rollouts: dict[tuple[str, int, int], dict[str, int]] = {}
            for i, s in enumerate(samples):
                gt = s.ground_truth
                slot = rollouts.setdefault((gt.conversation_id, gt.session_index, s.rollout_index), {})
                if s.agent in slot:
                    raise ValueError(
                        f"joint pairing got two rollouts {s.rollout_index} of agent {s.agent!r} for session "
                        f"{gt.conversation_id}/{gt.session_index}; rollout indices must be unique per prompt"
                    )
                slot[s.agent] = i
            for (conv, sess, _r), slot in rollouts.items():
                first = next(iter(slot.values()))
                gt = samples[first].ground_truth
                chosen: dict[str, Any] = {}
                filled = 0
                for a in AGENTS:
                    if a in slot:
                        p = parses[slot[a]]
                        chosen[a] = p if usable[slot[a]] else None  # a failed output adds nothing
                    else:
                        p = expert.get((conv, sess, a))
                        chosen[a] = p if p is not None and p.ok else None
                        filled += 1
                members = list(slot.values())
                for m in members:
                    paired_with_expert[m] = filled
                add(chosen, gt, members)
        return groups, sample_group, paired_with_expert

    async def _build_views(self, groups: list[_Group]) -> tuple[list[_Group], list[Any]]:
        """Load base states, make one view per group and plan its actions; returns the live
        groups and their plans. Nothing is embedded or committed yet (see :meth:`_commit`)."""
        core = self._core
        groups = [g for g in groups if not g.dropped]
        paths = list(dict.fromkeys(g.state_path for g in groups))

        async def load(path: Path) -> tuple[Path, Any, str | None]:
            try:
                return path, await asyncio.to_thread(self._load_state, path), None
            except (core.StateFileError, OSError) as exc:
                return path, None, f"base state {path} could not be loaded: {exc}"

        loaded = {p: (s, err) for p, s, err in await asyncio.gather(*(load(p) for p in paths))}
        live: list[_Group] = []
        for g in groups:
            state, err = loaded[g.state_path]
            if state is None:
                g.error = err
                self.stats.count_failure("state_load")
                continue
            g.base = state
            g.view = state.view()
            live.append(g)
        if not live:
            return [], []
        specs = {g.gt.embedder for g in live if g.gt.embedder}
        if specs and specs != {self.config.embedder}:
            raise ValueError(
                f"the base states were built with embedder {sorted(specs)} but the scorer uses "
                f"{self.config.embedder!r}; set the reward kwarg embedder to the states' embedder"
            )
        dims = {g.view.dim for g in live}
        if self.embedder.dim not in dims or len(dims) != 1:
            raise ValueError(
                f"embedder {self.embedder.name!r} has dimension {self.embedder.dim} but the base states have "
                f"{sorted(dims)}; score with the embedder the states were built with"
            )
        provs = [core.Provenance(g.gt.conversation_id, g.gt.session_index, g.gt.timestamp) for g in live]
        plans = await asyncio.to_thread(
            core.plan_views, [g.view for g in live], [g.parses for g in live], provs
        )
        if self.config.kind_prefix:
            for g in live:
                g.new_kinds = _new_memory_kinds(g.parses)
        return live, list(plans)

    async def _commit(self, groups: list[_Group], plans: list[Any], vectors: dict[str, np.ndarray]) -> None:
        """Embed the texts of ``plans`` that ``vectors`` (shared by the whole batch, so that a text is
        embedded once per batch) does not hold yet, then commit the plans to their groups' views."""
        if self.config.kind_prefix:
            # A new memory is embedded as the reference stores it, tagged with its kind; old texts
            # a plan embeds to find the entry they name stay bare (they are matched, not stored).
            texts = [_tagged(t, g.new_kinds.get(t)) for g, plan in zip(groups, plans) for t in plan.texts]
        else:
            texts = [t for plan in plans for t in plan.texts]
        new = [t for t in dict.fromkeys(texts) if t not in vectors]
        if new:
            vecs = np.asarray(await self.embedder.aembed_passages(new), dtype=np.float32)
            self.stats.texts_embedded += len(new)
            vectors.update(zip(new, vecs))
        if texts:
            stacked = np.ascontiguousarray(np.stack([vectors[t] for t in texts]))
        else:
            stacked = np.zeros((0, self.embedder.dim), dtype=np.float32)
        await asyncio.to_thread(self._core.commit_views, [g.view for g in groups], plans, stacked)

    def _chunks(self, rows_per_group: Sequence[int]) -> list[tuple[int, int]]:
        """Group ranges to embed, commit and send in turn. The first holds about one round of
        ``max_concurrency`` questions, so that calls start after a small embedding batch; each
        next one is twice the last, so that few, large embedding batches follow while the
        calls already sent are answered."""
        out: list[tuple[int, int]] = []
        target = self.config.max_concurrency
        start = rows = 0
        for gi, n in enumerate(rows_per_group):
            rows += n
            if rows >= target:
                out.append((start, gi + 1))
                start, rows, target = gi + 1, 0, 2 * target
        if start < len(rows_per_group):
            out.append((start, len(rows_per_group)))
        return out

    async def _answer_and_judge(self, live: list[_Group], plans: list[Any]) -> None:
        """Commit, retrieve for, answer and judge the groups chunk by chunk: the questions of one
        chunk go out while the next chunk's memories are embedded. Each distinct answer prompt and
        judge triple is sent once per batch, whichever chunk needs it first."""
        core = self._core
        if not live:
            return
        k = self.config.top_k
        limit = self.config.max_questions

        def qas(g: _Group) -> tuple[Any, ...]:
            return g.gt.qa[:limit] if limit else g.gt.qa

        questions = list(dict.fromkeys(qa.question for g in live for qa in qas(g)))
        qvecs = np.asarray(await self.embedder.aembed_queries(questions), dtype=np.float32)
        qrow = {q: i for i, q in enumerate(questions)}
        pair_group: list[int] = []
        pair_qa: list[Any] = []
        for gi, g in enumerate(live):
            for qa in qas(g):
                pair_group.append(gi)
                pair_qa.append(qa)
        rows_per_group = [len(qas(g)) for g in live]
        offsets = np.zeros(len(live) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum(rows_per_group)
        view_index = np.asarray(pair_group, dtype=np.int64)
        queries = np.ascontiguousarray(qvecs[[qrow[qa.question] for qa in pair_qa]])
        ids = np.full((len(pair_qa), k), -1, dtype=np.int64)
        kinds = np.full((len(pair_qa), k), -1, dtype=np.int8)

        answer_tasks: dict[str, asyncio.Task] = {}
        judge_tasks: dict[tuple[str, str, str], asyncio.Task] = {}

        def answer_task(messages: list[dict]) -> asyncio.Task:
            key = json.dumps(messages, sort_keys=True, ensure_ascii=False)
            task = answer_tasks.get(key)
            if task is None:
                task = asyncio.ensure_future(self._answer(messages))
                answer_tasks[key] = task
            return task

        def judge_task(question: str, gold: str, answer: str) -> asyncio.Task:
            key = (question, gold, answer)
            task = judge_tasks.get(key)
            if task is None:
                task = asyncio.ensure_future(self._judge(question, gold, answer))
                judge_tasks[key] = task
            return task

        from membuilder.answer import build_answer_messages

        async def chain(row: int) -> float:
            g = live[pair_group[row]]
            qa = pair_qa[row]
            texts = [t for t in g.view.texts(ids[row]) if t is not None]
            if self.config.kind_prefix:
                texts = [_tagged(t, int(c)) for t, c in zip(texts, kinds[row][kinds[row] >= 0])]
            now = qa.asked_at or g.gt.timestamp or ""
            messages = build_answer_messages(g.view.core, texts, qa.question, now)
            answer = await answer_task(messages)
            return await judge_task(qa.question, qa.answer, answer)

        vectors: dict[str, np.ndarray] = {}
        chains: list[asyncio.Future] = []
        try:
            for a, b in self._chunks(rows_per_group):
                await self._commit(live[a:b], plans[a:b], vectors)
                r0, r1 = int(offsets[a]), int(offsets[b])
                if r0 == r1:
                    continue
                local = view_index[r0:r1] - a  # view indices into live[a:b]
                if self.config.qa_scope == "rollout_only":
                    got_ids, got_kinds = await asyncio.to_thread(
                        self._rollout_only_hits, live[a:b], local, queries[r0:r1], k
                    )
                else:
                    got_ids, _scores, got_kinds = await asyncio.to_thread(
                        core.search_views, [g.view for g in live[a:b]], local, queries[r0:r1], k
                    )
                ids[r0:r1], kinds[r0:r1] = got_ids, got_kinds
                chains.extend(asyncio.ensure_future(chain(r)) for r in range(r0, r1))
            results = await asyncio.gather(*chains, return_exceptions=True)
        except BaseException:
            # Embedding or retrieval of a later chunk failed: stop the calls already sent.
            for t in (*chains, *answer_tasks.values(), *judge_tasks.values()):
                t.cancel()
            raise
        self.stats.answer_calls += len(answer_tasks)
        self.stats.judge_calls += len(judge_tasks) if self.config.judge == "llm" else 0

        per_group: list[list[float]] = [[] for _ in live]
        for row, res in enumerate(results):
            g = live[pair_group[row]]
            if isinstance(res, _CallFailed):
                if g.error is None:
                    g.error = str(res)
                    self.stats.count_failure(res.reason)
                continue
            if isinstance(res, BaseException):
                raise res  # a bug, not a model or network problem: surface it
            per_group[pair_group[row]].append(float(res))
        for gi, g in enumerate(live):
            rows = slice(int(offsets[gi]), int(offsets[gi + 1]))
            g.kinds = np.ascontiguousarray(kinds[rows].reshape(-1).astype(np.int8))
            if g.error is None:
                g.task = float(np.mean(per_group[gi])) if per_group[gi] else 0.0

    def _rollout_only_hits(
        self, live: list[_Group], view_index: np.ndarray, queries: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """The reference's QA scope: of the top 2k over the whole index, only the rollout's own new
        memories, at most k, in score order.

        The reference searches one index that holds the saved state (every entry tagged with the
        conversation's user id) and the rollout's new memories (untagged), then drops entries whose
        user id differs from the session-rollout id it searches with: all of the saved state. Its
        index also keeps the entries an UPDATE or MERGE replaced, so a new memory is in its top 2k
        when fewer than 2k entries of the base (replaced ones included) and of the new memories
        score above it; ties go to the base, which comes first in that index.
        """
        core = self._core
        k2 = 2 * k
        ids, scores, kinds = core.search_views([g.view for g in live], view_index, queries, k2)
        # The same queries against the untouched bases: the base entries competing for the 2k slots.
        bases: list[Any] = []
        slot: dict[int, int] = {}
        group_base: list[int] = []
        for g in live:
            group_base.append(slot.setdefault(id(g.base), len(slot)))
            if len(bases) < len(slot):
                bases.append(g.base)
        base_index = np.asarray([group_base[int(gi)] for gi in view_index], dtype=np.int64)
        _bids, bscores, _bkinds = core.search_views(bases, base_index, queries, k2)
        added = [set(g.view.added_ids()) for g in live]
        out_ids = np.full((len(view_index), k), -1, dtype=np.int64)
        out_kinds = np.full((len(view_index), k), -1, dtype=np.int8)
        for row, gi in enumerate(view_index):
            new_set = added[int(gi)]
            base_scores = bscores[row][np.isfinite(bscores[row])]
            kept = 0
            new_above = 0
            for j in range(ids.shape[1]):
                eid = int(ids[row, j])
                if eid < 0 or eid not in new_set:
                    continue
                rank = int((base_scores >= scores[row, j]).sum()) + new_above
                new_above += 1
                if rank >= k2:
                    break
                out_ids[row, kept] = eid
                out_kinds[row, kept] = kinds[row, j]
                kept += 1
                if kept == k:
                    break
        return out_ids, out_kinds

    async def _answer(self, messages: list[dict]) -> str:
        from membuilder.llm import LLMError

        try:
            result = await self.llm.chat(
                messages, model=self.config.answer_model, temperature=0.0, tag="answer"
            )
        except LLMError as exc:
            raise _CallFailed("answer_call", str(exc)) from exc
        return result.text

    async def _judge(self, question: str, gold: str, answer: str) -> float:
        if self.config.judge == "exact":
            from membuilder.metrics import exact_match

            return float(exact_match(answer, gold))
        if self.config.judge == "f1":
            from membuilder.metrics import token_f1

            return float(token_f1(answer, gold))
        from membuilder.judge import build_judge_messages, parse_judge_label, read_generous_label
        from membuilder.llm import LLMError

        model = self.config.judge_model or self.config.answer_model
        # The reference's reward judges with its evaluation judge (eval/llm_judge.py), so the
        # reward's judge wording and reading follow the protocol's judge style, as in `eval`.
        style = self.config.resolved.judge_style
        read = parse_judge_label if style == "strict" else read_generous_label
        try:
            result = await self.llm.chat(
                build_judge_messages(question, gold, answer, style), model=model, temperature=0.0, tag="judge"
            )
        except LLMError as exc:
            raise _CallFailed("judge_call", str(exc)) from exc
        label = read(result.text)
        if label is None:
            if self.config.resolved.judge_unreadable == "wrong":
                # The paper's judge counts a verdict it cannot read as WRONG (eval/llm_judge.py).
                self.stats.count_failure("judge_unreadable_as_wrong")
                return 0.0
            raise _CallFailed("judge_unreadable", f"judge answered {result.text[:200]!r}")
        return 1.0 if label else 0.0


def _new_memory_kinds(parses: Sequence[Any]) -> dict[str, int]:
    """New memory text -> kind code for the memory agents' ADD / UPDATE / MERGE operations."""
    out: dict[str, int] = {}
    for p in parses:
        if p.agent not in BANK_KINDS:
            continue
        code = BANK_KINDS.index(p.agent)
        for op in json.loads(p.to_json()).get("operations", []):
            text = op.get("memory") if op.get("action") == "ADD" else op.get("new_memory")
            if isinstance(text, str) and text:
                out[text] = code
    return out


def _tagged(text: str, code: int | None) -> str:
    """``[EPISODIC] text`` for a memory of kind ``code`` (as the reference stores memories)."""
    if code is None or code < 0:
        return text
    tag = f"[{BANK_KINDS[code].upper()}]"
    return text if text.startswith(tag) else f"{tag} {text}"
