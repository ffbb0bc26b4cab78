"""Smoke test of an installed wheel (run by .ci/wheel in a fresh venv with no Rust toolchain).

Checks that the compiled core imports and works (parse, plan/commit, search, save/load) and that
the command line runs a raw-builder retrieval evaluation of one LoCoMo conversation with the hash
embedder. It must not import anything from the source tree: it runs outside it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import membuilder
import numpy as np
from membuilder import MemoryState, Provenance, parse_actions

assert "site-packages" in membuilder.__file__, f"imported from the source tree: {membuilder.__file__}"
print("membuilder", membuilder.__file__)

result = parse_actions(
    "episodic",
    '```json\n{"operations": [{"action": "ADD", "memory": "2024-05-02: adopted a cat called Miso"},'
    ' {"action": "ADD", "memory": "2024-05-09: Miso went to the vet"}]}\n```',
)
state = MemoryState(dim=16)
plan = state.plan(result, Provenance("conv-1", session=0, timestamp="2024-05-02"))
assert len(plan) == 2, len(plan)
vectors = np.eye(16, dtype=np.float32)[:2] + 0.01
state.commit(plan, vectors)
hits = state.search(vectors[1], 1)
assert list(state.texts(hits.ids)) == ["2024-05-09: Miso went to the vet"], list(state.texts(hits.ids))
with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "state.mbs")
    state.save(path)
    assert MemoryState.load(path).count("episodic") == 2
print("core: parse, plan/commit, search, save/load ok")

data = Path(os.environ["MEMBUILDER_SMOKE_DATA"]) / "locomo" / "locomo10.json"
with tempfile.TemporaryDirectory() as tmp:
    out = Path(tmp) / "run"
    cmd = [
        sys.executable,
        "-m",
        "membuilder.cli",
        "eval",
        "--dataset",
        "locomo",
        "--data-path",
        str(data),
        "--conv-id",
        "conv-26",
        "--mode",
        "retrieval",
        "--builder",
        "raw",
        "--embedder",
        "hash",
        "--output-dir",
        str(out),
        "--no-progress",
    ]
    subprocess.run(cmd, check=True)
    summary = json.loads((out / "summary.json").read_text())
    print("eval summary keys:", sorted(summary)[:12])
    assert (out / "report.md").is_file()
    assert sum(1 for _ in (out / "results.jsonl").open()) > 100
print("cli: raw-builder retrieval eval on conv-26 ok")
