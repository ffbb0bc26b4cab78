"""The four memory agents (core, episodic, semantic, procedural), their prompts, and the builders.

- :func:`render_agent_messages` renders one agent's prompt (pure, deterministic).
- :class:`MemoryBuilder` runs the four agents on a session and applies their actions to a state.
- :class:`RawTurnBuilder` is the no-LLM baseline that stores every turn verbatim.
- :func:`compress_core` condenses an over-long core block.
"""

# The agent and bank names are the core's, defined once there.
from membuilder._core import AGENTS, BANK_KINDS
from membuilder.agents.builder import (
    AgentCall,
    MemoryBuilder,
    SessionResult,
    check_session_messages,
    retrieve_for_agents,
)
from membuilder.agents.compress import (
    COMPRESS_TAG,
    CompressionResult,
    build_compress_messages,
    compress_core,
    truncate_at_sentence,
)
from membuilder.agents.prompts import (
    DEFAULT_CORE_LIMIT,
    SYSTEM_PROMPTS,
    describe_date,
    render_agent_messages,
    render_rejection_feedback,
    session_date,
    session_query_text,
)
from membuilder.agents.raw import RawTurnBuilder, raw_turn_text

__all__ = [
    "AGENTS",
    "BANK_KINDS",
    "COMPRESS_TAG",
    "DEFAULT_CORE_LIMIT",
    "SYSTEM_PROMPTS",
    "AgentCall",
    "CompressionResult",
    "MemoryBuilder",
    "RawTurnBuilder",
    "SessionResult",
    "build_compress_messages",
    "check_session_messages",
    "compress_core",
    "describe_date",
    "raw_turn_text",
    "render_agent_messages",
    "render_rejection_feedback",
    "retrieve_for_agents",
    "session_date",
    "session_query_text",
    "truncate_at_sentence",
]
