"""Numbers a reviewer can trust: Wilson intervals, paired comparison, audited LoCoMo gold and the
judge probe (through the scripted server)."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from membuilder._files import read_jsonl
from membuilder.cli import main as cli_main
from membuilder.datasets import load_dataset
from membuilder.eval.audit import AuditError, join_audit
from membuilder.eval.stats import mcnemar, paired_bootstrap, proportion, wilson
from membuilder.judge import build_judge_messages
from membuilder.testing import ScriptedOpenAIServer
from membuilder.testing.responders import MemoryResponder

# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("k", "n", "lo", "hi"),
    # Newcombe (1998), "Two-sided confidence intervals for the single proportion", Stat. Med. 17,
    # Table I, method 3 (Wilson score, no continuity correction).
    [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)],
)
def test_wilson_matches_published_values(k: int, n: int, lo: float, hi: float) -> None:
    got = wilson(k, n)
    assert got is not None
    assert got[0] == pytest.approx(lo, abs=5e-5) and got[1] == pytest.approx(hi, abs=5e-5)


def test_wilson_edges() -> None:
    assert wilson(0, 0) is None and proportion(0, 0) == {"k": 0, "n": 0, "p": None, "ci95": None}
    assert wilson(7, 7)[1] == 1.0 and wilson(0, 7)[0] == 0.0
    lo, hi = wilson(5, 10)
    assert lo == pytest.approx(1 - hi)  # symmetric at p = 1/2
    with pytest.raises(ValueError):
        wilson(3, 2)


def test_paired_bootstrap_hand_computed() -> None:
    # Differences d = (1, 0, 0, 0, 0): a replicate's mean is Binomial(5, 1/5)/5, whose CDF is
    # 0.328 at 0, 0.737 at 0.2, 0.942 at 0.4, 0.993 at 0.6: the 2.5% quantile is 0 and the
    # 97.5% quantile 0.6, so the interval is [0, 0.6] and includes 0.
    r = paired_bootstrap([1, 0, 0, 0, 0], [0, 0, 0, 0, 0], seed=0)
    assert r["diff"] == pytest.approx(0.2)
    assert r["ci95"] == [0.0, 0.6] and r["distinguishable"] is False
    # the same seed gives the same interval; every pair differing the same way gives a point
    assert paired_bootstrap([1, 0, 0, 0, 0], [0] * 5, seed=0) == r
    s = paired_bootstrap([1, 1, 1, 1], [0, 0, 0, 0])
    assert s["ci95"] == [1.0, 1.0] and s["distinguishable"] is True
    with pytest.raises(ValueError):
        paired_bootstrap([1, 0], [1])


def test_mcnemar_exact() -> None:
    # 10 pairs only A got, 2 only B got: p = 2 * P[Bin(12, 1/2) <= 2] = 2 * (1 + 12 + 66) / 4096
    r = mcnemar([1] * 10 + [0] * 2 + [1] * 5, [0] * 10 + [1] * 2 + [1] * 5)
    assert (r["a_only"], r["b_only"]) == (10, 2)
    assert r["p_value"] == pytest.approx(2 * 79 / 4096)
    assert mcnemar([1, 0], [1, 0])["p_value"] == 1.0


# ---------------------------------------------------------------------------------------------
# Audited gold
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def audit_path(locomo_path: Path) -> Path:
    p = locomo_path.parent.parent / "locomo_audit" / "errors.json"
    if not p.is_file():
        pytest.skip(f"LoCoMo audit not found at {p}")
    return p


def test_audit_joins_all_156_entries(locomo_path: Path, audit_path: Path) -> None:
    joined = join_audit(audit_path, locomo_path)
    raw = json.loads(audit_path.read_text())
    assert len(raw) == len(joined) == 156
    questions = {q.id: q for q in load_dataset("locomo", locomo_path).questions}
    for e in raw:
        _, j = map(int, re.fullmatch(r"locomo_(\d+)_qa(\d+)", e["question_id"]).groups())
        entry = next(x for x in joined.values() if x.audit_id == e["question_id"])
        q = questions[entry.question_id]
        assert q.question == e["question"] and q.category_id == e["category"]
        assert entry.question_id.endswith(f"/q{j}")
    types = Counter(x.error_type for x in joined.values())
    assert types == {
        "WRONG_CITATION": 57,
        "HALLUCINATION": 33,
        "TEMPORAL_ERROR": 26,
        "ATTRIBUTION_ERROR": 24,
        "AMBIGUOUS": 13,
        "INCOMPLETE": 3,
    }
    assert sum(x.changes_answer for x in joined.values()) == 99


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda es: es[5].update(question="What did nobody ever ask?"), "does not match"),
        (lambda es: es[5].update(question_id="locomo_10_qa1"), "has 10 samples"),
        (lambda es: es[5].update(question_id="locomo_0_qa9999"), "questions"),
        (lambda es: es[5].update(question_id="conv-26/q1"), "expected 'locomo_<i>_qa<j>'"),
        (lambda es: es.append(dict(es[0])), "listed twice"),
    ],
)
def test_audit_join_fails_loudly(
    locomo_path: Path, audit_path: Path, tmp_path: Path, mutate: Any, message: str
) -> None:
    entries = json.loads(audit_path.read_text())
    mutate(entries)
    bad = tmp_path / "errors.json"
    bad.write_text(json.dumps(entries))
    with pytest.raises(AuditError, match=re.escape(message)) as info:
        join_audit(bad, locomo_path)
    assert str(bad) in str(info.value)


def _eval(argv: list[str]) -> int:
    return cli_main(["eval", *argv, "--no-progress"])


def _retrieval_run(locomo_path: Path, out: Path, embedder: str, *extra: str) -> Path:
    argv = [
        "--dataset",
        "locomo",
        "--data-path",
        str(locomo_path),
        "--conv-id",
        "conv-26",
        "--mode",
        "retrieval",
    ]
    assert _eval([*argv, "--builder", "raw", "--embedder", embedder, "--output-dir", str(out), *extra]) == 0
    return out


def test_retrieval_report_has_intervals_audited_recall_and_units(
    locomo_path: Path, audit_path: Path, tmp_path: Path
) -> None:
    out = _retrieval_run(locomo_path, tmp_path / "run", "hash")
    summary = json.loads((out / "summary.json").read_text())
    res = {r["question_id"]: r for r in read_jsonl(out / "results.jsonl")}
    joined = {k: v for k, v in join_audit(audit_path, locomo_path).items() if v.conversation_id == "conv-26"}
    m, a = summary["metrics"], summary["metrics_audited"]
    # every recall has its Wilson interval and n
    for block in [m["overall"], *m["by_category"].values(), a["overall"]]:
        for lv in ("turn", "session"):
            rec = block["recall"][lv]
            for k in (1, 5, 10):
                p, ci = rec[f"recall@{k}"], rec["ci95"][f"recall@{k}"]
                hits = round(p * rec["n"])
                assert ci == proportion(hits, rec["n"])["ci95"] and ci[0] <= p <= ci[1]
    # every line keeps its retrieved ids and their provenance
    for r in res.values():
        assert len(r["retrieved_provenance"]) == len(r["retrieved_ids"]) > 0
        assert all(set(p) == {"session", "turns"} for p in r["retrieved_provenance"])
    # audited ranks come from the corrected evidence: recompute from the recorded provenance
    for qid, e in joined.items():
        r = res[qid]
        assert r["audit_error_type"] == e.error_type
        turns = set(e.correct_evidence)
        want = next((i for i, p in enumerate(r["retrieved_provenance"], 1) if turns & set(p["turns"])), None)
        if "turn" in r["evidence_ranks_audited"]:
            assert r["evidence_ranks_audited"]["turn"] == want
    # AMBIGUOUS questions leave the audited numbers and are reported apart
    amb = sorted(q for q, e in joined.items() if e.ambiguous)
    assert summary["audit"]["in_run_ambiguous"] == amb and len(amb) == 3
    assert summary["audit"]["ambiguous"]["original"]["questions"] == len(amb)
    headline_amb = sum(1 for q in amb if res[q]["headline"])
    assert a["overall"]["questions"] == m["overall"]["questions"] - headline_amb
    assert a["overall"]["recall"]["turn"]["n"] == sum(
        1
        for q, r in res.items()
        if r["headline"] and q not in amb and "turn" in r.get("evidence_ranks_audited", r["evidence_ranks"])
    )
    # the audited turn-level recall@10 recounted by hand
    hits = sum(
        1
        for q, r in res.items()
        if r["headline"]
        and q not in amb
        and (r.get("evidence_ranks_audited", r["evidence_ranks"]).get("turn") or 99) <= 10
    )
    assert a["overall"]["recall"]["turn"]["recall@10"] == pytest.approx(
        hits / a["overall"]["recall"]["turn"]["n"]
    )
    # per-unit rows and the report
    assert set(m["by_unit"]["rows"]) == {"conv-26"} and m["by_unit"]["unit"] == "conversation"
    report = (out / "report.md").read_text()
    for text in (
        "Wilson",
        "Turn-level evidence recall",
        "Session-level evidence recall",
        "R@10 % audited",
        "AMBIGUOUS",
        "Per conversation",
        "conv-26",
    ):
        assert text in report

    # --gold original: no audit columns; a missing explicit audit file is one line, exit 2
    plain = _retrieval_run(locomo_path, tmp_path / "plain", "hash", "--gold", "original")
    assert "metrics_audited" not in json.loads((plain / "summary.json").read_text())
    assert (
        _eval(
            [
                "--dataset",
                "locomo",
                "--data-path",
                str(locomo_path),
                "--conv-id",
                "conv-26",
                "--mode",
                "retrieval",
                "--builder",
                "raw",
                "--embedder",
                "hash",
                "--output-dir",
                str(tmp_path / "x"),
                "--audit-file",
                str(tmp_path / "missing.json"),
            ]
        )
        == 2
    )


# ---------------------------------------------------------------------------------------------
# compare
# ---------------------------------------------------------------------------------------------


def test_compare_runs(locomo_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _retrieval_run(locomo_path, tmp_path / "a", "hash")
    b = _retrieval_run(locomo_path, tmp_path / "b", "hash")
    weak = _retrieval_run(locomo_path, tmp_path / "weak", "hash:4")
    capsys.readouterr()

    # identical settings: every difference is 0 and nothing is distinguishable
    assert cli_main(["compare", str(a), str(b), "--format", "json", "--gold", "both"]) == 0
    same = json.loads(capsys.readouterr().out)
    rows = [r for t in same["tables"] for r in t["rows"]]
    assert rows and all(r["diff"] == 0 and not r["distinguishable"] for r in rows)
    assert {t["gold"] for t in same["tables"]} == {"original", "audited"}

    # a 4-dimensional hashed embedder is far worse: distinguishable, and the numbers add up
    assert (
        cli_main(["compare", str(a), str(weak), "--level", "session", "--output-dir", str(tmp_path / "cmp")])
        == 0
    )
    md = capsys.readouterr().out
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert (tmp_path / "cmp" / "compare.md").read_text().strip() == md.strip()
    overall = {r["metric"]: r for r in result["tables"][0]["rows"] if r["category"] == "overall (headline)"}
    assert overall["recall@5"]["distinguishable"] is True and "**yes**" in md
    ra = {r["question_id"]: r for r in read_jsonl(a / "results.jsonl")}
    rw = {r["question_id"]: r for r in read_jsonl(weak / "results.jsonl")}
    hit = lambda r: int((r["evidence_ranks"].get("session") or 99) <= 5)
    ids = [q for q, r in ra.items() if r["headline"] and "session" in r["evidence_ranks"]]
    assert overall["recall@5"]["n"] == len(ids)
    assert overall["recall@5"]["diff"] == pytest.approx(sum(hit(ra[q]) - hit(rw[q]) for q in ids) / len(ids))

    # different question sets: refused with one line, unless --force
    other = tmp_path / "other"
    assert (
        _eval(
            [
                "--dataset",
                "locomo",
                "--data-path",
                str(locomo_path),
                "--conv-id",
                "conv-30",
                "--mode",
                "retrieval",
                "--builder",
                "raw",
                "--embedder",
                "hash",
                "--output-dir",
                str(other),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert cli_main(["compare", str(a), str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "different question sets" in err and "--force" in err
    # different protocols: refused; --force compares anyway and says over what
    proto = tmp_path / "proto"
    shutil.copytree(b, proto)
    s = json.loads((proto / "summary.json").read_text())
    s["protocol"] = "paper"
    (proto / "summary.json").write_text(json.dumps(s))
    assert cli_main(["compare", str(a), str(proto)]) == 2
    assert "different protocols" in capsys.readouterr().err
    assert cli_main(["compare", str(a), str(proto), "--force", "--format", "json"]) == 0
    forced = json.loads(capsys.readouterr().out)
    assert any("protocols" in p for p in forced["forced_over"])


# ---------------------------------------------------------------------------------------------
# judge-probe and the judge in eval reports
# ---------------------------------------------------------------------------------------------

_WORD = re.compile(r"[a-z0-9]+")
_STOP = {
    "the",
    "and",
    "for",
    "with",
    "was",
    "are",
    "her",
    "his",
    "she",
    "him",
    "they",
    "that",
    "this",
    "from",
}


def _keywords(text: object) -> set[str]:
    return {w for w in _WORD.findall(str(text).lower()) if len(w) > 2 and w not in _STOP}


def _probe_items(locomo_path: Path, conv: str) -> dict[str, list[tuple[str, object, str, int]]]:
    """(question, gold, answer, category) per set, read straight from the files, for conv."""
    data = json.loads(locomo_path.read_text())
    i = next(n for n, s in enumerate(data) if s["sample_id"] == conv)
    qa = data[i]["qa"]
    out: dict[str, list[tuple[str, object, str, int]]] = {}
    for name in ("specific_wrong", "vague_wrong"):
        f = json.loads((locomo_path.parent.parent / "locomo_audit" / f"judge_probe_{name}.json").read_text())
        out[name] = [
            (qa[j]["question"], qa[j]["answer"], e["generated_answer"], qa[j]["category"])
            for e in f["detailed_results"][f"locomo_exp_user_{i}"]
            for j in [int(e["question_id"].split("qa")[1])]
        ]
    out["gold"] = [
        (q["question"], q["answer"], str(q["answer"]), q["category"]) for q in qa if q["category"] != 5
    ]
    return out


class _LookupJudge:
    """A scripted judge: the verdict of each known judge prompt, by its user message."""

    def __init__(self, verdicts: dict[str, bool]) -> None:
        self.verdicts = verdicts

    def __call__(self, request: Any) -> str:
        user = next(m["content"] for m in request.messages if m["role"] == "user")
        ok = self.verdicts.get(user, True)
        return json.dumps({"label": "CORRECT" if ok else "WRONG"})


def _probe(server: ScriptedOpenAIServer, locomo_path: Path, out: Path, *extra: str) -> dict[str, Any]:
    argv = [
        "judge-probe",
        "--data-path",
        str(locomo_path),
        "--judge-model",
        "scripted-model",
        "--provider",
        "compatible",
        "--base-url",
        server.base_url,
        "--api-key",
        "sk-test",
        "--conv-id",
        "conv-26",
        "--output-dir",
        str(out),
        *extra,
    ]
    assert cli_main(argv) == 0
    return json.loads((out / "judge_probe.json").read_text())


def test_judge_probe_counts(locomo_path: Path, audit_path: Path, tmp_path: Path) -> None:
    items = _probe_items(locomo_path, "conv-26")
    verdicts = {
        build_judge_messages(q, gold, ans)[-1]["content"]: bool(_keywords(gold) & _keywords(ans))
        for its in items.values()
        for q, gold, ans, _ in its
    }
    with ScriptedOpenAIServer(_LookupJudge(verdicts)) as server:
        result = _probe(server, locomo_path, tmp_path / "kw")
    names = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop"}
    for name, its in items.items():
        s = result["sets"][name]
        # counted by hand: items whose answer shares a keyword with the gold
        accepted = sum(1 for _, gold, ans, _ in its if _keywords(gold) & _keywords(ans))
        assert (s["overall"]["k"], s["overall"]["n"], s["failed"]) == (accepted, len(its), 0)
        assert s["overall"]["ci95"] == proportion(accepted, len(its))["ci95"]
        for cid, cname in names.items():
            sub = [(g, a) for _, g, a, c in its if c == cid]
            got = s["by_category"][cname]
            assert (got["k"], got["n"]) == (sum(1 for g, a in sub if _keywords(g) & _keywords(a)), len(sub))
    assert result["sets"]["specific_wrong"]["rate"] == "false accept"
    assert result["sets"]["gold"]["rate"] == "true accept"
    assert 0 < result["sets"]["vague_wrong"]["overall"]["k"] < len(items["vague_wrong"])

    # a judge that always says CORRECT accepts everything
    with ScriptedOpenAIServer(_LookupJudge({})) as server:
        lenient = _probe(server, locomo_path, tmp_path / "always", "--limit", "40")
    for s in lenient["sets"].values():
        assert s["overall"]["p"] == 1.0 and s["overall"]["k"] == s["overall"]["n"] > 0


def test_eval_report_names_judge_rounds_probe_and_audited_accuracy(
    locomo_path: Path, audit_path: Path, tmp_path: Path
) -> None:
    out = tmp_path / "full"
    with ScriptedOpenAIServer(MemoryResponder()) as server:
        probe = _probe(server, locomo_path, out / "judge-probe")
        argv = [
            "--dataset",
            "locomo",
            "--data-path",
            str(locomo_path),
            "--conv-id",
            "conv-26",
            "--sessions",
            "3",
            "--questions",
            "5",
            "--mode",
            "full",
            "--builder",
            "raw",
            "--embedder",
            "hash",
            "--judge-rounds",
            "3",
            "--output-dir",
            str(out),
            "--provider",
            "compatible",
            "--base-url",
            server.base_url,
            "--api-key",
            "sk-test",
            "--model",
            "scripted-model",
            "--judge-model",
            "scripted-model",
        ]
        assert _eval(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    res = {r["question_id"]: r for r in read_jsonl(out / "results.jsonl")}
    joined = join_audit(audit_path, locomo_path)
    j = summary["judge"]
    assert (
        j["model"] == "scripted-model"
        and j["rounds"] == 3
        and j["prompt_version"] == probe["judge"]["prompt_version"]
    )
    assert j["probe"]["rates"] == probe["rates"]
    # the scripted judge is deterministic: all three rounds agree on every answer
    assert j["agreement"]["k"] == j["agreement"]["n"] == len(res)
    for qid, r in res.items():
        assert len(r["judge_rounds"]) == 3 and r["judge_correct"] == r["judge_rounds"][0]
        assert r["usage"]["prompt_tokens"] > 0 and r["wall_s"] >= 0
        e = joined.get(qid)
        if e is not None and e.changes_answer:
            assert r["audited"]["gold"] == e.correct_answer and r["audited"]["judge_correct"] in (True, False)
        else:
            assert "audited" not in r
    assert any(e.changes_answer for q, e in joined.items() if q in res)
    acc = summary["metrics"]["overall"]["answer"]
    assert acc["accuracy_ci95"] == proportion(acc["correct"], acc["judged"])["ci95"]
    report = (out / "report.md").read_text()
    assert "scripted-model" in report and j["prompt_version"] in report
    assert "judge_probe.json" in report and "accuracy % audited" in report
    assert summary["per_question"]["prompt_tokens"]["n"] == len(res)


# ---------------------------------------------------------------------------------------------
# Per-unit rows and judging rounds
# ---------------------------------------------------------------------------------------------


def test_units_per_character_and_per_question_type(longmemeval_dir: Path, tmp_path: Path) -> None:
    fixture = Path(__file__).parent / "fixtures" / "perltqa"
    out = tmp_path / "p"
    argv = ["--dataset", "perltqa", "--data-path", str(fixture), "--mode", "retrieval", "--builder", "raw"]
    assert _eval([*argv, "--embedder", "hash", "--output-dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    units = summary["metrics"]["by_unit"]
    res = read_jsonl(out / "results.jsonl")
    assert units["unit"] == "character" and set(units["rows"]) == {r["conversation_id"] for r in res}
    for unit, block in units["rows"].items():
        assert block["questions"] == sum(1 for r in res if r["conversation_id"] == unit and r["headline"])
    assert "metrics_audited" not in summary and summary["gold"] == "original"
    assert "Per character" in (out / "report.md").read_text()

    lme = tmp_path / "lme"
    argv = ["--dataset", "longmemeval", "--data-path", str(longmemeval_dir / "longmemeval_oracle.json")]
    argv += ["--questions", "3", "--mode", "retrieval", "--builder", "raw", "--embedder", "hash"]
    assert _eval([*argv, "--output-dir", str(lme)]) == 0
    units = json.loads((lme / "summary.json").read_text())["metrics"]["by_unit"]
    assert units == {"unit": "question_type", "same_as": "by_category"}


class _Verdict:
    def __init__(self, correct: bool | None) -> None:
        self.correct, self.raw, self.error, self.attempts = correct, None, None, 1
        self.usage = {"prompt_tokens": 10, "completion_tokens": 1}


class _FakeJudge:
    """Replies with a scripted label per round: round r's copy holds a client seeded with r."""

    def __init__(self, labels: dict[int | None, bool | None]) -> None:
        self.labels = labels
        self.llm = self
        self.model = "m"
        self.seen: list[int | None] = []

    async def judge(self, question: str, gold: object, answer: str) -> _Verdict:
        seed = getattr(self.llm, "seed", None)
        self.seen.append(seed)
        return _Verdict(self.labels[seed])


@pytest.mark.parametrize(
    ("labels", "correct", "agreement"),
    [
        ({None: True, 1: True, 2: False}, True, False),
        ({None: False, 1: None, 2: False}, False, True),
        ({None: True, 1: False}, None, False),  # a tie is not a label
        ({None: True, 1: True, 2: True}, True, True),
    ],
)
def test_rounds_judge_majority(
    labels: dict[int | None, bool | None], correct: bool | None, agreement: bool
) -> None:
    import asyncio

    from membuilder.eval.judging import RoundsJudge

    inner = _FakeJudge(labels)
    rj = RoundsJudge(inner, rounds=len(labels))
    v = asyncio.run(rj.judge("q", "g", "a"))
    assert inner.seen == list(labels)  # round 0 is the plain request, round r carries seed r
    assert v.rounds == list(labels.values()) and v.correct is correct and v.agreement is agreement
    assert v.usage["prompt_tokens"] == 10 * len(labels)
