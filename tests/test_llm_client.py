"""The async LLM client against the scripted server: retries, errors, cache, concurrency, usage."""

from __future__ import annotations

import asyncio
import json
import logging
import pickle
from email.utils import formatdate

import pytest
from membuilder import InvalidArgumentError, MembuilderError
from membuilder.llm import (
    KNOWN_PRICES,
    ChatResult,
    LLMClient,
    LLMConfig,
    LLMError,
    ResponseCache,
    RetryPolicy,
    UsageTracker,
    cache_key,
    lookup_price,
    parse_retry_after,
    split_reasoning,
    strip_reasoning,
)
from membuilder.testing import ScriptedOpenAIServer, ScriptedRequest

KEY = "sk-membuilder-test-4f9a2c71e0b3d5"
USER = [{"role": "user", "content": "What did Melanie paint?"}]


def make_config(server: ScriptedOpenAIServer, **overrides) -> LLMConfig:
    settings = {
        "model": "test-model",
        "base_url": server.base_url,
        "api_key": KEY,
        "provider": "compatible",
        "max_retries": 3,
        "timeout": 5.0,
        "backoff_base": 0.001,
        "backoff_cap": 0.005,
    }
    settings.update(overrides)
    return LLMConfig(**settings)


def chat_once(config: LLMConfig, messages=USER, **kwargs) -> ChatResult:
    async def main() -> ChatResult:
        async with LLMClient(config) as client:
            return await client.chat(messages, **kwargs)

    return asyncio.run(main())


# --------------------------------------------------------------------------------------------------
# Round trip
# --------------------------------------------------------------------------------------------------


def test_chat_round_trip_sends_params_and_tag():
    with ScriptedOpenAIServer({"answer": "A sunset."}) as server:
        result = chat_once(
            make_config(server),
            tag="answer",
            temperature=0.2,
            top_p=0.9,
            max_tokens=64,
            json_mode=True,
            seed=7,
        )
        assert result.text == "A sunset." and result.raw_text == "A sunset."
        assert not result.cached and result.attempts == 1 and result.tag == "answer"
        assert result.finish_reason == "stop" and result.model == "test-model"
        assert result.prompt_tokens > 0 and result.completion_tokens == 2
        (request,) = server.requests
        assert request.tag == "answer"
        body = request.body
        assert body["temperature"] == 0.2 and body["top_p"] == 0.9 and body["seed"] == 7
        assert body["max_tokens"] == 64 and "max_completion_tokens" not in body
        assert body["response_format"] == {"type": "json_object"}
        assert body["messages"] == USER


def test_openai_provider_sends_max_completion_tokens():
    with ScriptedOpenAIServer("ok") as server:
        chat_once(make_config(server, provider="openai"), max_tokens=10)
        body = server.requests[0].body
        assert body["max_completion_tokens"] == 10 and "max_tokens" not in body


def test_defaults_leave_optional_params_out():
    with ScriptedOpenAIServer("ok") as server:
        chat_once(make_config(server), temperature=None)
        body = server.requests[0].body
        for name in ("temperature", "top_p", "max_tokens", "seed", "response_format"):
            assert name not in body


@pytest.mark.parametrize(
    "messages",
    [[], "hello", [{"content": "no role"}], ["not a dict"]],
)
def test_bad_messages_are_the_callers_mistake(messages):
    with ScriptedOpenAIServer("ok") as server:
        with pytest.raises(InvalidArgumentError):
            chat_once(make_config(server), messages=messages)
        assert server.count() == 0


def test_bad_tag_and_params_are_rejected_before_sending():
    with ScriptedOpenAIServer("ok") as server:
        with pytest.raises(InvalidArgumentError, match="tag"):
            chat_once(make_config(server), tag="a\r\nX-Evil: 1")
        with pytest.raises(InvalidArgumentError, match="top_p"):
            chat_once(make_config(server), top_p=0.0)
        with pytest.raises(InvalidArgumentError, match="max_tokens"):
            chat_once(make_config(server), max_tokens=0)
        assert server.count() == 0


# --------------------------------------------------------------------------------------------------
# Faults and retries
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["429", "500", "timeout", "disconnect", "truncated_body", "malformed_body"])
def test_each_fault_is_retried_to_a_correct_answer(fault):
    with ScriptedOpenAIServer({"agent:core": '{"operation": "SKIP"}'}) as server:
        server.inject(fault, tag="agent:core", retry_after=0.01, timeout_s=10)
        result = chat_once(make_config(server, timeout=0.5), tag="agent:core")
        assert result.text == '{"operation": "SKIP"}'
        assert result.attempts == 2
        assert [r.fault for r in server.requests] == [fault, None]


def test_several_faults_in_a_row_are_all_retried():
    with ScriptedOpenAIServer("ok") as server:
        server.inject("500", times=2)
        server.inject("disconnect")
        result = chat_once(make_config(server, max_retries=3))
        assert result.text == "ok" and result.attempts == 4
        assert server.count() == 4


def test_retry_after_is_honoured():
    with ScriptedOpenAIServer("ok") as server:
        server.inject("429", retry_after=0.3)
        result = chat_once(make_config(server, backoff_base=0.0, backoff_cap=0.0))
        first, second = server.requests
        assert result.attempts == 2
        # Backoff is zero here, so any wait comes from the Retry-After header.
        assert second.time - first.time >= 0.29


def test_retry_after_is_capped():
    with ScriptedOpenAIServer("ok") as server:
        server.inject("429", retry_after=600)
        result = chat_once(make_config(server, retry_after_cap=0.01))
        first, second = server.requests
        assert result.text == "ok" and second.time - first.time < 5


def test_parse_retry_after_forms():
    assert parse_retry_after({"Retry-After": "2"}) == 2.0
    assert parse_retry_after({"retry-after": "0.25"}) == 0.25
    assert parse_retry_after({"retry-after-ms": "150", "Retry-After": "9"}) == 0.15
    now = 1_000_000_000.0
    assert parse_retry_after({"Retry-After": formatdate(now + 30, usegmt=True)}, now=now) == pytest.approx(30)
    assert parse_retry_after({"Retry-After": formatdate(now - 30, usegmt=True)}, now=now) == 0.0
    assert parse_retry_after({"Retry-After": "soon"}) is None
    assert parse_retry_after({"Retry-After": "-3"}) is None
    assert parse_retry_after({}) is None and parse_retry_after(None) is None


def test_backoff_grows_exponentially_with_jitter_and_cap():
    policy = RetryPolicy(max_retries=5, backoff_base=1.0, backoff_cap=5.0, retry_after_cap=2.0)
    for retry, full in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 5.0), (9, 5.0)]:
        delay = policy.delay(retry)
        assert 0.5 * full <= delay <= full
    assert policy.delay(1, retry_after=10.0) == 2.0
    assert policy.delay(1, retry_after=0.5) == 0.5
    with pytest.raises(ValueError):
        RetryPolicy(max_retries=-1)


def test_exhausted_retries_raise_llm_error_naming_endpoint_status_attempts_without_key(caplog):
    caplog.set_level(logging.DEBUG)
    with ScriptedOpenAIServer("ok") as server:
        server.inject("500", times=10)
        config = make_config(server, max_retries=2)
        with pytest.raises(LLMError) as info:
            chat_once(config, tag="judge")
        err = info.value
        assert isinstance(err, MembuilderError)
        assert err.status == 500 and err.attempts == 3 and err.reason == "http"
        assert err.endpoint == server.base_url
        message = str(err)
        assert server.base_url in message and "500" in message and "3 attempt" in message
        assert server.count() == 3
        for text in (message, repr(err), repr(err.args), caplog.text, repr(config), repr(LLMClient(config))):
            assert KEY not in text
        # The retries were logged (without the key).
        assert "retrying" in caplog.text


def test_llm_error_survives_pickling():
    err = LLMError("boom", endpoint="http://h/v1", status=503, attempts=4, reason="http")
    clone = pickle.loads(pickle.dumps(err))
    assert (str(clone), clone.endpoint, clone.status, clone.attempts, clone.reason) == (
        "boom",
        "http://h/v1",
        503,
        4,
        "http",
    )


def test_timeouts_exhausted_give_status_none():
    with ScriptedOpenAIServer("ok") as server:
        server.inject("timeout", times=5, timeout_s=10)
        with pytest.raises(LLMError) as info:
            chat_once(make_config(server, timeout=0.2, max_retries=1))
        assert info.value.status is None and info.value.reason == "timeout" and info.value.attempts == 2
        assert "last status none" in str(info.value)


def test_non_retryable_error_fails_at_once_with_the_server_message():
    with ScriptedOpenAIServer({"answer": "x"}) as server:
        with pytest.raises(LLMError) as info:
            chat_once(make_config(server), tag="judge")
        assert info.value.status == 400 and info.value.attempts == 1
        assert "no scripted response for tag 'judge'" in str(info.value)
        assert server.count() == 1


def test_key_in_a_server_error_message_is_redacted():
    def responder(request: ScriptedRequest) -> str:
        raise ValueError(f"bad key {KEY}")

    with ScriptedOpenAIServer(responder) as server:
        with pytest.raises(LLMError) as info:
            chat_once(make_config(server))
        assert KEY not in str(info.value) and "***" in str(info.value)


def test_failed_calls_are_counted_in_usage():
    async def main(config: LLMConfig) -> dict:
        async with LLMClient(config) as client:
            with pytest.raises(LLMError):
                await client.chat(USER)
            return client.usage.summary()

    with ScriptedOpenAIServer("ok") as server:
        server.inject("500", times=3)
        summary = asyncio.run(main(make_config(server, max_retries=1)))
        row = summary["models"]["test-model"]
        assert row["failed_calls"] == 1 and row["retries"] == 1 and row["calls"] == 0


def test_closed_client_refuses_calls():
    async def main(config: LLMConfig) -> None:
        client = LLMClient(config)
        await client.aclose()
        await client.chat(USER)

    with ScriptedOpenAIServer("ok") as server, pytest.raises(LLMError, match="closed"):
        asyncio.run(main(make_config(server)))


# --------------------------------------------------------------------------------------------------
# Response cache
# --------------------------------------------------------------------------------------------------


def test_second_identical_call_with_cache_makes_no_http_call(tmp_path):
    with ScriptedOpenAIServer({"answer": "<think>recall</think>Paris"}) as server:
        config = make_config(server, cache_dir=tmp_path / "cache")
        first = chat_once(config, tag="answer")
        # A fresh client (as after a restart) reads the same directory.
        second = chat_once(config, tag="answer")
        assert server.count() == 1
        assert not first.cached and second.cached and second.attempts == 0
        assert (second.text, second.raw_text, second.reasoning) == ("Paris", first.raw_text, "recall")
        assert (second.prompt_tokens, second.completion_tokens) == (
            first.prompt_tokens,
            first.completion_tokens,
        )
        for path in (tmp_path / "cache").rglob("*"):
            if path.is_file():
                assert KEY.encode() not in path.read_bytes()


def test_cache_hits_are_counted_as_cached_in_usage(tmp_path):
    async def main(config: LLMConfig) -> dict:
        async with LLMClient(config) as client:
            await client.chat(USER)
            await client.chat(USER)
            await client.chat(USER, tag="other-tag")  # the tag is not part of the key
            return client.usage.summary()

    with ScriptedOpenAIServer("ok") as server:
        summary = asyncio.run(main(make_config(server, cache_dir=tmp_path)))
        row = summary["models"]["test-model"]
        assert server.count() == 1
        assert row["calls"] == 3 and row["cached_calls"] == 2
        assert row["cached_prompt_tokens"] == 2 * row["prompt_tokens"]


def test_cache_key_covers_model_messages_and_params_but_not_tag(tmp_path):
    with ScriptedOpenAIServer("ok") as server:
        config = make_config(server, cache_dir=tmp_path)
        chat_once(config)
        chat_once(config, temperature=0.7)
        chat_once(config, seed=1)
        chat_once(config, json_mode=True)
        chat_once(config, model="other-model")
        chat_once(config, messages=[{"role": "user", "content": "different"}])
        assert server.count() == 6
        chat_once(config, tag="any")
        chat_once(config, seed=1)
        assert server.count() == 6
        chat_once(config, use_cache=False)
        assert server.count() == 7


def test_cache_key_is_canonical():
    a = cache_key("m", [{"role": "user", "content": "x"}], {"temperature": 0.0, "seed": None})
    b = cache_key("m", [{"content": "x", "role": "user"}], {"temperature": 0.0})
    c = cache_key("m", [{"role": "user", "content": "x"}], {"temperature": 0.1})
    assert a == b != c and len(a) == 64


def test_corrupt_cache_entry_is_ignored_with_a_warning_and_rewritten(tmp_path, caplog):
    with ScriptedOpenAIServer("fresh answer") as server:
        config = make_config(server, cache_dir=tmp_path)
        chat_once(config)
        (entry,) = [p for p in tmp_path.rglob("*.json")]
        entry.write_text('{"text": "half a recor')
        with caplog.at_level(logging.WARNING, logger="membuilder.llm"):
            result = chat_once(config)
        assert "corrupt" in caplog.text
        assert result.text == "fresh answer" and not result.cached and server.count() == 2
        record = json.loads(entry.read_text())
        assert record["text"] == "fresh answer"
        assert chat_once(config).cached and server.count() == 2


def test_response_cache_survives_unwritable_directory(tmp_path, caplog):
    cache = ResponseCache(tmp_path)
    blocker = tmp_path / "ab"
    blocker.write_text("a file where a directory should be")
    with caplog.at_level(logging.WARNING, logger="membuilder.llm"):
        cache.put("ab" + "0" * 62, {"text": "x"})
    assert "could not store" in caplog.text
    assert cache.get("ab" + "0" * 62) is None


def test_identical_concurrent_calls_are_sent_once_when_caching(tmp_path):
    async def main(config: LLMConfig) -> list[ChatResult]:
        async with LLMClient(config) as client:
            return await asyncio.gather(*(client.chat(USER) for _ in range(8)))

    with ScriptedOpenAIServer("ok", delay=0.1) as server:
        results = asyncio.run(main(make_config(server, cache_dir=tmp_path)))
        assert server.count() == 1
        assert [r.text for r in results] == ["ok"] * 8
        assert sum(not r.cached for r in results) == 1
        server.assert_no_repeated_requests()


# --------------------------------------------------------------------------------------------------
# Concurrency
# --------------------------------------------------------------------------------------------------


def test_concurrency_limit_is_respected_and_shared_per_endpoint():
    async def main(config: LLMConfig) -> None:
        # Two clients on one endpoint+key share one budget.
        async with LLMClient(config) as a, LLMClient(config) as b:
            calls = [
                (a if i % 2 else b).chat([{"role": "user", "content": f"question {i}"}]) for i in range(24)
            ]
            await asyncio.gather(*calls)

    with ScriptedOpenAIServer(delay=0.05) as server:
        asyncio.run(main(make_config(server, max_concurrency=3)))
        assert server.count() == 24
        assert 2 <= server.max_in_flight <= 3


def test_client_works_across_successive_event_loops():
    with ScriptedOpenAIServer() as server:
        client = LLMClient(make_config(server))
        first = asyncio.run(client.chat([{"role": "user", "content": "one"}]))
        second = asyncio.run(client.chat([{"role": "user", "content": "two"}]))
        assert (first.text, second.text) == ("one", "two")
        asyncio.run(client.aclose())


# --------------------------------------------------------------------------------------------------
# Reasoning blocks
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "reasoning", "answer"),
    [
        ("plain answer", "", "plain answer"),
        ("<think>a</think>B", "a", "B"),
        ('<THINKING>\nlong\nplan\n</THINKING>\n{"x": 1}', "long\nplan", '{"x": 1}'),
        ("<think>one</think> mid <think>two</think> end", "one\n\ntwo", "mid  end"),
        ("thought without opener</think>answer", "thought without opener", "answer"),
        ("<think>ran out of tokens", "ran out of tokens", ""),
        ("  <thinking>unclosed after blank", "unclosed after blank", ""),
        ("<think>done</think><think>then cut", "done\n\nthen cut", ""),
        ("keep <b>html</b> and a < b", "", "keep <b>html</b> and a < b"),
        ("answer mentions </think> late", "answer mentions", "late"),
    ],
)
def test_split_reasoning(raw, reasoning, answer):
    assert split_reasoning(raw) == (reasoning, answer)
    assert strip_reasoning(raw) == answer


def test_chat_result_text_has_reasoning_stripped():
    with ScriptedOpenAIServer("<think>The user asked about art.</think>\nWatercolours.") as server:
        result = chat_once(make_config(server))
        assert result.text == "Watercolours."
        assert result.raw_text.startswith("<think>")
        assert result.reasoning == "The user asked about art."


def test_unclosed_reasoning_gives_empty_text_not_thoughts():
    with ScriptedOpenAIServer("<think>I should list the memories and then") as server:
        result = chat_once(make_config(server))
        assert result.text == "" and result.reasoning.startswith("I should")


# --------------------------------------------------------------------------------------------------
# Usage and prices
# --------------------------------------------------------------------------------------------------


def test_usage_totals_match_the_responses_and_known_prices():
    async def main(config: LLMConfig) -> tuple[list[ChatResult], dict]:
        async with LLMClient(config) as client:
            results = [
                await client.chat([{"role": "user", "content": "short"}]),
                await client.chat([{"role": "user", "content": "a somewhat longer question here"}]),
                await client.chat([{"role": "user", "content": "x"}], model="mystery-model"),
            ]
            return results, client.usage.summary()

    with ScriptedOpenAIServer("three word answer") as server:
        results, summary = asyncio.run(main(make_config(server, model="gpt-4o-mini")))
    known = summary["models"]["gpt-4o-mini"]
    prompt = results[0].prompt_tokens + results[1].prompt_tokens
    assert known["calls"] == 2 and known["prompt_tokens"] == prompt and known["completion_tokens"] == 6
    price_in, price_out = KNOWN_PRICES["gpt-4o-mini"]
    assert known["cost_usd"] == pytest.approx((prompt * price_in + 6 * price_out) / 1e6)
    assert summary["models"]["mystery-model"]["cost_usd"] is None
    total = summary["total"]
    assert total["calls"] == 3 and total["prompt_tokens"] == sum(r.prompt_tokens for r in results)
    assert total["cost_usd"] is None  # one model's price is unknown: no invented total
    json.dumps(summary)


def test_user_prices_override_and_snapshots_resolve():
    tracker = UsageTracker(prices={"my-vllm-model": (1.0, 2.0), "gpt-4o-mini": {"input": 9.0, "output": 9.0}})
    tracker.record("my-vllm-model", 1_000_000, 500_000)
    tracker.record("gpt-4o-mini-2024-07-18", 1_000_000, 0)
    tracker.record("my-vllm-model", 1_000_000, 0, cached=True)
    summary = tracker.summary()
    assert summary["models"]["my-vllm-model"]["cost_usd"] == pytest.approx(2.0)
    assert summary["models"]["gpt-4o-mini-2024-07-18"]["cost_usd"] == pytest.approx(9.0)
    assert summary["total"]["cost_usd"] == pytest.approx(11.0)
    assert summary["total"]["cached_calls"] == 1
    assert lookup_price("openai/gpt-4.1-mini") == KNOWN_PRICES["gpt-4.1-mini"]
    assert lookup_price("Qwen/Qwen3-4B-Instruct-2507") is None
    with pytest.raises(ValueError):
        UsageTracker(prices={"m": (-1, 0)})
    other = UsageTracker()
    other.record("my-vllm-model", 10, 10)
    tracker.merge(other)
    assert tracker.summary()["models"]["my-vllm-model"]["calls"] == 3


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


def test_from_env_and_args_defaults(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    vllm = LLMConfig.from_env_and_args("vllm", None, None, "Qwen3-4B")
    assert (vllm.base_url, vllm.api_key, vllm.provider) == ("http://localhost:8000/v1", "EMPTY", "vllm")
    with pytest.raises(InvalidArgumentError, match="OPENAI_API_KEY"):
        LLMConfig.from_env_and_args("openai", None, None, "gpt-4o-mini")
    with pytest.raises(InvalidArgumentError, match="model"):
        LLMConfig.from_env_and_args("vllm", None, None, None)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", "http://proxy.local/v1")
    openai_cfg = LLMConfig.from_env_and_args("openai", None, None, "gpt-4o-mini", max_retries=1)
    assert openai_cfg.api_key == KEY and openai_cfg.base_url == "http://proxy.local/v1"
    assert openai_cfg.max_retries == 1
    assert KEY not in repr(openai_cfg) and "api_key=***" in repr(openai_cfg)


def test_config_validation():
    with pytest.raises(InvalidArgumentError, match="provider"):
        LLMConfig(model="m", provider="anthropic")
    with pytest.raises(InvalidArgumentError, match="base_url"):
        LLMConfig(model="m", provider="compatible")
    with pytest.raises(InvalidArgumentError, match="max_concurrency"):
        LLMConfig(model="m", max_concurrency=0)
    with pytest.raises(InvalidArgumentError, match="timeout"):
        LLMConfig(model="m", timeout=0)
    with pytest.raises(InvalidArgumentError, match="model"):
        LLMConfig(model="")
    with pytest.raises(InvalidArgumentError, match="price"):
        LLMConfig(model="m", prices={"m": "cheap"})


def test_openai_provider_without_any_key_fails_at_client_creation(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(InvalidArgumentError, match="OPENAI_API_KEY"):
        LLMClient(LLMConfig(model="gpt-4o-mini"))


def test_repr_hides_credentials_in_url_and_headers():
    config = LLMConfig(
        model="m",
        provider="compatible",
        base_url="http://user:pa55word@host:9/v1?key=zzz",
        api_key=KEY,
        default_headers={"Authorization": "Bearer hidden-value"},
    )
    text = repr(config) + repr(LLMClient(config)) + json.dumps(config.to_dict())
    for secret in (KEY, "pa55word", "zzz", "hidden-value"):
        assert secret not in text
    assert config.to_dict()["api_key_given"] is True
    assert config.to_dict()["base_url"] == "http://host:9/v1"


def test_bodies_without_a_first_choice_are_malformed_and_retryable():
    from types import SimpleNamespace

    from membuilder.llm.client import _extract
    from membuilder.llm.retry import MalformedResponse, classify

    for body in (
        SimpleNamespace(choices=[]),
        SimpleNamespace(),
        SimpleNamespace(choices=[SimpleNamespace()]),
    ):
        with pytest.raises(MalformedResponse) as info:
            _extract(body)
        failure = classify(info.value)
        assert failure is not None and failure.retryable and failure.reason == "malformed_response"
    ok = SimpleNamespace(
        choices=[SimpleNamespace(message=SimpleNamespace(content=None), finish_reason="length")],
        usage=None,
        model="m",
    )
    assert _extract(ok) == ("", "m", "length", 0, 0)
    assert classify(RuntimeError("not an API failure")) is None


# --------------------------------------------------------------------------------------------------
# JSON mode refused by the endpoint (proxies, some vLLM setups)
# --------------------------------------------------------------------------------------------------


def test_json_mode_refused_falls_back_without_response_format_and_remembers():
    reply = '{"label": "CORRECT"}'
    with ScriptedOpenAIServer(reply, reject_response_format=True) as server:

        async def main() -> tuple[list[ChatResult], int, set[str]]:
            async with LLMClient(make_config(server)) as client:
                out = [await client.chat(USER, json_mode=True, tag="judge") for _ in range(2)]
                other = await client.chat(USER, json_mode=True, model="other-model", tag="judge")
                return [*out, other], client.json_mode_fallbacks, set(client.json_mode_refused)

        results, fallbacks, refused = asyncio.run(main())
        assert [r.text for r in results] == [reply] * 3
        bodies = [(r.model, "response_format" in r.body) for r in server.requests]
    # first call: refused, then sent again without JSON mode; the second call of the same model
    # leaves JSON mode out at once; another model is asked with JSON mode first, like the first.
    assert bodies == [
        ("test-model", True),
        ("test-model", False),
        ("test-model", False),
        ("other-model", True),
        ("other-model", False),
    ]
    assert fallbacks == 2 and refused == {"test-model", "other-model"}
    assert results[0].attempts == 2 and results[1].attempts == 1


def test_json_mode_refused_without_fallback_fails_with_the_status():
    with ScriptedOpenAIServer("{}", reject_response_format=True) as server:
        with pytest.raises(LLMError) as info:
            chat_once(make_config(server, json_mode_fallback=False), json_mode=True)
        assert info.value.status == 400 and "response_format" in str(info.value)
        assert len(server.requests) == 1


def test_json_mode_fallback_does_not_touch_calls_without_json_mode():
    with ScriptedOpenAIServer("plain", reject_response_format=True) as server:
        assert chat_once(make_config(server)).text == "plain"
        assert len(server.requests) == 1 and "response_format" not in server.requests[0].body
