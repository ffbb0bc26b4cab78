"""End to end: trajectories -> synthetic QA -> SFT / RL exports, through the scripted server.

Two LongMemEval ``sft`` conversations are recorded with MemoryResponder standing in for the expert;
a second recording is interrupted at a known session, resumed with ``--skip-existing``, and must
give the same bytes. The SFT files are checked against LLaMA-Factory's documented layouts (the
field names and role alternation its converters read), the RL parquet against what veRL's
dataset and reward managers read.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any

import pytest
from membuilder import MembuilderError, MemoryState, parse_actions
from membuilder.cli import main as cli_main
from membuilder.data.schemas import (
    AGENT_ORDER,
    QA_TYPES,
    AgentCallRecord,
    DataFormatError,
    decode_ground_truth,
    encode_json,
    state_path,
)
from membuilder.data.trajectories import iter_conversations, read_meta
from membuilder.testing import ScriptedOpenAIServer
from membuilder.testing.responders import MemoryResponder

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

SESSIONS = 3


def typed_qa(request: Any) -> str:
    """MemoryResponder's default qa-gen reply (question/answer/evidence from the session's turns), made to
    follow our prompt: a ``type`` (cycled so every one is exercised), a short answer (its turn's
    first 120 characters) and a question made unique by naming its turn."""
    data = json.loads(MemoryResponder().qa_gen(request, n=3))
    for k, item in enumerate(data["questions"]):
        item["type"] = QA_TYPES[k % len(QA_TYPES)]
        item["answer"] = item["answer"][:120]
        item["question"] = f"{item['question']} (turn {item['evidence'][0]})"
    return json.dumps(data)


class FailingOn:
    """A responder that fails (HTTP 400, not retried) every agent request whose prompt contains
    ``marker``, until ``healthy`` is set."""

    def __init__(self, marker: str) -> None:
        self.inner = MemoryResponder(qa_gen=typed_qa)
        self.marker = marker
        self.healthy = threading.Event()
        self.failed = 0

    def __call__(self, request: Any) -> str:
        if not self.healthy.is_set() and str(request.tag).startswith("agent:"):
            text = "\n".join(str(m.get("content", "")) for m in request.messages)
            if self.marker in text:
                self.failed += 1
                raise RuntimeError("simulated outage")
        return self.inner(request)


@pytest.fixture(scope="module")
def sft_ids(longmemeval_dir: Path) -> list[str]:
    """The first two ``sft`` conversations that have at least two sessions."""
    oracle = {
        q["question_id"]: q for q in json.loads((longmemeval_dir / "longmemeval_oracle.json").read_text())
    }
    splits = json.loads((longmemeval_dir / "longmemeval_splits.json").read_text())
    ids = [i for i in splits["sft"] if len(oracle[i]["haystack_sessions"]) >= 2][:2]
    assert len(ids) == 2
    return ids


def _traj_args(server: ScriptedOpenAIServer, data: Path, out: Path, ids: list[str], *extra: str) -> list[str]:
    args = [
        "trajectories",
        "--dataset", "longmemeval", "--split", "sft",
        "--data-path", str(data / "longmemeval_oracle.json"),
        "--expert-model", "expert-m", "--provider", "compatible",
        "--base-url", server.base_url, "--api-key", "k",
        "--embedder", "openai:emb-test",
        "--sessions", str(SESSIONS),
        "--max-retries", "0",
        "--output-dir", str(out),
    ]  # fmt: skip
    for i in ids:
        args += ["--conv-id", i]
    return args + list(extra)


def _files(root: Path) -> dict[str, bytes]:
    """Every output file's bytes, minus the run log and the response cache (wall-clock, cache hits)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel != "run_log.jsonl" and not rel.startswith(".llm_cache"):
            out[rel] = p.read_bytes()
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory, longmemeval_dir: Path, sft_ids: list[str]) -> dict[str, Any]:
    """One uninterrupted recording (parallel) plus QA, shared by the tests below."""
    root = tmp_path_factory.mktemp("traj")
    responder = MemoryResponder(qa_gen=typed_qa)
    with ScriptedOpenAIServer(responder) as server:
        rc = cli_main(_traj_args(server, longmemeval_dir, root, sft_ids, "--parallel", "--workers", "2"))
        assert rc == 0
        agent_requests = sum(server.count(f"agent:{a}") for a in AGENT_ORDER)
        rc = cli_main(
            [
                "qa-gen", "--trajectories", str(root), "--per-session", "3", "--model", "qa-m",
                "--provider", "compatible", "--base-url", server.base_url, "--api-key", "k",
            ]
        )  # fmt: skip
        assert rc == 0
        qa_requests = server.count("qa-gen")
    return {"root": root, "agent_requests": agent_requests, "qa_requests": qa_requests, "base_url": None}


# ---------------------------------------------------------------------------------------------
# Trajectories
# ---------------------------------------------------------------------------------------------


def test_trajectories_record_every_session_and_agent(built, sft_ids):
    root = built["root"]
    convs = iter_conversations(root)
    assert [c.meta.conversation_id for c in convs] == sorted(sft_ids)
    for conv in convs:
        meta = conv.meta
        assert meta.complete and meta.expert_model == "expert-m" and meta.split == "sft"
        assert [s.index for s in meta.sessions] == list(range(len(meta.sessions)))
        assert 2 <= len(meta.sessions) <= SESSIONS
        # Sessions chain: the state after one is the state before the next.
        for prev, nxt in zip(meta.sessions, meta.sessions[1:]):
            assert prev.state_after == nxt.state_before
        assert meta.final_state == meta.sessions[-1].state_after
        for s in meta.sessions:
            calls = conv.session_calls(s.index)
            assert [c.agent for c in calls] == list(AGENT_ORDER)
            for c in calls:
                assert c.state_before == s.state_before
                assert c.model == "expert-m"
                assert [m.role for m in c.prompt] == ["system", "user"]
                assert c.raw_output
                # The record's parse is what the core makes of the raw output.
                parsed = parse_actions(c.agent, c.raw_output)
                assert c.ok == parsed.ok
                assert c.content_chars == parsed.content_chars
                assert c.actions == [a.to_dict() for a in parsed.actions]
                assert c.content_tokens == c.content_chars // 4
                assert c.usage.prompt_tokens > 0
    # The empty start state of both conversations is stored once.
    firsts = {c.meta.sessions[0].state_before for c in convs}
    assert len(firsts) == 1
    # Every referenced state is a loadable file named by the sha256 of its bytes.
    for digest in {s.state_before for c in convs for s in c.meta.sessions}:
        path = state_path(root, digest)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
        MemoryState.load(path)
    first = MemoryState.load(state_path(root, next(iter(firsts))))
    assert len(first) == 0 and first.core == ""
    last = MemoryState.load(state_path(root, convs[0].meta.final_state))
    assert len(last) > 0


def test_interrupted_then_resumed_run_is_byte_identical(built, tmp_path, longmemeval_dir, sft_ids):
    root = tmp_path / "traj"
    victim = min(sft_ids)
    convs = {c.meta.conversation_id: c for c in iter_conversations(built["root"])}
    # Fail on the second session of one conversation: the first is recorded, the rest is not.
    marker = convs[victim].meta.sessions[1].messages[0].turn_id
    assert marker
    responder = FailingOn(f"[{marker}]")
    with ScriptedOpenAIServer(responder) as server:
        rc = cli_main(_traj_args(server, longmemeval_dir, root, sft_ids))
        assert rc == 1
        assert responder.failed >= 1
        meta = read_meta(root / "conversations" / victim / "metadata.json")
        assert not meta.complete and len(meta.sessions) == 1
        # A crash while appending the next session's lines leaves a torn tail; resume drops it.
        with open(root / "conversations" / victim / "agent_calls.jsonl", "ab") as fh:
            fh.write(b'{"version":1,"conversation_id":"torn')
        responder.healthy.set()
        rc = cli_main(_traj_args(server, longmemeval_dir, root, sft_ids, "--skip-existing"))
        assert rc == 0
    expected = {
        k: v for k, v in _files(built["root"]).items() if not k.endswith(("qa.jsonl", "qa_manifest.json"))
    }
    assert _files(root) == expected


def test_more_sessions_extend_a_recording(built, tmp_path, longmemeval_dir, sft_ids):
    """Recording one session, then asking for more with --skip-existing, equals recording all at once."""
    root = tmp_path / "traj"
    with ScriptedOpenAIServer(MemoryResponder(qa_gen=typed_qa)) as server:
        args = _traj_args(server, longmemeval_dir, root, sft_ids)
        short = list(args)
        short[short.index("--sessions") + 1] = "1"
        assert cli_main(short) == 0
        assert all(len(c.meta.sessions) == 1 for c in iter_conversations(root))
        assert cli_main([*args, "--skip-existing"]) == 0
    expected = {
        k: v for k, v in _files(built["root"]).items() if not k.endswith(("qa.jsonl", "qa_manifest.json"))
    }
    assert _files(root) == expected


def test_skip_existing_on_complete_output_calls_nothing(built, tmp_path, longmemeval_dir, sft_ids):
    root = tmp_path / "copy"
    import shutil

    shutil.copytree(built["root"], root)
    with ScriptedOpenAIServer(MemoryResponder()) as server:
        rc = cli_main(
            _traj_args(server, longmemeval_dir, root, sft_ids, "--skip-existing", "--cache-dir", "none")
        )
        assert rc == 0
        assert server.count(path="/chat/completions") == 0


def test_existing_output_is_refused_without_skip_or_overwrite(
    built, tmp_path, longmemeval_dir, sft_ids, capsys
):
    root = tmp_path / "copy"
    import shutil

    shutil.copytree(built["root"], root)
    with ScriptedOpenAIServer(MemoryResponder()) as server:
        rc = cli_main(_traj_args(server, longmemeval_dir, root, sft_ids))
        assert rc != 0
        assert server.count(path="/chat/completions") == 0
    assert "--skip-existing" in capsys.readouterr().err
    # A different expert in the same directory is refused before anything runs.
    with ScriptedOpenAIServer(MemoryResponder()) as server:
        args = _traj_args(server, longmemeval_dir, root, sft_ids, "--skip-existing")
        args[args.index("expert-m")] = "other-model"
        assert cli_main(args) == 2
        assert server.count(path="/chat/completions") == 0
    assert "other settings" in capsys.readouterr().err


def test_readers_refuse_another_version(built, tmp_path):
    conv_dir = next((built["root"] / "conversations").iterdir())
    meta = json.loads((conv_dir / "metadata.json").read_text())
    meta["version"] = 99
    bad = tmp_path / "metadata.json"
    bad.write_text(json.dumps(meta))
    with pytest.raises(DataFormatError, match=r"version 99.*reads version 1"):
        read_meta(bad)
    line = (conv_dir / "agent_calls.jsonl").read_bytes().splitlines()[0]
    from membuilder.data.schemas import decode_versioned

    record = decode_versioned(line, AgentCallRecord, 1, what="agent call")
    assert record.version == 1
    with pytest.raises(DataFormatError, match="no 'version' field"):
        decode_versioned(b'{"conversation_id": "x"}', AgentCallRecord, 1, what="agent call")


# ---------------------------------------------------------------------------------------------
# Synthetic QA
# ---------------------------------------------------------------------------------------------


def test_qa_gen_writes_validated_questions_per_session(built):
    from membuilder.data.qagen import read_qa

    root = built["root"]
    sessions = 0
    for conv in iter_conversations(root):
        records = read_qa(conv.dir)
        assert [r.session_index for r in records] == [s.index for s in conv.meta.sessions]
        for r, s in zip(records, conv.meta.sessions):
            sessions += 1
            assert r.error is None and r.model == "qa-m" and r.state_before == s.state_before
            assert len(r.questions) == 3
            turn_ids = {m.turn_id for m in s.messages}
            for k, q in enumerate(r.questions):
                assert q.id == f"{conv.meta.conversation_id}:{s.index}:{k}"
                assert q.type in QA_TYPES and q.question and q.answer
                assert q.asked_at == s.timestamp
                assert set(q.evidence) <= turn_ids
    assert built["qa_requests"] == sessions


def test_qa_validation_rejects_bad_items_and_asks_again(tmp_path, built):
    """A reply with invalid items is answered with the reasons; valid items from both replies count."""
    import asyncio
    import shutil

    from membuilder.data.qagen import generate_qa, read_qa
    from membuilder.llm import LLMClient, LLMConfig

    root = tmp_path / "t"
    shutil.copytree(built["root"], root)
    good = [
        {"question": f"What did I say about topic {k}?", "answer": f"thing {k}", "type": "single-session"}
        for k in range(3)
    ]
    first = json.dumps(
        {
            "questions": [
                good[0],
                {"question": "Where?", "answer": "", "type": "single-session"},
                {"question": "When?", "answer": "x", "type": "bogus"},
                good[0],
            ]
        }
    )
    second = json.dumps({"questions": good[1:]})

    def replies(request: Any) -> str:
        # Sessions are asked concurrently, so answer by position in the exchange, not by order.
        return first if len(request.messages) == 2 else second

    with ScriptedOpenAIServer(replies) as server:

        async def go():
            llm = LLMClient(
                LLMConfig(model="qa-m", base_url=server.base_url, api_key="k", provider="compatible")
            )
            try:
                return await generate_qa(
                    root,
                    llm,
                    n=3,
                    model="qa-m",
                    overwrite=True,
                    workers=1,
                    conversation_ids=[iter_conversations(root)[0].meta.conversation_id],
                )
            finally:
                await llm.aclose()

        counts = asyncio.run(go())
        feedback = [r for r in server.requests if r.tag == "qa-gen" and len(r.messages) > 2]
    assert counts["sessions_with_error"] == 0
    assert feedback and "more question(s) are needed" in feedback[0].messages[-1]["content"]
    rec = read_qa(iter_conversations(root)[0].dir)[0]
    assert [q.question for q in rec.questions] == [g["question"] for g in good]
    assert any(r.reason.startswith("'type' must be one of") for r in rec.rejected)
    assert {r.reason for r in rec.rejected} >= {"missing or empty 'answer'", "duplicate question"}
    assert rec.attempts == 2


# ---------------------------------------------------------------------------------------------
# SFT export (LLaMA-Factory layouts, data/README.md and its converters)
# ---------------------------------------------------------------------------------------------


def _check_alpaca(sample: dict, entry: dict) -> None:
    cols = entry["columns"]
    # LLaMA-Factory's converter reads example[column] for every mapped column: all must exist.
    assert set(cols.values()) <= set(sample)
    assert entry.get("formatting", "alpaca") == "alpaca"
    assert isinstance(sample[cols["prompt"]], str) and sample[cols["prompt"]]
    assert isinstance(sample[cols["query"]], str)
    assert isinstance(sample[cols["response"]], str) and sample[cols["response"]]
    assert isinstance(sample[cols["system"]], str)
    assert isinstance(sample[cols["history"]], list)
    for pair in sample[cols["history"]]:
        assert len(pair) == 2 and all(isinstance(x, str) for x in pair)


def _check_sharegpt(sample: dict, entry: dict) -> None:
    assert entry["formatting"] == "sharegpt"
    tags = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt"}
    tags.update(entry.get("tags", {}))
    assert set(entry["columns"].values()) <= set(sample)
    msgs = sample[entry["columns"]["messages"]]
    # LLaMA-Factory: user/observation at odd positions, assistant/function at even, an even count.
    assert len(msgs) % 2 == 0 and msgs
    for k, m in enumerate(msgs):
        assert m[tags["role_tag"]] == (tags["user_tag"] if k % 2 == 0 else tags["assistant_tag"])
        assert isinstance(m[tags["content_tag"]], str)
    assert isinstance(sample[entry["columns"]["system"]], str)


@pytest.mark.parametrize("fmt, ext", [("alpaca", ".json"), ("sharegpt", ".jsonl")])
def test_export_sft_layouts(built, tmp_path, fmt, ext):
    out = tmp_path / f"mem_sft{ext}"
    rc = cli_main(["export-sft", "--trajectories", str(built["root"]), "--format", fmt,
                   "--max-length", "20000", "--output", str(out)])  # fmt: skip
    assert rc == 0
    text = out.read_text()
    samples = json.loads(text) if ext == ".json" else [json.loads(line) for line in text.splitlines()]
    info = json.loads(Path(f"{out}.dataset_info.json").read_text())
    assert list(info) == ["mem_sft"] and info["mem_sft"]["file_name"] == out.name
    entry = info["mem_sft"]
    check = _check_alpaca if fmt == "alpaca" else _check_sharegpt
    for s in samples:
        check(s, entry)
    report = json.loads(Path(f"{out}.report.json").read_text())
    convs = iter_conversations(built["root"])
    # --balance session (the default): a session counts only when all four expert outputs passed.
    ok_calls = [
        c
        for conv in convs
        for s in conv.meta.sessions
        if all(x.ok for x in conv.session_calls(s.index))
        for c in conv.session_calls(s.index)
    ]
    assert ok_calls
    assert sum(report["samples"].values()) == len(samples) == len(ok_calls)
    assert report["samples"] == {a: sum(1 for c in ok_calls if c.agent == a) for a in AGENT_ORDER}
    assert report["length_unit"] == "approx_tokens"
    # The response is the expert's raw output and the prompt its system + user messages.
    first = ok_calls[0]
    if fmt == "alpaca":
        assert samples[0]["output"] == first.raw_output
        assert samples[0]["system"] == first.prompt[0].content
        assert samples[0]["instruction"] == first.prompt[1].content
    else:
        assert samples[0]["conversations"][-1]["value"] == first.raw_output


def test_export_sft_drops_and_counts_over_length(built, tmp_path):
    from membuilder.data.export_sft import approx_length, export_sft

    convs = iter_conversations(built["root"])
    calls = [c for conv in convs for c in conv.calls]
    lengths = sorted(approx_length(c) for c in calls)
    limit = lengths[len(lengths) // 2]
    for balance in ("none", "session"):
        report = export_sft(built["root"], tmp_path / f"s_{balance}.json", fmt="alpaca", max_length=limit,
                            balance=balance)  # fmt: skip
        too_long = {
            a: sum(1 for c in calls if c.agent == a and approx_length(c) > limit) for a in AGENT_ORDER
        }
        assert report.dropped_too_long == too_long
        assert report.max_sample_length <= limit
        kept = sum(report.samples.values())
        if balance == "none":
            assert kept == len(calls) - sum(too_long.values())
        else:
            # Whole sessions only: the four agents keep the same number of samples.
            assert len(set(report.samples.values())) == 1
            assert kept + sum(too_long.values()) + sum(report.dropped_unbalanced.values()) == len(calls)


def test_export_sft_counts_with_a_tokenizer(built, tmp_path):
    from membuilder.data.export_sft import export_sft, tokenizer_counter

    class WordTokenizer:
        chat_template = None

        def encode(self, text, add_special_tokens=False):
            return text.split()

    report = export_sft(built["root"], tmp_path / "t.jsonl", fmt="sharegpt", max_length=10**9,
                        count=tokenizer_counter(WordTokenizer()))  # fmt: skip
    assert report.length_unit == "tokens"
    calls = [c for conv in iter_conversations(built["root"]) for c in conv.calls]
    words = max(sum(len(m.content.split()) for m in c.prompt) + len(c.raw_output.split()) for c in calls)
    assert report.max_sample_length == words


def test_export_sft_tokenizer_without_transformers_is_a_clear_error(built, tmp_path, capsys):
    try:
        import transformers  # noqa: F401

        pytest.skip("transformers is installed")
    except ImportError:
        pass
    rc = cli_main(["export-sft", "--trajectories", str(built["root"]), "--tokenizer", str(tmp_path),
                   "--output", str(tmp_path / "x.json")])  # fmt: skip
    assert rc == 2
    assert "transformers" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# RL export (veRL parquet)
# ---------------------------------------------------------------------------------------------


def test_export_rl_rows_and_ground_truth(built, tmp_path):
    from membuilder.data.export_rl import read_rl, resolve_state
    from membuilder.data.qagen import read_qa

    out = tmp_path / "rl" / "train.parquet"
    rc = cli_main(["export-rl", "--trajectories", str(built["root"]), "--output", str(out)])
    assert rc == 0
    table = pq.read_table(out)
    assert set(table.column_names) == {"prompt", "data_source", "ability", "reward_model", "extra_info"}
    rows = read_rl(out)
    convs = iter_conversations(built["root"])
    n_sessions = sum(len(c.meta.sessions) for c in convs)
    assert len(rows) == 4 * n_sessions
    # Sessions stay together, agents in order; conversations by id.
    expected_keys = [
        (c.meta.conversation_id, s.index, a) for c in convs for s in c.meta.sessions for a in AGENT_ORDER
    ]
    got_keys = [
        (r["extra_info"]["conversation_id"], r["extra_info"]["session_index"], r["extra_info"]["agent"])
        for r in rows
    ]
    assert got_keys == expected_keys
    assert [r["extra_info"]["index"] for r in rows] == list(range(len(rows)))
    for conv in convs:
        qa = {r.session_index: r for r in read_qa(conv.dir)}
        for s in conv.meta.sessions:
            calls = conv.session_calls(s.index)
            group = [
                r
                for r in rows
                if r["extra_info"]["session_group"] == f"{conv.meta.conversation_id}:{s.index}"
            ]
            for row, call in zip(group, calls):
                assert row["data_source"] == "membuilder/longmemeval"
                assert row["reward_model"]["style"] == "rule"
                assert row["prompt"] == [{"role": m.role, "content": m.content} for m in call.prompt]
                truth = row["truth"]
                assert truth.agent == call.agent and truth.session_index == s.index
                assert truth.expert_content_chars == parse_actions(call.agent, call.raw_output).content_chars
                assert truth.expert_content_tokens == truth.expert_content_chars // 4
                assert [e.agent for e in truth.experts] == list(AGENT_ORDER)
                assert [e.raw_output for e in truth.experts] == [c.raw_output for c in calls]
                assert [q.question for q in truth.qa] == [q.question for q in qa[s.index].questions]
                assert truth.embedder == "openai:emb-test" and truth.timestamp == s.timestamp
                assert not Path(truth.state_before).is_absolute()
                path = resolve_state(out, truth.state_before)
                assert hashlib.sha256(path.read_bytes()).hexdigest() == truth.state_sha256 == s.state_before
                state = MemoryState.load(path)
                assert state.dim == truth.embedding_dim
    report = json.loads(Path(f"{out}.report.json").read_text())
    assert report["rows"] == len(rows) and report["rows_per_agent"] == {a: n_sessions for a in AGENT_ORDER}
    # Re-exporting gives the same bytes.
    data = out.read_bytes()
    assert cli_main(["export-rl", "--trajectories", str(built["root"]), "--output", str(out)]) == 0
    assert out.read_bytes() == data


def test_export_rl_ground_truth_version_is_checked(built, tmp_path):
    from membuilder.data.export_rl import export_rl, read_rl

    out = tmp_path / "x.parquet"
    export_rl(built["root"], out)
    row = pq.read_table(out).to_pylist()[0]
    truth = json.loads(row["reward_model"]["ground_truth"])
    assert decode_ground_truth(encode_json(truth)).conversation_id == truth["conversation_id"]
    truth["version"] = 2
    with pytest.raises(DataFormatError, match="version 2"):
        decode_ground_truth(json.dumps(truth))
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"a": [1]}), plain)
    with pytest.raises(DataFormatError, match="not a membuilder RL file"):
        read_rl(plain)


def test_export_rl_drops_sessions_without_qa(built, tmp_path):
    import shutil

    from membuilder.data.export_rl import export_rl

    root = tmp_path / "t"
    shutil.copytree(built["root"], root)
    conv_dir = next((root / "conversations").iterdir())
    (conv_dir / "qa.jsonl").unlink()
    n = len(read_meta(conv_dir / "metadata.json").sessions)
    total = sum(len(c.meta.sessions) for c in iter_conversations(root))
    report = export_rl(root, tmp_path / "a.parquet")
    assert report.dropped_sessions_without_qa == n and report.rows == 4 * (total - n)
    report = export_rl(root, tmp_path / "b.parquet", allow_missing_qa=True)
    assert report.sessions_without_qa == n and report.rows == 4 * total


def test_export_rl_absolute_states_copies_nothing(built, tmp_path):
    from membuilder.data.export_rl import export_rl, read_rl

    out = tmp_path / "abs.parquet"
    report = export_rl(built["root"], out, absolute_states=True)
    assert report.states_dir == "" and not (tmp_path / "abs.states").exists()
    for row in read_rl(out):
        path = Path(row["truth"].state_before)
        assert path.is_absolute() and path.is_file()
        assert path.name == f"{row['truth'].state_sha256}.mbstate"


# ---------------------------------------------------------------------------------------------
# Selecting conversations
# ---------------------------------------------------------------------------------------------


def test_conversation_selection(longmemeval_dir, sft_ids, tmp_path):
    import argparse

    from membuilder.data.trajectories import add_arguments, load_conversations

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    subset = tmp_path / "ids.json"
    subset.write_text(json.dumps([sft_ids[1]]))
    base = [
        "--dataset",
        "longmemeval",
        "--split",
        "sft",
        "--data-path",
        str(longmemeval_dir / "longmemeval_oracle.json"),
    ]
    base += ["--expert-model", "m", "--output-dir", str(tmp_path / "o")]
    convs = load_conversations(parser.parse_args([*base, "--subset-file", str(subset), "--sessions", "1"]))
    assert [c.id for c in convs] == [sft_ids[1]]
    assert len(convs[0].sessions) == 1
    # --conv-id and --subset-file together keep the ids in both.
    args = parser.parse_args([*base, "--subset-file", str(subset), "--conv-id", sft_ids[0]])
    with pytest.raises(MembuilderError, match="no id in common"):
        load_conversations(args)


def test_conversation_ids_must_be_plain_names():
    from membuilder.data._io import check_id

    assert check_id("gpt4_2655b836") == "gpt4_2655b836"
    for bad in ("../x", "a/b", "", ".", "x" * 300):
        with pytest.raises(ValueError, match="directory name"):
            check_id(bad)


def test_export_rl_ground_truth_is_what_the_reward_scorer_reads(built, tmp_path):
    """The contract with the training side: its ground-truth reader accepts every exported row."""
    samples = pytest.importorskip("membuilder.training.samples")
    from membuilder.data.export_rl import export_rl, read_rl

    out = tmp_path / "c.parquet"
    export_rl(built["root"], out)
    for row in read_rl(out):
        gt = samples.GroundTruth.from_obj(row["reward_model"]["ground_truth"])
        truth = row["truth"]
        assert (gt.conversation_id, gt.session_index, gt.agent) == (
            truth.conversation_id,
            truth.session_index,
            truth.agent,
        )
        assert [q.question for q in gt.qa] == [q.question for q in truth.qa]
        assert gt.expert_outputs == {e.agent: e.raw_output for e in truth.experts}
        assert gt.expert_content_chars == truth.expert_content_chars
        assert gt.resolve_state(out.parent).is_file()


def test_export_rl_ground_truth_is_decoded_with_its_own_schema(built, tmp_path):
    """The reward scorer decodes an exported row with the schema that wrote it: the same object as
    its general reader gives, with expert facts that are what parsing the expert's output gives."""
    samples = pytest.importorskip("membuilder.training.samples")
    from membuilder.data.export_rl import export_rl

    out = tmp_path / "c.parquet"
    export_rl(built["root"], out)
    rows = pq.read_table(out).to_pylist()
    assert rows
    for row in rows:
        text = row["reward_model"]["ground_truth"]
        typed = samples._from_export(text)
        assert typed is not None  # an exported row takes the schema's path
        general = samples.GroundTruth.from_obj(json.loads(text))  # a mapping: the general reader
        assert typed == general
        assert samples.GroundTruth.from_obj(text) == samples.GroundTruth.from_obj(text.encode()) == typed
        assert list(typed.expert_facts) == list(typed.expert_outputs) == list(AGENT_ORDER)
        for agent, raw in typed.expert_outputs.items():
            parse = parse_actions(agent, raw)
            assert typed.expert_facts[agent] == samples.ExpertFacts(parse.ok, parse.content_text())
    # Anything but an exported row of this version is left to the general reader.
    doc = json.loads(rows[0]["reward_model"]["ground_truth"])
    for other in (dict(doc, version=2), dict(doc, qa=[]), dict(doc, expert_outputs={"core": "x"})):
        assert samples._from_export(json.dumps(other)) is None
    given = samples.GroundTruth.from_obj(json.dumps(dict(doc, expert_outputs={"core": "x"})))
    assert given.expert_outputs["core"] == "x" and "core" not in given.expert_facts  # facts were of the other


def test_export_sft_merges_into_dataset_info(built, tmp_path):
    from membuilder.data.export_sft import export_sft

    info = tmp_path / "dataset_info.json"
    info.write_text(json.dumps({"alpaca_en_demo": {"file_name": "alpaca_en_demo.json"}}))
    export_sft(built["root"], tmp_path / "mine.json", fmt="alpaca", max_length=10**6, dataset_info=info)
    merged = json.loads(info.read_text())
    assert merged["alpaca_en_demo"] == {"file_name": "alpaca_en_demo.json"}
    assert merged["mine"]["file_name"] == "mine.json" and merged["mine"]["formatting"] == "alpaca"
