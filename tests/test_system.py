"""The ``MemorySystem`` facade: add sessions, search, answer, save and load."""

from __future__ import annotations

import asyncio
import json

import pytest
from membuilder._core import InvalidArgumentError, MemoryState
from membuilder.llm import LLMClient, LLMConfig
from membuilder.system import SIDECAR_SUFFIX, MemoryConfig, MemorySystem
from membuilder.testing import ScriptedOpenAIServer
from membuilder.testing.responders import MemoryResponder, sample_conversation

SESSIONS = sample_conversation()
KEY = "sk-test-secret-0123456789"


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
def server():
    with ScriptedOpenAIServer(MemoryResponder()) as srv:
        yield srv


def _client(server) -> LLMClient:
    return LLMClient(
        LLMConfig(
            model="scripted-model",
            base_url=server.base_url,
            api_key=KEY,
            provider="compatible",
            max_retries=2,
            timeout=5.0,
            backoff_base=0.01,
        )
    )


def test_sync_facade_build_search_answer_save_load(server, e5, tmp_path):
    config = MemoryConfig(model="scripted-model", conversation_id="caroline-melanie", core_limit=4000)
    with MemorySystem(llm=_client(server), embedder=e5, config=config) as mem:
        for ts, msgs in SESSIONS:
            result = mem.add_session(msgs, ts)
            assert not result.skipped_agents
        assert mem.sessions_added == len(SESSIONS) and mem.last_result.session_index == len(SESSIONS) - 1
        assert mem.core and len(mem.state) > 0

        hits = mem.search("Melanie's dog Max", k=3)
        assert len(hits) == 3
        text, score, kind = hits[0]
        assert "Max" in text and kind in ("episodic", "semantic", "procedural") and -1.0 <= score <= 1.0
        assert [h[1] for h in hits] == sorted((h[1] for h in hits), reverse=True)

        answer = mem.answer("What is the name of Melanie's dog?", now="2023-07-01")
        assert "Max" in answer
        assert server.count("answer") == 1

        path = tmp_path / "memory.mbs"
        mem.save(path)
        before_search = mem.search("cold brew steps", k=5)

    sidecar = json.loads((tmp_path / ("memory.mbs" + SIDECAR_SUFFIX)).read_text())
    assert sidecar["config"]["conversation_id"] == "caroline-melanie"
    assert sidecar["embedder"] == {"name": e5.name, "dim": e5.dim}
    assert KEY not in (tmp_path / ("memory.mbs" + SIDECAR_SUFFIX)).read_text()

    loaded = MemorySystem.load(path, llm=_client(server), embedder=e5)
    try:
        assert loaded.config == config and loaded.sessions_added == len(SESSIONS)
        assert loaded.core == mem.core and len(loaded.state) == len(mem.state)
        assert loaded.search("cold brew steps", k=5) == before_search
        # a further session continues the numbering
        ts, msgs = SESSIONS[0]
        assert loaded.add_session(msgs, "2023-07-02").session_index == len(SESSIONS)
    finally:
        loaded.close()


def test_async_variants_and_the_error_inside_a_running_loop(server, embedder):
    async def run():
        async with _client(server) as llm, MemorySystem(llm=llm, embedder=embedder) as mem:
            ts, msgs = SESSIONS[1]
            with pytest.raises(RuntimeError, match="aadd_session"):
                mem.add_session(msgs, ts)
            with pytest.raises(RuntimeError, match="aanswer"):
                mem.answer("anything?")
            await mem.aadd_session(msgs, ts)
            hits = await mem.asearch("cold brew", k=2)
            answer = await mem.aanswer("How long does Caroline steep her cold brew?", "2023-06-01")
            return mem, hits, answer

    mem, hits, answer = asyncio.run(run())
    assert mem.sessions_added == 1  # the refused synchronous call added nothing
    assert len(hits) == 2 and "16 hours" in answer


def test_concurrent_async_sessions_are_applied_in_order(server, embedder):
    async def run():
        async with _client(server) as llm:
            mem = MemorySystem(llm=llm, embedder=embedder)
            results = await asyncio.gather(*(mem.aadd_session(m, ts) for ts, m in SESSIONS))
            await mem.aclose()
            return mem, results

    mem, results = asyncio.run(run())
    assert [r.session_index for r in results] == list(range(len(SESSIONS)))
    sessions = [e.provenance.session for e in mem.state.entries()]
    assert sessions == sorted(sessions)


def test_raw_builder_needs_no_llm(embedder, tmp_path):
    with MemorySystem(embedder=embedder, config=MemoryConfig(builder="raw")) as mem:
        for ts, msgs in SESSIONS:
            mem.add_session(msgs, ts)
        assert len(mem.state) == sum(len(m) for _, m in SESSIONS) and mem.core == ""
        assert mem._llm is None  # no client was created
        assert "pottery bowl" in mem.search("What happened to the pottery bowl?", k=1)[0][0]


def test_load_refuses_another_embedder_and_missing_sidecar(embedder, tmp_path):
    with MemorySystem(embedder=embedder, config=MemoryConfig(builder="raw")) as mem:
        mem.add_session(SESSIONS[0][1], SESSIONS[0][0])
        mem.save(tmp_path / "m.mbs")

    class OtherEmbedder:
        name, dim = "other-model", embedder.dim

    with pytest.raises(InvalidArgumentError, match="other-model"):
        MemorySystem.load(tmp_path / "m.mbs", embedder=OtherEmbedder())
    MemoryState(embedder.dim).save(tmp_path / "bare.mbs")
    with pytest.raises(FileNotFoundError, match="settings file"):
        MemorySystem.load(tmp_path / "bare.mbs", embedder=embedder)
    (tmp_path / ("bad.mbs" + SIDECAR_SUFFIX)).write_text("{not json")
    with pytest.raises(InvalidArgumentError, match="not valid JSON"):
        MemorySystem.load(tmp_path / "bad.mbs", embedder=embedder)


@pytest.mark.parametrize(
    "bad",
    [
        {"builder": "llm"},
        {"update_mode": "overwrite"},
        {"top_k": -1},
        {"max_attempts": 0},
        {"core_limit": 0},
    ],
)
def test_config_validation(bad, embedder):
    with pytest.raises(InvalidArgumentError):
        MemorySystem(embedder=embedder, config=MemoryConfig(**bad))


def test_config_round_trip_ignores_unknown_keys():
    cfg = MemoryConfig(model="m", top_k=5, update_mode="replace")
    data = cfg.to_dict() | {"added_in_a_later_version": 1}
    assert MemoryConfig.from_dict(data) == cfg


def test_replace_mode_reaches_the_state(embedder):
    mem = MemorySystem(
        embedder=embedder, config=MemoryConfig(builder="raw", update_mode="replace", core_limit=123)
    )
    assert mem.state.update_mode == "replace" and mem.state.core_limit == 123
    mem.close()
