"""membuilder: build, evaluate and train long-term memory for LLM agents.

The deterministic, hot parts (memory state, action parsing, retrieval, rewards) are the Rust core
``membuilder._core``; everything that talks to a model is Python.
"""

from membuilder._core import (
    AGENTS,
    BANK_KINDS,
    STATE_FORMAT_VERSION,
    Action,
    CommitReport,
    Entry,
    InvalidArgumentError,
    MembuilderError,
    MemoryState,
    ParseResult,
    Plan,
    Provenance,
    Rejection,
    RewardBatch,
    RewardConfig,
    RewardKernel,
    SearchHits,
    StateFileError,
    StateView,
    Unmatched,
    __version__,
    parse_actions,
    parse_actions_batch,
)

__all__ = [
    "AGENTS",
    "BANK_KINDS",
    "STATE_FORMAT_VERSION",
    "Action",
    "CommitReport",
    "Entry",
    "InvalidArgumentError",
    "MembuilderError",
    "MemoryConfig",
    "MemoryState",
    "MemorySystem",
    "ParseResult",
    "Plan",
    "Provenance",
    "Rejection",
    "RewardBatch",
    "RewardConfig",
    "RewardKernel",
    "SearchHits",
    "StateFileError",
    "StateView",
    "Unmatched",
    "__version__",
    "parse_actions",
    "parse_actions_batch",
]


def __getattr__(name: str):
    # The facade pulls in the LLM and embedding stacks; import it only when asked for.
    if name in ("MemorySystem", "MemoryConfig"):
        from membuilder import system

        return getattr(system, name)
    raise AttributeError(f"module 'membuilder' has no attribute {name!r}")
