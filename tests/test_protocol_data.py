"""The data pipeline under a protocol (issue 14, data side), through the scripted server.

* ``trajectories --dry-run`` counts what the paper's run would do on the real LongMemEval files
  (the ``_s`` haystacks by default) and names the split ids the file lacks;
* a recording names missing ids and writes its protocol into the manifest;
* ``qa-gen`` under ``paper``: 5 questions per session, temperature 0, every memory of the state
  *before* the session, the 50/30/20 type mix asked for in the prompt and not counted (the
  reference states the mix in its prompt and keeps whatever types come back), one call;
* ``export-rl`` writes the protocol into every row's ground truth, additively;
* prompt templates: validated at start (one-line error naming the file), recorded by hash in every
  output, and actually sent to the endpoint.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
from membuilder import MemoryState
from membuilder.cli import main as cli_main
from membuilder.data.qagen import describe_type_mix, mix_targets, parse_type_mix, read_qa, read_qa_manifest
from membuilder.data.schemas import AGENT_ORDER, decode_ground_truth
from membuilder.data.trajectories import iter_conversations, load_state, read_manifest
from membuilder.prompt_templates import (
    PLACEHOLDERS,
    PromptTemplateError,
    load_prompt_templates,
    use_templates,
)
from membuilder.protocol import PAPER
from membuilder.testing import ScriptedOpenAIServer
from membuilder.testing.responders import MemoryResponder

pq = pytest.importorskip("pyarrow.parquet")

_ASK = re.compile(r"Write exactly (\d+) questions")


def qa_reply(request: Any) -> str:
    """``n`` questions (the number the prompt asks for), one per session turn, ALL of type
    single-session: a model that ignores the requested mix."""
    text = request.messages[-1]["content"] if request.messages else ""
    m = _ASK.search("\n".join(str(x.get("content", "")) for x in request.messages))
    n = int(m.group(1)) if m else 5
    turns = re.findall(r"^\[([^\]]+)\] ([^:]+): (.+)$", text, re.MULTILINE)
    items = [
        {
            "question": f"What did I say in turn {tid}?",
            "answer": body[:80],
            "type": "single-session",
            "evidence": [tid],
        }
        for tid, _, body in turns[:n]
    ]
    return json.dumps({"questions": items})


def _endpoint(server: ScriptedOpenAIServer) -> list[str]:
    return ["--provider", "compatible", "--base-url", server.base_url, "--api-key", "k", "--max-retries", "0"]


def _first_sft_id(longmemeval_dir: Path, min_sessions: int = 3) -> str:
    oracle = {
        q["question_id"]: q for q in json.loads((longmemeval_dir / "longmemeval_oracle.json").read_text())
    }
    splits = json.loads((longmemeval_dir / "longmemeval_splits.json").read_text())
    return next(i for i in splits["sft"] if len(oracle[i]["haystack_sessions"]) >= min_sessions)


def _record(server: ScriptedOpenAIServer, longmemeval_dir: Path, out: Path, conv: str, *extra: str) -> int:
    return cli_main(
        [
            "trajectories", "--dataset", "longmemeval", "--split", "sft",
            "--data-path", str(longmemeval_dir / "longmemeval_oracle.json"),
            "--expert-model", "expert-m", "--embedder", "openai:emb-test",
            "--sessions", "3", "--conv-id", conv, "--output-dir", str(out),
            *_endpoint(server), *extra,
        ]
    )  # fmt: skip


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, longmemeval_dir: Path) -> dict[str, Any]:
    """One sft conversation (3 sessions) recorded under the default protocol, then paper QA."""
    root = tmp_path_factory.mktemp("paper_traj")
    conv = _first_sft_id(longmemeval_dir)
    with ScriptedOpenAIServer(MemoryResponder(qa_gen=qa_reply)) as server:
        assert _record(server, longmemeval_dir, root, conv) == 0
        server.reset()
        rc = cli_main(["qa-gen", "--trajectories", str(root), *_endpoint(server)])
        assert rc == 0
        qa_requests = [r for r in server.requests if r.tag == "qa-gen"]
    return {"root": root, "conv": conv, "qa_requests": qa_requests}


# ---------------------------------------------------------------------------------------------
# trajectories: the paper's file, missing ids, the dry run, the manifest
# ---------------------------------------------------------------------------------------------


def test_dry_run_counts_the_papers_sft_run_without_a_model(data_dir: Path, capsys, monkeypatch):
    if not (data_dir / "longmemeval" / "longmemeval_s_498.json.xz").is_file():
        pytest.skip("the LongMemEval _s file is not in the benchmark data")
    monkeypatch.setenv("MEMBUILDER_DATA", str(data_dir))
    # No --output-dir, no model, no endpoint: a dry run needs none of them.
    rc = cli_main(["trajectories", "--dataset", "longmemeval", "--split", "sft", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0
    rows = {r["protocol"]: r for r in json.loads(out.strip().splitlines()[-1])["dry_run"]}
    paper = rows["paper (chosen)"]
    assert paper["file"].endswith("longmemeval/longmemeval_s_498.json.xz")
    # The paper's README: 50 dialogues, ~2,400 sessions, ~9,600 SFT samples (4 agents each).
    assert paper["conversations"] == 50
    assert 2300 <= paper["sessions"] <= 2500
    assert paper["agent_calls"] == 4 * paper["sessions"]
    assert paper["missing_ids"] == []
    # The two questions the _s copy lacks are named, with the split that asks for them.
    assert paper["file_lacks"] == {"rl": ["7e00a6cb"], "test": ["gpt4_7a0daae1"]}
    assert paper["splits"]["rl"]["missing_ids"] == ["7e00a6cb"]
    assert paper["splits"]["rl"]["conversations"] == 49
    assert paper["splits"]["test"]["conversations"] == 399
    # Each protocol's default file is shown (both use _s), and the oracle file for comparison:
    # the old default, about 25 times fewer sessions.
    assert rows["membuilder"]["sessions"] == paper["sessions"]
    oracle = rows["--longmemeval-file oracle"]
    assert oracle["file"].endswith("longmemeval_oracle.json") and oracle["conversations"] == 50
    assert oracle["sessions"] * 15 < paper["sessions"]
    assert "7e00a6cb" in out and "gpt4_7a0daae1" in out and "longmemeval_s_498.json.xz" in out


def test_a_recording_names_the_ids_it_cannot_find(longmemeval_dir: Path, tmp_path: Path, capsys):
    conv = _first_sft_id(longmemeval_dir)
    # A split that asks for an id the file lacks (as the _s file lacks two of the paper's).
    split_file = tmp_path / "splits.json"
    split_file.write_text(json.dumps({"sft": [conv, "no_such_q"]}))
    with ScriptedOpenAIServer(MemoryResponder()) as server:
        rc = _record(
            server, longmemeval_dir, tmp_path / "t", conv, "--conv-id", "no_such_q", "--sessions", "1",
            "--split-file", str(split_file),
        )  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0
    assert "no_such_q" in captured.err and "not in the data file" in captured.err
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["missing_ids"] == ["no_such_q"] and summary["recorded"] == 1


def test_manifest_records_the_protocol_and_its_overrides(recorded):
    manifest = read_manifest(recorded["root"])
    assert manifest.protocol is not None
    assert manifest.protocol["name"] == "paper" and manifest.protocol["version"] == PAPER.version
    # The test's expert model, embedder and oracle file differ from the paper's: recorded.
    assert manifest.protocol["overrides"] == {"expert_model": "expert-m", "embedder": "openai:emb-test"}
    assert manifest.protocol["label"] == "paper+overrides"
    assert manifest.retrieve_k == PAPER.agent_top_k == 20
    assert manifest.prompt_templates == {"source": "builtin"}


# ---------------------------------------------------------------------------------------------
# qa-gen under paper
# ---------------------------------------------------------------------------------------------


def test_paper_qa_asks_for_five_at_temperature_zero_with_the_mix(recorded):
    requests = recorded["qa_requests"]
    sessions = iter_conversations(recorded["root"])[0].meta.sessions
    # One call per session (the reference calls once and keeps what came back).
    assert len(requests) == len(sessions) == 3
    for r in requests:
        assert r.model == PAPER.qa_model == "claude-opus-4-5"
        assert r.body["temperature"] == 0
        prompt = r.messages[-1]["content"]
        assert "Write exactly 5 questions" in prompt
        # 50/30/20 of 5: the prompt carries the counts it implies.
        assert "2 to 3 single-session (50%)" in prompt
        assert "1 to 2 multi-session (30%)" in prompt
        assert "1 temporal-reasoning (20%)" in prompt
    assert mix_targets(PAPER.qa_type_mix, 5) == {
        "single-session": (2, 3),
        "multi-session": (1, 2),
        "temporal-reasoning": (1, 1),
    }


def test_paper_qa_shows_every_memory_of_the_state_before_the_session(recorded):
    root = recorded["root"]
    meta = iter_conversations(root)[0].meta
    by_session = {r.session_index: r for r in read_qa(root / "conversations" / recorded["conv"])}
    flat = {}
    for r in recorded["qa_requests"]:  # sessions run concurrently: match each by its first turn
        text = r.messages[-1]["content"]
        flat[text[text.index("<session") :].split("\n")[1].split("]")[0] + "]"] = " ".join(text.split())
    checked = 0
    for session in meta.sessions:
        prompt = flat[f"[{session.messages[0].turn_id}]"]
        before = load_state(root, session.state_before).entries()
        after = MemoryState.load(root / "states" / f"{session.state_after}.mbstate").entries()
        for e in before:
            assert f"- [{e.kind}] {' '.join(e.text.split())}" in prompt
        for text in {e.text for e in after} - {e.text for e in before}:
            # the session's own memories are what the questions test: not shown
            assert " ".join(text.split()) not in prompt
        assert "older memories not shown" not in prompt
        rec = by_session[session.index]
        assert rec.memories_shown == rec.memories_total == len(before)
        checked += len(before)
    assert checked > 0  # a later session had memories to show


def test_paper_mix_is_asked_for_not_counted(recorded):
    """The reference states the mix in the prompt and keeps the questions whatever their types:
    a reply of five single-session questions is kept as it is, and recorded as such."""
    recs = read_qa(recorded["root"] / "conversations" / recorded["conv"])
    full = [r for r in recs if len(r.questions) == 5]
    assert full, "the scripted model answered at least one session with five questions"
    for rec in full:
        assert rec.attempts == 1 and rec.error is None
        assert rec.type_counts == {"single-session": 5}
        assert rec.type_mix == {"single-session": 0.5, "multi-session": 0.3, "temporal-reasoning": 0.2}
        assert rec.protocol == "paper" and rec.temperature == 0.0
    manifest = read_qa_manifest(recorded["root"])
    assert manifest is not None
    assert manifest.protocol["name"] == "paper" and manifest.protocol["overrides"] == {}
    assert (manifest.per_session, manifest.temperature, manifest.max_memories) == (5, 0.0, None)
    assert manifest.max_attempts == 1


def test_membuilder_qa_has_no_mix_and_the_newest_memories(recorded, tmp_path):
    import shutil

    root = tmp_path / "t"
    shutil.copytree(recorded["root"], root)
    with ScriptedOpenAIServer(MemoryResponder(qa_gen=qa_reply)) as server:
        rc = cli_main(
            ["qa-gen", "--trajectories", str(root), "--protocol", "membuilder", "--max-memories", "1",
             "--model", "qa-m", "--overwrite", *_endpoint(server)]
        )  # fmt: skip
        prompts = [r.messages[-1]["content"] for r in server.requests if r.tag == "qa-gen"]
    assert rc == 0
    assert prompts and not any("Spread the" in p for p in prompts)
    recs = read_qa(root / "conversations" / recorded["conv"])
    assert all(r.memories_shown <= 1 for r in recs) and any(r.memories_total > 1 for r in recs)
    manifest = read_qa_manifest(root)
    assert manifest.protocol["name"] == "membuilder"
    assert manifest.protocol["overrides"] == {"qa_model": "qa-m", "qa_memory_scope": "1"}
    assert all(r.protocol == "membuilder+overrides" for r in recs)


def test_qa_gen_refuses_to_mix_settings_in_one_directory(recorded, tmp_path, capsys):
    import shutil

    root = tmp_path / "t"
    shutil.copytree(recorded["root"], root)
    rc = cli_main(["qa-gen", "--trajectories", str(root), "--protocol", "membuilder", "--skip-existing",
                   "--base-url", "http://127.0.0.1:9/v1", "--api-key", "k"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "other settings" in err and err.count("\n") == 1


def test_type_mix_flag():
    assert parse_type_mix("none") == {}
    assert parse_type_mix("single-session=0.6,temporal=0.4") == {"single_session": 0.6, "temporal": 0.4}
    for bad in ("single_session=0.5", "x=1", "single_session=a,temporal=1", "temporal=0,single_session=1"):
        with pytest.raises(ValueError, match="--type-mix"):
            parse_type_mix(bad)
    assert describe_type_mix({}, 5) == ""


# ---------------------------------------------------------------------------------------------
# export-rl: the protocol in the ground truth
# ---------------------------------------------------------------------------------------------


def test_rl_ground_truth_records_the_protocol_additively(recorded, tmp_path, capsys):
    out = tmp_path / "rl.parquet"
    rc = cli_main(["export-rl", "--trajectories", str(recorded["root"]), "--output", str(out)])
    captured = capsys.readouterr()
    assert rc == 0
    # The trajectories were recorded with overrides (test models): said, not hidden.
    assert "paper+overrides" in captured.err
    report = json.loads(captured.out)
    assert report["protocol"] == "paper" and report["warnings"]
    rows = pq.read_table(out).to_pylist()
    assert rows
    for row in rows:
        raw = json.loads(row["reward_model"]["ground_truth"])
        assert raw["protocol"]["name"] == "paper"
        assert raw["protocol"]["settings"]["reward_pairing"] == "joint"
        assert raw["sources"]["trajectories"]["protocol"] == "paper+overrides"
        assert raw["sources"]["qa"]["protocol"] == "paper"
        # Every field the reward scorer read before is still there, with its meaning.
        truth = decode_ground_truth(row["reward_model"]["ground_truth"])
        assert truth.agent in AGENT_ORDER and len(truth.experts) == 4 and truth.qa


# ---------------------------------------------------------------------------------------------
# Prompt templates
# ---------------------------------------------------------------------------------------------

TEMPLATES = '''
[episodic]
system = "EPISODIC-TEMPLATE: keep events as JSON operations."
user = """Date {session_day}. Known ({memory_count}):
{existing_memories}
Talk:
{session}"""

[qa]
user = """QA-TEMPLATE {num_questions} {type_mix}
core: {core_memory}
{episodic_memories}
{session}
Write exactly {num_questions} questions"""

[judge]
braces_are_text = "no"
'''


def _write(tmp_path: Path, text: str, name: str = "prompts.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


GOOD = TEMPLATES.replace('[judge]\nbraces_are_text = "no"\n', "")


def test_template_file_validation(tmp_path):
    t = load_prompt_templates(_write(tmp_path, GOOD))
    assert set(t.prompts) == {"episodic", "qa"}
    cases = {
        '[answer]\nuser = "{memories} only"\n': "lacks required placeholder {question}",
        '[judge]\nuser = "{question} {gold_answer} {generated_answr}"\n': (
            "unknown placeholder {generated_answr}"
        ),
        '[answr]\nuser = "x"\n': "unknown prompt [answr]",
        '[judge]\nsystem = "x"\n': "needs a non-empty 'user'",
        TEMPLATES: "unknown key(s) braces_are_text",
        "[judge\n": "not valid TOML",
        "": "no prompt in the file",
        'braces = 3\n[judge]\nuser = "x"\n': "'braces' must be 1 or 2",
    }
    for k, (text, message) in enumerate(cases.items()):
        path = _write(tmp_path, text, f"bad{k}.toml")
        with pytest.raises(PromptTemplateError) as info:
            load_prompt_templates(path)
        assert str(path) in str(info.value) and message in str(info.value)
        assert "\n" not in str(info.value)
    # Every prompt's required placeholders are documented by name.
    assert set(PLACEHOLDERS) == {
        "core", "episodic", "semantic", "procedural", "compress", "answer", "judge", "qa"
    }  # fmt: skip


def test_single_brace_templates_read_like_str_format(tmp_path):
    from membuilder.judge import build_judge_messages

    path = _write(
        tmp_path,
        '[judge]\nuser = """{question}|{gold_answer}|{generated_answer}|{{question}}|'
        '{"label": "CORRECT"}|{{"label": "WRONG"}}"""\n',
    )
    with use_templates(load_prompt_templates(path)):
        content = build_judge_messages("Q", "G", "A")[0]["content"]
    # Escapes and placeholders as str.format would render them; the unescaped JSON stays as is.
    assert content == 'Q|G|A|{question}|{"label": "CORRECT"}|{"label": "WRONG"}'
    fmt = "{question}|{gold_answer}|{generated_answer}|{{question}}"
    assert content.startswith(fmt.format(question="Q", gold_answer="G", generated_answer="A"))


def test_double_brace_templates_leave_single_braces_alone(tmp_path):
    path = _write(
        tmp_path,
        'braces = 2\n[judge]\nuser = """Q: {{question}} G: {{gold_answer}} A: {{generated_answer}}\n'
        'Reply {"label": "CORRECT"} or {"label": "WRONG"}"""\n',
    )
    from membuilder.judge import build_judge_messages

    with use_templates(load_prompt_templates(path)):
        messages = build_judge_messages("When?", 2023, "in 2023")
    assert messages == [
        {
            "role": "user",
            "content": 'Q: When? G: 2023 A: in 2023\nReply {"label": "CORRECT"} or {"label": "WRONG"}',
        }
    ]
    # Outside the block the built-in prompt is back.
    assert build_judge_messages("When?", 2023, "x")[0]["role"] == "system"


def test_a_bad_template_stops_the_command_before_any_call(recorded, tmp_path, capsys):
    bad = _write(tmp_path, '[qa]\nuser = "{session} only"\n')
    with ScriptedOpenAIServer(MemoryResponder()) as server:
        rc = cli_main(["qa-gen", "--trajectories", str(recorded["root"]), "--prompt-templates", str(bad),
                       "--overwrite", *_endpoint(server)])  # fmt: skip
        assert server.count() == 0
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert str(bad) in err and "{num_questions}" in err


def test_templates_reach_the_endpoint_and_their_hash_every_output(longmemeval_dir, tmp_path, capsys):
    path = _write(tmp_path, GOOD)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    root = tmp_path / "traj"
    conv = _first_sft_id(longmemeval_dir)
    with ScriptedOpenAIServer(MemoryResponder(qa_gen=qa_reply)) as server:
        assert _record(server, longmemeval_dir, root, conv, "--prompt-templates", str(path)) == 0
        episodic = [r for r in server.requests if r.tag == "agent:episodic"]
        core = [r for r in server.requests if r.tag == "agent:core"]
        server.reset()
        rc = cli_main(["qa-gen", "--trajectories", str(root), "--prompt-templates", str(path),
                       *_endpoint(server)])  # fmt: skip
        assert rc == 0
        qa = [r for r in server.requests if r.tag == "qa-gen"]
    # The episodic agent got the template, filled in; the core agent kept the built-in prompt.
    assert episodic and all(r.messages[0]["content"].startswith("EPISODIC-TEMPLATE") for r in episodic)
    assert all("Talk:\n[" in r.messages[1]["content"] for r in episodic)
    assert core and all("EPISODIC-TEMPLATE" not in r.messages[0]["content"] for r in core)
    assert qa and all(len(r.messages) == 1 for r in qa)
    assert all(r.messages[0]["content"].startswith("QA-TEMPLATE 5 Spread") for r in qa)
    # The hash is in the manifest, the QA manifest, each QA line and the RL ground truth.
    manifest = read_manifest(root)
    assert manifest.prompt_templates["sha256"] == digest
    assert set(manifest.prompt_templates["prompts"]) == {"episodic", "qa"}
    assert read_qa_manifest(root).prompt_templates["sha256"] == digest
    assert all(r.prompt_templates["sha256"] == digest for r in read_qa(root / "conversations" / conv))
    sft = tmp_path / "sft.json"
    assert cli_main(["export-sft", "--trajectories", str(root), "--output", str(sft)]) == 0
    sft_report = json.loads(Path(f"{sft}.report.json").read_text())
    assert sft_report["prompt_templates"]["sha256"] == digest
    assert sft_report["trajectories_protocol"] == "paper+overrides"
    out = tmp_path / "rl.parquet"
    assert cli_main(["export-rl", "--trajectories", str(root), "--output", str(out)]) == 0
    raw = json.loads(pq.read_table(out).to_pylist()[0]["reward_model"]["ground_truth"])
    assert raw["sources"]["trajectories"]["prompt_templates"]["sha256"] == digest
    assert raw["sources"]["qa"]["prompt_templates"]["sha256"] == digest
    capsys.readouterr()


def test_answer_judge_and_compression_templates_reach_the_endpoint(tmp_path):
    from membuilder.agents import compress_core
    from membuilder.answer import build_answer_messages
    from membuilder.judge import Judge
    from membuilder.llm import LLMClient, LLMConfig

    path = _write(
        tmp_path,
        '[answer]\nuser = "ANSWER-T {current_date} | {core_memory} | {memories} | {question}"\n'
        '[judge]\nsystem = "JUDGE-T"\nuser = "{question} / {gold_answer} / {generated_answer}"\n'
        '[compress]\nuser = "COMPRESS-T to {target_chars} of {core_limit}: {core_memory}"\n',
    )
    templates = load_prompt_templates(path)
    with use_templates(templates):
        assert build_answer_messages("core", ["m1", "m2"], "Where?", "2023-05-08") == [
            {"role": "user", "content": "ANSWER-T 2023-05-08 | core | 1. m1\n2. m2 | Where?"}
        ]

    def reply(request: Any) -> str:
        if request.tag == "judge":
            return '{"label": "CORRECT"}'
        return '{"content": "short"}'

    async def go(server: ScriptedOpenAIServer) -> None:
        llm = LLMClient(LLMConfig(model="m", base_url=server.base_url, api_key="k", provider="compatible"))
        try:
            with use_templates(templates):
                verdict = await Judge(llm).judge("Q?", "gold", "answer")
                result = await compress_core(llm, "x" * 300, limit=200)
            assert verdict.correct is True and result.text == "short"
        finally:
            await llm.aclose()

    with ScriptedOpenAIServer(reply) as server:
        asyncio.run(go(server))
        judge = [r for r in server.requests if r.tag == "judge"]
        compress = [r for r in server.requests if r.tag == "compress:core"]
    assert judge[0].messages == [
        {"role": "system", "content": "JUDGE-T"},
        {"role": "user", "content": "Q? / gold / answer"},
    ]
    assert compress[0].messages == [{"role": "user", "content": f"COMPRESS-T to 120 of 200: {'x' * 300}"}]


def test_eval_sends_the_answer_and_judge_templates_and_records_their_hash(longmemeval_dir, tmp_path, capsys):
    path = _write(
        tmp_path,
        '[answer]\nuser = "ANSWER-T {current_date}\\n{memories}\\nQuestion: {question}"\n'
        '[judge]\nuser = "JUDGE-T {question} | {gold_answer} | {generated_answer}"\n',
    )
    out = tmp_path / "eval"
    with ScriptedOpenAIServer(MemoryResponder()) as server:
        rc = cli_main(
            ["eval", "--dataset", "longmemeval",
             "--data-path", str(longmemeval_dir / "longmemeval_oracle.json"), "--split", "test",
             "--questions", "2", "--mode", "full", "--builder", "raw", "--embedder", "hash",
             "--output-dir", str(out), "--no-progress", "--prompt-templates", str(path),
             "--provider", "compatible", "--base-url", server.base_url, "--api-key", "k", "--model", "m"]
        )  # fmt: skip
        answers = [r for r in server.requests if r.tag == "answer"]
        judges = [r for r in server.requests if r.tag == "judge"]
    capsys.readouterr()
    assert rc == 0
    assert len(answers) == 2 and all(r.messages[0]["content"].startswith("ANSWER-T ") for r in answers)
    assert len(judges) >= 2 and all(r.messages[0]["content"].startswith("JUDGE-T ") for r in judges)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["prompt_templates"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert set(summary["prompt_templates"]["prompts"]) == {"answer", "judge"}


def test_eval_refuses_a_bad_template_in_one_line(tmp_path, capsys):
    path = _write(tmp_path, '[judge]\nuser = "{question} {gold_answer}"\n')
    rc = cli_main(["eval", "--dataset", "locomo", "--data-path", str(tmp_path / "x.json"),
                   "--prompt-templates", str(path), "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and str(path) in err and "{generated_answer}" in err


def test_every_agent_prompt_can_be_replaced(tmp_path):
    from membuilder.agents.prompts import render_agent_messages

    path = _write(
        tmp_path,
        '[core]\nuser = "CORE {session_day} {core_chars}/{core_limit}: {core_memory} || {session}"\n'
        + "".join(
            f'[{a}]\nuser = "{a.upper()} {{memory_count}}: {{existing_memories}} || {{session}}"\n'
            for a in ("episodic", "semantic", "procedural")
        ),
    )
    session = [{"role": "user", "content": "I adopted  a cat.", "turn_id": "D1:1", "speaker": "Ann"}]
    kwargs = {"core": "Ann likes cats.", "retrieved": ["old one", "old two"], "session_messages": session}
    with use_templates(load_prompt_templates(path)):
        got = {
            a: render_agent_messages(a, **kwargs, timestamp="2023/05/08 (Mon) 13:56", core_limit=500)
            for a in AGENT_ORDER
        }
    turn = "[D1:1] Ann: I adopted a cat."
    assert got["core"] == [
        {"role": "user", "content": f"CORE 2023-05-08, Monday 15/500: Ann likes cats. || {turn}"}
    ]
    for a in ("episodic", "semantic", "procedural"):
        assert got[a] == [{"role": "user", "content": f"{a.upper()} 2: 1. old one\n2. old two || {turn}"}]
