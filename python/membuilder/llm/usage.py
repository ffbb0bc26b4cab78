"""Token and cost accounting for LLM and embedding calls.

Prices are US dollars per million tokens, as ``(input, output)``. The built-in table holds list prices of
common OpenAI models at the time of writing; providers change prices, so pass your own through
``LLMConfig(prices=...)`` (they take precedence) when the number matters. A model found in neither table
has cost ``None`` — never a guessed number. Self-hosted endpoints (vLLM) are therefore ``None`` unless
you give a price.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["KNOWN_PRICES", "ModelUsage", "UsageTracker", "lookup_price", "normalize_prices"]

# USD per 1M tokens (input, output). Embedding models have no output tokens.
KNOWN_PRICES: dict[str, tuple[float, float]] = {
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4-turbo": (10.00, 30.00),
    "gpt-3.5-turbo": (0.50, 1.50),
    "o1": (15.00, 60.00),
    "o1-mini": (1.10, 4.40),
    "o3": (2.00, 8.00),
    "o3-mini": (1.10, 4.40),
    "o4-mini": (1.10, 4.40),
    "gpt-5": (1.25, 10.00),
    "gpt-5-mini": (0.25, 2.00),
    "gpt-5-nano": (0.05, 0.40),
    "text-embedding-3-small": (0.02, 0.0),
    "text-embedding-3-large": (0.13, 0.0),
    "text-embedding-ada-002": (0.10, 0.0),
}

# Dated snapshots ("gpt-4o-mini-2024-07-18") bill like their alias.
_SNAPSHOT_SUFFIX = re.compile(r"-\d{4}-\d{2}-\d{2}$")


def normalize_prices(prices: Mapping[str, object] | None) -> dict[str, tuple[float, float]]:
    """Validate user prices: ``{model: (input, output)}`` or ``{model: {"input": x, "output": y}}``.

    A bare number is taken as the input price with free output (embedding models).
    Raises ``ValueError`` for a negative or non-numeric price.
    """
    out: dict[str, tuple[float, float]] = {}
    for model, value in (prices or {}).items():
        if isinstance(value, Mapping):
            pair = (value.get("input", 0.0), value.get("output", 0.0))
        elif isinstance(value, (int, float)):
            pair = (value, 0.0)
        else:
            try:
                pair = tuple(value)  # type: ignore[arg-type]
            except TypeError:
                pair = ()
            if len(pair) != 2:
                raise ValueError(
                    f"price for {model!r} must be (input, output) USD per 1M tokens, got {value!r}"
                )
        try:
            inp, outp = float(pair[0]), float(pair[1])  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ValueError(f"price for {model!r} must be numeric, got {value!r}") from None
        if not (math.isfinite(inp) and math.isfinite(outp)) or inp < 0 or outp < 0:
            raise ValueError(f"price for {model!r} must be non-negative, got {value!r}")
        out[str(model)] = (inp, outp)
    return out


def lookup_price(
    model: str, prices: Mapping[str, tuple[float, float]] | None = None
) -> tuple[float, float] | None:
    """The ``(input, output)`` USD-per-1M price of ``model``: user table first, then the built-in one.

    Matches the exact name, then the name without a date suffix, then without a ``provider/`` prefix.
    Returns ``None`` for an unknown model.
    """
    candidates = [model, _SNAPSHOT_SUFFIX.sub("", model)]
    if "/" in model:
        tail = model.rsplit("/", 1)[1]
        candidates += [tail, _SNAPSHOT_SUFFIX.sub("", tail)]
    for table in (prices or {}, KNOWN_PRICES):
        for name in candidates:
            if name in table:
                return table[name]
    return None


@dataclass
class ModelUsage:
    """Counters for one model. Tokens of cache hits are kept apart: they cost nothing."""

    calls: int = 0
    cached_calls: int = 0
    failed_calls: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    cached_completion_tokens: int = 0


class UsageTracker:
    """Thread-safe running totals of calls, tokens and cost per model.

    ``calls`` counts every answered call, cached or not; ``cached_calls`` the subset served from the
    response cache (no HTTP request). ``cost_usd`` covers only the non-cached tokens and is ``None`` when
    the model's price is unknown.
    """

    def __init__(self, prices: Mapping[str, object] | None = None) -> None:
        self._prices = normalize_prices(prices)
        self._lock = threading.Lock()
        self._models: dict[str, ModelUsage] = {}

    def _entry(self, model: str) -> ModelUsage:
        entry = self._models.get(model)
        if entry is None:
            entry = self._models[model] = ModelUsage()
        return entry

    def record(
        self,
        model: str,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        *,
        cached: bool = False,
        retries: int = 0,
    ) -> None:
        """Count one answered call."""
        with self._lock:
            entry = self._entry(model)
            entry.calls += 1
            entry.retries += retries
            if cached:
                entry.cached_calls += 1
                entry.cached_prompt_tokens += int(prompt_tokens)
                entry.cached_completion_tokens += int(completion_tokens)
            else:
                entry.prompt_tokens += int(prompt_tokens)
                entry.completion_tokens += int(completion_tokens)

    def record_failure(self, model: str, *, retries: int = 0) -> None:
        """Count one call that ended in an error after ``retries`` retries."""
        with self._lock:
            entry = self._entry(model)
            entry.failed_calls += 1
            entry.retries += retries

    def cost(self, model: str) -> float | None:
        """USD spent on ``model`` so far, or ``None`` if its price is unknown."""
        with self._lock:
            entry = self._models.get(model, ModelUsage())
            return self._cost(model, entry)

    def _cost(self, model: str, entry: ModelUsage) -> float | None:
        price = lookup_price(model, self._prices)
        if price is None:
            return None
        return (entry.prompt_tokens * price[0] + entry.completion_tokens * price[1]) / 1e6

    def summary(self) -> dict:
        """A JSON-serialisable snapshot.

        ``{"models": {name: {calls, cached_calls, failed_calls, retries, prompt_tokens, completion_tokens,
        cached_prompt_tokens, cached_completion_tokens, cost_usd}}, "total": {... same keys ...}}``.
        The total's ``cost_usd`` is ``None`` if any model with non-cached tokens has an unknown price.
        """
        with self._lock:
            models: dict[str, dict] = {}
            total: dict[str, object] = {k: 0 for k in ModelUsage.__dataclass_fields__}
            total_cost: float | None = 0.0
            for name in sorted(self._models):
                entry = self._models[name]
                row = dict(entry.__dict__)
                cost = self._cost(name, entry)
                row["cost_usd"] = cost
                models[name] = row
                for key in ModelUsage.__dataclass_fields__:
                    total[key] = int(total[key]) + getattr(entry, key)  # type: ignore[call-overload]
                if cost is None:
                    if entry.prompt_tokens or entry.completion_tokens:
                        total_cost = None
                elif total_cost is not None:
                    total_cost += cost
            total["cost_usd"] = total_cost
            return {"models": models, "total": total}

    def merge(self, other: UsageTracker) -> None:
        """Add another tracker's counters into this one (e.g. from a worker process)."""
        with other._lock:
            snapshot = {name: ModelUsage(**entry.__dict__) for name, entry in other._models.items()}
        with self._lock:
            for name, entry in snapshot.items():
                mine = self._entry(name)
                for key in ModelUsage.__dataclass_fields__:
                    setattr(mine, key, getattr(mine, key) + getattr(entry, key))

    def __repr__(self) -> str:
        total = self.summary()["total"]
        return (
            f"UsageTracker(calls={total['calls']}, cached_calls={total['cached_calls']}, "
            f"prompt_tokens={total['prompt_tokens']}, completion_tokens={total['completion_tokens']}, "
            f"cost_usd={total['cost_usd']})"
        )
