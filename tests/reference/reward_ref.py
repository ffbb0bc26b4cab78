"""Pure-Python reference of the Rust reward functions (``membuilder._core`` "Rewards" section).

Same semantics as the paper's reward (format gate, length penalties, attribution), written for
clarity; the property tests compare the compiled kernel against it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

KINDS = ("episodic", "semantic", "procedural")


@dataclass
class Config:
    length_lambda: float = 0.8
    core_theta_min: float = 150.0
    core_theta_max: float = 400.0
    ratio_lower: float = 0.5
    ratio_upper: float = 1.3
    ratio_upper_full: float = 2.0
    ratio_lower_full: float = 0.2
    min_abs_diff: float = 200.0
    attribution_alpha: float = 4.0
    length_penalty_enabled: bool = True
    attribution_enabled: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def approx_tokens(text: str) -> int:
    return len(text) // 4


def core_length_penalty(tokens: float, c: Config) -> float:
    if tokens <= c.core_theta_min:
        return 0.0
    if tokens >= c.core_theta_max:
        return 1.0
    return (tokens - c.core_theta_min) / (c.core_theta_max - c.core_theta_min)


def ratio_length_penalty(tokens: float, expert: float, c: Config) -> float:
    if expert <= 0:
        return 0.0
    if abs(tokens - expert) < c.min_abs_diff:
        return 0.0
    ratio = tokens / expert
    if c.ratio_lower <= ratio <= c.ratio_upper:
        return 0.0
    if ratio > c.ratio_upper:
        return min(1.0, (ratio - c.ratio_upper) / (c.ratio_upper_full - c.ratio_upper))
    return min(1.0, (c.ratio_lower - ratio) / (c.ratio_lower - c.ratio_lower_full))


def length_penalty(agent: str, tokens: float, expert: float, c: Config) -> float:
    if not c.length_penalty_enabled:
        return 0.0
    if agent == "core":
        return core_length_penalty(tokens, c)
    return ratio_length_penalty(tokens, expert, c)


def final_reward(format_ok: bool, task: float, penalty: float, c: Config) -> float:
    return task * (1.0 - c.length_lambda * penalty) if format_ok else 0.0


def retrieval_counts(kinds) -> tuple[int, int, int]:
    counts = [0, 0, 0]
    for k in kinds:
        if k >= 0:
            counts[int(k)] += 1
    return counts[0], counts[1], counts[2]


def dominant_kind(counts) -> str | None:
    best = None
    for kind, n in zip(KINDS, counts):
        if n > 0 and (best is None or n > best[1]):
            best = (kind, n)
    return None if best is None else best[0]


def attribution_weight(agent: str, dominant: str | None, c: Config) -> float:
    if c.attribution_enabled and dominant is not None and agent == dominant:
        return c.attribution_alpha
    return 1.0


def score(agents, format_ok, task, policy_tokens, expert_tokens, c: Config, retrieved_kinds=None, valid=None):
    """Returns (penalties, rewards, weights, dominants), lists with one entry per sample."""
    pens, rewards, weights, doms = [], [], [], []
    for i, agent in enumerate(agents):
        pen = length_penalty(agent, float(policy_tokens[i]), float(expert_tokens[i]), c)
        dom = None if retrieved_kinds is None else dominant_kind(retrieval_counts(retrieved_kinds[i]))
        if valid is not None and not valid[i]:
            reward, weight = 0.0, 0.0
        else:
            reward = final_reward(bool(format_ok[i]), float(task[i]), pen, c)
            weight = attribution_weight(agent, dom, c)
        pens.append(pen)
        rewards.append(reward)
        weights.append(weight)
        doms.append(dom)
    return pens, rewards, weights, doms
