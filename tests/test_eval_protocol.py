"""``membuilder eval`` under the paper protocol, against the scripted server (no network).

What the issue asks to see: one LoCoMo conversation reported over all its questions with category 5
scored as the reference scores it; an unreadable verdict counted as WRONG; with ``--provider vllm``
the judge call on the API endpoint with the judge model; the answer prompt holding the core block,
the top 10 memories and the date; the two-step evaluation on two servers, each seeing only its own
calls; the JSON-mode fallback against a server that refuses ``response_format``; LongMemEval's
``_s`` file by default with the ids it lacks named.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
from membuilder._files import read_jsonl
from membuilder.eval import runner
from membuilder.testing import ScriptedOpenAIServer
from membuilder.testing.responders import MemoryResponder

KEY = "sk-test-protocol-0000"


def _main(argv: list[str]) -> int:
    return runner.main([*argv, "--no-progress"])


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _results(out: Path) -> dict[str, dict]:
    return {r["question_id"]: r for r in read_jsonl(out / "results.jsonl")}


def _endpoint(server: ScriptedOpenAIServer, model: str = "scripted-model") -> list[str]:
    return ["--provider", "compatible", "--base-url", server.base_url, "--api-key", KEY, "--model", model]


def _block(text: str, tag: str) -> str | None:
    m = re.search(rf"<{tag}[^>]*>(.*?)</{tag}>", text, re.DOTALL)
    return m.group(1) if m else None


def _conv26(locomo_path: Path) -> dict:
    data = json.loads(locomo_path.read_text())
    return next(s for s in data if s["sample_id"] == "conv-26")


def _locomo(locomo_path: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--dataset",
        "locomo",
        "--data-path",
        str(locomo_path),
        "--conv-id",
        "conv-26",
        "--sessions",
        "1",
        "--builder",
        "llm",
        "--embedder",
        "hash",
        "--output-dir",
        str(out),
        # The audited-gold column judges corrected answers a second time; the reference has no
        # such column, and these tests count judge calls.
        "--gold",
        "original",
        *extra,
    ]


# --------------------------------------------------------------------------------------------
# LoCoMo: all questions, category 5 as the reference scores it
# --------------------------------------------------------------------------------------------


def test_paper_locomo_conversation_all_questions_category5_as_reference(
    locomo_path: Path, tmp_path: Path
) -> None:
    out = tmp_path / "paper"
    with ScriptedOpenAIServer(MemoryResponder()) as server:
        assert _main([*_locomo(locomo_path, out), *_endpoint(server)]) == 0
        judge_reqs = [r for r in server.requests if r.tag == "judge"]
        answer_reqs = [r for r in server.requests if r.tag == "answer"]
    raw = _conv26(locomo_path)["qa"]
    summary, res = _summary(out), _results(out)

    proto = summary["protocol"]
    assert proto["name"] == "paper" and proto["version"] == 1
    assert proto["overrides"] == {"embedder": "hash", "answer_model": "scripted-model"}
    assert proto["label"] == "paper+overrides"

    # every question of the conversation, category 5 included, in the headline
    m = summary["metrics"]
    assert summary["counts"]["questions"] == len(res) == len(raw) == 199
    assert m["overall"]["questions"] == 199 and m["excluded_from_headline"] == []
    # the reference's category names (scripts/process_locomo.py), category 5 "unknown"
    names = {
        1: "single-session",
        2: "temporal-reasoning",
        3: "multi-session",
        4: "knowledge-update",
        5: "unknown",
    }
    by_cat = Counter(names[q["category"]] for q in raw)
    assert {c: b["questions"] for c, b in m["by_category"].items()} == dict(by_cat)

    # category 5 gold: the release's answer field ("" where it has none), handed to the judge as is
    cat5 = [q for q in raw if q["category"] == 5]
    assert [res[f"conv-26/q{j}"]["gold"] for j, q in enumerate(raw) if q["category"] == 5] == [
        str(q.get("answer", "")) for q in cat5
    ]
    judged_gold = {
        _block(r.last_user_message, "question"): _block(r.last_user_message, "gold_answer")
        for r in judge_reqs
    }
    for q in cat5:
        assert judged_gold[" ".join(q["question"].split())] == " ".join(str(q.get("answer", "")).split())

    # one judge call per question, with the judge model; answers with the model under test
    assert len(judge_reqs) == 199 and {r.model for r in judge_reqs} == {"gpt-4.1"}
    assert len(answer_reqs) == 199 and {r.model for r in answer_reqs} == {"scripted-model"}
    assert summary["models"]["judge"] == "gpt-4.1" and summary["models"]["answer"] == "scripted-model"

    # the score: correct over all 199, category 5 counted like every other question
    correct = sum(1 for r in res.values() if r["judge_correct"])
    a = m["overall"]["answer"]
    assert a["judged"] == 199 and a["correct"] == correct and a["accuracy"] == pytest.approx(correct / 199)
    unk = m["by_category"]["unknown"]["answer"]
    cat5_correct = sum(1 for r in res.values() if r["category_id"] == 5 and r["judge_correct"])
    assert unk["judged"] == len(cat5) and unk["accuracy"] == pytest.approx(cat5_correct / len(cat5))
    report = (out / "report.md").read_text()
    assert "protocol: **paper** (v1)" in report and "| unknown |" in report


def test_membuilder_protocol_keeps_its_own_question_set(locomo_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "mb"
    argv = _locomo(locomo_path, out, "--protocol", "membuilder", "--mode", "retrieval", "--builder", "raw")
    assert _main(argv) == 0
    summary, res = _summary(out), _results(out)
    assert len(res) == 199
    assert summary["protocol"]["name"] == "membuilder"
    m = summary["metrics"]
    assert m["excluded_from_headline"] == ["adversarial"]
    assert m["overall"]["questions"] == sum(1 for r in res.values() if r["category_id"] != 5)
    assert {r["gold"] for r in res.values() if r["category_id"] == 5} == {"Not mentioned in the conversation"}


# --------------------------------------------------------------------------------------------
# Unreadable verdicts
# --------------------------------------------------------------------------------------------


class _Unreadable(MemoryResponder):
    """Every verdict CORRECT, except for one question whose verdict names both labels."""

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question
        self.calls_for_it = 0

    def judge(self, messages):  # type: ignore[override]
        first = next(m["content"] for m in messages if m["role"] == "user")
        if _block(first, "question") == self.question:
            self.calls_for_it += 1
            return "It could be CORRECT or it could be WRONG."
        return 'The answer matches the gold one. {"label": "CORRECT"}'


@pytest.mark.parametrize("protocol", ["paper", "membuilder"])
def test_unreadable_verdict_counts_as_wrong_under_paper(
    locomo_path: Path, tmp_path: Path, protocol: str
) -> None:
    raw = _conv26(locomo_path)["qa"]
    target = " ".join(raw[0]["question"].split())
    responder = _Unreadable(target)
    out = tmp_path / protocol
    with ScriptedOpenAIServer(responder) as server:
        argv = [*_locomo(locomo_path, out, "--protocol", protocol, "--questions", "4"), *_endpoint(server)]
        assert _main(argv) == 0
    res = _results(out)
    a = _summary(out)["metrics"]["overall"]["answer"]
    rec = res["conv-26/q0"]
    assert rec["judge_unreadable"] is True and rec["judge_error"].startswith("unparseable")
    assert len(res) == 4 and all(raw[j]["category"] != 5 for j in range(4))
    if protocol == "paper":
        # one call, as the reference makes; the verdict it cannot read is WRONG and stays counted
        assert responder.calls_for_it == 1 and rec["judge_correct"] is False
        assert (a["judged"], a["correct"], a["judge_failed"], a["judge_unreadable_as_wrong"]) == (4, 3, 0, 1)
        assert a["accuracy"] == pytest.approx(3 / 4)
    else:
        # asked three times, then left out of the denominator and counted on its own
        assert responder.calls_for_it == 3 and rec["judge_correct"] is None
        assert (a["judged"], a["correct"], a["judge_failed"], a["judge_unreadable_as_wrong"]) == (3, 3, 1, 0)
        assert a["accuracy"] == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------
# Endpoints
# --------------------------------------------------------------------------------------------


def test_vllm_provider_sends_the_judge_to_the_api_with_the_judge_model(
    locomo_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "vllm"
    with ScriptedOpenAIServer(MemoryResponder()) as vllm, ScriptedOpenAIServer(MemoryResponder()) as api:
        monkeypatch.setenv("OPENAI_BASE_URL", api.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", KEY)
        argv = [
            *_locomo(locomo_path, out, "--questions", "3"),
            "--provider",
            "vllm",
            "--base-url",
            vllm.base_url,
            "--model",
            "my-membuilder-4b",
        ]
        assert _main(argv) == 0
        on_vllm = Counter(r.tag for r in vllm.requests)
        on_api = [(r.tag, r.model) for r in api.requests]
        vllm_models = {r.model for r in vllm.requests}
    assert on_api == [("judge", "gpt-4.1")] * 3
    assert on_vllm["judge"] == 0 and on_vllm["answer"] == 3
    assert set(on_vllm) <= {"agent:core", "agent:episodic", "agent:semantic", "agent:procedural", "answer"}
    assert vllm_models == {"my-membuilder-4b"}
    summary = _summary(out)
    assert summary["models"]["judge"] == "gpt-4.1"
    assert "judge_model" not in summary["protocol"]["overrides"]
    assert summary["usage"]["judge"]["total"]["calls"] == 3


def test_answer_prompt_holds_core_block_top10_and_date(locomo_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "prompt"
    with ScriptedOpenAIServer(MemoryResponder()) as server:
        assert _main([*_locomo(locomo_path, out, "--questions", "2"), *_endpoint(server)]) == 0
        answers = [r for r in server.requests if r.tag == "answer"]
    conv = _conv26(locomo_path)["conversation"]
    last = max(int(k.split("_")[1]) for k in conv if re.fullmatch(r"session_\d+", k))
    last_date = conv[f"session_{last}_date_time"]
    first_turn = conv["session_1"][0]["text"]
    res = _results(out)
    assert len(answers) == 2
    for req in answers:
        user = req.last_user_message
        core = _block(user, "core_memory")
        assert core is not None and first_turn in core  # the core agent's append from session 1
        memories = _block(user, "memories")
        assert memories is not None and '<memories count="10">' in user
        numbers = [line.split(". ", 1)[0] for line in memories.strip().splitlines()]
        assert numbers == [str(i) for i in range(1, 11)]
        assert _block(user, "current_date") == last_date
        assert req.body["max_tokens"] == 4096  # the reference client's default cap: answers are not cut
    assert all(len(r["answer_retrieved_ids"]) == 10 for r in res.values())


def test_two_step_evaluation_on_two_servers(locomo_path: Path, tmp_path: Path) -> None:
    db = tmp_path / "memory"
    with ScriptedOpenAIServer(MemoryResponder()) as build, ScriptedOpenAIServer(MemoryResponder()) as answer:
        step1 = [*_locomo(locomo_path, tmp_path / "b", "--mode", "build", "--db-path", str(db))]
        assert _main([*step1, *_endpoint(build, "trained-4b")]) == 0
        built = len(build.requests)
        step2 = _locomo(locomo_path, tmp_path / "a", "--mode", "answer", "--db-path", str(db))
        step2 += ["--questions", "3"]
        assert _main([*step2, *_endpoint(answer, "gpt-4.1-mini")]) == 0
        build_tags = Counter(r.tag for r in build.requests)
        build_models = {r.model for r in build.requests}
        answer_calls = Counter((r.tag, r.model) for r in answer.requests)
    # the build server saw the build and nothing after it; the answer server only answers and verdicts
    assert sum(build_tags.values()) == built > 0
    agents = {"agent:core", "agent:episodic", "agent:semantic", "agent:procedural", "compress:core"}
    assert set(build_tags) <= agents
    assert answer_calls == Counter({("answer", "gpt-4.1-mini"): 3, ("judge", "gpt-4.1"): 3})
    assert build_models == {"trained-4b"}
    s = _summary(tmp_path / "a")
    assert s["models"]["build"] is None and s["models"]["answer"] == "gpt-4.1-mini"
    assert s["protocol"]["name"] == "paper" and "answer_model" not in s["protocol"]["overrides"]


def test_json_mode_fallback_in_a_full_run(locomo_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "nojson"
    with ScriptedOpenAIServer(MemoryResponder(), reject_response_format=True) as server:
        argv = [*_locomo(locomo_path, out, "--questions", "3", "--sessions", "2"), *_endpoint(server)]
        assert _main(argv) == 0
        agent_calls = [r for r in server.requests if r.tag and r.tag.startswith("agent:")]
        judge_calls = [r for r in server.requests if r.tag == "judge"]

    def plain(body: dict) -> str:
        return json.dumps({k: v for k, v in body.items() if k != "response_format"}, sort_keys=True)

    # the first session's four agents were refused once each and sent again without JSON mode; the
    # second session's went without it at once. The judge (another model) learnt it the same way.
    refused = [r for r in agent_calls if "response_format" in r.body]
    assert len(refused) == 4 and len(agent_calls) == 4 + 8
    resent = {plain(r.body) for r in agent_calls if "response_format" not in r.body}
    assert {plain(r.body) for r in refused} <= resent
    judge_refused = [r for r in judge_calls if "response_format" in r.body]
    assert 1 <= len(judge_refused) <= 3 and len(judge_calls) == 3 + len(judge_refused)
    log = read_jsonl(out / "build_log.jsonl")
    assert log and all(c["ok"] for line in log for c in line["calls"])
    res = _results(out)
    assert len(res) == 3 and not any(r["judge_unreadable"] for r in res.values())
    # without the fallback the same server fails every agent: the session is not built and the run
    # says so with exit 1 (a failed build is never recorded as done)
    out2 = tmp_path / "nofallback"
    with ScriptedOpenAIServer(MemoryResponder(), reject_response_format=True) as server:
        argv = [*_locomo(locomo_path, out2, "--mode", "build", "--no-json-mode-fallback"), *_endpoint(server)]
        assert _main(argv) == 1
    summary = _summary(out2)
    assert [f["conversation_id"] for f in summary["failed_sessions"]] == ["conv-26"]
    assert "response_format" in summary["failed_sessions"][0]["reason"]
    assert summary["protocol"]["overrides"]["json_mode_fallback"] is False


# --------------------------------------------------------------------------------------------
# LongMemEval: the _s file by default, missing ids by name
# --------------------------------------------------------------------------------------------


def test_longmemeval_defaults_to_s_file_and_names_missing_ids(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    if not (data_dir / "longmemeval" / "longmemeval_s_498.json.xz").is_file():
        pytest.skip("LongMemEval _s file not found")
    monkeypatch.setenv("MEMBUILDER_DATA", str(data_dir))
    out = tmp_path / "lme"
    argv = [
        "--dataset",
        "longmemeval",
        "--split",
        "test",
        "--sample-id",
        "gpt4_7a0daae1,001be529",
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
    ]
    assert _main(argv) == 0
    err = capsys.readouterr().err
    assert "gpt4_7a0daae1" in err and "1 requested question id(s)" in err
    s = _summary(out)
    assert s["dataset"]["source"].endswith("longmemeval_s_498.json.xz")
    assert s["dataset"]["missing_ids"] == ["gpt4_7a0daae1"] and s["counts"]["questions"] == 1
    assert s["protocol"]["settings"]["longmemeval_file"] == "s"
    assert "longmemeval_file" not in s["protocol"]["overrides"]
    assert "gpt4_7a0daae1" in (out / "report.md").read_text()


def test_longmemeval_oracle_file_is_an_override(longmemeval_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "oracle"
    argv = [
        "--dataset",
        "longmemeval",
        "--data-path",
        str(longmemeval_dir / "longmemeval_oracle.json"),
        "--sample-id",
        "001be529",
        "--mode",
        "retrieval",
        "--builder",
        "raw",
        "--embedder",
        "hash",
        "--output-dir",
        str(out),
    ]
    assert _main(argv) == 0
    assert _summary(out)["protocol"]["overrides"] == {"embedder": "hash", "longmemeval_file": "oracle"}
    assert _main([*argv[:-1], str(tmp_path / "x"), "--longmemeval-file", "s"]) == 2


# --------------------------------------------------------------------------------------------
# The reference's flags
# --------------------------------------------------------------------------------------------


def test_reference_flags_are_accepted(tmp_path: Path, locomo_path: Path) -> None:
    fixture = Path(__file__).parent / "fixtures" / "perltqa"
    out = tmp_path / "p"
    base = ["--mode", "retrieval", "--builder", "raw", "--embedder", "hash"]
    argv = ["--dataset", "perltqa", "--data-path", str(fixture), "--num-users", "1", *base]
    argv += ["--parallel", "--workers", "2", "--vector-store", "faiss", "--output-dir", str(out)]
    assert _main(argv) == 0
    s = _summary(out)
    assert s["counts"]["conversations"] == 1
    assert s["config"]["concurrency"] == 2 and s["config"]["vector_store"] == "faiss"
    # --num-users is PerLTQA's
    bad = ["--dataset", "locomo", "--data-path", str(locomo_path), "--num-users", "1", *base]
    assert _main([*bad, "--output-dir", str(tmp_path / "l")]) == 2


def test_resuming_under_another_protocol_is_refused(locomo_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "r"
    argv = _locomo(locomo_path, out, "--mode", "retrieval", "--builder", "raw", "--questions", "3")
    assert _main(argv) == 0
    assert _main([*argv, "--resume"]) == 0
    assert _main([*argv, "--resume", "--protocol", "membuilder"]) == 2
    assert _main([*argv, "--resume", "--agent-retrieval", "per_kind"]) == 2
