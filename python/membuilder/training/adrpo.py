"""ADRPO on verl's v1 trainer: GRPO advantages times each sample's attribution weight.

verl's advantage estimators see only rewards, masks, uids and the algorithm config, so a weight
per sample cannot reach them. The weight instead travels with the sample: the reward function
returns it as the extra key ``adrpo_weight`` (attribution weight alpha or 1, and 0 for a sample
whose reward could not be computed), verl stores it with the sample's
``extra_fields["reward_extra_info"]``, and :class:`AdrpoSyncTrainer` — verl's synchronous v1
trainer with one step added — multiplies the advantages by it right after verl has computed
GRPO's. Nothing is patched and no global state is shared between processes.

The trainer is registered in verl's trainer registry as ``adrpo_sync`` when this module is
imported; verl looks the name up inside its TaskRunner (a Ray actor), so the module must be
imported in every Ray process: the launch scripts set ``VERL_USE_EXTERNAL_MODULES`` to
:mod:`membuilder.training.verl_plugin` for the driver and pass it to the workers through
``ray_kwargs.ray_init.runtime_env.env_vars`` (the package's ``verl.plugins`` entry point, when
declared, does the same for every process that imports verl).

Configuration: ``trainer.v1.trainer_mode=adrpo_sync`` turns the weighting on;
``trainer.v1.trainer_mode=sync`` is plain GRPO. Whether attribution is used, and alpha, are the
reward's settings (``attribution_enabled``, ``attribution_alpha`` reward kwargs); with
attribution disabled the weights are 1 for computed rewards and 0 for failed ones, so failed
samples are still kept out of the update. A sample whose reward could not be computed
(``reward_valid`` 0) is also taken out of its prompt's GRPO group before verl computes the group
statistics, so its placeholder reward does not shift the other rollouts' advantages.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from membuilder.errors import MissingWeightError

logger = logging.getLogger(__name__)

WEIGHT_KEY = "adrpo_weight"
TRAINER_NAME = "adrpo_sync"


def weights_from_extra_fields(extra_fields: Iterable[Any], key: str = WEIGHT_KEY) -> np.ndarray:
    """Per-sample weights from verl's ``extra_fields`` entries (``{"reward_extra_info": {...}}``).

    Raises :class:`MissingWeightError` naming the first sample without the key, because training
    with some samples silently unweighted would not be ADRPO.
    """
    out: list[float] = []
    for i, entry in enumerate(extra_fields):
        entry = getattr(entry, "data", entry)
        info = entry.get("reward_extra_info", {}) if isinstance(entry, dict) else {}
        value = info.get(key) if isinstance(info, dict) else None
        if value is None:
            raise MissingWeightError(
                f"sample {i} has no {key!r} in extra_fields['reward_extra_info'] (keys: "
                f"{sorted(info) if isinstance(info, dict) else type(info).__name__}); ADRPO needs the membuilder reward "
                "function (reward.custom_reward_function.path=pkg://membuilder.training.reward)"
            )
        out.append(float(np.asarray(value).item()))
    weights = np.asarray(out, dtype=np.float64)
    if not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise ValueError(f"ADRPO weights must be finite and >= 0, got {weights.tolist()}")
    return weights


def _reward_valid(entry: Any) -> bool:
    entry = getattr(entry, "data", entry)
    info = entry.get("reward_extra_info", {}) if isinstance(entry, dict) else {}
    value = info.get("reward_valid", 1.0) if isinstance(info, dict) else 1.0
    return float(np.asarray(value).item()) != 0.0


def scale_advantages(
    advantages: torch.Tensor, weights: Sequence[float] | np.ndarray | torch.Tensor
) -> torch.Tensor:
    """``advantages`` (a padded ``(batch, tokens)`` tensor or a jagged nested tensor) times one weight per row."""
    w = torch.as_tensor(np.asarray(weights, dtype=np.float64))
    if advantages.is_nested:
        rows = advantages.unbind()
        if len(rows) != len(w):
            raise ValueError(f"{len(rows)} advantage rows but {len(w)} weights")
        scaled = [r * w[i].to(r.dtype) for i, r in enumerate(rows)]
        return torch.nested.as_nested_tensor(scaled, layout=torch.jagged)
    if advantages.shape[0] != len(w):
        raise ValueError(f"{advantages.shape[0]} advantage rows but {len(w)} weights")
    return advantages * w.to(advantages.dtype).view(-1, *([1] * (advantages.dim() - 1)))


def _trainer_base() -> type:
    from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

    return PPOTrainerSync


def _make_trainer_class() -> type:
    import transfer_queue as tq
    from omegaconf import open_dict
    from tensordict import TensorDict
    from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY, register_trainer
    from verl.utils import tensordict_utils as tu

    existing = TRAINER_REGISTRY.get(TRAINER_NAME)
    if existing is not None:
        return existing

    base = _trainer_base()

    class AdrpoSyncTrainer(base):  # type: ignore[misc, valid-type]
        """verl's synchronous v1 trainer, with GRPO advantages multiplied by ``adrpo_weight``."""

        def __init__(self, config: Any) -> None:
            # verl's trainer checks ``trainer_mode == "sync"`` in several places to choose the
            # synchronous code paths; this trainer is the sync trainer plus one step, so it runs
            # under that mode name once selected.
            with open_dict(config):
                config.trainer.v1.trainer_mode = "sync"
            super().__init__(config)

        def _compute_advantage(self, batch, metrics):  # type: ignore[override]
            unscored = self._isolate_unscored(batch)
            try:
                batch = super()._compute_advantage(batch, metrics)
            finally:
                if unscored is not None:
                    self._put_uids(batch, unscored)
            data = tq.kv_batch_get(
                keys=batch.keys, partition_id=batch.partition_id, select_fields=["advantages", "extra_fields"]
            )
            weights = weights_from_extra_fields(list(data["extra_fields"]))
            scaled = scale_advantages(data["advantages"], weights)
            tq.kv_batch_put(
                keys=batch.keys,
                partition_id=batch.partition_id,
                fields=TensorDict({"advantages": scaled}, batch_size=len(batch)),
            )
            metrics["adrpo/weight_mean"] = float(weights.mean()) if len(weights) else 0.0
            metrics["adrpo/weighted_fraction"] = float((weights > 1).mean()) if len(weights) else 0.0
            metrics["adrpo/masked_samples"] = float((weights == 0).sum())
            return batch

        def _isolate_unscored(self, batch) -> list[str] | None:
            """Give each sample whose reward could not be computed a group of its own.

            Its stored reward (0) is a placeholder, not a measurement: GRPO must not use it in
            the mean and standard deviation of its prompt's rollouts. A sample alone in its group
            gets GRPO advantage 0 - 0 (verl: mean 0, std 1 for a single sample), and its weight 0
            keeps it out of the update. Returns the original uids to restore, or None.
            """
            data = tq.kv_batch_get(
                keys=batch.keys, partition_id=batch.partition_id, select_fields=["uid", "extra_fields"]
            )
            unscored = [i for i, e in enumerate(data["extra_fields"]) if not _reward_valid(e)]
            if not unscored:
                return None
            uids = [str(u) for u in data["uid"]]
            isolated = list(uids)
            for i in unscored:
                isolated[i] = f"{uids[i]}#unscored{i}"
            self._put_uids(batch, isolated)
            return uids

        @staticmethod
        def _put_uids(batch, uids: list[str]) -> None:
            fields = tu.list_of_dict_to_tensordict([{"uid": u} for u in uids])
            tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=fields)

    AdrpoSyncTrainer.__module__ = __name__
    AdrpoSyncTrainer.__qualname__ = "AdrpoSyncTrainer"
    return register_trainer(TRAINER_NAME)(AdrpoSyncTrainer)


def register() -> type:
    """Register (once) and return the ``adrpo_sync`` trainer class. Needs verl installed."""
    return _make_trainer_class()


def __getattr__(name: str) -> Any:
    # ``from membuilder.training.adrpo import AdrpoSyncTrainer`` builds the class on first use, so
    # importing this module for its helpers does not import verl.
    if name == "AdrpoSyncTrainer":
        return register()
    raise AttributeError(name)
