"""Metrics over result records, and the reports: summary JSON, Markdown table, PNG chart.

A result record is one JSON line per question (see ``runner``). Accuracy is the LLM judge's: the
share of judged questions labelled CORRECT. A question the judge could not label is, by the
protocol's ``judge_unreadable``, either recorded as WRONG by the runner (``paper``; counted in
``judge_unreadable_as_wrong``) or left without a label, counted in ``judge_failed`` and left out of
the denominator (``membuilder``); a label is never guessed. Exact match and token F1 are
averaged over all answered questions. The *headline* set is every question except LoCoMo's
adversarial category (unless the run included it); every category, adversarial included, is also
reported on its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from membuilder.eval.evidence import LEVELS, recall_table
from membuilder.eval.stats import proportion
from membuilder.eval.trust import pct_ci


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def answer_metrics(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Judge accuracy, exact match and F1 over the answered records."""
    answered = [r for r in records if "answer" in r]
    judged = [r for r in answered if r.get("judge_correct") is not None]
    out: dict[str, Any] = {
        "n": len(answered),
        "judged": len(judged),
        "judge_failed": sum(
            1 for r in answered if r.get("judge_correct") is None and r.get("judge") != "none"
        ),
        "judge_unreadable_as_wrong": sum(
            1 for r in judged if r.get("judge_unreadable") and r["judge_correct"] is False
        ),
        "correct": sum(1 for r in judged if r["judge_correct"]),
        "accuracy": _mean([1.0 if r["judge_correct"] else 0.0 for r in judged]),
        "exact_match": _mean([float(r["exact_match"]) for r in answered if r.get("exact_match") is not None]),
        "f1": _mean([float(r["f1"]) for r in answered if r.get("f1") is not None]),
    }
    out["accuracy_ci95"] = proportion(out["correct"], out["judged"])["ci95"]  # Wilson, over judged
    return out


def _group(records: Iterable[Mapping[str, Any]], key: str) -> dict[str, list[Mapping[str, Any]]]:
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        groups.setdefault(str(r.get(key)), []).append(r)
    return groups


def category_order(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Categories in a stable order: by LoCoMo number when there is one, else by first appearance."""
    seen: dict[str, tuple[int, int]] = {}
    for i, r in enumerate(records):
        cat = str(r.get("category"))
        if cat not in seen:
            cid = r.get("category_id")
            seen[cat] = (cid if isinstance(cid, int) else 10_000, i)
    return sorted(seen, key=lambda c: seen[c])


def compute_metrics(records: Sequence[Mapping[str, Any]], *, ks: Sequence[int], level: str) -> dict[str, Any]:
    """Overall (headline) and per-category retrieval and answer metrics.

    ``level`` is the primary evidence level (``"turn"`` or ``"session"``); both levels are
    reported where the data allows.
    """
    headline = [r for r in records if r.get("headline", True)]
    answered = any("answer" in r for r in records)

    def block(rs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        b: dict[str, Any] = {"questions": len(rs)}
        b["recall"] = {lv: recall_table(rs, ks, lv) for lv in LEVELS}
        if answered:
            b["answer"] = answer_metrics(rs)
        return b

    by_cat = _group(records, "category")
    out: dict[str, Any] = {
        "evidence_level": level,
        "ks": list(ks),
        "overall": block(headline),
        "all_questions": block(records),
        "by_category": {c: block(by_cat[c]) for c in category_order(records)},
        "excluded_from_headline": sorted(
            {str(r.get("category")) for r in records if not r.get("headline", True)}
        ),
    }
    abst = [r for r in records if r.get("is_abstention")]
    if abst:
        out["abstention"] = block(abst)
    return out


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def markdown_report(summary: Mapping[str, Any]) -> str:
    """A Markdown page: setup, one row per category (accuracy, EM, F1, evidence recall@k)."""
    m = summary["metrics"]
    ks = m["ks"]
    level = m["evidence_level"]
    cfg = summary["config"]
    models = summary.get("models", {})
    lines = [f"# {cfg['dataset']} — membuilder eval ({cfg['mode']})", ""]
    lines.append(
        f"- builder: `{cfg['builder']}`; embedder: `{models.get('embedder')}`; "
        f"top-k: {cfg['top_k']}; update mode: {cfg['update_mode']}"
    )
    for role in ("build", "answer", "judge"):
        if models.get(role):
            lines.append(f"- {role} model: `{models[role]}`")
    counts = summary.get("counts", {})
    lines.append(
        f"- conversations: {counts.get('conversations')}, sessions built: "
        f"{counts.get('sessions')}, questions: {counts.get('questions')} "
        f"(headline: {m['overall']['questions']})"
    )
    if m.get("excluded_from_headline"):
        lines.append(
            f"- left out of the headline row: {', '.join(m['excluded_from_headline'])} (shown on its own row)"
        )
    lines.append(
        f"- evidence recall at **{level}** level (a top-k memory was built from an "
        f"evidence {level}); R@k and accuracy in % with their Wilson 95% interval in brackets"
    )
    t = summary.get("timings", {})
    if t:
        lines.append("- wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in t.items()))
    lines.append("")
    answered = "answer" in m["overall"]
    head = ["category", "n"]
    if answered:
        head += ["accuracy %", "judged", "EM %", "F1 %"]
    head += ["with evidence"] + [f"R@{k} %" for k in ks]
    other = [lv for lv in LEVELS if lv != level]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))

    def row(name: str, b: Mapping[str, Any]) -> str:
        cells = [name, str(b["questions"])]
        if answered:
            a = b["answer"]
            acc = pct_ci(a["accuracy"], a.get("accuracy_ci95"))
            cells += [acc, str(a["judged"]), _pct(a["exact_match"]), _pct(a["f1"])]
        rec = b["recall"][level]
        ci = rec.get("ci95") or {}
        cells += [str(rec["n"])] + [pct_ci(rec.get(f"recall@{k}"), ci.get(f"recall@{k}")) for k in ks]
        return "| " + " | ".join(cells) + " |"

    for cat, b in m["by_category"].items():
        lines.append(row(cat, b))
    lines.append(row("**overall (headline)**", m["overall"]))
    if m.get("excluded_from_headline"):
        lines.append(row("all questions", m["all_questions"]))
    lines.append("")
    for lv in other:
        rec = m["overall"]["recall"][lv]
        if rec["n"]:
            lines.append(
                f"Evidence recall at {lv} level (headline, n={rec['n']}): "
                + ", ".join(
                    f"R@{k} {pct_ci(rec.get(f'recall@{k}'), (rec.get('ci95') or {}).get(f'recall@{k}'))}%"
                    for k in ks
                )
            )
            lines.append("")
    usage = summary.get("usage") or {}
    if usage:
        lines.append("## Usage")
        lines.append("")
        lines.append("| stage | calls | cached | prompt tokens | completion tokens | cost USD |")
        lines.append("|---|---|---|---|---|---|")
        for stage, u in usage.items():
            tot = u.get("total", u) if isinstance(u, Mapping) else {}
            cells = [
                tot.get(k)
                for k in ("calls", "cached_calls", "prompt_tokens", "completion_tokens", "cost_usd")
            ]
            # A cost is shown only when the model's price is known; an unknown price stays blank.
            lines.append("| " + " | ".join([stage, *("–" if c is None else str(c) for c in cells)]) + " |")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Chart
# ---------------------------------------------------------------------------------------------


def write_chart(summary: Mapping[str, Any], path: str | Path) -> Path:
    """A PNG bar chart per category: judge accuracy when answers were judged, else evidence
    recall@k. Uses matplotlib's Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    m = summary["metrics"]
    cats = list(m["by_category"])
    names = [*cats, "overall"]
    blocks = [*(m["by_category"][c] for c in cats), m["overall"]]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(names) + 2), 4.2), dpi=110)
    answered = "answer" in m["overall"] and m["overall"]["answer"]["judged"] > 0
    if answered:
        vals = [100 * (b["answer"]["accuracy"] or 0.0) for b in blocks]
        bars = ax.bar(names, vals, color=["#4C72B0"] * len(cats) + ["#DD8452"])
        for bar, v in zip(bars, vals):
            ax.annotate(
                f"{v:.1f}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=8
            )
        ax.set_ylabel("LLM-judge accuracy (%)")
        ax.set_title(f"{summary['config']['dataset']}: accuracy per category")
    else:
        level = m["evidence_level"]
        ks = m["ks"]
        width = 0.8 / max(1, len(ks))
        for i, k in enumerate(ks):
            vals = [100 * (b["recall"][level].get(f"recall@{k}") or 0.0) for b in blocks]
            xs = [j + (i - (len(ks) - 1) / 2) * width for j in range(len(names))]
            ax.bar(xs, vals, width=width, label=f"R@{k}")
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel(f"evidence recall at {level} level (%)")
        ax.set_title(f"{summary['config']['dataset']}: evidence recall per category")
        ax.legend()
    ax.set_ylim(0, 105)
    ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
