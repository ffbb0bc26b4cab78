"""A GGUF model served on 127.0.0.1 behind an OpenAI-compatible API (the ``[local]`` extra).

Every stage of the CPU rehearsal talks to the model through the normal client
(:class:`membuilder.llm.LLMClient`, ``provider="compatible"``), exactly as it would to vLLM. The
engine is llama.cpp's own server engine (``xllamacpp``) in this process; this module adds the HTTP
front and one thing a stock server cannot know: which bounded JSON schema to apply. The client
names each call in the ``X-Membuilder-Call`` header (``agent:episodic``, ``judge``, ...); a request
that asks for ``response_format={"type": "json_object"}`` gets that call's bounded schema
(:func:`membuilder.llm.local.json_schema_for_tag`), so a small model can neither emit invalid JSON
nor ramble until its context is full (``qa-gen`` included: unbounded, SmolLM2-135M wrote objects
that its validator rejected, so the rehearsal had no questions). A request's own
``{"type": "json_schema", ...}`` goes to llama.cpp unchanged, which applies it. ``max_tokens`` is
capped at ``max_tokens_cap``.

Endpoints: ``POST /v1/chat/completions`` (no streaming), ``GET /v1/models``, ``GET /health``.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

from membuilder.llm.client import CALL_HEADER
from membuilder.llm.local import SchemaBounds, json_schema_for_tag, load_engine

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["LocalModelServer"]


class _Http(ThreadingHTTPServer):
    daemon_threads = True
    owner: LocalModelServer


class _Handler(BaseHTTPRequestHandler):
    server: _Http
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the caller logs what matters
        pass

    def _send(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        owner = self.server.owner
        if self.path.rstrip("/").endswith("/models"):
            self._send(200, {"object": "list", "data": [{"id": owner.model_name, "object": "model"}]})
        elif self.path.rstrip("/").endswith("/health"):
            self._send(200, {"status": "ok"})
        else:
            self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})

    def do_POST(self) -> None:
        owner = self.server.owner
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except json.JSONDecodeError as exc:
            self._send(
                400, {"error": {"message": f"request body is not JSON: {exc}", "type": "invalid_request"}}
            )
            return
        if not self.path.rstrip("/").endswith("/chat/completions"):
            self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
            return
        if body.get("stream"):
            self._send(400, {"error": {"message": "streaming is not supported", "type": "invalid_request"}})
            return
        out = owner.complete(body, self.headers.get(CALL_HEADER))
        if "error" in out:
            err = out["error"]
            code = int(err.get("code") or 500) if isinstance(err, dict) else 500
            self._send(code if 400 <= code < 600 else 500, out)
            return
        self._send(200, out)


class LocalModelServer:
    """Serve ``model_path`` (a GGUF file) at ``base_url`` = ``http://127.0.0.1:<port>/v1``.

    ``port`` 0 picks a free one. ``n_parallel`` requests are decoded together (continuous
    batching; each gets ``n_ctx`` tokens of context). ``schema_bounds`` bounds the JSON-mode
    replies (:class:`~membuilder.llm.local.SchemaBounds`; fit them to ``max_tokens_cap``). Use as a context manager or call
    :meth:`start` / :meth:`stop`.
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        model_name: str = "local",
        port: int = 0,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        n_parallel: int = 2,
        max_tokens_cap: int = 1024,
        schema_bounds: SchemaBounds | None = None,
    ) -> None:
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise FileNotFoundError(f"GGUF model file not found: {self.model_path}")
        self.model_name = model_name
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.n_parallel = n_parallel
        self.max_tokens_cap = max_tokens_cap
        self.schema_bounds = schema_bounds or SchemaBounds()
        self._port = port
        self._engine: Any = None
        self._http: _Http | None = None
        self._thread: threading.Thread | None = None
        self.requests = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self._count_lock = threading.Lock()

    @property
    def base_url(self) -> str:
        if self._http is None:
            raise RuntimeError("the server is not started")
        return f"http://127.0.0.1:{self._http.server_address[1]}/v1"

    def complete(self, body: dict[str, Any], tag: str | None) -> dict[str, Any]:
        """One chat completion through the engine, with the bounded schema of ``tag`` in JSON mode."""
        request = dict(body)
        request.pop("model", None)
        fmt = request.get("response_format")
        if isinstance(fmt, dict) and fmt.get("type") == "json_object" and "schema" not in fmt:
            schema = json_schema_for_tag(tag, bounds=self.schema_bounds)
            if schema is not None:
                request["response_format"] = {"type": "json_object", "schema": schema}
        cap = self.max_tokens_cap
        asked = request.get("max_tokens") or request.get("max_completion_tokens")
        request["max_tokens"] = min(int(asked), cap) if asked else cap
        request.pop("max_completion_tokens", None)
        try:
            out = self._engine.handle_chat_completions(request)
        except (ValueError, RuntimeError) as exc:
            return {"error": {"code": 500, "message": str(exc), "type": "server_error"}}
        if "error" not in out:
            out["model"] = self.model_name
            usage = out.get("usage") or {}
            with self._count_lock:
                self.requests += 1
                self.prompt_tokens += int(usage.get("prompt_tokens") or 0)
                self.completion_tokens += int(usage.get("completion_tokens") or 0)
        return out

    def start(self) -> Self:
        if self._http is not None:
            return self
        self._engine = load_engine(
            self.model_path, n_ctx=self.n_ctx, n_threads=self.n_threads, n_parallel=self.n_parallel
        )
        http = _Http(("127.0.0.1", self._port), _Handler)
        http.owner = self
        self._http = http
        self._thread = threading.Thread(target=http.serve_forever, name="local-model-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self._engine = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
