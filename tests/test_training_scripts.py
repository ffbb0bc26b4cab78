"""The launch scripts and the SFT configuration: the paper's settings, overridable, valid shell.

The ADRPO script is checked against veRL's own configuration in ``test_training_config_on_cpu.py``;
this module needs neither veRL nor LLaMA-Factory.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

TRAINING = Path(__file__).resolve().parent.parent / "training"
SCRIPTS = ["run_sft.sh", "run_adrpo.sh", "convert_to_hf.sh", "serve_vllm.sh"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_scripts_parse_and_pass_extra_arguments_last(name: str) -> None:
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash not available")
    path = TRAINING / name
    proc = subprocess.run([bash, "-n", str(path)], check=False, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    code = [line.rstrip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert any(line.endswith('"$@"') for line in code), f"{name} must pass extra arguments on last"


def test_scripts_refuse_missing_inputs(tmp_path: Path) -> None:
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash not available")
    proc = subprocess.run(
        [bash, str(TRAINING / "convert_to_hf.sh"), str(tmp_path / "nope"), str(tmp_path / "out")],
        check=False,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "global_step_N" in proc.stderr
    proc = subprocess.run(
        [bash, str(TRAINING / "run_adrpo.sh")],
        check=False,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "MODEL_PATH": ""},
    )
    assert proc.returncode == 2 and "MODEL_PATH" in proc.stderr


def _flat_yaml(path: Path) -> dict[str, str]:
    """The config is flat ``key: value`` lines; read it without a YAML dependency."""
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition(":")
            out[key.strip()] = value.strip()
    return out


def test_sft_config_has_the_papers_settings() -> None:
    cfg = _flat_yaml(TRAINING / "configs" / "sft_qwen3_4b.yaml")
    assert cfg["model_name_or_path"] == "Qwen/Qwen3-4B-Instruct-2507"
    assert int(cfg["cutoff_len"]) == 20000
    assert float(cfg["learning_rate"]) == 5e-7
    assert float(cfg["num_train_epochs"]) == 10
    assert cfg["finetuning_type"] == "full" and cfg["stage"] == "sft"
    assert cfg["deepspeed"].endswith("ds_zero2.json")
    ds = json.loads((TRAINING / "configs" / "ds_zero2.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2
