"""Registers membuilder's verl extensions by name; import it in every process that runs verl.

* trainer ``adrpo_sync`` (:class:`membuilder.training.adrpo.AdrpoSyncTrainer`), selected with
  ``trainer.v1.trainer_mode=adrpo_sync``;
* reward manager ``membuilder`` (:class:`membuilder.training.reward_manager.MembuilderRewardManager`),
  selected with ``reward.reward_manager.name=membuilder``.

verl imports it for you in every process when ``VERL_USE_EXTERNAL_MODULES`` names it (the launch
scripts set that variable and forward it to the Ray workers), or through the package's
``verl.plugins`` entry point. Registration is idempotent: importing twice is harmless.
"""

from __future__ import annotations

from membuilder.training.adrpo import register as _register_trainer


def _register_reward_manager() -> None:
    from verl.experimental.reward_loop.reward_manager.registry import REWARD_MANAGER, register

    from membuilder.training.reward_manager import MembuilderRewardManager

    if REWARD_MANAGER.get("membuilder") is not MembuilderRewardManager:
        register("membuilder")(MembuilderRewardManager)


AdrpoSyncTrainer = _register_trainer()
_register_reward_manager()
