"""``membuilder export-sft``: expert trajectories as LLaMA-Factory supervised fine-tuning data.

One sample per recorded agent call whose expert output passed the format gate: the prompt the
agent was given and the expert's raw output as the response. Calls that failed the gate or were
skipped are never trained on (counted in the report). Two layouts, as LLaMA-Factory documents them
(``data/README.md``):

* ``alpaca``: ``{"instruction": <last user message>, "input": "", "output": <expert output>,
  "system": <system prompt>, "history": [[user, assistant], ...]}`` (``history`` empty unless the
  prompt has earlier turns);
* ``sharegpt``: ``{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value":
  ...}], "system": <system prompt>}``.

Samples longer than ``--max-length`` are dropped and counted. Length is the sample's tokens
(system, prompt and response) with the tokenizer at ``--tokenizer`` (a local Hugging Face
tokenizer directory; needs ``transformers``; its chat template is applied when it has one), else
characters / 4. With ``--balance session`` (the default) a session whose sample of any agent was
dropped loses all four, so the agents stay equally represented; ``--balance none`` keeps the rest.

Writes ``OUTPUT`` (a JSON array for ``.json``, one object per line for ``.jsonl``),
``OUTPUT.dataset_info.json`` (the entry to add to LLaMA-Factory's ``dataset_info.json``; or merged
into the file given by ``--dataset-info``) and ``OUTPUT.report.json``
(:class:`~membuilder.data.schemas.SFTReport`). The order is fixed (conversations by id, sessions,
agents), so the same trajectories always give the same bytes.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from membuilder._core import MembuilderError
from membuilder._files import atomic_write_bytes
from membuilder.data.schemas import (
    AGENT_ORDER,
    SFT_VERSION,
    AgentCallRecord,
    DataFormatError,
    SFTReport,
    decode_versioned,
    encode_json,
)
from membuilder.data.trajectories import iter_conversations, read_manifest

FORMATS = ("alpaca", "sharegpt")


def split_prompt(messages: Sequence[Any]) -> tuple[str, list[tuple[str, str]], str]:
    """A chat prompt as ``(system, history pairs, last user message)``.

    Leading system messages are joined into the system prompt; the rest must alternate user and
    assistant and end with a user message (what an agent prompt always is). Raises ValueError
    otherwise.
    """
    msgs = [(m.role, m.content) if hasattr(m, "role") else (m["role"], m["content"]) for m in messages]
    system_parts = []
    while msgs and msgs[0][0] == "system":
        system_parts.append(msgs.pop(0)[1])
    if not msgs or len(msgs) % 2 == 0:
        raise ValueError("a prompt must end with a user message after alternating user/assistant turns")
    for k, (role, _) in enumerate(msgs):
        expected = "user" if k % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(f"prompt message {k} has role {role!r}, expected {expected!r}")
    history = [(msgs[k][1], msgs[k + 1][1]) for k in range(0, len(msgs) - 1, 2)]
    return "\n\n".join(system_parts), history, msgs[-1][1]


def to_alpaca(record: AgentCallRecord) -> dict[str, Any]:
    system, history, last = split_prompt(record.prompt)
    # Every column named in the dataset_info entry must exist in every row: LLaMA-Factory's
    # converter indexes ``example[column]`` directly, so "history" is written even when empty.
    return {
        "instruction": last,
        "input": "",
        "output": record.raw_output,
        "system": system,
        "history": [list(p) for p in history],
    }


def to_sharegpt(record: AgentCallRecord) -> dict[str, Any]:
    system, history, last = split_prompt(record.prompt)
    turns = []
    for user, assistant in history:
        turns += [{"from": "human", "value": user}, {"from": "gpt", "value": assistant}]
    turns += [{"from": "human", "value": last}, {"from": "gpt", "value": record.raw_output}]
    return {"conversations": turns, "system": system}


def dataset_info_entry(fmt: str, file_name: str) -> dict[str, Any]:
    """The ``dataset_info.json`` entry that registers an export with LLaMA-Factory."""
    if fmt == "alpaca":
        return {
            "file_name": file_name,
            "formatting": "alpaca",
            "columns": {
                "prompt": "instruction",
                "query": "input",
                "response": "output",
                "system": "system",
                "history": "history",
            },
        }
    if fmt == "sharegpt":
        return {
            "file_name": file_name,
            "formatting": "sharegpt",
            "columns": {"messages": "conversations", "system": "system"},
            "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt"},
        }
    raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


def approx_length(record: AgentCallRecord) -> int:
    """Characters / 4 of everything the sample holds (system, prompt, response)."""
    chars = sum(len(m.content) for m in record.prompt) + len(record.raw_output)
    return chars // 4


def load_tokenizer_counter(path: str | Path) -> Callable[[AgentCallRecord], int]:
    """A length function counting real tokens with the tokenizer saved at ``path``.

    Raises MembuilderError when ``transformers`` is missing or the tokenizer cannot be loaded.
    """
    try:
        from transformers import AutoTokenizer  # type: ignore[import-not-found]
    except ImportError:
        raise MembuilderError(
            "--tokenizer needs the 'transformers' package (pip install transformers); "
            "without --tokenizer lengths are characters / 4"
        ) from None
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for a bad directory
        raise MembuilderError(f"cannot load a tokenizer from {path}: {exc}") from None
    return tokenizer_counter(tok)


def tokenizer_counter(tok: Any) -> Callable[[AgentCallRecord], int]:
    """Length in tokens with a Hugging Face-style tokenizer object (chat template when it has one)."""

    def count(record: AgentCallRecord) -> int:
        messages = [{"role": m.role, "content": m.content} for m in record.prompt]
        messages.append({"role": "assistant", "content": record.raw_output})
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template(messages, tokenize=True)
            return len(ids)
        return sum(len(tok.encode(m["content"], add_special_tokens=False)) for m in messages)

    return count


def export_sft(
    root: str | Path,
    output: str | Path,
    *,
    fmt: str,
    max_length: int,
    count: Callable[[AgentCallRecord], int] | None = None,
    balance: str = "session",
    dataset_name: str | None = None,
    dataset_info: str | Path | None = None,
) -> SFTReport:
    """Export the trajectories under ``root`` to ``output``; returns (and writes) the report."""
    if fmt not in FORMATS:
        raise MembuilderError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if balance not in ("session", "none"):
        raise MembuilderError(f"--balance must be 'session' or 'none', got {balance!r}")
    if max_length <= 0:
        raise MembuilderError(f"--max-length must be positive, got {max_length}")
    output = Path(output)
    if output.suffix not in (".json", ".jsonl"):
        raise MembuilderError(f"the output must end in .json or .jsonl, got {output.name}")
    manifest = read_manifest(root)  # refuses a directory of another version before anything is written
    convert = to_alpaca if fmt == "alpaca" else to_sharegpt
    length = count or approx_length
    name = dataset_name or output.stem

    kept, too_long, rejected, skipped, unbalanced = ({a: 0 for a in AGENT_ORDER} for _ in range(5))
    samples: list[dict[str, Any]] = []
    max_len = 0
    n_conv = n_sess = 0
    for conv in iter_conversations(root):
        n_conv += 1
        for session in conv.meta.sessions:
            n_sess += 1
            group: list[tuple[str, dict[str, Any]]] = []
            dropped = False
            for record in conv.session_calls(session.index):
                if record.skipped and not record.raw_output:
                    skipped[record.agent] += 1
                    dropped = True
                    continue
                if not record.ok:
                    rejected[record.agent] += 1
                    dropped = True
                    continue
                n = length(record)
                if n > max_length:
                    too_long[record.agent] += 1
                    dropped = True
                    continue
                max_len = max(max_len, n)
                group.append((record.agent, convert(record)))
            if dropped and balance == "session":
                for agent, _ in group:
                    unbalanced[agent] += 1
                continue
            for agent, sample in group:
                kept[agent] += 1
                samples.append(sample)

    if output.suffix == ".jsonl":
        data = b"".join(json.dumps(s, ensure_ascii=False).encode() + b"\n" for s in samples)
    else:
        data = json.dumps(samples, ensure_ascii=False, indent=1).encode() + b"\n"
    atomic_write_bytes(output, data)
    entry = {name: dataset_info_entry(fmt, output.name)}
    atomic_write_bytes(Path(f"{output}.dataset_info.json"), json.dumps(entry, indent=2).encode() + b"\n")
    if dataset_info is not None:
        merge_dataset_info(dataset_info, entry)
    report = SFTReport(
        format=fmt,
        output=output.name,
        dataset_name=name,
        max_length=max_length,
        length_unit="approx_tokens" if count is None else "tokens",
        balance=balance,
        samples=kept,
        dropped_too_long=too_long,
        dropped_rejected=rejected,
        dropped_skipped=skipped,
        dropped_unbalanced=unbalanced,
        max_sample_length=max_len,
        conversations=n_conv,
        sessions=n_sess,
        trajectories_protocol=(manifest.protocol or {}).get("label", "none recorded"),
        prompt_templates=manifest.prompt_templates,
    )
    atomic_write_bytes(Path(f"{output}.report.json"), encode_json(report) + b"\n")
    return report


def merge_dataset_info(path: str | Path, entry: dict[str, Any]) -> None:
    """Add ``entry`` to LLaMA-Factory's ``dataset_info.json`` at ``path`` (created if missing)."""
    path = Path(path)
    info: dict[str, Any] = {}
    if path.exists():
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataFormatError(f"{path} is not valid JSON: {exc}", path) from None
        if not isinstance(info, dict):
            raise DataFormatError(f"{path} must hold a JSON object", path)
    info.update(entry)
    atomic_write_bytes(path, json.dumps(info, indent=2, ensure_ascii=False).encode() + b"\n")


def read_sft_report(path: str | Path) -> SFTReport:
    path = Path(path)
    return decode_versioned(path.read_bytes(), SFTReport, SFT_VERSION, what="SFT report", path=path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Export expert trajectories as LLaMA-Factory SFT data (alpaca or sharegpt)."
    parser.add_argument("--trajectories", type=Path, required=True, help="a trajectory directory")
    parser.add_argument("--format", choices=FORMATS, default="alpaca")
    parser.add_argument(
        "--max-length", type=int, default=20000, help="drop samples longer than this (default 20000)"
    )
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="local tokenizer directory to count tokens (else chars / 4)",
    )
    parser.add_argument(
        "--balance",
        choices=("session", "none"),
        default="session",
        help="session: drop a session's four samples when any is dropped (default); none: keep the rest",
    )
    parser.add_argument(
        "--dataset-name", default=None, help="name in dataset_info.json (default: output stem)"
    )
    parser.add_argument(
        "--dataset-info", type=Path, default=None, help="also merge the entry into this dataset_info.json"
    )
    parser.add_argument("--output", type=Path, required=True, help="OUTPUT.json or OUTPUT.jsonl")


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
        count = load_tokenizer_counter(args.tokenizer) if args.tokenizer is not None else None
        report = export_sft(
            args.trajectories,
            args.output,
            fmt=args.format,
            max_length=args.max_length,
            count=count,
            balance=args.balance,
            dataset_name=args.dataset_name,
            dataset_info=args.dataset_info,
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
    print(encode_json(report).decode())
    return 0
