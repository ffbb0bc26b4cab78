"""A verl reward manager that tells the reward function which rollout of its prompt a sample is.

verl's stock ``naive`` manager passes ``data_source``, the decoded response, the ground truth and
the dataset's ``extra_info`` to the reward function, but not the rollout's index among the ``n``
rollouts of its prompt (verl calls it ``session_id``). The ``joint`` pairing needs it to apply
the r-th rollouts of a session's four agents together, so this manager copies it into
``extra_info["rollout_index"]`` and otherwise behaves exactly like ``naive``.

Select it with::

    reward.reward_manager.source=importlib
    reward.reward_manager.name=MembuilderRewardManager
    reward.reward_manager.module.path=pkg://membuilder.training.reward_manager

(or ``reward.reward_manager.name=membuilder`` in a process where
:mod:`membuilder.training.verl_plugin` was imported, which registers it under that name).
"""

from __future__ import annotations

import numpy as np
from verl.experimental.reward_loop.reward_manager.naive import NaiveRewardManager

__all__ = ["MembuilderRewardManager"]


class MembuilderRewardManager(NaiveRewardManager):
    """``naive`` plus ``extra_info["rollout_index"]`` (the sample's index among its prompt's rollouts)."""

    async def run_single(self, data):  # type: ignore[override]
        data = data[-1:]
        ntb = data.non_tensor_batch
        rollout = ntb.get("session_id")
        info = ntb.get("extra_info")
        merged = dict(info[0]) if info is not None and info[0] is not None else {}
        if rollout is not None:
            merged["rollout_index"] = int(np.asarray(rollout[0]).item())
        arr = np.empty(1, dtype=object)
        arr[0] = merged
        ntb["extra_info"] = arr
        return await super().run_single(data)
