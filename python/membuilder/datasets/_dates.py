"""Refuse session and question dates that are not dates.

Dates drive the agents' absolute timestamps ("last Tuesday" becomes a day) and the answerer's
"now": a date that silently fails to parse gives memories without a time and answers computed
from nothing. Every loader passes each date it reads through :func:`require_date`, which raises
:class:`DatasetError` naming the file and the item.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from membuilder.errors import DatasetError

#: Forms of PerLTQA's free-text event times ("March 3, 2022", "August 2022", "2022-03-03").
_LOOSE_FORMATS = (
    "%B %d, %Y",
    "%b %d, %Y",
    "%d %B %Y",
    "%B %Y",
    "%b %Y",
    "%Y-%m-%d",
    "%Y-%m",
    "%Y/%m/%d",
    "%Y",
)


def parse_loose_date(text: str) -> datetime | None:
    """A calendar date in one of the common written forms, or ``None``."""
    t = " ".join(text.split())
    for fmt in _LOOSE_FORMATS:
        try:
            return datetime.strptime(t, fmt)
        except ValueError:
            continue
    return None


def require_date(
    text: str | None,
    parse: Callable[[str], datetime | None],
    path: str | Path,
    where: str,
    example: str,
) -> str | None:
    """``text`` unchanged when it is ``None`` or parses; else DatasetError at ``path``/``where``."""
    if text is not None and parse(text) is None:
        raise DatasetError(path, where, f"{text[:80]!r} is not a date (expected a form like {example!r})")
    return text
