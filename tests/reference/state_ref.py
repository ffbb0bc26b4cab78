"""A short, obviously-correct pure-Python model of the memory state's semantics.

It mirrors ``membuilder._core.MemoryState`` (see the Rust ``state`` module docs) with no
attention to speed: lists, dicts and brute-force numpy. Tests apply the same actions and vectors
to both and compare everything observable.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field

import numpy as np

_EDGE = string.punctuation + "\u201c\u201d\u2018\u2019\u00ab\u00bb\u2026\u201e\u201a" + " "


def normalize_text(text: str) -> str:
    """Lower case, whitespace runs collapsed to one space, edge punctuation/quotes/spaces removed."""
    return " ".join(text.lower().split()).strip(_EDGE)


def unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


@dataclass
class RefEntry:
    id: int
    kind: str
    text: str
    vector: np.ndarray
    retired: bool = False


@dataclass
class RefReport:
    added: list[int] = field(default_factory=list)
    retired: list[int] = field(default_factory=list)
    unmatched: list[tuple[int, str, str, float | None]] = field(default_factory=list)
    skipped: int = 0
    duplicates: int = 0
    core_before: str = ""
    core_after: str = ""
    compression_due: bool = False


@dataclass
class RefAction:
    agent: str
    op: str
    text: str | None = None
    old: tuple[str, ...] = ()


class RefState:
    def __init__(
        self, dim: int, update_mode: str = "history", core_limit: int = 5000, match_threshold: float = 0.92
    ) -> None:
        self.dim = dim
        self.update_mode = update_mode
        self.core_limit = core_limit
        self.match_threshold = match_threshold
        self.core = ""
        self.entries: list[RefEntry] = []

    # -- reads --------------------------------------------------------------------------------
    def live(self, kind: str | None = None) -> list[RefEntry]:
        return [e for e in self.entries if not e.retired and (kind is None or e.kind == kind)]

    def find_exact(self, kind: str, norm: str) -> int | None:
        for e in self.live(kind):  # entries are in id order, so the first is the lowest id
            if normalize_text(e.text) == norm:
                return e.id
        return None

    def search(self, query, k: int, kind: str | None = None) -> list[tuple[int, float, str]]:
        q = unit(query)
        scored = [(float(e.vector @ q), e.id, e.kind) for e in self.live(kind)]
        scored.sort(key=lambda t: (-t[0], t[1]))
        return [(i, s, kd) for s, i, kd in scored[:k]]

    # -- two-phase apply ----------------------------------------------------------------------
    def plan(self, actions: list[RefAction]) -> list[str]:
        new_texts, old_texts = [], []
        pending: dict[str, set[str]] = {}
        for a in actions:
            if a.agent == "core" or a.op not in ("ADD", "UPDATE", "MERGE"):
                continue
            if self.update_mode == "replace" and a.op in ("UPDATE", "MERGE"):
                for old in a.old:
                    n = normalize_text(old)
                    if self.find_exact(a.agent, n) is None and n not in pending.get(a.agent, set()):
                        old_texts.append(old)
            pending.setdefault(a.agent, set()).add(normalize_text(a.text))
            new_texts.append(a.text)
        return new_texts + old_texts

    def commit(self, actions: list[RefAction], vectors) -> RefReport:
        texts = self.plan(actions)
        vectors = [unit(v) for v in np.asarray(vectors, dtype=np.float64).reshape(len(texts), self.dim)]
        n_new = sum(1 for a in actions if a.agent != "core" and a.op in ("ADD", "UPDATE", "MERGE"))
        new_vecs, old_vecs = vectors[:n_new], list(zip(texts[n_new:], vectors[n_new:]))
        # Old texts are embedded in plan order; hand them out in the same order.
        old_queue = list(old_vecs)
        # Which old references got a vector is decided at plan time: recompute that list.
        embedded = self._embedded_old_refs(actions)
        rep = RefReport(core_before=self.core)
        new_i = 0
        for i, a in enumerate(actions):
            if a.op == "SKIP":
                rep.skipped += 1
            elif a.agent == "core":
                if a.op == "APPEND":
                    self.core = a.text if self.core == "" else self.core + "\n" + a.text
                elif a.op == "REWRITE":
                    self.core = a.text
                elif a.op == "REPLACE":
                    old = a.old[0]
                    if old and old in self.core:
                        self.core = self.core.replace(old, a.text, 1)
                    else:
                        rep.unmatched.append((i, "core", old, None))
            else:
                if self.update_mode == "replace" and a.op in ("UPDATE", "MERGE"):
                    for j, old in enumerate(a.old):
                        hit = self.find_exact(a.agent, normalize_text(old))
                        if hit is not None:
                            self._retire(hit)
                            rep.retired.append(hit)
                            continue
                        best = None
                        if (i, j) in embedded:
                            _, v = old_queue[embedded[(i, j)]]
                            top = self.search(v, 1, a.agent)
                            if top:
                                best = top[0][1]
                                if best >= self.match_threshold:
                                    self._retire(top[0][0])
                                    rep.retired.append(top[0][0])
                                    continue
                        rep.unmatched.append((i, a.agent, old, best))
                vec = new_vecs[new_i]
                new_i += 1
                if self.find_exact(a.agent, normalize_text(a.text)) is not None:
                    rep.duplicates += 1
                else:
                    rep.added.append(self._push(a.agent, a.text, vec))
        rep.core_after = self.core
        rep.compression_due = len(self.core) > self.core_limit
        return rep

    def _embedded_old_refs(self, actions: list[RefAction]) -> dict[tuple[int, int], int]:
        """(action index, old index) -> position among embedded old texts (as decided by plan)."""
        out: dict[tuple[int, int], int] = {}
        pending: dict[str, set[str]] = {}
        for i, a in enumerate(actions):
            if a.agent == "core" or a.op not in ("ADD", "UPDATE", "MERGE"):
                continue
            if self.update_mode == "replace" and a.op in ("UPDATE", "MERGE"):
                for j, old in enumerate(a.old):
                    n = normalize_text(old)
                    if self.find_exact(a.agent, n) is None and n not in pending.get(a.agent, set()):
                        out[(i, j)] = len(out)
            pending.setdefault(a.agent, set()).add(normalize_text(a.text))
        return out

    def _next_id(self) -> int:
        return self.entries[-1].id + 1 if self.entries else 0

    def _push(self, kind: str, text: str, vec) -> int:
        e = RefEntry(self._next_id(), kind, text, unit(vec))
        self.entries.append(e)
        return e.id

    def _retire(self, id_: int) -> None:
        for e in self.entries:
            if e.id == id_:
                e.retired = True
