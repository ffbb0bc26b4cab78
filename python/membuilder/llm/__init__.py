"""Talking to chat models: one async client for OpenAI-compatible endpoints.

Public names:

* :class:`LLMConfig`, :class:`LLMClient`, :class:`ChatResult` — configuration, the client, one answer;
* :class:`LLMError` — a call that failed for good (``.endpoint``, ``.status``, ``.attempts``);
* :class:`UsageTracker` — tokens, calls and cost per model (``client.usage.summary()``);
* :class:`ResponseCache`, :func:`cache_key` — the content-addressed response cache;
* :class:`RetryPolicy` and :func:`call_with_retries` — the retry loop, reused by the embedders;
* :func:`strip_reasoning`, :func:`split_reasoning` — remove ``<think>`` blocks from model output.
"""

from membuilder.errors import LLMError
from membuilder.llm.cache import ResponseCache, cache_key
from membuilder.llm.client import (
    CALL_HEADER,
    PROVIDERS,
    VLLM_DEFAULT_BASE_URL,
    ChatResult,
    LLMClient,
    LLMConfig,
)
from membuilder.llm.reasoning import split_reasoning, strip_reasoning
from membuilder.llm.retry import RetryPolicy, call_with_retries, call_with_retries_sync, parse_retry_after
from membuilder.llm.usage import KNOWN_PRICES, UsageTracker, lookup_price

__all__ = [
    "CALL_HEADER",
    "KNOWN_PRICES",
    "PROVIDERS",
    "VLLM_DEFAULT_BASE_URL",
    "ChatResult",
    "LLMClient",
    "LLMConfig",
    "LLMError",
    "ResponseCache",
    "RetryPolicy",
    "UsageTracker",
    "cache_key",
    "call_with_retries",
    "call_with_retries_sync",
    "lookup_price",
    "parse_retry_after",
    "split_reasoning",
    "strip_reasoning",
]
