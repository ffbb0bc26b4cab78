"""Uncertainty of the numbers an evaluation reports: intervals for proportions, paired tests.

Every accuracy and recall membuilder reports is a proportion ``k / n`` over questions, so its 95%
interval is the **Wilson score interval**: unlike the normal ("Wald") interval it stays inside
[0, 1] and keeps close to its nominal coverage at the small n of a benchmark category (LoCoMo's
open-domain category has n = 96) and at proportions near 0 or 1 (a judge's false-accept rate).

Two runs over the same questions are compared *paired*, question by question:

* :func:`paired_bootstrap`: percentile interval of the mean difference, resampling questions with
  replacement (``numpy.random.default_rng(seed)``, fixed seed: the same inputs give the same
  interval on every machine);
* :func:`mcnemar`: the exact (binomial) McNemar test on the discordant pairs.

Both are pure functions of their inputs; nothing here needs a model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "INTERVAL",
    "Z95",
    "mcnemar",
    "paired_bootstrap",
    "proportion",
    "wilson",
]

#: How the reports name the interval they show.
INTERVAL = "wilson95"
#: Two-sided 95% normal quantile.
Z95 = 1.959963984540054


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval of ``k`` successes in ``n`` trials (``None`` when ``n == 0``).

    ``center = (k + z²/2) / (n + z²)``, ``half = z·sqrt(k(n−k)/n + z²/4) / (n + z²)``; the bounds are
    clipped to [0, 1] against rounding (they are exactly 0 at k = 0 and 1 at k = n).
    """
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return None
    z2 = z * z
    denom = n + z2
    center = (k + z2 / 2) / denom
    half = z * math.sqrt(k * (n - k) / n + z2 / 4) / denom
    lo = 0.0 if k == 0 else max(0.0, center - half)
    hi = 1.0 if k == n else min(1.0, center + half)
    return lo, hi


def proportion(k: int, n: int) -> dict[str, Any]:
    """``{"k", "n", "p", "ci95": [lo, hi]}`` (``p`` and ``ci95`` are ``None`` when ``n == 0``)."""
    ci = wilson(k, n)
    return {
        "k": int(k),
        "n": int(n),
        "p": (k / n) if n else None,
        "ci95": None if ci is None else [round(ci[0], 6), round(ci[1], 6)],
    }


def _paired(a: Sequence[float], b: Sequence[float]) -> np.ndarray:
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired outcomes need two equal-length 1-d sequences, got {x.shape} and {y.shape}")
    return x - y


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], *, iters: int = 10_000, seed: int = 0, level: float = 0.95
) -> dict[str, Any]:
    """Percentile bootstrap of ``mean(a) − mean(b)`` over paired outcomes (one pair per question).

    Each replicate draws ``n`` question indices with replacement and takes the mean difference of
    those pairs; the interval is the ``(1 − level)/2`` and ``(1 + level)/2`` quantiles of the
    replicates (numpy's default linear interpolation). ``distinguishable`` is true when the
    interval excludes 0. Empty input gives ``None`` fields.
    """
    d = _paired(a, b)
    n = int(d.size)
    out: dict[str, Any] = {"n": n, "diff": None, "ci95": None, "iters": iters, "seed": seed}
    if n == 0:
        out["distinguishable"] = None
        return out
    rng = np.random.default_rng(seed)
    means = np.empty(iters, dtype=np.float64)
    # Chunked so that a 10,000 x 2,000 resample never sits in memory at once.
    step = max(1, 2_000_000 // n)
    for start in range(0, iters, step):
        m = min(step, iters - start)
        idx = rng.integers(0, n, size=(m, n))
        means[start : start + m] = d[idx].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    out["diff"] = float(d.mean())
    out["ci95"] = [round(float(lo), 6), round(float(hi), 6)]
    out["distinguishable"] = bool(lo > 0.0 or hi < 0.0)
    return out


def mcnemar(a: Sequence[bool | int], b: Sequence[bool | int]) -> dict[str, Any]:
    """Exact McNemar test of paired binary outcomes.

    ``a_only``: pairs where only ``a`` succeeded, ``b_only``: only ``b``. Under the null hypothesis
    (equal success rates) each discordant pair is a fair coin, so the two-sided p-value is
    ``min(1, 2·P[Binomial(a_only + b_only, 1/2) <= min(a_only, b_only)])`` (1.0 with no discordant
    pair).
    """
    d = _paired([float(bool(x)) for x in a], [float(bool(x)) for x in b])
    a_only = int((d > 0).sum())
    b_only = int((d < 0).sum())
    m = a_only + b_only
    if m == 0:
        p = 1.0
    else:
        t = min(a_only, b_only)
        # Sum in log space: m can be in the thousands, where 2**-m underflows.
        logs = [
            math.lgamma(m + 1) - math.lgamma(i + 1) - math.lgamma(m - i + 1) - m * math.log(2)
            for i in range(t + 1)
        ]
        top = max(logs)
        p = min(1.0, 2.0 * math.exp(top) * sum(math.exp(x - top) for x in logs))
    return {"a_only": a_only, "b_only": b_only, "p_value": p}
