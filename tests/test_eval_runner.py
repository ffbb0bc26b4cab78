"""The eval runner end to end: offline retrieval, two-step and full runs through the scripted
server, and crash safety (a real subprocess killed with SIGKILL, then resumed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest
from membuilder._files import JsonlAppender, read_jsonl, write_json_atomic
from membuilder.eval import runner
from membuilder.testing import ScriptedOpenAIServer
from membuilder.testing.responders import MemoryResponder

SECRET = "sk-test-DO-NOT-LEAK-1234"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _main(argv: list[str]) -> int:
    return runner.main([*argv, "--no-progress"])


def _results(out: Path) -> dict[str, dict]:
    return {r["question_id"]: r for r in read_jsonl(out / "results.jsonl")}


def _no_secret_anywhere(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            assert SECRET.encode() not in p.read_bytes(), f"API key written to {p}"


def _llm_args(server: ScriptedOpenAIServer) -> list[str]:
    return [
        "--provider",
        "compatible",
        "--base-url",
        server.base_url,
        "--api-key",
        SECRET,
        "--model",
        "scripted-model",
    ]


# --------------------------------------------------------------------------------------------
# Offline: raw builder, no LLM
# --------------------------------------------------------------------------------------------


def test_retrieval_mode_offline(locomo_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = [
        "--dataset",
        "locomo",
        "--data-path",
        str(locomo_path),
        "--conv-id",
        "conv-26,conv-30",
        "--sessions",
        "2",
        "--mode",
        "retrieval",
        "--builder",
        "raw",
        "--embedder",
        "hash",
        "--output-dir",
        str(out),
        # the membuilder question set and names (the paper protocol's are tested further down)
        "--locomo-questions",
        "cat1-4",
        "--locomo-category-labels",
        "locomo",
    ]
    assert _main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    res = _results(out)
    assert summary["counts"]["conversations"] == 2 and summary["counts"]["sessions"] == 4
    assert len(res) == summary["counts"]["questions"] == summary["counts"]["results"] > 0
    m = summary["metrics"]
    assert m["evidence_level"] == "turn" and m["ks"] == [1, 5, 10]
    assert set(m["by_category"]) <= {"multi-hop", "temporal", "open-domain", "single-hop", "adversarial"}
    assert m["excluded_from_headline"] == ["adversarial"]
    assert m["overall"]["questions"] == sum(1 for r in res.values() if r["category_id"] != 5)
    turn = m["overall"]["recall"]["turn"]
    # Questions whose evidence lies outside the two built sessions are not evaluable.
    evaluable = [r for r in res.values() if "turn" in r["evidence_ranks"] and r["headline"]]
    assert turn["n"] == len(evaluable) > 0
    hits5 = sum(
        1 for r in evaluable if r["evidence_ranks"]["turn"] is not None and r["evidence_ranks"]["turn"] <= 5
    )
    assert turn["recall@5"] == pytest.approx(hits5 / len(evaluable))
    assert turn["recall@1"] <= turn["recall@5"] <= turn["recall@10"]
    assert "answer" not in m["overall"]
    assert (out / "chart.png").read_bytes()[:8] == PNG_MAGIC
    report = (out / "report.md").read_text()
    assert "R@10" in report and "single-hop" in report
    # every raw entry is one turn: its provenance names that turn
    log_lines = read_jsonl(out / "build_log.jsonl")
    assert [
        (x["conversation_id"], x["session_index"])
        for x in sorted(log_lines, key=lambda x: (x["conversation_id"], x["session_index"]))
    ] == [("conv-26", 0), ("conv-26", 1), ("conv-30", 0), ("conv-30", 1)]
    assert not any(p.name.endswith(".state") and ".s0001." in p.name for p in (out / "memory").iterdir())

    # the same output again without --resume is refused; with --resume nothing is redone
    assert _main(argv) == 2
    assert _main([*argv, "--resume"]) == 0
    assert _results(out) == res
    # resuming with other settings is refused
    assert _main([*argv, "--resume", "--top-k", "3"]) == 2


def test_bad_inputs_exit_2(locomo_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--dataset", "locomo", "--data-path", str(locomo_path), "--output-dir", str(tmp_path / "o")]
    assert (
        _main(
            [*base, "--conv-id", "conv-404", "--builder", "raw", "--mode", "retrieval", "--embedder", "hash"]
        )
        == 2
    )
    assert "conv-404" in capsys.readouterr().err
    assert _main([*base, "--mode", "full"]) == 2  # no model
    assert "--model" in capsys.readouterr().err
    assert (
        _main(
            [
                "--dataset",
                "locomo",
                "--data-path",
                str(tmp_path / "missing.json"),
                "--builder",
                "raw",
                "--mode",
                "retrieval",
                "--embedder",
                "hash",
                "--output-dir",
                str(tmp_path / "p"),
            ]
        )
        == 2
    )
    assert "missing.json" in capsys.readouterr().err
    assert _main([*base, "--sample-id", "x", "--builder", "raw"]) == 2
    # answering from a memory that was never built
    assert (
        _main(
            [
                *base,
                "--mode",
                "answer",
                "--model",
                "m",
                "--provider",
                "vllm",
                "--judge-provider",  # judge on the same server (with vllm it now defaults to the API)
                "vllm",
                "--embedder",
                "hash",
                "--conv-id",
                "conv-26",
                "--db-path",
                str(tmp_path / "empty"),
            ]
        )
        == 2
    )
    assert "no memory" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Through the scripted server
# --------------------------------------------------------------------------------------------


def test_full_mode_locomo_two_conversations(locomo_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "full"
    with ScriptedOpenAIServer(MemoryResponder()) as server:
        code = _main(
            [
                "--dataset",
                "locomo",
                "--data-path",
                str(locomo_path),
                "--conv-id",
                "conv-26",
                "--conv-id",
                "conv-30",
                "--sessions",
                "2",
                "--questions",
                "6",
                "--mode",
                "full",
                "--builder",
                "llm",
                "--embedder",
                "hash",
                "--output-dir",
                str(out),
                *_llm_args(server),
                "--judge-model",  # the judge model used to default to the answer model
                "scripted-model",
            ]
        )
        assert code == 0
        tags = Counter(r.tag for r in server.requests)
    res = _results(out)
    assert len(res) == 12 and {r["conversation_id"] for r in res.values()} == {"conv-26", "conv-30"}
    assert (
        tags["agent:core"]
        == tags["agent:episodic"]
        == tags["agent:semantic"]
        == tags["agent:procedural"]
        == 4
    )
    assert tags["answer"] == 12 and tags["judge"] >= 12
    for r in res.values():
        assert isinstance(r["answer"], str) and r["judge_correct"] in (True, False)
        assert 0.0 <= r["f1"] <= 1.0 and r["exact_match"] in (0.0, 1.0)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["models"] == {
        "build": "scripted-model",
        "builder": "llm",
        "answer": "scripted-model",
        "judge": "scripted-model",
        "embedder": summary["models"]["embedder"],
    }
    acc = summary["metrics"]["overall"]["answer"]
    judged = [r for r in res.values() if r["headline"]]
    assert acc["judged"] == len(judged)
    assert acc["accuracy"] == pytest.approx(sum(r["judge_correct"] for r in judged) / len(judged))
    assert summary["metrics"]["evidence_level"] == "session"
    for role in ("build", "answer", "judge"):
        assert role in summary["usage"]
    assert summary["config"]["api_key_given"] is True and "api_key" not in summary["config"]
    assert set(summary["timings"]) >= {"build_s", "retrieval_s", "answer_s", "total_s"}
    assert (out / "chart.png").read_bytes()[:8] == PNG_MAGIC
    assert "accuracy %" in (out / "report.md").read_text()
    _no_secret_anywhere(out)


def test_answer_takes_the_hits_of_the_one_search_per_question(locomo_path: Path, tmp_path: Path) -> None:
    """Each question is searched once (top max(recall k, top k)); the answer uses the first top k of
    those hits, which are exactly what a search of its own for the top k finds."""
    import argparse
    import asyncio

    import numpy as np
    from membuilder.answer import Answerer

    out = tmp_path / "one"
    parser = argparse.ArgumentParser()
    runner.add_arguments(parser)
    with ScriptedOpenAIServer(MemoryResponder()) as server:
        args = parser.parse_args(
            ["--dataset", "locomo", "--data-path", str(locomo_path), "--conv-id", "conv-30", "--sessions", "3",
             "--questions", "12", "--mode", "full", "--builder", "raw", "--embedder", "hash", "--top-k", "4",
             "--judge", "none", "--output-dir", str(out), "--no-progress", *_llm_args(server)]
        )  # fmt: skip
        run = runner.Runner(runner.EvalConfig.from_args(args))
        asyncio.run(run.run())
        assert server.count("answer") == 12
    res = _results(out)
    assert len(res) == 12 and run.search_k == 10 > run.cfg.top_k == 4
    state = run.states["conv-30"]
    answerer = Answerer(None, run.embedder, top_k=4)
    for r in res.values():
        # its own search, as the answerer made it before it was handed the hits
        own = asyncio.run(answerer.retrieve(state, r["question"]))
        handed = asyncio.run(answerer.retrieve(state, r["question"], run.search_hits[r["question_id"]]))
        assert handed == own
        assert r["answer_retrieved_ids"] == own[0] == r["retrieved_ids"][:4]
        assert np.array_equal(
            run.search_hits[r["question_id"]][0][: len(r["retrieved_ids"])], r["retrieved_ids"]
        )


def test_full_mode_longmemeval_oracle_with_abstention(longmemeval_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "lme"
    with ScriptedOpenAIServer(MemoryResponder()) as server:
        code = _main(
            [
                "--dataset",
                "longmemeval",
                "--data-path",
                str(longmemeval_dir / "longmemeval_oracle.json"),
                "--split",
                "test",
                "--questions",
                "4",
                "--mode",
                "full",
                "--builder",
                "llm",
                "--embedder",
                "hash",
                "--output-dir",
                str(out),
                *_llm_args(server),
            ]
        )
        assert code == 0
    res = _results(out)
    assert len(res) == 4 and any(r["is_abstention"] for r in res.values())
    summary = json.loads((out / "summary.json").read_text())
    m = summary["metrics"]
    assert m["overall"]["questions"] == 4  # LongMemEval abstention counts in the headline
    assert m["abstention"]["questions"] == sum(r["is_abstention"] for r in res.values())
    assert m["overall"]["recall"]["session"]["n"] == 4
    assert (out / "chart.png").read_bytes()[:8] == PNG_MAGIC
    assert summary["dataset"]["split"] == "test"


def test_two_step_build_then_answer(locomo_path: Path, tmp_path: Path) -> None:
    db = tmp_path / "db"
    with ScriptedOpenAIServer(MemoryResponder()) as server:
        base = [
            "--dataset",
            "locomo",
            "--data-path",
            str(locomo_path),
            "--conv-id",
            "conv-26",
            "--sessions",
            "2",
            "--embedder",
            "hash",
            "--db-path",
            str(db),
            *_llm_args(server),
        ]
        assert _main([*base, "--mode", "build", "--output-dir", str(tmp_path / "b")]) == 0
        built = len(server.requests)
        assert built > 0 and not (tmp_path / "b" / "results.jsonl").exists()
        assert (
            _main(
                [
                    *base,
                    "--mode",
                    "answer",
                    "--questions",
                    "3",
                    "--answer-model",
                    "answerer",
                    "--output-dir",
                    str(tmp_path / "a"),
                ]
            )
            == 0
        )
        later = server.requests[built:]
        assert {r.tag for r in later} <= {"answer", "judge"}
        assert {r.body["model"] for r in later if r.tag == "answer"} == {"answerer"}
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["models"]["answer"] == "answerer" and summary["models"]["build"] is None
    assert len(_results(tmp_path / "a")) == 3
    # answering with another embedder than the build's is refused
    assert (
        _main(
            [
                "--dataset",
                "locomo",
                "--data-path",
                str(locomo_path),
                "--conv-id",
                "conv-26",
                "--sessions",
                "2",
                "--embedder",
                "hash:64",
                "--db-path",
                str(db),
                "--mode",
                "answer",
                "--model",
                "m",
                "--provider",
                "vllm",
                "--judge-provider",
                "vllm",
                "--output-dir",
                str(tmp_path / "c"),
            ]
        )
        == 2
    )


# --------------------------------------------------------------------------------------------
# Crash safety
# --------------------------------------------------------------------------------------------


def _canonical(body: dict) -> str:
    return json.dumps(body, sort_keys=True)


class _KillAt:
    """Responder wrapper that SIGKILLs the client process when the n-th request arrives (the
    request stays unanswered, as with a crash while a call is in flight)."""

    def __init__(self, inner: MemoryResponder) -> None:
        self.inner = inner
        self.lock = threading.Lock()
        self.count = 0
        self.kill_at: int | None = None
        self.pid: int | None = None
        self.killed_bodies: list[str] = []

    def __call__(self, request):
        with self.lock:
            self.count += 1
            if self.kill_at is not None and self.count == self.kill_at and self.pid is not None:
                os.kill(self.pid, signal.SIGKILL)
                self.killed_bodies.append(_canonical(request.body))
        return self.inner(request)


def _subprocess_run(argv: list[str], responder: _KillAt, kill_after: int | None) -> int:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in [str(Path(runner.__file__).parents[2]), env.get("PYTHONPATH")] if p
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "membuilder.eval", *argv, "--no-progress"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    with responder.lock:
        responder.pid = proc.pid
        responder.kill_at = None if kill_after is None else responder.count + kill_after
    _, err = proc.communicate(timeout=300)
    expected = 0 if kill_after is None else -signal.SIGKILL
    assert proc.returncode == expected, f"exit {proc.returncode}: {err.decode()[-3000:]}"
    return proc.returncode


def test_killed_run_resumes_without_repeats_or_losses(locomo_path: Path, tmp_path: Path) -> None:
    def argv(out: Path, base_url: str) -> list[str]:
        return [
            "--dataset",
            "locomo",
            "--data-path",
            str(locomo_path),
            "--conv-id",
            "conv-26,conv-30",
            "--sessions",
            "2",
            "--questions",
            "4",
            "--mode",
            "full",
            "--builder",
            "llm",
            "--embedder",
            "hash",
            "--output-dir",
            str(out),
            "--concurrency",
            "2",
            "--max-concurrent-requests",
            "1",
            "--provider",
            "compatible",
            "--base-url",
            base_url,
            "--api-key",
            SECRET,
            "--model",
            "scripted-model",
        ]

    killed = _KillAt(MemoryResponder())
    with ScriptedOpenAIServer(killed) as server:
        out = tmp_path / "killed"
        # 1st kill while building (7th call), 2nd while answering/judging, then run to the end.
        assert _subprocess_run(argv(out, server.base_url), killed, 7) == -signal.SIGKILL
        assert read_jsonl(out / "results.jsonl") == []
        assert _subprocess_run([*argv(out, server.base_url), "--resume"], killed, 16) == -signal.SIGKILL
        assert 0 < len(read_jsonl(out / "results.jsonl")) < 8
        assert _subprocess_run([*argv(out, server.base_url), "--resume"], killed, None) == 0
        bodies = Counter(_canonical(r.body) for r in server.requests if r.is_chat)

    # Only the requests that were in flight at a kill were ever sent twice.
    assert len(killed.killed_bodies) == 2
    repeated = {b: n for b, n in bodies.items() if n > 1}
    assert set(repeated) <= set(killed.killed_bodies) and all(n == 2 for n in repeated.values())

    clean = _KillAt(MemoryResponder())
    with ScriptedOpenAIServer(clean) as server:
        assert _subprocess_run(argv(tmp_path / "clean", server.base_url), clean, None) == 0
        clean_bodies = Counter(_canonical(r.body) for r in server.requests if r.is_chat)
    # the killed-and-resumed run made exactly the calls of an uninterrupted run (plus the lost ones)
    assert set(bodies) == set(clean_bodies)

    a, b = _results(tmp_path / "killed"), _results(tmp_path / "clean")
    assert set(a) == set(b) and len(a) == 8
    keys = ("answer", "judge_correct", "retrieved_ids", "evidence_ranks", "exact_match", "f1", "gold")
    for qid in a:
        assert {k: a[qid][k] for k in keys} == {k: b[qid][k] for k in keys}
    sa = json.loads((tmp_path / "killed" / "summary.json").read_text())["metrics"]
    sb = json.loads((tmp_path / "clean" / "summary.json").read_text())["metrics"]
    assert sa == sb
    _no_secret_anywhere(tmp_path)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def test_jsonl_torn_last_line_is_dropped_and_cut(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    with JsonlAppender(path) as f:
        f.append({"a": 1})
        f.append({"a": 2})
    with open(path, "ab") as raw:
        raw.write(b'{"a": 3, "tor')  # a writer killed mid-line
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]
    with JsonlAppender(path) as f:
        f.append({"a": 4})
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}, {"a": 4}]
    assert path.read_text().count("\n") == 3


def test_atomic_json_replaces_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    write_json_atomic(path, {"v": 1})
    write_json_atomic(path, {"v": 2, "p": tmp_path})
    assert json.loads(path.read_text()) == {"v": 2, "p": str(tmp_path)}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_perltqa_fixture_through_the_runner(tmp_path: Path) -> None:
    out = tmp_path / "p"
    fixture = Path(__file__).parent / "fixtures" / "perltqa"
    assert (
        _main(
            [
                "--dataset",
                "perltqa",
                "--data-path",
                str(fixture),
                "--character-id",
                "Lena Moreau",
                "--mode",
                "retrieval",
                "--builder",
                "raw",
                "--embedder",
                "hash",
                "--output-dir",
                str(out),
            ]
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    m = summary["metrics"]
    assert list(m["by_category"]) == ["profile", "social_relationship", "events", "dialogues"]
    # profile facts are not in the dialogues or events: no evidence to recall, not a miss
    assert m["by_category"]["profile"]["recall"]["session"]["n"] == 0
    assert m["by_category"]["events"]["recall"]["session"]["n"] == 2
    assert summary["counts"] == {
        "conversations": 1,
        "sessions": 5,
        "sessions_built_this_run": 5,
        "questions": 7,
        "results": 7,
        "conversations_failed": 0,
        "questions_skipped_failed_build": 0,
    }


def test_checkpoint_every_n_sessions(locomo_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "ck"
    assert (
        _main(
            [
                "--dataset",
                "locomo",
                "--data-path",
                str(locomo_path),
                "--conv-id",
                "conv-30",
                "--sessions",
                "3",
                "--mode",
                "build",
                "--builder",
                "raw",
                "--embedder",
                "hash",
                "--checkpoint-every",
                "2",
                "--output-dir",
                str(out),
            ]
        )
        == 0
    )
    progress = json.loads((out / "memory" / "conv-30.progress.json").read_text())
    assert progress["sessions_done"] == progress["sessions_total"] == 3
    assert sorted(p.name for p in (out / "memory").glob("*.state")) == ["conv-30.s0003.state"]
    assert not (out / "results.jsonl").exists() and "metrics" not in json.loads(
        (out / "summary.json").read_text()
    )
