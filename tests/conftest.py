"""Shared fixtures: where the benchmark data lives, and a scratch directory per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def _data_dir() -> Path:
    # The benchmark files are never committed; they sit in ../shared/data beside the checkout on
    # every development and CI machine, or wherever MEMBUILDER_DATA points.
    env = os.environ.get("MEMBUILDER_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = _data_dir()
    if not path.is_dir():
        pytest.skip(f"benchmark data not found at {path} (set MEMBUILDER_DATA)")
    return path


@pytest.fixture(scope="session")
def locomo_path(data_dir: Path) -> Path:
    path = data_dir / "locomo" / "locomo10.json"
    if not path.is_file():
        pytest.skip(f"LoCoMo file not found at {path}")
    return path


@pytest.fixture(scope="session")
def longmemeval_dir(data_dir: Path) -> Path:
    path = data_dir / "longmemeval"
    if not (path / "longmemeval_oracle.json").is_file():
        pytest.skip(f"LongMemEval files not found in {path}")
    return path
