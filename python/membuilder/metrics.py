"""Local answer metrics: normalised exact match and token F1, with SQuAD's normalisation.

Normalisation lower-cases, removes punctuation and the articles *a*, *an*, *the*, and collapses
whitespace. Both metrics return a float in ``[0, 1]``.

>>> exact_match("The Eiffel Tower!", "eiffel tower")
1.0
>>> round(token_f1("a red bicycle", "red bike"), 3)
0.5
"""

from __future__ import annotations

import re
import string
from collections import Counter

__all__ = ["exact_match", "normalize_answer", "token_f1", "tokens"]

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation) | {"\u2018", "\u2019", "\u201c", "\u201d", "\u2013", "\u2014"}


def normalize_answer(text: object) -> str:
    """SQuAD normalisation: lower-case, drop punctuation, drop articles, collapse whitespace.

    Non-string answers (LoCoMo has a few integers) are converted with ``str``; ``None`` is "".
    """
    s = "" if text is None else str(text)
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def tokens(text: object) -> list[str]:
    """The normalised tokens of ``text``."""
    return normalize_answer(text).split()


def exact_match(pred: object, gold: object) -> float:
    """1.0 if the normalised strings are equal, else 0.0."""
    return float(normalize_answer(pred) == normalize_answer(gold))


def token_f1(pred: object, gold: object) -> float:
    """Harmonic mean of token precision and recall over normalised tokens (multiset overlap).

    When either side has no tokens the score is 1.0 if both are empty and 0.0 otherwise (SQuAD 2.0's
    convention for unanswerable questions).
    """
    p, g = tokens(pred), tokens(gold)
    if not p or not g:
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)
