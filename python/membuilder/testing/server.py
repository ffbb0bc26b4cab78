"""A scripted OpenAI-compatible HTTP server for tests.

It is a real server on ``127.0.0.1`` (stdlib ``ThreadingHTTPServer`` in a daemon thread), so tests drive
the real ``openai`` SDK and the real retry code. It records every request, answers chat completions from
a *responder*, serves deterministic hashed bag-of-words embeddings and ``/v1/models``, and can be told to
misbehave for the next matching request(s)::

    def responder(req: ScriptedRequest) -> str:
        return '{"operation": "SKIP"}' if req.tag == "agent:core" else "ok"

    with ScriptedOpenAIServer(responder) as server:
        server.inject("429", times=2, tag="agent:core")
        config = LLMConfig(model="m", base_url=server.base_url, provider="compatible")
        ...
        assert server.count("agent:core") == 3
        server.assert_no_repeated_requests()

Faults (:data:`FaultKind`): ``"429"`` (with ``Retry-After``), ``"500"``, ``"timeout"`` (holds the request
without answering until ``timeout_s`` passes or the server stops), ``"disconnect"`` (closes the socket
without a response), ``"truncated_body"`` (announces the full ``Content-Length`` then sends half the body
and closes), ``"malformed_body"`` (a complete 200 response whose body is not JSON). A faulted request is
recorded (``ScriptedRequest.fault``) but does not consume the responder's script.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Literal, get_args

from membuilder.embed.hashing import hashed_bow_vector

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["FAULT_KINDS", "FaultKind", "Responder", "ScriptedOpenAIServer", "ScriptedRequest"]

FaultKind = Literal["429", "500", "timeout", "disconnect", "truncated_body", "malformed_body"]
FAULT_KINDS: tuple[str, ...] = get_args(FaultKind)

CALL_HEADER = "X-Membuilder-Call"


@dataclass(frozen=True)
class ScriptedRequest:
    """One request as the server saw it.

    ``tag`` is the ``X-Membuilder-Call`` header (``None`` if absent); ``body`` the parsed JSON body (``{}``
    for GET); ``messages`` the chat messages (``[]`` for other endpoints); ``model`` the body's model.
    ``time`` is ``time.monotonic()`` at arrival; ``index`` the arrival order; ``fault`` the injected
    fault it received, if any. Request headers are not kept (they carry the API key).
    """

    tag: str | None
    body: dict
    messages: list
    model: str | None
    path: str = "/v1/chat/completions"
    time: float = 0.0
    index: int = 0
    fault: str | None = None

    @property
    def last_user_message(self) -> str:
        """Content of the last ``user`` message (``""`` if none)."""
        for message in reversed(self.messages):
            if message.get("role") == "user" and isinstance(message.get("content"), str):
                return message["content"]
        return ""

    @property
    def is_chat(self) -> bool:
        return self.path.endswith("/chat/completions")

    @property
    def is_embeddings(self) -> bool:
        return self.path.endswith("/embeddings")


Responder = Callable[[ScriptedRequest], str] | Mapping[str | None, str | Sequence[str]] | str | None


class ScriptError(Exception):
    """The script cannot answer a request (unknown tag, exhausted list, bad responder output)."""


@dataclass
class _QueuedFault:
    kind: str
    remaining: int
    tag: str | None
    path: str | None
    retry_after: str
    timeout_s: float


def _echo(request: ScriptedRequest) -> str:
    return request.last_user_message


class _ScriptResponder:
    """Adapts the accepted responder forms to one callable; lists are consumed in order per tag."""

    def __init__(self, responder: Responder) -> None:
        self._lock = threading.Lock()
        self._positions: dict[str | None, int] = {}
        if responder is None:
            self._fn: Callable[[ScriptedRequest], str] = _echo
        elif isinstance(responder, str):
            text = responder
            self._fn = lambda _req: text
        elif isinstance(responder, Mapping):
            self._script = dict(responder)
            self._fn = self._from_script
        elif callable(responder):
            self._fn = responder
        else:
            raise TypeError(
                "responder must be a callable(ScriptedRequest) -> str, a dict tag -> str | list[str], "
                f"a str or None; got {type(responder).__name__}"
            )

    def _from_script(self, request: ScriptedRequest) -> str:
        tag = request.tag
        if tag in self._script:
            key = tag
        elif "*" in self._script:
            key = "*"
        elif None in self._script:
            key = None
        else:
            raise ScriptError(
                f"no scripted response for tag {tag!r} (script has {sorted(map(str, self._script))})"
            )
        entry = self._script[key]
        if isinstance(entry, str):
            return entry
        with self._lock:
            position = self._positions.get(key, 0)
            if position >= len(entry):
                raise ScriptError(f"script for tag {key!r} is exhausted after {len(entry)} response(s)")
            self._positions[key] = position + 1
        return entry[position]

    def __call__(self, request: ScriptedRequest) -> str:
        out = self._fn(request)
        if not isinstance(out, str):
            raise ScriptError(f"responder returned {type(out).__name__}, expected str")
        return out


def _count_tokens(text: str) -> int:
    # Deterministic stand-in for a tokenizer: whitespace words.
    return len(text.split())


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # a request held by a "timeout" fault must not block stop()
    request_queue_size = 512
    allow_reuse_address = True
    owner: ScriptedOpenAIServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like a real API server
    server: _Server
    timeout = 60  # idle keep-alive connections give up eventually

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.server.owner._track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.owner._track(self.connection, add=False)

    # -- plumbing ----------------------------------------------------------------------------------

    def _send_json(self, status: int, payload: Any, headers: Mapping[str, str] | None = None) -> None:
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def _send_error_json(
        self, status: int, message: str, kind: str, headers: Mapping[str, str] | None = None
    ):
        self._send_json(status, {"error": {"message": message, "type": kind, "code": status}}, headers)

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # -- verbs -------------------------------------------------------------------------------------

    def do_GET(self) -> None:
        owner = self.server.owner
        path = self.path.split("?", 1)[0].rstrip("/")
        owner._record(self.headers.get(CALL_HEADER), {}, path, fault=None)
        if path.endswith("/models"):
            self._send_json(
                200,
                {
                    "object": "list",
                    "data": [{"id": owner.model, "object": "model", "owned_by": "membuilder"}],
                },
            )
        else:
            self._send_error_json(404, f"no route for GET {path}", "not_found")

    def do_POST(self) -> None:
        owner = self.server.owner
        path = self.path.split("?", 1)[0].rstrip("/")
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        tag = self.headers.get(CALL_HEADER)
        try:
            body = json.loads(raw) if raw else {}
            problem = None if isinstance(body, dict) else "body is not a JSON object"
        except ValueError as exc:
            problem = f"request body is not valid JSON: {exc}"
        if problem is not None:
            owner._record(tag, {"_unparsed": raw.decode("utf-8", "replace")}, path, fault=None)
            self._send_error_json(400, problem, "invalid_request_error")
            return
        fault = owner._take_fault(tag, path)
        request = owner._record(tag, body, path, fault=fault.kind if fault else None)
        owner._enter()
        try:
            if owner.delay > 0 and owner._stop.wait(owner.delay):
                self._drop()
                return
            if fault is not None:
                self._apply_fault(fault)
                return
            if path.endswith("/chat/completions"):
                self._chat(request)
            elif path.endswith("/embeddings"):
                self._embeddings(request)
            else:
                self._send_error_json(404, f"no route for POST {path}", "not_found")
        finally:
            owner._leave()

    # -- faults ------------------------------------------------------------------------------------

    def _apply_fault(self, fault: _QueuedFault) -> None:
        kind = fault.kind
        if kind == "429":
            self._send_error_json(
                429, "rate limited (scripted)", "rate_limit_exceeded", {"Retry-After": fault.retry_after}
            )
        elif kind == "500":
            self._send_error_json(500, "internal error (scripted)", "server_error")
        elif kind == "timeout":
            self.server.owner._stop.wait(fault.timeout_s)
            self._drop()
        elif kind == "disconnect":
            self._drop()
        elif kind == "truncated_body":
            data = json.dumps(_chat_payload("truncated", "scripted-model", 1, 1)).encode("utf-8")
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self._drop()
        elif kind == "malformed_body":
            data = b'{"id": "chatcmpl-scripted", "object": "chat.completion", "choices": [{"message": '
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()
        else:  # pragma: no cover - inject() validates kinds
            self._drop()

    # -- endpoints ---------------------------------------------------------------------------------

    def _chat(self, request: ScriptedRequest) -> None:
        owner = self.server.owner
        messages = request.body.get("messages")
        if not isinstance(messages, list) or not messages:
            self._send_error_json(400, "'messages' must be a non-empty list", "invalid_request_error")
            return
        if owner.reject_response_format and "response_format" in request.body:
            self._send_error_json(
                400, "response_format is not supported by this server (scripted)", "invalid_request_error"
            )
            return
        try:
            content = owner._responder(request)
        except Exception as exc:  # noqa: BLE001 - a broken responder must reach the test as a 400
            detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            owner._errors.append(f"request {request.index} (tag {request.tag!r}): {detail}")
            self._send_error_json(400, f"scripted responder failed: {detail}", "invalid_request_error")
            return
        prompt_tokens = sum(
            _count_tokens(m.get("content")) + 4
            for m in messages
            if isinstance(m, dict) and isinstance(m.get("content"), str)
        )
        payload = _chat_payload(
            content, request.model or owner.model, prompt_tokens, max(1, _count_tokens(content))
        )
        payload["id"] = f"chatcmpl-scripted-{request.index}"
        self._send_json(200, payload)

    def _embeddings(self, request: ScriptedRequest) -> None:
        owner = self.server.owner
        inputs = request.body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not all(isinstance(t, str) for t in inputs):
            self._send_error_json(
                400, "'input' must be a string or a list of strings", "invalid_request_error"
            )
            return
        dim = request.body.get("dimensions") or owner.embedding_dim
        if not isinstance(dim, int) or dim < 1:
            self._send_error_json(
                400, f"'dimensions' must be a positive int, got {dim!r}", "invalid_request_error"
            )
            return
        base64_out = request.body.get("encoding_format") == "base64"
        data = []
        for i, text in enumerate(inputs):
            vec = hashed_bow_vector(text, dim)
            if base64_out:
                emb: Any = base64.b64encode(vec.astype("<f4").tobytes()).decode("ascii")
            else:
                emb = [float(x) for x in vec]
            data.append({"object": "embedding", "index": i, "embedding": emb})
        tokens = sum(_count_tokens(t) for t in inputs)
        self._send_json(
            200,
            {
                "object": "list",
                "data": data,
                "model": request.model or "scripted-embedding",
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
        )


def _chat_payload(content: str, model: str, prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "id": "chatcmpl-scripted",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


class ScriptedOpenAIServer:
    """A real OpenAI-compatible HTTP server on a free local port, answering from a script.

    Args:
        responder: how chat completions are answered — a ``callable(ScriptedRequest) -> str`` (the
            assistant content), a dict ``tag -> str | list[str]`` (lists are consumed in order; key
            ``"*"`` or ``None`` answers any other tag), a fixed ``str``, or ``None`` to echo the last
            user message. A responder that raises or cannot answer produces an HTTP 400 whose message
            says why (the client does not retry it), and the reason is kept in :attr:`errors`.
        delay: seconds every POST waits before it is answered (to make concurrency observable).
        host: interface to bind; the port is chosen by the OS.
        embedding_dim: dimension of ``/v1/embeddings`` vectors when the request gives no ``dimensions``.
        model: name reported by ``/v1/models`` and used when a request names none.
        reject_response_format: answer every chat request that carries ``response_format`` with an
            HTTP 400, as proxies and some vLLM setups do for JSON mode (the request is recorded).

    Use as a context manager (or call :meth:`start` / :meth:`stop`). Thread-safe; serves many concurrent
    requests (one thread per connection).
    """

    def __init__(
        self,
        responder: Responder = None,
        *,
        delay: float = 0.0,
        host: str = "127.0.0.1",
        embedding_dim: int = 64,
        model: str = "scripted-model",
        reject_response_format: bool = False,
    ) -> None:
        if delay < 0:
            raise ValueError(f"delay must be >= 0 seconds, got {delay}")
        if embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {embedding_dim}")
        self._responder = _ScriptResponder(responder)
        self.delay = float(delay)
        self.host = host
        self.embedding_dim = int(embedding_dim)
        self.model = model
        self.reject_response_format = bool(reject_response_format)
        self._lock = threading.Lock()
        self._requests: list[ScriptedRequest] = []
        self._faults: list[_QueuedFault] = []
        self._errors: list[str] = []
        self._in_flight = 0
        self._max_in_flight = 0
        self._connections: set[socket.socket] = set()
        self._stop = threading.Event()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> ScriptedOpenAIServer:
        """Bind and serve in a daemon thread. Returns self. Raises RuntimeError if already started."""
        if self._httpd is not None:
            raise RuntimeError("server already started")
        self._stop.clear()
        httpd = _Server((self.host, 0), _Handler)
        httpd.owner = self
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="scripted-openai", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, release held requests and close every connection. Idempotent."""
        httpd = self._httpd
        if httpd is None:
            return
        self._stop.set()
        httpd.shutdown()
        httpd.server_close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("server is not running; use it as a context manager or call start()")
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1``."""
        return f"http://{self.host}:{self.port}/v1"

    # -- scripting ---------------------------------------------------------------------------------

    def inject(
        self,
        fault: FaultKind,
        times: int = 1,
        tag: str | None = None,
        *,
        path: str | None = None,
        retry_after: float | str = 0.05,
        timeout_s: float = 30.0,
    ) -> None:
        """Make the next ``times`` requests matching ``tag`` (any tag if ``None``) and ``path`` (a
        suffix such as ``"/embeddings"``; any if ``None``) fail with ``fault``.

        Faults are used first-queued first. ``retry_after`` is the ``Retry-After`` header value of a
        ``"429"`` (seconds; a string is sent verbatim, e.g. an HTTP date). ``timeout_s`` is how long a
        ``"timeout"`` fault holds the request before closing it (released early by :meth:`stop`).
        Raises ``ValueError`` for an unknown fault or ``times < 1``.
        """
        if fault not in FAULT_KINDS:
            raise ValueError(f"unknown fault {fault!r}; expected one of {', '.join(FAULT_KINDS)}")
        if not isinstance(times, int) or times < 1:
            raise ValueError(f"times must be an int >= 1, got {times!r}")
        header = retry_after if isinstance(retry_after, str) else f"{float(retry_after):g}"
        with self._lock:
            self._faults.append(_QueuedFault(fault, times, tag, path, header, float(timeout_s)))

    def pending_faults(self) -> int:
        """How many injected faults have not been used yet."""
        with self._lock:
            return sum(f.remaining for f in self._faults)

    def set_responder(self, responder: Responder) -> None:
        """Replace the responder (resets the position in any scripted lists)."""
        self._responder = _ScriptResponder(responder)

    # -- observation -------------------------------------------------------------------------------

    @property
    def requests(self) -> list[ScriptedRequest]:
        """A copy of every recorded request, in arrival order (faulted ones included)."""
        with self._lock:
            return list(self._requests)

    @property
    def errors(self) -> list[str]:
        """Why the responder could not answer, one line per failed request."""
        with self._lock:
            return list(self._errors)

    @property
    def max_in_flight(self) -> int:
        """The largest number of POST requests being handled at the same moment."""
        with self._lock:
            return self._max_in_flight

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def count(self, tag: str | None = None, *, path: str | None = None) -> int:
        """Number of requests received (faulted ones included), optionally only those with ``tag``
        and/or whose path ends with ``path`` (e.g. ``"/embeddings"``)."""
        return len(self._select(tag, path))

    def repeated_requests(
        self, tag: str | None = None, *, path: str | None = None
    ) -> list[list[ScriptedRequest]]:
        """Groups of two or more answered requests with an identical path and JSON body.

        Requests that got an injected fault are left out: resending after a fault is the point of a
        retry, not a repeat.
        """
        groups: dict[tuple[str, str], list[ScriptedRequest]] = {}
        for req in self._select(tag, path):
            if req.fault is not None:
                continue
            key = (req.path, json.dumps(req.body, sort_keys=True, separators=(",", ":")))
            groups.setdefault(key, []).append(req)
        return [group for group in groups.values() if len(group) > 1]

    def assert_no_repeated_requests(self, tag: str | None = None, *, path: str | None = None) -> None:
        """Raise AssertionError naming the first repeated request, if any."""
        repeated = self.repeated_requests(tag, path=path)
        if repeated:
            first = repeated[0]
            raise AssertionError(
                f"{len(repeated)} request(s) were sent more than once; e.g. {len(first)}x "
                f"{first[0].path} tag={first[0].tag!r} (request indices {[r.index for r in first]})"
            )

    def reset(self) -> None:
        """Forget recorded requests, errors, pending faults and the in-flight maximum."""
        with self._lock:
            self._requests.clear()
            self._errors.clear()
            self._faults.clear()
            self._max_in_flight = self._in_flight

    def _select(self, tag: str | None, path: str | None) -> list[ScriptedRequest]:
        with self._lock:
            return [
                r
                for r in self._requests
                if (tag is None or r.tag == tag) and (path is None or r.path.endswith(path))
            ]

    # -- called by the handler threads -------------------------------------------------------------

    def _record(self, tag: str | None, body: dict, path: str, fault: str | None) -> ScriptedRequest:
        messages = body.get("messages") if isinstance(body.get("messages"), list) else []
        model = body.get("model") if isinstance(body.get("model"), str) else None
        with self._lock:
            request = ScriptedRequest(
                tag=tag,
                body=body,
                messages=messages,
                model=model,
                path=path,
                time=time.monotonic(),
                index=len(self._requests),
                fault=fault,
            )
            self._requests.append(request)
        return request

    def _take_fault(self, tag: str | None, path: str) -> _QueuedFault | None:
        with self._lock:
            for i, fault in enumerate(self._faults):
                if (fault.tag is None or fault.tag == tag) and (
                    fault.path is None or path.endswith(fault.path)
                ):
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        del self._faults[i]
                    return fault
        return None

    def _enter(self) -> None:
        with self._lock:
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _track(self, conn: socket.socket, *, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    def __repr__(self) -> str:
        where = self.base_url if self._httpd is not None else "stopped"
        return f"ScriptedOpenAIServer({where}, requests={len(self._requests)})"
