"""Real texts for the embedding benches, from LoCoMo (``../shared/data/locomo/locomo10.json``).

* :func:`locomo_turns`: conversation turns as the raw builder stores them (``"speaker: text"``);
* :func:`memory_texts`: memory-like texts of 100–300 characters — consecutive sentences of LoCoMo's
  session summaries packed together, the length real memory agents write (a fact with its context),
  unlike the ~30-character placeholders of the synthetic reward batch.
"""

from __future__ import annotations

import json
import os
import platform
import re
from functools import lru_cache
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def locomo_path() -> Path:
    env = os.environ.get("MEMBUILDER_DATA")
    base = Path(env) if env else REPO_ROOT.parent / "shared" / "data"
    return base / "locomo" / "locomo10.json"


@lru_cache(maxsize=1)
def _locomo() -> list[dict]:
    path = locomo_path()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: LoCoMo not found (set MEMBUILDER_DATA to the data folder)")
    return json.loads(path.read_text(encoding="utf-8"))


def locomo_turns(n: int) -> list[str]:
    """The first ``n`` turns of LoCoMo, in conversation and session order."""
    out: list[str] = []
    for sample in _locomo():
        conv = sample["conversation"]
        sessions = sorted(
            (k for k in conv if re.fullmatch(r"session_\d+", k)), key=lambda k: int(k.split("_")[1])
        )
        for key in sessions:
            for turn in conv[key]:
                out.append(f"{turn['speaker']}: {turn['text']}")
                if len(out) == n:
                    return out
    return out


def memory_texts(n: int, lo: int = 100, hi: int = 300) -> list[str]:
    """``n`` texts of ``lo``..``hi`` characters packed from session-summary sentences (cycled)."""
    pool: list[str] = []
    for sample in _locomo():
        for summary in sample.get("session_summary", {}).values():
            current = ""
            for sentence in re.split(r"(?<=[.!?])\s+", summary.strip()):
                candidate = f"{current} {sentence}".strip()
                if len(candidate) <= hi:
                    current = candidate
                    continue
                if len(current) >= lo:
                    pool.append(current)
                current = sentence if len(sentence) <= hi else ""
            if lo <= len(current) <= hi:
                pool.append(current)
    if not pool:
        raise ValueError(f"{locomo_path()}: no session summaries to build memory texts from")
    return [pool[i % len(pool)] for i in range(n)]


def cpu_model() -> str:
    """The CPU model and the ISA extensions the kernels may use, for bench output."""
    from membuilder.embed.fast_e5 import cpu_summary

    return f"{cpu_summary()} ({platform.machine()})"
