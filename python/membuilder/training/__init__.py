"""Training: the reward scorer and the veRL plug-ins for ADRPO.

Importing this package does not import verl or torch; the verl-facing modules
(:mod:`~membuilder.training.reward`, :mod:`~membuilder.training.adrpo`,
:mod:`~membuilder.training.reward_manager`, :mod:`~membuilder.training.verl_plugin`) are imported
by verl itself from the launch scripts' configuration.
"""

from membuilder.training.samples import GroundTruth, GroundTruthError, QAPair, RewardSample, SampleReward
from membuilder.training.scorer import RewardScorer, ScorerConfig, ScorerStats

__all__ = [
    "GroundTruth",
    "GroundTruthError",
    "QAPair",
    "RewardSample",
    "RewardScorer",
    "SampleReward",
    "ScorerConfig",
    "ScorerStats",
]
