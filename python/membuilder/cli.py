"""The ``membuilder`` command: one entry point, one subcommand per job.

Each subcommand lives in the module that owns the job and exposes ``add_arguments(parser)`` and
``run(args) -> int``; they are imported only when chosen so that ``membuilder --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "eval": ("membuilder.eval.runner", "build memory and/or answer and judge a benchmark"),
    "trajectories": ("membuilder.data.trajectories", "record an expert model's agent calls"),
    "qa-gen": ("membuilder.data.qagen", "write synthetic QA for every recorded session"),
    "export-sft": ("membuilder.data.export_sft", "export trajectories as LLaMA-Factory SFT data"),
    "export-rl": ("membuilder.data.export_rl", "export sessions as veRL RL parquet"),
    "compare": ("membuilder.eval.compare", "paired comparison of two eval runs over the same questions"),
    "judge-probe": (
        "membuilder.eval.judge_probe",
        "measure the judge on wrong and gold answers (LoCoMo audit)",
    ),
    "rehearse": ("membuilder.training.rehearse", "rehearse the training recipe on a CPU with a small model"),
}


def positive_int(text: str) -> int:
    """argparse ``type=`` for a count that must be at least 1 (one line on bad input, no traceback)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def build_parser(chosen: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="membuilder",
        description="Build, evaluate and train long-term memory for LLM agents (MemBuilder, ADRPO).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name == chosen:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    if chosen not in SUBCOMMANDS:
        chosen = None
    parser = build_parser(chosen)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
