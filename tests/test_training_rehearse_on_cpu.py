"""``membuilder rehearse`` end to end, two ADRPO steps (slow: a real 135M model on the CPU)."""

from __future__ import annotations

import json
import math

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.train,
    pytest.mark.local_model,
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

pytest.importorskip("torch")
pytest.importorskip("verl")
pytest.importorskip("transformers")
pytest.importorskip("gguf")
pytest.importorskip("xllamacpp")
pytest.importorskip("pyarrow")


def test_two_step_rehearsal(tmp_path, longmemeval_dir, locomo_path):
    from membuilder.cli import main
    from membuilder.llm.local import find_smollm2_gguf

    try:
        find_smollm2_gguf()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    out = tmp_path / "rehearsal"
    argv = [
        "rehearse",
        "--output-dir",
        str(out),
        "--longmemeval",
        str(longmemeval_dir / "longmemeval_oracle.json"),
    ]
    argv += ["--split-file", str(longmemeval_dir / "longmemeval_splits.json"), "--locomo", str(locomo_path)]
    argv += ["--sessions", "1", "--eval-sessions", "1", "--qa-per-session", "2", "--sft-steps", "2"]
    argv += ["--adrpo-steps", "2", "--prompts-per-step", "1", "--rollouts", "2", "--max-new-tokens", "64"]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["timings_s"]) == {"model", "endpoint", "data", "sft", "adrpo", "eval", "report"}
    assert len(metrics["sft_losses"]) == 2 and all(math.isfinite(v) for v in metrics["sft_losses"])
    steps = metrics["steps"]
    assert [s["step"] for s in steps] == [1, 2]
    for s in steps:
        assert len(s["weights"]) == 2
        assert 0.0 <= s["format_pass"] <= 1.0
        assert s["skipped"] or (math.isfinite(s["loss"]) and math.isfinite(s["grad_norm"]))
    assert (out / "report.md").is_file() and (out / "report.png").stat().st_size > 0
    assert (out / "adrpo" / "policy-f32.gguf").stat().st_size > 0
    assert metrics["notes"]["policy_server_requests"] > 0  # the trained policy built memory when served
    assert metrics["notes"]["eval"]["files"]
