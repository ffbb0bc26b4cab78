"""Retries, backoff and per-endpoint concurrency limits shared by the chat client and the embedders.

The ``openai`` SDK is always built with ``max_retries=0``; this module decides what to retry:

* HTTP 408, 409, 425, 429 and every 5xx;
* timeouts and dropped connections (including a body cut off mid-way);
* a 200 response whose body cannot be parsed as the expected JSON.

Everything else (400, 401, 403, 404, 422, ...) fails at once: repeating a bad request cannot help.

Between attempts the delay is the server's ``Retry-After`` (``retry-after-ms``, or ``Retry-After`` in
seconds or as an HTTP date), capped at ``retry_after_cap``; without one it is exponential backoff with
jitter, ``min(backoff_cap, backoff_base * 2**(retry-1)) * U(0.5, 1)``.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import logging
import math
import random
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import openai

from membuilder.errors import LLMError

__all__ = [
    "Failure",
    "MalformedResponse",
    "RetryPolicy",
    "call_with_retries",
    "call_with_retries_sync",
    "classify",
    "endpoint_semaphore",
    "parse_retry_after",
    "redact",
    "sanitize_url",
]

logger = logging.getLogger("membuilder.llm")

T = TypeVar("T")

RETRYABLE_STATUS = frozenset({408, 409, 425, 429})


class MalformedResponse(Exception):
    """Raised internally when a 200 response lacks what the API promises (no choices, no data)."""


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry. All durations in seconds.

    ``max_retries`` is the number of retries after the first attempt (0 = try once).
    """

    max_retries: int = 6
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    retry_after_cap: float = 60.0

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        for name in ("backoff_base", "backoff_cap", "retry_after_cap"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0 seconds, got {value}")

    def delay(self, retry: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (1-based)."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.retry_after_cap)
        raw = self.backoff_base * (2 ** min(retry - 1, 30))
        return min(self.backoff_cap, raw) * random.uniform(0.5, 1.0)


@dataclass(frozen=True)
class Failure:
    """What one failed attempt tells the retry loop."""

    retryable: bool
    reason: str  # "http" | "timeout" | "connection" | "malformed_response"
    status: int | None
    detail: str
    retry_after: float | None = None


# --------------------------------------------------------------------------------------------------
# Helpers: URLs, secrets, Retry-After
# --------------------------------------------------------------------------------------------------


def sanitize_url(url: str) -> str:
    """``url`` without user info, query string or fragment (they may hold credentials)."""
    try:
        parts = urlsplit(str(url))
    except ValueError:
        return "<unparseable url>"
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """Replace every occurrence of each secret in ``text`` by ``***``.

    Placeholders that are not secrets (``"EMPTY"``, empty or very short strings) are left alone.
    """
    for secret in secrets:
        if secret and len(secret) >= 6 and secret != "EMPTY":
            text = text.replace(secret, "***")
    return text


def key_fingerprint(api_key: str | None) -> str:
    """A short, irreversible tag of a key, for grouping; never the key itself."""
    return hashlib.sha256((api_key or "").encode("utf-8")).hexdigest()[:12]


def parse_retry_after(headers: Mapping[str, str] | None, *, now: float | None = None) -> float | None:
    """Seconds to wait according to ``retry-after-ms`` or ``Retry-After``; ``None`` if absent/invalid.

    ``Retry-After`` may be a number of seconds (fractions accepted) or an HTTP date; a date in the past
    gives 0.
    """
    if not headers:
        return None
    lower = {str(k).lower(): str(v) for k, v in headers.items()}
    ms = lower.get("retry-after-ms")
    if ms is not None:
        try:
            value = float(ms) / 1000.0
            if math.isfinite(value) and value >= 0:
                return value
        except ValueError:
            pass
    raw = lower.get("retry-after")
    if raw is None:
        return None
    raw = raw.strip()
    try:
        value = float(raw)
        return value if math.isfinite(value) and value >= 0 else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


def classify(exc: BaseException) -> Failure | None:
    """Map an exception from the SDK to a :class:`Failure`; ``None`` if it is not an API failure."""
    if isinstance(exc, openai.APITimeoutError):
        return Failure(True, "timeout", None, "request timed out")
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__ or exc.__context__
        detail = f"{type(cause).__name__}: {cause}" if cause is not None else str(exc)
        return Failure(True, "connection", None, detail)
    if isinstance(exc, openai.APIStatusError):
        status = int(exc.status_code)
        try:
            headers = exc.response.headers
        except AttributeError:
            headers = None
        retry_after = parse_retry_after(headers)
        retryable = status in RETRYABLE_STATUS or status >= 500
        return Failure(retryable, "http", status, _status_detail(exc), retry_after)
    if isinstance(exc, openai.APIResponseValidationError):
        return Failure(True, "malformed_response", getattr(exc, "status_code", None), str(exc))
    if isinstance(exc, (json.JSONDecodeError, MalformedResponse)):
        return Failure(True, "malformed_response", 200, f"{type(exc).__name__}: {exc}")
    return None


def _status_detail(exc: openai.APIStatusError) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:500]
        if isinstance(err, str):
            return err[:500]
    return str(getattr(exc, "message", exc))[:500]


# --------------------------------------------------------------------------------------------------
# Concurrency: one semaphore per (endpoint, key) per event loop, shared by every client in the process
# --------------------------------------------------------------------------------------------------

_SEMAPHORES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str, str], asyncio.Semaphore]]
_SEMAPHORES = weakref.WeakKeyDictionary()
_SEMAPHORE_LOCK = threading.Lock()


def endpoint_semaphore(endpoint: str, api_key: str | None, limit: int) -> asyncio.Semaphore:
    """The semaphore that bounds concurrent requests to ``endpoint`` with ``api_key`` in this loop.

    The first caller fixes the limit; later callers with another limit share it (a debug line says so),
    because the point is a single budget per endpoint. Must be called from a running event loop.
    """
    if limit < 1:
        raise ValueError(f"concurrency limit must be >= 1, got {limit}")
    loop = asyncio.get_running_loop()
    key = (endpoint, key_fingerprint(api_key))
    with _SEMAPHORE_LOCK:
        per_loop = _SEMAPHORES.get(loop)
        if per_loop is None:
            per_loop = _SEMAPHORES[loop] = {}
        sem = per_loop.get(key)
        if sem is None:
            sem = per_loop[key] = asyncio.Semaphore(limit)
            sem._membuilder_limit = limit  # type: ignore[attr-defined]
        elif getattr(sem, "_membuilder_limit", limit) != limit:
            logger.debug(
                "endpoint %s already limited to %s concurrent requests; keeping that limit (asked %s)",
                endpoint,
                sem._membuilder_limit,  # type: ignore[attr-defined]
                limit,
            )
        return sem


# --------------------------------------------------------------------------------------------------
# The retry loops
# --------------------------------------------------------------------------------------------------


def _final_error(what: str, endpoint: str, attempts: int, failure: Failure, secrets: tuple) -> LLMError:
    status = failure.status if failure.status is not None else "none"
    message = (
        f"{what} failed at {endpoint} after {attempts} attempt(s); last status {status} "
        f"({failure.reason}: {failure.detail})"
    )
    if not failure.retryable:
        message += "; not retried (this error does not go away by repeating the request)"
    elif failure.reason == "connection":
        message += "; is the server running and reachable at that address?"
    elif failure.reason == "timeout":
        message += "; raise the timeout if the model needs longer to answer"
    return LLMError(
        redact(message, secrets),
        endpoint=endpoint,
        status=failure.status,
        attempts=attempts,
        reason=failure.reason,
    )


async def call_with_retries(
    attempt: Callable[[], Awaitable[T]],
    *,
    policy: RetryPolicy,
    endpoint: str,
    what: str = "request",
    secrets: Iterable[str | None] = (),
    semaphore: asyncio.Semaphore | None = None,
) -> tuple[T, int]:
    """Run ``attempt()`` until it succeeds; return ``(result, attempts)``.

    The semaphore (if any) is held for each attempt only, not while sleeping between attempts.
    Raises :class:`LLMError` when the failure is not retryable or the retries are used up; any
    exception that is not an API failure propagates unchanged.
    """
    secrets = tuple(secrets)
    attempts = 0
    while True:
        attempts += 1
        try:
            if semaphore is None:
                return await attempt(), attempts
            async with semaphore:
                return await attempt(), attempts
        except Exception as exc:
            failure = classify(exc)
            if failure is None:
                raise
        if not failure.retryable or attempts > policy.max_retries:
            raise _final_error(what, endpoint, attempts, failure, secrets) from None
        wait = policy.delay(attempts, failure.retry_after)
        logger.info(
            "%s",
            redact(
                f"{what} at {endpoint}: attempt {attempts} failed (status {failure.status}, "
                f"{failure.reason}: {failure.detail}); retrying in {wait:.3f}s",
                secrets,
            ),
        )
        await asyncio.sleep(wait)


def call_with_retries_sync(
    attempt: Callable[[], T],
    *,
    policy: RetryPolicy,
    endpoint: str,
    what: str = "request",
    secrets: Iterable[str | None] = (),
) -> tuple[T, int]:
    """Blocking twin of :func:`call_with_retries` (no concurrency limit)."""
    secrets = tuple(secrets)
    attempts = 0
    while True:
        attempts += 1
        try:
            return attempt(), attempts
        except Exception as exc:
            failure = classify(exc)
            if failure is None:
                raise
        if not failure.retryable or attempts > policy.max_retries:
            raise _final_error(what, endpoint, attempts, failure, secrets) from None
        wait = policy.delay(attempts, failure.retry_after)
        logger.info(
            "%s",
            redact(
                f"{what} at {endpoint}: attempt {attempts} failed (status {failure.status}, "
                f"{failure.reason}: {failure.detail}); retrying in {wait:.3f}s",
                secrets,
            ),
        )
        time.sleep(wait)
