"""State files: round trip, and a clear StateFileError for every kind of bad file."""

from __future__ import annotations

import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from membuilder import _core as c

DIM = 8
PROV = c.Provenance("conv", 1, None, [])


def make_state(n: int = 40, limit: int = 20000) -> c.MemoryState:
    rng = np.random.default_rng(1)
    s = c.MemoryState(
        DIM, update_mode="replace", core_limit=100, exact_search_limit=limit, match_threshold=0.8
    )
    s.add_entries(
        "episodic",
        [f"event {i}" for i in range(n)],
        rng.standard_normal((n, DIM)).astype(np.float32),
        [c.Provenance("conv", i, f"2023-01-{i % 28 + 1:02d}", [f"D{i}:1"]) for i in range(n)],
    )
    plan = s.plan(
        [
            c.Action("episodic", "UPDATE", text="event 3 again", old=["event 3"]),
            c.Action("core", "APPEND", text="Ana, 34, nurse"),
        ],
        PROV,
    )
    s.commit(plan, rng.standard_normal((len(plan), DIM)).astype(np.float32))
    return s


@pytest.mark.parametrize("limit", [20000, 10])  # exact search, and a stored graph index
def test_round_trip(tmp_path: Path, limit: int):
    s = make_state(60, limit)
    path = tmp_path / "state.mb"
    s.save(path)
    back = c.MemoryState.load(str(path))
    assert back.to_dict() == s.to_dict()
    assert back.core == "Ana, 34, nurse" and back.get(3).retired
    q = np.random.default_rng(2).standard_normal((20, DIM)).astype(np.float32)
    for a, b in zip(s.search_batch(q, 7), back.search_batch(q, 7)):
        np.testing.assert_array_equal(a, b)
    # The loaded state keeps working: same ids continue, plans apply.
    plan = back.plan([c.Action("semantic", "ADD", text="new fact")], PROV)
    assert back.commit(plan, q[:1]).added == [s.to_dict()["entries"][-1]["id"] + 1]


def _saved(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "s.mb"
    make_state().save(path)
    return path, path.read_bytes()


def _problem(path: Path) -> str:
    with pytest.raises(c.StateFileError) as info:
        c.MemoryState.load(path)
    err = info.value
    assert err.path == str(path) and str(path) in str(err)
    assert isinstance(err, OSError) and isinstance(err, c.MembuilderError)
    return err.problem


def test_missing_file(tmp_path: Path):
    assert _problem(tmp_path / "nope.mb") == "not_found"


def test_truncated(tmp_path: Path):
    path, data = _saved(tmp_path)
    for cut in (len(data) - 1, 40, 20, 5):
        path.write_bytes(data[:cut])
        assert _problem(path) == "truncated"


def test_corrupted_byte(tmp_path: Path):
    path, data = _saved(tmp_path)
    bad = bytearray(data)
    bad[len(bad) // 2] ^= 0x01
    path.write_bytes(bytes(bad))
    assert _problem(path) == "checksum_mismatch"


def test_other_version(tmp_path: Path):
    path, data = _saved(tmp_path)
    bad = bytearray(data)
    struct.pack_into("<I", bad, 8, c.STATE_FORMAT_VERSION + 1)
    path.write_bytes(bytes(bad))
    assert _problem(path) == "version_mismatch"


def test_bad_magic_and_malformed(tmp_path: Path):
    path = tmp_path / "s.mb"
    path.write_text('{"core": "not a state file"}')
    assert _problem(path) == "bad_magic"
    _, data = _saved(tmp_path)
    path.write_bytes(data + b"extra")
    assert _problem(path) == "malformed"


def test_save_is_atomic_when_writing_fails(tmp_path: Path):
    """A save that fails part-way (here: the file-size limit is hit) leaves the old file intact
    and no temporary file behind."""
    path = tmp_path / "s.mb"
    small = c.MemoryState(DIM)
    small.set_core("the old state")
    small.save(path)
    old = path.read_bytes()
    script = textwrap.dedent(
        f"""
        import resource, signal, numpy as np
        from membuilder import _core as c
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
        s = c.MemoryState({DIM})
        n = 20000
        s.add_entries("episodic", ["x" * 50] * n, np.ones((n, {DIM}), np.float32),
                      [c.Provenance("c", 0)] * n)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({len(old) + 4096}, resource.RLIM_INFINITY))
        try:
            s.save({str(path)!r})
        except c.StateFileError as e:
            print("FAILED", e.problem)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert "FAILED io" in out.stdout, out.stderr
    assert path.read_bytes() == old
    assert c.MemoryState.load(path).core == "the old state"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.mb"]
