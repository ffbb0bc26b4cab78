"""The verl reward function: ``compute_score`` for ``reward.custom_reward_function``.

verl 0.9's trainer computes rewards per sample, asynchronously, in reward-loop workers (Ray
actors): each finished rollout calls ``compute_score(data_source, solution_str, ground_truth,
extra_info, **reward_kwargs)``. Scoring one rollout at a time would waste the batching that makes
the reward cheap, so :func:`compute_score` hands each sample to a per-process
:class:`RewardBatcher` that collects the samples arriving within a short window and scores them
together with one :class:`~membuilder.training.scorer.RewardScorer` (whose state cache lives as
long as the worker).

Configure it in the launch script (every key is a reward kwarg)::

    reward.custom_reward_function.path=pkg://membuilder.training.reward
    reward.custom_reward_function.name=compute_score
    +reward.custom_reward_function.reward_kwargs.protocol=paper
    +reward.custom_reward_function.reward_kwargs.answer_model=gpt-4.1-mini

``protocol`` (``paper``, the default, or ``membuilder``) sets what the reward means; every
protocol setting has its own kwarg (``pairing``, ``qa_scope``, ``format_gate``, ``kind_prefix``,
``max_questions``, ``answer_model``, ``judge_model``, ``embedder``, ``sparse_reward``,
``sparse_drop_rate``, ``sparse_default_reward``, ``sparse_seed``) that overrides it and is recorded
(``protocol_id`` / ``protocol_overridden`` in every sample's metrics, the whole record in the
scorer's stats and the worker's log).

``pairing=joint`` needs the rollout index of each sample, which verl's stock reward managers do
not pass on: use :class:`membuilder.training.reward_manager.MembuilderRewardManager` and a single
reward worker (``reward.num_workers=1``) so that a session's four agents meet in one process.

The returned dict has ``score`` and the same extra keys for every sample (see
:meth:`SampleReward.to_verl`); ``adrpo_weight`` is what the ADRPO trainer multiplies the GRPO
advantages by.

>>> from membuilder.training.reward import scorer_config_from_kwargs
>>> cfg = scorer_config_from_kwargs({"protocol": "membuilder", "pairing": "joint", "attribution_alpha": 2})
>>> cfg.reward, cfg.resolved.label, dict(cfg.resolved.overrides)
({'attribution_alpha': 2.0}, 'membuilder+overrides', {'reward_pairing': 'joint'})
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import weakref
from collections.abc import Mapping
from typing import Any

from membuilder._core import AGENTS
from membuilder.training.samples import GroundTruth, GroundTruthError, RewardSample, SampleReward
from membuilder.training.scorer import RewardScorer, ScorerConfig

logger = logging.getLogger(__name__)

# RewardConfig fields accepted directly as reward kwargs (the rest of the kwargs are ScorerConfig's).
REWARD_FIELDS = (
    "length_lambda",
    "core_theta_min",
    "core_theta_max",
    "ratio_lower",
    "ratio_upper",
    "ratio_upper_full",
    "ratio_lower_full",
    "min_abs_diff",
    "attribution_alpha",
    "length_penalty_enabled",
    "attribution_enabled",
)
BATCHER_FIELDS = ("batch_window_s", "max_batch", "joint_wait_s")


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"not a boolean: {value!r}")
    return bool(value)


def scorer_config_from_kwargs(kwargs: Mapping[str, Any]) -> ScorerConfig:
    """Build a :class:`ScorerConfig` from flat reward kwargs (strings from the command line allowed).

    Unknown keys raise ``ValueError`` listing the accepted ones, so a typo in a launch script
    fails at the first reward instead of being ignored.
    """
    fields = {f.name: f for f in dataclasses.fields(ScorerConfig)}
    cfg: dict[str, Any] = {}
    reward: dict[str, float | bool] = {}
    for key, value in kwargs.items():
        if key in BATCHER_FIELDS:
            continue
        if key in REWARD_FIELDS:
            reward[key] = _as_bool(value) if key.endswith("_enabled") else float(value)
        elif key in fields and key != "reward":
            ftype = str(fields[key].type)
            if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
                cfg[key] = None
            elif ftype.startswith("bool"):
                cfg[key] = _as_bool(value)
            elif ftype.startswith("int"):
                cfg[key] = int(value)
            elif ftype.startswith("float"):
                cfg[key] = float(value)
            else:
                cfg[key] = str(value)
        else:
            accepted = sorted([*fields.keys() - {"reward"}, *REWARD_FIELDS, *BATCHER_FIELDS])
            raise ValueError(f"unknown membuilder reward kwarg {key!r}; accepted: {', '.join(accepted)}")
    return ScorerConfig(**cfg, reward=reward)


class RewardBatcher:
    """Collects samples from concurrent callers and scores them in batches.

    ``expert`` pairing: every sample is ready at once; a batch is flushed ``batch_window_s``
    seconds after its first sample arrives, or as soon as ``max_batch`` samples wait.
    ``joint`` pairing: a session-rollout is ready when all four agents' samples have arrived; one
    that is still incomplete after ``joint_wait_s`` is scored with the expert's actions for the
    missing agents (reported per sample as ``paired_with_expert``).
    """

    def __init__(
        self,
        scorer: RewardScorer,
        *,
        pairing: str,
        batch_window_s: float = 0.2,
        max_batch: int = 4096,
        joint_wait_s: float = 600.0,
    ) -> None:
        self.scorer = scorer
        self.pairing = pairing
        self.batch_window_s = batch_window_s
        self.max_batch = max_batch
        self.joint_wait_s = joint_wait_s
        self._pending: list[tuple[RewardSample, asyncio.Future, float]] = []
        self._flusher: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._inflight: set[asyncio.Task] = set()

    async def score(self, sample: RewardSample) -> SampleReward:
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((sample, fut, time.monotonic()))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush_loop())
        if len(self._pending) >= self.max_batch:
            self._wake.set()
        return await fut

    def _key(self, s: RewardSample) -> tuple[str, int, int]:
        gt = s.ground_truth
        return (gt.conversation_id, gt.session_index, s.rollout_index)

    def _take_ready(self, force_all: bool) -> list[tuple[RewardSample, asyncio.Future, float]]:
        if self.pairing == "expert" or force_all:
            ready, self._pending = self._pending, []
            return ready
        now = time.monotonic()
        groups: dict[tuple[str, int, int], list[int]] = {}
        for i, (s, _f, _t) in enumerate(self._pending):
            groups.setdefault(self._key(s), []).append(i)
        take: set[int] = set()
        for idx in groups.values():
            agents = {self._pending[i][0].agent for i in idx}
            oldest = min(self._pending[i][2] for i in idx)
            if agents == set(AGENTS) or now - oldest >= self.joint_wait_s:
                take.update(idx)
        ready = [p for i, p in enumerate(self._pending) if i in take]
        self._pending = [p for i, p in enumerate(self._pending) if i not in take]
        return ready

    async def _flush_loop(self) -> None:
        while self._pending:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.batch_window_s)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            ready = self._take_ready(force_all=False)
            if ready:
                task = asyncio.ensure_future(self._run(ready))
                self._inflight.add(task)
                task.add_done_callback(self._inflight.discard)

    async def _run(self, ready: list[tuple[RewardSample, asyncio.Future, float]]) -> None:
        samples = [s for s, _f, _t in ready]
        try:
            results = await self.scorer.score(samples, pairing=self.pairing)
        except BaseException as exc:  # hand the error to every waiting caller, never drop it
            for _s, fut, _t in ready:
                if not fut.done():
                    fut.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (_s, fut, _t), res in zip(ready, results):
            if not fut.done():
                fut.set_result(res)


# One batcher per (event loop, configuration) in each worker process. The reward-loop worker is
# a long-lived Ray actor, so the scorer's state cache survives across training steps; a batcher
# (and its HTTP client) never outlives the loop it was made on.
_BATCHERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple, RewardBatcher]] = (
    weakref.WeakKeyDictionary()
)


def _batcher_for(kwargs: Mapping[str, Any]) -> RewardBatcher:
    per_loop = _BATCHERS.setdefault(asyncio.get_running_loop(), {})
    key = tuple(sorted((k, repr(v)) for k, v in kwargs.items()))
    batcher = per_loop.get(key)
    if batcher is None:
        config = scorer_config_from_kwargs(kwargs)
        extra = {k: kwargs[k] for k in BATCHER_FIELDS if k in kwargs}
        batcher = RewardBatcher(
            RewardScorer(config),
            pairing=config.pairing,
            batch_window_s=float(extra.get("batch_window_s", 0.2)),
            max_batch=int(extra.get("max_batch", 4096)),
            joint_wait_s=float(extra.get("joint_wait_s", 600.0)),
        )
        per_loop[key] = batcher
    return batcher


def _rollout_index(extra_info: Mapping[str, Any] | None, pairing: str) -> int:
    if extra_info is not None and extra_info.get("rollout_index") is not None:
        return int(extra_info["rollout_index"])
    if pairing == "joint":
        raise ValueError(
            "pairing=joint needs each sample's rollout index in extra_info['rollout_index']; set "
            "reward.reward_manager.source=importlib, reward.reward_manager.name=MembuilderRewardManager and "
            "reward.reward_manager.module.path=pkg://membuilder.training.reward_manager"
        )
    return 0


async def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: Any,
    extra_info: Mapping[str, Any] | None = None,
    **reward_kwargs: Any,
) -> dict[str, float]:
    """verl reward function: the reward of one rollout, scored in a batch with its neighbours.

    ``ground_truth`` is the RL export's ground truth (a mapping or its JSON text). Returns a dict
    with ``score`` (the reward) and the extra keys of :meth:`SampleReward.to_verl`, the same for
    every sample. A sample whose ground truth is malformed raises :class:`GroundTruthError` (a
    data bug that must stop the run); one whose reward cannot be computed returns ``score`` 0,
    ``adrpo_weight`` 0 and ``reward_valid`` 0.
    """
    # verl adds its own keys (reward_router_address, ...) when a reward model is enabled; they
    # are not ours to interpret.
    kwargs = {
        k: v for k, v in reward_kwargs.items() if k not in ("reward_router_address", "reward_model_tokenizer")
    }
    batcher = _batcher_for(kwargs)
    try:
        gt = GroundTruth.from_obj(ground_truth)
    except GroundTruthError as exc:
        raise GroundTruthError(f"{exc} (data_source={data_source!r})") from exc
    sample = RewardSample(gt, solution_str, _rollout_index(extra_info, batcher.pairing))
    result = await batcher.score(sample)
    if not result.valid:
        logger.warning(
            "reward not computed for %s/%s agent %s rollout %d: %s",
            gt.conversation_id,
            gt.session_index,
            gt.agent,
            sample.rollout_index,
            result.error,
        )
    return result.to_verl()
