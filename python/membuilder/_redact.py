"""Keep credentials out of logs and output files.

An endpoint URL may carry a key in its userinfo (``https://user:KEY@host/v1``) or in its query
(``?api-key=KEY``, Azure's form). :func:`redact_url` masks both; :func:`redact_text` masks every
URL inside a free text (a log line, an error message); :func:`install_log_redaction` puts a
filter on the root logger's handlers so that no library's log record (the HTTP client logs
every request URL at INFO) prints a key.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"
#: Query parameters that carry a credential (compared case-insensitively, ``-`` == ``_``).
SECRET_PARAMS = frozenset(
    {"api_key", "apikey", "key", "token", "access_token", "auth", "authorization", "sig", "signature",
     "password", "secret", "client_secret", "code"}
)  # fmt: skip
_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")


def _secret_param(name: str) -> bool:
    return name.lower().replace("-", "_") in SECRET_PARAMS


def redact_url(url: str | None) -> str | None:
    """``url`` with its userinfo and credential query parameters replaced by ``***``."""
    if not url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    changed = False
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rsplit('@', 1)[1]}"
        changed = True
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_secret_param(k) for k, _ in pairs):
            query = urlencode([(k, MASK if _secret_param(k) else v) for k, v in pairs], safe="*")
            changed = True
    if not changed:
        return url
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def redact_text(text: str) -> str:
    """``text`` with every URL in it passed through :func:`redact_url`."""
    if "://" not in text:
        return text
    return _URL.sub(lambda m: redact_url(m.group(0)) or "", text)


class RedactingFilter(logging.Filter):
    """Rewrites a record's message with :func:`redact_text` (arguments formatted first)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken record is the logging module's to report
            return True
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


_FILTER = RedactingFilter()


def install_log_redaction() -> None:
    """Add the redacting filter to every handler of the root logger (idempotent)."""
    for handler in logging.getLogger().handlers:
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)
