"""The scripted OpenAI-compatible server: routing, scripts, faults, recording, concurrency."""

from __future__ import annotations

import asyncio
import base64
import threading
import time

import numpy as np
import openai
import pytest
from membuilder.embed import hashed_bow_vector
from membuilder.testing import FAULT_KINDS, ScriptedOpenAIServer, ScriptedRequest

KEY = "sk-test-server-0123456789"


def _client(server: ScriptedOpenAIServer, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(
        api_key=KEY, base_url=server.base_url, max_retries=0, timeout=kwargs.pop("timeout", 5.0)
    )


def _chat(client: openai.OpenAI, content: str, tag: str | None = None, **kwargs) -> str:
    headers = {"X-Membuilder-Call": tag} if tag else None
    response = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": content}], extra_headers=headers, **kwargs
    )
    return response.choices[0].message.content


def test_fault_kinds_are_the_documented_ones():
    assert set(FAULT_KINDS) == {"429", "500", "timeout", "disconnect", "truncated_body", "malformed_body"}


def test_base_url_and_models_endpoint():
    with ScriptedOpenAIServer(model="served-model") as server:
        assert server.base_url.startswith("http://127.0.0.1:") and server.base_url.endswith("/v1")
        with _client(server) as client:
            ids = [m.id for m in client.models.list()]
        assert ids == ["served-model"]
        assert server.count(path="/models") == 1


def test_default_responder_echoes_last_user_message():
    with ScriptedOpenAIServer() as server, _client(server) as client:
        assert _chat(client, "hello there") == "hello there"


def test_callable_responder_sees_tag_messages_and_model():
    seen: list[ScriptedRequest] = []

    def responder(request: ScriptedRequest) -> str:
        seen.append(request)
        return f"{request.tag}|{request.model}|{request.last_user_message}"

    with ScriptedOpenAIServer(responder) as server, _client(server) as client:
        assert _chat(client, "q1", tag="answer") == "answer|m|q1"
    assert len(seen) == 1
    assert seen[0].messages == [{"role": "user", "content": "q1"}]
    assert seen[0].is_chat and not seen[0].is_embeddings


def test_dict_script_lists_are_consumed_in_order_then_fail_clearly():
    script = {"judge": ["first", "second"], "*": "fallback"}
    with ScriptedOpenAIServer(script) as server, _client(server) as client:
        assert _chat(client, "a", tag="judge") == "first"
        assert _chat(client, "b", tag="judge") == "second"
        assert _chat(client, "c", tag="answer") == "fallback"
        assert _chat(client, "d") == "fallback"
        with pytest.raises(openai.BadRequestError, match="exhausted after 2"):
            _chat(client, "e", tag="judge")
        assert len(server.errors) == 1 and "exhausted" in server.errors[0]


def test_unknown_tag_without_fallback_is_a_400_naming_the_tag():
    with (
        ScriptedOpenAIServer({"answer": "x"}) as server,
        _client(server) as client,
        pytest.raises(openai.BadRequestError, match="no scripted response for tag 'judge'"),
    ):
        _chat(client, "q", tag="judge")


def test_responder_exception_becomes_400_and_is_recorded():
    def responder(request: ScriptedRequest) -> str:
        raise KeyError("boom")

    with ScriptedOpenAIServer(responder) as server, _client(server) as client:
        with pytest.raises(openai.BadRequestError, match="KeyError"):
            _chat(client, "q")
        assert "KeyError" in server.errors[0]


def test_chat_response_has_usage_block():
    with ScriptedOpenAIServer("one two three") as server, _client(server) as client:
        response = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "a b"}])
    assert response.usage.completion_tokens == 3
    assert response.usage.prompt_tokens == 2 + 4  # words + per-message overhead
    assert response.usage.total_tokens == 9
    assert response.choices[0].finish_reason == "stop"


def test_inject_rejects_unknown_fault_and_bad_times():
    server = ScriptedOpenAIServer()
    with pytest.raises(ValueError, match="unknown fault"):
        server.inject("418")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="times"):
        server.inject("500", times=0)


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        ("429", openai.RateLimitError),
        ("500", openai.InternalServerError),
        ("disconnect", openai.APIConnectionError),
        ("truncated_body", openai.APIConnectionError),
    ],
)
def test_each_fault_reaches_the_sdk_then_the_next_request_succeeds(fault, error):
    with ScriptedOpenAIServer("fine") as server, _client(server) as client:
        server.inject(fault)
        with pytest.raises(error):
            _chat(client, "q")
        assert _chat(client, "q") == "fine"
        assert [r.fault for r in server.requests] == [fault, None]


def test_429_carries_retry_after_header():
    with ScriptedOpenAIServer("ok") as server, _client(server) as client:
        server.inject("429", retry_after=7)
        with pytest.raises(openai.RateLimitError) as info:
            _chat(client, "q")
    assert info.value.response.headers["retry-after"] == "7"


def test_malformed_body_is_a_complete_response_that_is_not_json():
    with ScriptedOpenAIServer("ok") as server, _client(server) as client:
        server.inject("malformed_body")
        with pytest.raises(ValueError):  # json.JSONDecodeError from the SDK's parser
            _chat(client, "q")


def test_timeout_fault_holds_until_the_client_gives_up_and_stop_releases_it():
    server = ScriptedOpenAIServer("ok").start()
    try:
        server.inject("timeout", timeout_s=30)
        with _client(server, timeout=0.3) as client, pytest.raises(openai.APITimeoutError):
            _chat(client, "q")
    finally:
        started = time.monotonic()
        server.stop()
    assert time.monotonic() - started < 5  # the held handler was woken, not waited out


def test_faults_are_scoped_by_tag_and_path_and_counted():
    with ScriptedOpenAIServer("ok") as server, _client(server) as client:
        server.inject("500", times=2, tag="judge")
        server.inject("500", path="/embeddings")
        assert server.pending_faults() == 3
        assert _chat(client, "q", tag="answer") == "ok"  # not the judge: no fault
        with pytest.raises(openai.InternalServerError):
            _chat(client, "q", tag="judge")
        with pytest.raises(openai.InternalServerError):
            client.embeddings.create(model="e", input=["x"])
        assert server.pending_faults() == 1
        assert server.count() == 3
        assert server.count("judge") == 1
        assert server.count(path="/embeddings") == 1


def test_repeated_requests_detection_ignores_faulted_attempts():
    with ScriptedOpenAIServer("ok") as server, _client(server) as client:
        server.inject("500")
        with pytest.raises(openai.InternalServerError):
            _chat(client, "same")
        _chat(client, "same")  # a retry after a fault is not a repeat
        _chat(client, "other", tag="answer")
        assert server.repeated_requests() == []
        server.assert_no_repeated_requests()
        _chat(client, "other", tag="answer")
        groups = server.repeated_requests()
        assert len(groups) == 1 and len(groups[0]) == 2 and groups[0][0].tag == "answer"
        with pytest.raises(AssertionError, match="more than once"):
            server.assert_no_repeated_requests()
        server.assert_no_repeated_requests(tag="judge")
        server.reset()
        assert server.count() == 0 and server.pending_faults() == 0


def test_embeddings_are_deterministic_normalised_and_support_base64_and_dimensions():
    with ScriptedOpenAIServer(embedding_dim=16) as server, _client(server) as client:
        texts = ["Melanie paints sunsets", "", "Caroline went to a support group"]
        plain = client.embeddings.create(model="e", input=texts, encoding_format="float")
        vectors = np.array([d.embedding for d in plain.data], dtype=np.float32)
        assert vectors.shape == (3, 16)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
        np.testing.assert_allclose(vectors[0], hashed_bow_vector(texts[0], 16), rtol=1e-6)
        raw = client.embeddings.with_raw_response.create(model="e", input=texts, encoding_format="base64")
        encoded = raw.http_response.json()["data"][2]["embedding"]
        decoded = np.frombuffer(base64.b64decode(encoded), dtype="<f4")
        np.testing.assert_allclose(decoded, vectors[2], rtol=1e-6)
        wide = client.embeddings.create(model="e", input="x", dimensions=40, encoding_format="float")
        assert len(wide.data[0].embedding) == 40
        assert plain.usage.prompt_tokens == 3 + 0 + 6  # whitespace words


def test_bad_embedding_input_is_400():
    with (
        ScriptedOpenAIServer() as server,
        _client(server) as client,
        pytest.raises(openai.BadRequestError, match="input"),
    ):
        client.embeddings.create(model="e", input=[[1, 2, 3]])


def test_serves_64_concurrent_requests_and_records_max_in_flight():
    # Every handler waits until all 64 are inside the responder at once: this only completes if the
    # server really holds 64 requests concurrently.
    barrier = threading.Barrier(64, timeout=30)

    def responder(request: ScriptedRequest) -> str:
        barrier.wait()
        return request.last_user_message

    async def main(base_url: str) -> list[str]:
        async with openai.AsyncOpenAI(api_key=KEY, base_url=base_url, max_retries=0, timeout=60) as client:

            async def one(i: int) -> str:
                r = await client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": f"n{i}"}]
                )
                return r.choices[0].message.content

            return await asyncio.gather(*(one(i) for i in range(64)))

    with ScriptedOpenAIServer(responder) as server:
        answers = asyncio.run(main(server.base_url))
        assert answers == [f"n{i}" for i in range(64)]
        assert server.max_in_flight == 64
        assert server.in_flight == 0


def test_delay_holds_every_request():
    with ScriptedOpenAIServer("ok", delay=0.2) as server, _client(server) as client:
        started = time.monotonic()
        _chat(client, "q")
        assert time.monotonic() - started >= 0.19


def test_server_is_usable_from_threads_and_restartable():
    server = ScriptedOpenAIServer("ok")
    with pytest.raises(RuntimeError, match="not running"):
        _ = server.base_url
    with server:
        results: list[str] = []
        with _client(server) as client:
            threads = [threading.Thread(target=lambda: results.append(_chat(client, "q"))) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert results == ["ok"] * 8
    with server, _client(server) as client:  # a stopped server can start again on a new port
        assert _chat(client, "q") == "ok"
    assert server.count() == 9
