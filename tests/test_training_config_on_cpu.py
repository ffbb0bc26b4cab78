"""run_adrpo.sh against verl's own Hydra configuration.

The script is run with ``--cfg job`` (verl composes and prints the configuration and starts
nothing). Hydra refuses keys that do not exist; this test adds what Hydra cannot see: keys verl
would accept and then ignore (the legacy sections ``custom_reward_function``, ``reward_model`` and
``sandbox_fusion``, which the v1 entry point never migrates, and ``+``-added keys nothing reads),
reward kwargs our reward function would refuse, and names (trainer, reward manager, reward
function) that must resolve in a process where the plug-in was imported.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [
    pytest.mark.train,
    # verl announces its optional engines (torchtitan, megatron, ...) as warnings when imported.
    pytest.mark.filterwarnings("ignore:.*engine is not available:UserWarning"),
]

verl = pytest.importorskip("verl")
yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "training" / "run_adrpo.sh"

# Keys that do not exist in verl's schema but that verl reads as free-form mappings.
FREE_FORM = ("reward.custom_reward_function.reward_kwargs.", "ray_kwargs.ray_init.runtime_env.env_vars.")


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(node, dict):
        for k, v in node.items():
            out.update(_leaves(v, f"{prefix}{k}."))
        if not node and prefix:
            out[prefix[:-1]] = {}
    else:
        out[prefix[:-1]] = node
    return out


def _compose(*overrides: str, env: dict[str, str] | None = None, script: bool = True) -> dict[str, Any]:
    full_env = dict(os.environ, PYTHON=sys.executable, **(env or {}))
    if script:
        cmd = ["bash", str(SCRIPT), *overrides, "--cfg", "job"]
    else:
        cmd = [sys.executable, "-m", "verl.trainer.main_ppo", *overrides, "--cfg", "job"]
    proc = subprocess.run(
        cmd, check=False, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"composition failed:\n{proc.stderr[-4000:]}"
    return yaml.safe_load(proc.stdout)


@pytest.fixture(scope="module")
def default_config() -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "VERL_USE_EXTERNAL_MODULES"}
    proc = subprocess.run(
        [sys.executable, "-m", "verl.trainer.main_ppo", "--cfg", "job"],
        check=False,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return yaml.safe_load(proc.stdout)


def _legacy_sections() -> list[str]:
    path = Path(verl.__file__).parent / "trainer" / "config" / "legacy_reward_impl.yaml"
    return list(yaml.safe_load(path.read_text()))


def _check(config: dict[str, Any], default: dict[str, Any]) -> dict[str, Any]:
    got, base = _leaves(config), _leaves(default)
    added = sorted(k for k in got if k not in base and not k.startswith(FREE_FORM))
    assert not added, f"keys verl does not define (it would ignore them): {added}"
    # The v1 entry point never migrates the legacy reward sections: a value set there is ignored.
    from verl.trainer import main_ppo

    assert "migrate_legacy_reward_impl" not in inspect.getsource(main_ppo)
    legacy = _legacy_sections()
    assert legacy, "verl's legacy_reward_impl.yaml lists no sections"
    ignored = sorted(k for k in got if k.split(".")[0] in legacy and got[k] != base.get(k))
    assert not ignored, f"keys set in legacy sections that the v1 trainer ignores: {ignored}"
    assert config["trainer"]["use_v1"] is True
    return got


def _check_names_resolve(config: dict[str, Any]) -> None:
    """What verl will look up by name, looked up the way verl does it."""
    from membuilder.training import verl_plugin  # noqa: F401 - what VERL_USE_EXTERNAL_MODULES imports
    from membuilder.training.reward import scorer_config_from_kwargs
    from omegaconf import OmegaConf
    from verl.trainer.ppo.reward import get_custom_reward_fn, resolve_reward_manager_cls
    from verl.trainer.ppo.v1 import get_trainer_cls

    assert config["ray_kwargs"]["ray_init"]["runtime_env"]["env_vars"]["VERL_USE_EXTERNAL_MODULES"] == (
        "membuilder.training.verl_plugin"
    )
    get_trainer_cls(config["trainer"]["v1"]["trainer_mode"])
    cfg = OmegaConf.create(config)
    manager = resolve_reward_manager_cls(cfg)
    assert manager.__name__ == "MembuilderRewardManager"
    assert get_custom_reward_fn(cfg) is not None
    kwargs = config["reward"]["custom_reward_function"]["reward_kwargs"]
    scorer_config_from_kwargs(kwargs)  # raises on any key the reward function would refuse


def test_single_node_overrides_are_all_used(default_config: dict[str, Any]) -> None:
    config = _compose(env={"MODEL_PATH": "unused-model-dir", "TRAIN_DATA": "data/rl/train.parquet"})
    got = _check(config, default_config)
    # The paper's settings reach the keys verl reads.
    assert got["actor_rollout_ref.actor.optim.lr"] == 1e-6
    assert got["actor_rollout_ref.actor.kl_loss_coef"] == 0.02
    assert got["actor_rollout_ref.actor.kl_loss_type"] == "low_var_kl"
    assert got["actor_rollout_ref.actor.use_kl_loss"] is True
    assert got["actor_rollout_ref.rollout.n"] == 8
    assert got["actor_rollout_ref.rollout.temperature"] == 0.8
    assert got["actor_rollout_ref.rollout.top_p"] == 0.9
    assert got["data.max_prompt_length"] == 20000
    assert got["data.max_response_length"] == 6000
    assert got["trainer.total_epochs"] == 5
    assert got["algorithm.adv_estimator"] == "grpo"
    assert got["trainer.v1.trainer_mode"] == "adrpo_sync"
    # The paper's reward by default: its protocol (joint pairing), hence one reward worker, in order.
    assert got["reward.custom_reward_function.reward_kwargs.protocol"] == "paper"
    assert "reward.custom_reward_function.reward_kwargs.pairing" not in got  # the protocol's
    assert got["reward.num_workers"] == 1 and got["data.shuffle"] is False
    _check_names_resolve(config)


def test_membuilder_protocol_and_its_overrides(default_config: dict[str, Any]) -> None:
    config = _compose(env={"MODEL_PATH": "m", "PROTOCOL": "membuilder", "SPARSE_REWARD": "true"})
    got = _check(config, default_config)
    assert got["reward.custom_reward_function.reward_kwargs.protocol"] == "membuilder"
    assert got["reward.custom_reward_function.reward_kwargs.sparse_reward"] is True
    assert got["reward.num_workers"] == 2 and got["data.shuffle"] is True  # expert pairing
    _check_names_resolve(config)


def test_multi_node_joint_plain_grpo_and_overrides(default_config: dict[str, Any]) -> None:
    config = _compose(
        "actor_rollout_ref.actor.optim.lr=3e-6",
        "+reward.custom_reward_function.reward_kwargs.top_k=5",
        env={"NNODES": "2", "PAIRING": "joint", "ADRPO": "0", "MODEL_PATH": "m", "ALPHA": "2.5"},
    )
    got = _check(config, default_config)
    assert got["trainer.nnodes"] == 2
    assert got["data.train_batch_size"] == 64
    assert got["actor_rollout_ref.actor.optim.lr"] == 3e-6  # "$@" comes last and wins
    assert got["trainer.v1.trainer_mode"] == "sync"
    assert got["reward.num_workers"] == 1  # joint: a session's four agents meet in one worker
    assert got["data.shuffle"] is False
    assert got["reward.custom_reward_function.reward_kwargs.attribution_alpha"] == 2.5
    _check_names_resolve(config)


def test_check_catches_ignored_keys(default_config: dict[str, Any]) -> None:
    """The paper's keys compose fine under verl 0.9.1 and are then ignored; the check must say so."""
    config = _compose(
        "custom_reward_function.path=reward.py",
        "reward_model.reward_manager=batch",
        "+actor_rollout_ref.model.max_length=20000",
        script=False,
    )
    with pytest.raises(AssertionError, match="max_length"):
        _check(config, default_config)
    del config["actor_rollout_ref"]["model"]["max_length"]
    with pytest.raises(AssertionError, match="custom_reward_function.path"):
        _check(config, default_config)
