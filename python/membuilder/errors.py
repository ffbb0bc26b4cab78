"""Every exception membuilder raises on purpose, and the one-line report of an operating-system error.

One module so that a caller can see (and catch) the whole vocabulary in one place, and so that no
package has to import another sideways only to name its error. The two roots come from the Rust core:
``MembuilderError`` (every membuilder failure) and its subclass ``InvalidArgumentError`` (bad input
from the user: exit 2). The classes keep the standard bases they always had (``ValueError``,
``RuntimeError``) so existing ``except`` clauses still catch them.

A path the user gave that cannot be used (missing, a file where a directory belongs, read-only,
no permission) is bad input: exit 2. Anything else the system refused (a full disk, an I/O
error) is a failure of the run: exit 1. Either way :func:`os_error_line` gives the one line naming
the path.
"""

from __future__ import annotations

import errno
from pathlib import Path

from membuilder._core import InvalidArgumentError, MembuilderError

__all__ = [
    "AuditError",
    "CompareError",
    "DamagedFileError",
    "DataFormatError",
    "DatasetError",
    "DirectoryBusyError",
    "GroundTruthError",
    "InvalidArgumentError",
    "LLMError",
    "MembuilderError",
    "MissingWeightError",
    "ProbeError",
    "PromptTemplateError",
    "TrajectoryError",
    "os_error_line",
]

# ---------------------------------------------------------------------------------------------
# Model endpoints
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Input files
# ---------------------------------------------------------------------------------------------


class DatasetError(MembuilderError, ValueError):
    """A dataset file is missing or does not have the layout its loader expects.

    ``path`` names the file, ``field`` the JSON location that was wrong (``None`` when the whole
    file is unusable: missing, not JSON, truncated). The message says both and what was expected.
    """

    def __init__(self, path: str | Path, field: str | None, problem: str) -> None:
        self.path = str(path)
        self.field = field
        self.problem = problem
        where = f"{self.path}: field {field!r}" if field else self.path
        super().__init__(f"{where}: {problem}")


class AuditError(DatasetError):
    """The audit file is unreadable or does not match the dataset (names the file and entry)."""


class DataFormatError(MembuilderError, ValueError):
    """A data file is malformed or of another format version. ``path`` names the file."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else str(path)


class PromptTemplateError(MembuilderError, ValueError):
    """A template file that cannot be used; the message is one line and names the file."""


class DamagedFileError(InvalidArgumentError):
    """A results file has a complete line that is not JSON (not a torn last line)."""


class CompareError(ValueError):
    """Runs that cannot be compared (the message is the one line shown to the user)."""


class ProbeError(ValueError):
    """Bad probe input (one line, naming the file)."""


class GroundTruthError(ValueError):
    """A sample's ground truth is missing a field or has the wrong shape (a data problem, not a model one)."""


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------


class DirectoryBusyError(InvalidArgumentError):
    """Another process holds the directory's lock."""


class TrajectoryError(MembuilderError, RuntimeError):
    """A conversation could not be recorded (endpoint failure, conflicting output directory...)."""


class MissingWeightError(RuntimeError):
    """A sample reached the ADRPO trainer without an ``adrpo_weight`` (the reward function is not ours)."""


# ---------------------------------------------------------------------------------------------
# Operating-system errors
# ---------------------------------------------------------------------------------------------

_BAD_INPUT = {
    errno.ENOENT,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.EEXIST,
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENAMETOOLONG,
    errno.ELOOP,
}


def os_error_line(exc: OSError) -> tuple[str, int]:
    """``(message, exit status)`` for ``exc``."""
    where = exc.filename if exc.filename is not None else ""
    if exc.filename2 is not None:
        where = f"{where} -> {exc.filename2}"
    reason = exc.strerror or str(exc)
    hint = {
        errno.ENOTDIR: "a file is in the way where a directory is needed",
        errno.EEXIST: "a file is in the way where a directory is needed",
        errno.EISDIR: "a directory was given where a file is needed",
        errno.EROFS: "the file system is read-only",
        errno.ENOSPC: "the disk is full; free space and resume",
    }.get(exc.errno or 0)
    text = f"{where}: {reason}" if where else reason
    if hint:
        text += f" ({hint})"
    return text, 2 if exc.errno in _BAD_INPUT else 1
