"""Test helpers: a scripted OpenAI-compatible server (and, from the agents' side, responders)."""

from membuilder.testing.server import (
    FAULT_KINDS,
    FaultKind,
    Responder,
    ScriptedOpenAIServer,
    ScriptedRequest,
)

__all__ = ["FAULT_KINDS", "FaultKind", "Responder", "ScriptedOpenAIServer", "ScriptedRequest"]
