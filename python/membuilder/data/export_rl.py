"""``membuilder export-rl``: recorded sessions as veRL RL data (parquet).

One row per (session, agent), rows of a session together and in the order core, episodic,
semantic, procedural; conversations by id, sessions in order. Columns, as veRL's ``RLHFDataset``
and reward managers read them:

* ``prompt``: list of ``{"role", "content"}``: the agent's prompt exactly as the expert got it;
* ``data_source``: ``"membuilder/<dataset>"`` (``--data-source``), passed to the reward function;
* ``ability``: ``"memory"``;
* ``reward_model``: ``{"style": "rule", "ground_truth": <JSON text>}``: the ground truth is the JSON
  of :class:`~membuilder.data.schemas.RLGroundTruth` (decode with
  :func:`~membuilder.data.schemas.decode_ground_truth`). It is a string rather than a nested struct
  because veRL hands it to the reward function untouched, and a JSON string survives parquet,
  ``datasets`` and Ray without schema unification surprises (e.g. empty QA lists, ``None`` fields);
* ``extra_info``: flat scalars (:class:`~membuilder.data.schemas.RLExtraInfo`); veRL adds its own
  keys to this dict at run time.

States: each row's ``state_before`` is copied (hard-linked when possible) to
``<output stem>.states/<sha256>.mbstate`` beside the parquet file, and the ground truth holds that
path *relative to the parquet file's directory* (``--absolute-states`` instead stores absolute
paths into the trajectory directory and copies nothing). The parquet file's key-value metadata
``membuilder`` holds ``{"format": "membuilder.rl", "version": ...}``; :func:`read_rl` checks it.

Sessions with no valid synthetic QA have no task reward: they are dropped and counted unless
``--allow-missing-qa``. Sessions without all four agent records are dropped and counted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from membuilder._core import MembuilderError
from membuilder._files import atomic_path, atomic_write_bytes, sha256_file
from membuilder.data.qagen import read_qa, read_qa_manifest
from membuilder.data.schemas import (
    AGENT_ORDER,
    RL_VERSION,
    DataFormatError,
    ExpertOutput,
    RLExtraInfo,
    RLGroundTruth,
    RLReport,
    decode_ground_truth,
    encode_json,
    state_path,
)
from membuilder.data.trajectories import iter_conversations, read_manifest
from membuilder.protocol import DEFAULT_PROTOCOL, Protocol, add_protocol_argument, get_protocol

RL_FORMAT = "membuilder.rl"
METADATA_KEY = b"membuilder"


def _pyarrow() -> Any:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise MembuilderError("export-rl needs 'pyarrow' (pip install pyarrow)") from None
    return pa, pq


def _schema(pa: Any) -> Any:
    return pa.schema(
        [
            ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
            ("data_source", pa.string()),
            ("ability", pa.string()),
            ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
            (
                "extra_info",
                pa.struct(
                    [
                        ("index", pa.int64()),
                        ("conversation_id", pa.string()),
                        ("session_index", pa.int64()),
                        ("agent", pa.string()),
                        ("agent_index", pa.int64()),
                        ("session_group", pa.string()),
                        ("num_questions", pa.int64()),
                    ]
                ),
            ),
        ]
    )


def _place_state(src: Path, dst: Path, digest: str) -> None:
    """Copy (or hard-link) a state file, checking its digest so a damaged file is never shipped."""
    if dst.exists():
        return
    actual = sha256_file(src)
    if actual != digest:
        raise DataFormatError(
            f"{src}: content hash {actual} does not match its name; the file is damaged", src
        )
    with atomic_path(dst) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def export_rl(
    root: str | Path,
    output: str | Path,
    *,
    data_source: str | None = None,
    allow_missing_qa: bool = False,
    absolute_states: bool = False,
    protocol: Protocol | None = None,
) -> RLReport:
    """Export the trajectories (and QA) under ``root`` to the parquet file ``output``.

    Every row's ground truth records ``protocol`` (default ``paper``) and the protocols and
    prompt templates the trajectories and QA were made with; a trajectory or QA protocol other
    than ``protocol`` is reported in ``RLReport.warnings`` (the export still runs: mixing is a
    choice, but never a silent one)."""
    pa, pq = _pyarrow()
    root = Path(root)
    output = Path(output)
    if output.suffix != ".parquet":
        raise MembuilderError(f"the output must end in .parquet, got {output.name}")
    protocol = protocol or get_protocol(DEFAULT_PROTOCOL)
    manifest = read_manifest(root)
    qa_manifest = read_qa_manifest(root)
    sources = {
        "trajectories": _source(manifest.protocol, manifest.prompt_templates),
        "qa": _source(
            qa_manifest.protocol if qa_manifest else None,
            qa_manifest.prompt_templates if qa_manifest else None,
        ),
    }
    warnings = [
        f"{what} made under protocol {src['protocol']}, exported under {protocol.label}"
        for what, src in sources.items()
        if src["protocol"] != protocol.label
    ]
    source = data_source or f"membuilder/{manifest.dataset}"
    states_dir_name = f"{output.stem}.states"
    states_dir = output.parent / states_dir_name

    rows: list[dict[str, Any]] = []
    per_agent = {a: 0 for a in AGENT_ORDER}
    states: set[str] = set()
    n_conv = n_sess = without_qa = dropped_qa = incomplete = 0
    for conv in iter_conversations(root):
        qa = {r.session_index: r for r in read_qa(conv.dir)}
        conv_rows = 0
        for session in conv.meta.sessions:
            calls = conv.session_calls(session.index)
            if [c.agent for c in calls] != list(AGENT_ORDER):
                incomplete += 1
                continue
            questions = qa[session.index].questions if session.index in qa else []
            if not questions:
                without_qa += 1
                if not allow_missing_qa:
                    dropped_qa += 1
                    continue
            digest = session.state_before
            src = state_path(root, digest)
            if not src.is_file():
                raise DataFormatError(
                    f"state {digest} of {conv.meta.conversation_id}:{session.index} is missing", src
                )
            if absolute_states:
                ref = str(src.resolve())
            else:
                _place_state(src, states_dir / f"{digest}.mbstate", digest)
                ref = f"{states_dir_name}/{digest}.mbstate"
            states.add(digest)
            experts = [
                ExpertOutput(
                    agent=c.agent,
                    raw_output=c.raw_output,
                    ok=c.ok,
                    actions=c.actions,
                    content_chars=c.content_chars,
                    content_tokens=c.content_tokens,
                    content_text=c.content_text,
                )
                for c in calls
            ]
            for k, call in enumerate(calls):
                truth = RLGroundTruth(
                    conversation_id=conv.meta.conversation_id,
                    session_index=session.index,
                    session_id=session.session_id,
                    timestamp=session.timestamp,
                    agent=call.agent,
                    state_before=ref,
                    state_sha256=digest,
                    embedder=manifest.embedder,
                    embedding_dim=manifest.embedding_dim,
                    update_mode=manifest.update_mode,
                    expert_content_chars=call.content_chars,
                    expert_content_tokens=call.content_tokens,
                    experts=experts,
                    qa=list(questions),
                    session_messages=session.messages,
                    protocol=protocol.record(),
                    sources=sources,
                )
                extra = RLExtraInfo(
                    index=len(rows),
                    conversation_id=conv.meta.conversation_id,
                    session_index=session.index,
                    agent=call.agent,
                    agent_index=k,
                    session_group=f"{conv.meta.conversation_id}:{session.index}",
                    num_questions=len(questions),
                )
                rows.append(
                    {
                        "prompt": [{"role": m.role, "content": m.content} for m in call.prompt],
                        "data_source": source,
                        "ability": "memory",
                        "reward_model": {"style": "rule", "ground_truth": encode_json(truth).decode()},
                        "extra_info": {f: getattr(extra, f) for f in extra.__struct_fields__},
                    }
                )
                per_agent[call.agent] += 1
            n_sess += 1
            conv_rows += 1
        n_conv += 1 if conv_rows else 0

    schema = _schema(pa).with_metadata(
        {METADATA_KEY: json.dumps({"format": RL_FORMAT, "version": RL_VERSION}).encode()}
    )
    table = pa.Table.from_pylist(rows, schema=schema)
    with atomic_path(output) as tmp:
        pq.write_table(table, tmp)
    report = RLReport(
        output=output.name,
        rows=len(rows),
        sessions=n_sess,
        conversations=n_conv,
        rows_per_agent=per_agent,
        states=len(states),
        states_dir="" if absolute_states else states_dir_name,
        sessions_without_qa=without_qa,
        dropped_sessions_without_qa=dropped_qa,
        incomplete_sessions=incomplete,
        protocol=protocol.label,
        warnings=warnings,
    )
    atomic_write_bytes(Path(f"{output}.report.json"), encode_json(report) + b"\n")
    return report


def _source(record: dict[str, Any] | None, templates: dict[str, Any] | None) -> dict[str, Any]:
    """Where a part of the data came from: its protocol label (``"none recorded"`` for data made
    before protocols were recorded) and its prompt templates' record."""
    return {
        "protocol": record.get("label", record.get("name")) if record else "none recorded",
        "prompt_templates": templates,
    }


def read_rl(path: str | Path) -> list[dict[str, Any]]:
    """Read an RL parquet written by :func:`export_rl`; each row's ``reward_model.ground_truth`` is
    decoded into an :class:`RLGroundTruth` under the extra key ``"truth"``.

    Raises DataFormatError for a parquet file of another format or version.
    """
    _, pq = _pyarrow()
    path = Path(path)
    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(METADATA_KEY)
    if raw is None:
        raise DataFormatError(
            f"{path} is not a membuilder RL file (no '{METADATA_KEY.decode()}' metadata)", path
        )
    info = json.loads(raw)
    if info.get("format") != RL_FORMAT or info.get("version") != RL_VERSION:
        raise DataFormatError(
            f"{path}: {info.get('format')} version {info.get('version')}, this membuilder reads "
            f"{RL_FORMAT} version {RL_VERSION}; re-export it with this version",
            path,
        )
    rows = pq.read_table(path).to_pylist()
    for row in rows:
        row["truth"] = decode_ground_truth(row["reward_model"]["ground_truth"])
    return rows


def resolve_state(parquet_path: str | Path, ref: str) -> Path:
    """The state file a ground truth's ``state_before`` names (relative to the parquet's directory)."""
    p = Path(ref)
    return p if p.is_absolute() else Path(parquet_path).parent / p


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Export recorded sessions (with their synthetic QA) as veRL RL parquet."
    parser.add_argument("--trajectories", type=Path, required=True, help="a trajectory directory")
    parser.add_argument("--output", type=Path, required=True, help="OUTPUT.parquet")
    parser.add_argument(
        "--data-source", default=None, help="data_source column (default membuilder/<dataset>)"
    )
    parser.add_argument(
        "--allow-missing-qa", action="store_true", help="keep sessions that have no synthetic QA"
    )
    parser.add_argument(
        "--absolute-states", action="store_true", help="reference states in place by absolute path, copy none"
    )
    add_protocol_argument(parser)


def run(args: argparse.Namespace) -> int:
    from membuilder._lock import DirectoryLock
    from membuilder.errors import os_error_line

    try:
        if Path(args.output).is_dir():
            raise MembuilderError(f"--output {args.output} is a directory; give a file name")
        # One writer per output directory (two exports into one place would race on its files).
        lock = DirectoryLock(Path(args.output).parent, "export output directory").acquire()
    except MembuilderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {os_error_line(exc)[0]}", file=sys.stderr)
        return 2
    try:
        report = export_rl(
            args.trajectories,
            args.output,
            data_source=args.data_source,
            allow_missing_qa=args.allow_missing_qa,
            absolute_states=args.absolute_states,
            protocol=get_protocol(args.protocol),
        )
    except MembuilderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        line, code = os_error_line(exc)
        print(f"error: {line}", file=sys.stderr)
        return code
    finally:
        lock.release()
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(encode_json(report).decode())
    return 0
