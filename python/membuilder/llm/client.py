"""One asynchronous client for any OpenAI-compatible chat endpoint (OpenAI, vLLM, local servers).

Built on the ``openai`` SDK with the SDK's own retries switched off; retries, backoff, the concurrency
limit, the response cache and the usage accounting live here (see :mod:`membuilder.llm.retry`).

Typical use::

    config = LLMConfig.from_env_and_args("vllm", None, None, "Qwen/Qwen3-4B-Instruct-2507")
    async with LLMClient(config) as llm:
        result = await llm.chat([{"role": "user", "content": "hi"}], tag="answer")
        print(result.text, llm.usage.summary())
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import openai

from membuilder._core import InvalidArgumentError
from membuilder._text import clean_text
from membuilder.endpoint import PROVIDERS
from membuilder.errors import LLMError
from membuilder.llm._loops import PerLoop
from membuilder.llm.cache import ResponseCache, cache_key
from membuilder.llm.reasoning import split_reasoning
from membuilder.llm.retry import (
    MalformedResponse,
    RetryPolicy,
    call_with_retries,
    endpoint_semaphore,
    sanitize_url,
)
from membuilder.llm.usage import UsageTracker, normalize_prices

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["CALL_HEADER", "PROVIDERS", "VLLM_DEFAULT_BASE_URL", "ChatResult", "LLMClient", "LLMConfig"]

CALL_HEADER = "X-Membuilder-Call"
VLLM_DEFAULT_BASE_URL = "http://localhost:8000/v1"
OPENAI_DEFAULT_BASE_URL = "https://api.openai.com/v1"
# Statuses with which a server says it does not accept a request parameter such as response_format.
_JSON_MODE_REFUSED = (400, 422)


@dataclass(frozen=True)
class LLMConfig:
    """Where and how to call a chat model.

    Args:
        model: model name sent to the endpoint (default for every call; calls may override it).
        base_url: endpoint root including ``/v1``. ``None``: OpenAI for ``provider="openai"``,
            ``http://localhost:8000/v1`` for ``"vllm"``; required for ``"compatible"``.
        api_key: the key. ``None``: ``OPENAI_API_KEY`` for ``"openai"``, ``"EMPTY"`` otherwise.
            Never shown by ``repr`` and never written to logs, errors or cache files.
        provider: ``"openai"``, ``"vllm"`` or ``"compatible"``.
        max_concurrency: requests in flight at once to this endpoint+key, shared by every client of
            the process (the first client to use an endpoint fixes the limit), >= 1.
        max_retries: retries after the first attempt, >= 0.
        timeout: seconds per attempt (connect + read), > 0 (the commands' ``--timeout``).
        cache_dir: directory of the response cache; ``None`` disables caching.
        prices: ``{model: (input, output)}`` USD per 1M tokens, overriding the built-in table.
        backoff_base, backoff_cap: exponential backoff parameters in seconds (see ``retry``).
        retry_after_cap: longest ``Retry-After`` honoured, in seconds.
        default_headers: extra HTTP headers sent with every request.
        json_mode_fallback: when the endpoint refuses ``response_format`` (HTTP 400 or 422 to a
            JSON-mode call; some proxies and vLLM setups do), send the call again without it, and
            leave it out of this client's later calls to that model. The callers parse the reply
            themselves, so they lose nothing but the server-side guarantee.

    Raises:
        InvalidArgumentError: for an unknown provider or an out-of-range number.
    """

    model: str
    base_url: str | None = None
    api_key: str | None = field(default=None, repr=False)
    provider: str = "openai"
    max_concurrency: int = 16
    max_retries: int = 6
    timeout: float = 120.0
    cache_dir: Path | None = None
    prices: dict | None = None
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    retry_after_cap: float = 60.0
    default_headers: dict | None = None
    json_mode_fallback: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise InvalidArgumentError(f"model must be a non-empty string, got {self.model!r}")
        if self.provider not in PROVIDERS:
            raise InvalidArgumentError(
                f"unknown provider {self.provider!r}; expected one of {', '.join(PROVIDERS)}"
            )
        if self.provider == "compatible" and not self.base_url:
            raise InvalidArgumentError("provider 'compatible' needs base_url (e.g. http://host:port/v1)")
        if not (isinstance(self.max_concurrency, int) and self.max_concurrency >= 1):
            raise InvalidArgumentError(f"max_concurrency must be an int >= 1, got {self.max_concurrency!r}")
        if not (isinstance(self.max_retries, int) and self.max_retries >= 0):
            raise InvalidArgumentError(f"max_retries must be an int >= 0, got {self.max_retries!r}")
        if not (self.timeout > 0):
            raise InvalidArgumentError(f"timeout must be > 0 seconds, got {self.timeout!r}")
        for name in ("backoff_base", "backoff_cap", "retry_after_cap"):
            if not (getattr(self, name) >= 0):
                raise InvalidArgumentError(f"{name} must be >= 0 seconds, got {getattr(self, name)!r}")
        if self.cache_dir is not None and not isinstance(self.cache_dir, Path):
            object.__setattr__(self, "cache_dir", Path(self.cache_dir))
        try:
            normalize_prices(self.prices)
        except ValueError as exc:
            raise InvalidArgumentError(str(exc)) from None

    @classmethod
    def from_env_and_args(
        cls,
        provider: str = "openai",
        base_url: str | None = None,
        api_key: str | None = None,
        model: str | None = None,
        **overrides: Any,
    ) -> LLMConfig:
        """Build a config from command-line style arguments, falling back on the environment.

        ``openai``: ``base_url`` or ``OPENAI_BASE_URL`` (else api.openai.com), ``api_key`` or
        ``OPENAI_API_KEY``. ``vllm``: ``base_url`` or ``http://localhost:8000/v1``, ``api_key`` or
        ``"EMPTY"``. ``compatible``: ``base_url`` required, ``api_key`` or ``OPENAI_API_KEY`` or
        ``"EMPTY"``. ``overrides`` are other :class:`LLMConfig` fields.

        Raises:
            InvalidArgumentError: no model, an unknown provider, or an OpenAI provider without a key.
        """
        if not model:
            raise InvalidArgumentError("a model name is required (e.g. --model gpt-4o-mini)")
        if provider == "openai":
            base_url = base_url or os.environ.get("OPENAI_BASE_URL") or None
            api_key = api_key or os.environ.get("OPENAI_API_KEY") or None
            if api_key is None:
                raise InvalidArgumentError(
                    "no API key for provider 'openai': pass --api-key or set OPENAI_API_KEY "
                    "(for a local server use provider 'vllm' or 'compatible')"
                )
        elif provider == "vllm":
            base_url = base_url or VLLM_DEFAULT_BASE_URL
            api_key = api_key or "EMPTY"
        elif provider == "compatible":
            api_key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
        return cls(model=model, base_url=base_url, api_key=api_key, provider=provider, **overrides)

    def resolved_base_url(self) -> str:
        if self.base_url:
            return self.base_url
        if self.provider == "vllm":
            return VLLM_DEFAULT_BASE_URL
        return os.environ.get("OPENAI_BASE_URL") or OPENAI_DEFAULT_BASE_URL

    def resolved_api_key(self) -> str:
        """The key to send. Raises InvalidArgumentError when OpenAI itself is called without one."""
        if self.api_key:
            return self.api_key
        if self.provider == "openai":
            env = os.environ.get("OPENAI_API_KEY")
            if env:
                return env
            if not self.base_url and not os.environ.get("OPENAI_BASE_URL"):
                raise InvalidArgumentError(
                    "no API key for provider 'openai': pass api_key or set OPENAI_API_KEY"
                )
        return "EMPTY"

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(
            max_retries=self.max_retries,
            backoff_base=self.backoff_base,
            backoff_cap=self.backoff_cap,
            retry_after_cap=self.retry_after_cap,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description for result files: the key is replaced by ``api_key_given``.

        Use this, not ``dataclasses.asdict``, which would copy the key.
        """
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "api_key":
                out["api_key_given"] = bool(value) and value != "EMPTY"
            elif f.name == "base_url":
                out[f.name] = sanitize_url(value) if value else None
            elif f.name == "cache_dir":
                out[f.name] = str(value) if value is not None else None
            elif f.name == "default_headers":
                out[f.name] = sorted(value) if value else None  # names only: values may be credentials
            else:
                out[f.name] = value
        return out

    def __repr__(self) -> str:
        shown = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "api_key":
                shown.append(f"api_key={'***' if value else None}")
            elif f.name == "base_url" and value:
                shown.append(f"base_url={sanitize_url(value)!r}")  # user info may hold credentials
            elif f.name == "default_headers" and value:
                shown.append(f"default_headers={ {k: '***' for k in value}!r}")
            else:
                shown.append(f"{f.name}={value!r}")
        return f"LLMConfig({', '.join(shown)})"


@dataclass(frozen=True)
class ChatResult:
    """One chat completion.

    ``text`` is the answer with reasoning blocks removed, ``raw_text`` exactly what the model returned
    (``""`` when the endpoint sent no content). ``cached`` is true when no HTTP request was made (cache
    hit, or the answer of an identical request already in flight). Token counts are the endpoint's
    ``usage`` block (0 when it sent none); for a cached result they are those of the original call.
    """

    text: str
    raw_text: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    cached: bool
    finish_reason: str | None
    reasoning: str = ""
    attempts: int = 1
    tag: str | None = None
    latency_s: float = 0.0


def _check_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InvalidArgumentError(
            f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got {type(messages).__name__}"
        )
    if not messages:
        raise InvalidArgumentError("messages is empty; a chat call needs at least one message")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message:
            raise InvalidArgumentError(
                f"messages[{i}] must be a dict with a 'role' key, got {message!r:.200}"
            )
        message = dict(message)
        if isinstance(message.get("content"), str):
            # Text quoted from an earlier reply or a data file may hold lone surrogates, which
            # neither the cache key nor the HTTP body can encode.
            message["content"] = clean_text(message["content"])
        out.append(message)
    return out


class LLMClient:
    """Asynchronous chat client with retries, a shared concurrency limit, caching and usage accounting.

    The client may be used from several event loops in turn (e.g. successive ``asyncio.run`` calls): it
    keeps one SDK client per loop, because an HTTP connection pool belongs to the loop that opened it.
    Close it with ``await client.aclose()`` or use it as an async context manager.
    """

    def __init__(self, config: LLMConfig, *, usage: UsageTracker | None = None) -> None:
        if not isinstance(config, LLMConfig):
            raise InvalidArgumentError(f"LLMClient needs an LLMConfig, got {type(config).__name__}")
        self._config = config
        self._base_url = config.resolved_base_url()
        self._api_key = config.resolved_api_key()
        self.endpoint = sanitize_url(self._base_url)
        self.usage = usage if usage is not None else UsageTracker(config.prices)
        self._policy = config.retry_policy()
        self._cache = ResponseCache(config.cache_dir) if config.cache_dir is not None else None
        self._sdks: PerLoop[openai.AsyncOpenAI] = PerLoop(self._new_sdk)
        self._inflight: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, asyncio.Future]]
        self._inflight = weakref.WeakKeyDictionary()
        self._closed = False
        #: Models for which this endpoint refused JSON mode (see ``LLMConfig.json_mode_fallback``).
        self.json_mode_refused: set[str] = set()
        #: Calls that were sent again without ``response_format`` after a refusal.
        self.json_mode_fallbacks = 0

    # -- properties --------------------------------------------------------------------------------

    @property
    def config(self) -> LLMConfig:
        return self._config

    @property
    def model(self) -> str:
        return self._config.model

    @property
    def cache(self) -> ResponseCache | None:
        return self._cache

    def __repr__(self) -> str:
        return (
            f"LLMClient(endpoint={self.endpoint!r}, model={self._config.model!r}, "
            f"provider={self._config.provider!r}, cache={'on' if self._cache else 'off'})"
        )

    # -- lifecycle ---------------------------------------------------------------------------------

    def _new_sdk(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            api_key=self._api_key,
            base_url=self._base_url,
            max_retries=0,
            timeout=self._config.timeout,
            default_headers=dict(self._config.default_headers or {}),
        )

    async def _sdk(self) -> openai.AsyncOpenAI:
        if self._closed:
            raise LLMError(
                f"LLMClient for {self.endpoint} is closed",
                endpoint=self.endpoint,
                attempts=0,
                reason="closed",
            )
        return await self._sdks.get()

    async def aclose(self) -> None:
        """Close the HTTP connections of the current loop; the client is unusable afterwards.

        Connections opened in other (earlier) event loops were closed when those loops shut down.
        """
        self._closed = True
        await self._sdks.aclose_current()
        self._sdks.forget_all()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- the call ----------------------------------------------------------------------------------

    async def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        model: str | None = None,
        temperature: float | None = 0.0,
        max_tokens: int | None = None,
        top_p: float | None = None,
        json_mode: bool = False,
        seed: int | None = None,
        tag: str | None = None,
        use_cache: bool = True,
        timeout: float | None = None,
    ) -> ChatResult:
        """Send one chat completion request and return its answer.

        Args:
            messages: OpenAI chat messages (dicts with ``role`` and ``content``).
            model: overrides the config's model for this call.
            temperature: sampling temperature (``None`` leaves it to the server).
            max_tokens: cap on completion tokens (sent as ``max_completion_tokens`` to OpenAI itself and
                as ``max_tokens`` to other servers).
            top_p: nucleus sampling mass in (0, 1].
            json_mode: ask for a JSON object (``response_format={"type": "json_object"}``).
            seed: sampling seed, where the server supports it; part of the cache key.
            tag: what the call is for (``"agent:core"``, ``"answer"``, ...); sent as the
                ``X-Membuilder-Call`` header, not part of the cache key.
            use_cache: ``False`` bypasses the response cache for this call (read and write).
            timeout: seconds for each attempt of this call (default: the config's).

        Raises:
            InvalidArgumentError: malformed ``messages``, a bad tag or parameter.
            LLMError: the endpoint failed for good (after retries, or at once for e.g. 400/401).
        """
        msgs = _check_messages(messages)
        model = model or self._config.model
        if tag is not None and (not isinstance(tag, str) or any(c in tag for c in "\r\n")):
            raise InvalidArgumentError(f"tag must be a one-line string, got {tag!r}")
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise InvalidArgumentError(f"max_tokens must be a positive int, got {max_tokens!r}")
        if top_p is not None and not (0.0 < top_p <= 1.0):
            raise InvalidArgumentError(f"top_p must be in (0, 1], got {top_p!r}")
        if temperature is not None and not (temperature >= 0.0):
            raise InvalidArgumentError(f"temperature must be >= 0, got {temperature!r}")
        params = {
            "temperature": temperature,
            "top_p": top_p,
            "max_tokens": max_tokens,
            "json_mode": bool(json_mode) or None,
            "seed": seed,
        }
        started = time.perf_counter()

        key: str | None = None
        if self._cache is not None and use_cache:
            try:
                key = cache_key(model, msgs, params)
            except (TypeError, ValueError) as exc:
                raise InvalidArgumentError(f"messages are not JSON-serialisable: {exc}") from None
            record = self._cache.get(key)
            if record is not None:
                return self._from_record(record, model, tag, started)
            # Identical request already on its way in this loop: wait for its answer, do not resend.
            loop = asyncio.get_running_loop()
            inflight = self._inflight.setdefault(loop, {})
            pending = inflight.get(key)
            if pending is not None:
                try:
                    record = await asyncio.shield(pending)
                except asyncio.CancelledError:
                    if not pending.cancelled():
                        raise  # this caller was cancelled
                    # the first caller was cancelled: send the request ourselves below
                else:
                    return self._from_record(record, model, tag, started)
            future: asyncio.Future = loop.create_future()
            inflight[key] = future
            try:
                result, record = await self._call(msgs, model, params, tag, timeout, started)
            except Exception as exc:
                future.set_exception(exc)
                future.exception()  # mark retrieved: waiters, if any, re-raise it themselves
                raise
            else:
                self._cache.put(key, record)
                future.set_result(record)
                return result
            finally:
                if not future.done():  # cancelled (or interrupted): waiters send their own request
                    future.cancel()
                if inflight.get(key) is future:
                    del inflight[key]
        result, _ = await self._call(msgs, model, params, tag, timeout, started)
        return result

    def _from_record(
        self, record: Mapping[str, Any], model: str, tag: str | None, started: float
    ) -> ChatResult:
        raw = record["text"]
        reasoning, text = split_reasoning(raw)
        prompt_tokens = int(record.get("prompt_tokens") or 0)
        completion_tokens = int(record.get("completion_tokens") or 0)
        self.usage.record(model, prompt_tokens, completion_tokens, cached=True)
        return ChatResult(
            text=text,
            raw_text=raw,
            model=str(record.get("model") or model),
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cached=True,
            finish_reason=record.get("finish_reason"),
            reasoning=reasoning,
            attempts=0,
            tag=tag,
            latency_s=time.perf_counter() - started,
        )

    async def _call(
        self,
        msgs: list[dict[str, Any]],
        model: str,
        params: Mapping[str, Any],
        tag: str | None,
        timeout: float | None,
        started: float,
    ) -> tuple[ChatResult, dict[str, Any]]:
        sdk = await self._sdk()
        kwargs: dict[str, Any] = {"model": model, "messages": msgs}
        if params["temperature"] is not None:
            kwargs["temperature"] = params["temperature"]
        if params["top_p"] is not None:
            kwargs["top_p"] = params["top_p"]
        if params["max_tokens"] is not None:
            # OpenAI deprecated max_tokens (reasoning models reject it); vLLM and most servers know it.
            name = "max_completion_tokens" if self._config.provider == "openai" else "max_tokens"
            kwargs[name] = params["max_tokens"]
        if params["json_mode"] and model not in self.json_mode_refused:
            kwargs["response_format"] = {"type": "json_object"}
        if params["seed"] is not None:
            kwargs["seed"] = params["seed"]
        if tag is not None:
            kwargs["extra_headers"] = {CALL_HEADER: tag}
        if timeout is not None:
            kwargs["timeout"] = timeout

        async def attempt() -> Any:
            response = await sdk.chat.completions.create(**kwargs)
            return _extract(response)

        semaphore = endpoint_semaphore(self.endpoint, self._api_key, self._config.max_concurrency)

        async def send() -> tuple[Any, int]:
            return await call_with_retries(
                attempt,
                policy=self._policy,
                endpoint=self.endpoint,
                what=f"chat call{f' [{tag}]' if tag else ''} to model {model!r}",
                secrets=(self._api_key,),
                semaphore=semaphore,
            )

        try:
            try:
                extracted, attempts = await send()
            except LLMError as exc:
                if not (
                    "response_format" in kwargs
                    and self._config.json_mode_fallback
                    and exc.status in _JSON_MODE_REFUSED
                ):
                    raise
                # The endpoint refused JSON mode: ask again without it, and stop asking this model.
                self.json_mode_refused.add(model)
                self.json_mode_fallbacks += 1
                del kwargs["response_format"]
                extracted, attempts = await send()
                attempts += exc.attempts
        except LLMError as exc:
            self.usage.record_failure(model, retries=max(exc.attempts - 1, 0))
            raise
        raw, served_model, finish_reason, prompt_tokens, completion_tokens = extracted
        self.usage.record(model, prompt_tokens, completion_tokens, retries=attempts - 1)
        reasoning, text = split_reasoning(raw)
        result = ChatResult(
            text=text,
            raw_text=raw,
            model=served_model or model,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cached=False,
            finish_reason=finish_reason,
            reasoning=reasoning,
            attempts=attempts,
            tag=tag,
            latency_s=time.perf_counter() - started,
        )
        record = {
            "text": raw,
            "model": served_model or model,
            "finish_reason": finish_reason,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "created": time.time(),
        }
        return result, record


def _extract(response: Any) -> tuple[str, str | None, str | None, int, int]:
    """Pull (content, model, finish_reason, prompt_tokens, completion_tokens) out of an SDK response.

    Raises MalformedResponse (retried) when the body lacks a first choice with a message: the SDK does
    not validate bodies, so a broken proxy can hand us an object without them.
    """
    try:
        choices = response.choices
        if not choices:
            raise MalformedResponse("response has no choices")
        choice = choices[0]
        message = choice.message
        content = message.content
        finish_reason = getattr(choice, "finish_reason", None)
    except (AttributeError, IndexError, TypeError, KeyError) as exc:
        raise MalformedResponse(f"response lacks choices[0].message ({type(exc).__name__})") from None
    if content is None:
        content = ""
    elif not isinstance(content, str):
        raise MalformedResponse(f"message content is {type(content).__name__}, not a string")
    else:
        # A reply may hold lone surrogates ("\ud800" is valid JSON): they could be neither
        # cached, nor sent back in a later prompt, nor written as UTF-8. Model text is data.
        content = clean_text(content)
    usage = getattr(response, "usage", None)
    prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0) if usage is not None else 0
    completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0) if usage is not None else 0
    served = getattr(response, "model", None)
    return (
        content,
        served if isinstance(served, str) else None,
        finish_reason,
        prompt_tokens,
        completion_tokens,
    )
