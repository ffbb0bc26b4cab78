"""What a report needs to say about its LLM judge: which prompt, how many rounds, how lenient.

* :func:`judge_prompt_version`: a name for the exact judge prompt (the module's
  ``JUDGE_PROMPT_VERSION`` when it declares one, plus a short hash of the rendered prompt, so a
  reworded prompt never passes for the old one).
* :class:`RoundsJudge`: judging with ``k`` rounds and a majority vote. Round 0 is the judge's
  usual request (so ``k = 1`` is exactly the plain judge and shares its cache entries); round
  ``r > 0`` sends the same prompt with ``seed = r``, a different request, so the response cache
  does not replay round 0. A tie or no readable round leaves the item unlabelled (never guessed).
* :func:`find_probe`: the newest ``judge-probe`` result for a given judge model and prompt
  version in some directories (the eval's output and cache directories).
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["PROBE_FILE", "RoundsJudge", "find_probe", "judge_prompt_version"]

#: File name ``membuilder judge-probe`` writes its JSON result to.
PROBE_FILE = "judge_probe.json"


def judge_prompt_version(style: str = "strict") -> str:
    """``<declared version or "judge">-<style>+<12 hex of sha256(rendered prompt)>``: the two judge
    wordings (and a user's template) are different judges, and their probe results differ."""
    from membuilder import judge as judge_module

    messages = judge_module.build_judge_messages("{question}", "{gold}", "{answer}", style)
    digest = hashlib.sha256(json.dumps(messages, sort_keys=True).encode("utf-8")).hexdigest()[:12]
    declared = getattr(judge_module, "JUDGE_PROMPT_VERSION", None) or "judge"
    return f"{declared}-{style}+{digest}"


class _SeededLLM:
    """The judge's client with a fixed sampling seed on every call."""

    def __init__(self, inner: Any, seed: int) -> None:
        self.inner = inner
        self.seed = seed

    async def chat(self, messages: Any, **kwargs: Any) -> Any:
        kwargs["seed"] = self.seed
        return await self.inner.chat(messages, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class RoundsJudge:
    """A judge asked ``rounds`` times per item; the label is the majority of readable rounds.

    The returned result is the judge's own result type with ``rounds`` (the per-round labels,
    ``None`` for an unreadable round) and ``agreement`` (all readable rounds agree) added.
    """

    def __init__(self, judge: Any, rounds: int = 1) -> None:
        if rounds < 1:
            raise ValueError(f"rounds must be at least 1, got {rounds}")
        self.inner = judge
        self.rounds = rounds
        self.model = getattr(judge, "model", None)
        self._copies = [judge]
        for r in range(1, rounds):
            j = copy.copy(judge)
            j.llm = _SeededLLM(judge.llm, r)
            self._copies.append(j)

    async def judge(self, question: str, gold: object, answer: str) -> Any:
        results = [await j.judge(question, gold, answer) for j in self._copies]
        labels = [r.correct for r in results]
        final = results[0]
        if self.rounds > 1:
            final = copy.copy(results[-1])
            yes = sum(1 for x in labels if x is True)
            no = sum(1 for x in labels if x is False)
            final.correct = True if yes > no else False if no > yes else None
            if final.correct is None:
                final.error = f"no majority over {self.rounds} rounds ({yes} CORRECT, {no} WRONG)"
            else:
                final.error = None
            final.attempts = sum(r.attempts for r in results)
            final.usage = {
                k: sum(int(r.usage.get(k, 0)) for r in results)
                for k in ("prompt_tokens", "completion_tokens")
            }
        readable = [x for x in labels if x is not None]
        final.rounds = labels
        final.agreement = bool(readable) and len(set(readable)) == 1
        return final


def _probe_files(dirs: Iterable[Path | None]) -> list[Path]:
    found: list[Path] = []
    for d in dirs:
        if d is None or not Path(d).is_dir():
            continue
        d = Path(d)
        found += [p for p in (d / PROBE_FILE, *d.glob(f"*/{PROBE_FILE}")) if p.is_file()]
    return found


def find_probe(dirs: Sequence[Path | None], model: str | None, prompt_version: str) -> dict[str, Any] | None:
    """The newest probe result (by ``finished_at``) for this judge model and prompt version, with
    its ``path``; ``None`` when there is none. Unreadable files are skipped."""
    best: dict[str, Any] | None = None
    for p in _probe_files(dirs):
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        j = data.get("judge", {}) if isinstance(data, dict) else {}
        if j.get("model") != model or j.get("prompt_version") != prompt_version:
            continue
        if best is None or str(data.get("finished_at", "")) > str(best.get("finished_at", "")):
            best = {**data, "path": str(p)}
    return best
