"""Training data: expert trajectories, synthetic QA, and the SFT / RL exports.

- :mod:`membuilder.data.trajectories` records an expert model building memory session by session
  (``membuilder trajectories``);
- :mod:`membuilder.data.qagen` writes synthetic questions per session (``membuilder qa-gen``);
- :mod:`membuilder.data.export_sft` writes LLaMA-Factory data (``membuilder export-sft``);
- :mod:`membuilder.data.export_rl` writes veRL parquet (``membuilder export-rl``);
- :mod:`membuilder.data.schemas` defines every file format (typed, versioned).
"""

from membuilder.data.schemas import (
    AGENT_ORDER,
    QA_TYPES,
    DataFormatError,
    RLGroundTruth,
    decode_ground_truth,
)

__all__ = ["AGENT_ORDER", "QA_TYPES", "DataFormatError", "RLGroundTruth", "decode_ground_truth"]
