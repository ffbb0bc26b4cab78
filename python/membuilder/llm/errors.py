"""The exception raised when an LLM or embedding endpoint cannot give an answer."""

from __future__ import annotations

from membuilder._core import MembuilderError

__all__ = ["LLMError"]


class LLMError(MembuilderError):
    """A call to a model endpoint failed for good (after retries, or at once for a non-retryable error).

    Attributes:
        endpoint: the base URL of the endpoint (credentials and query strings removed).
        status: the last HTTP status received, or ``None`` when the last attempt got no HTTP response
            (timeout, dropped connection).
        attempts: how many HTTP attempts were made (1 + retries).
        reason: a short machine-friendly cause: ``"http"``, ``"timeout"``, ``"connection"``,
            ``"malformed_response"``, ``"closed"``.

    The message never contains the API key: every text that goes into it passes through the same redaction
    as the client's logs.
    """

    def __init__(
        self,
        message: str,
        *,
        endpoint: str,
        status: int | None = None,
        attempts: int = 0,
        reason: str = "http",
    ) -> None:
        super().__init__(message)
        self.endpoint = endpoint
        self.status = status
        self.attempts = attempts
        self.reason = reason

    def __reduce__(self):  # keep the attributes across pickling (multiprocessing, Ray workers)
        return (
            _rebuild_llm_error,
            (str(self), self.endpoint, self.status, self.attempts, self.reason),
        )


def _rebuild_llm_error(
    message: str, endpoint: str, status: int | None, attempts: int, reason: str
) -> LLMError:
    return LLMError(message, endpoint=endpoint, status=status, attempts=attempts, reason=reason)
