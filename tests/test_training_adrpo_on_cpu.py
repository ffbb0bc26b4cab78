"""ADRPO weighting through verl's own advantage computation.

A batch is put into verl's TransferQueue exactly as the v1 agent loop stores it (keys
``{uid}_{rollout}_0``, jagged response masks and reward tensors, the reward function's extra info
under ``extra_fields``). verl's synchronous trainer computes GRPO's advantages from it; the
``adrpo_sync`` trainer, on the same stored batch, must give exactly those advantages times each
sample's ``adrpo_weight``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

pytestmark = [
    pytest.mark.train,
    # verl announces its optional engines (torchtitan, megatron, ...) as warnings when imported.
    pytest.mark.filterwarnings("ignore:.*engine is not available:UserWarning"),
]

verl = pytest.importorskip("verl")
torch = pytest.importorskip("torch")
ray = pytest.importorskip("ray")
tq = pytest.importorskip("transfer_queue")


def _verl_config(n: int):
    from hydra import compose, initialize_config_dir

    config_dir = str(Path(verl.__file__).parent / "trainer" / "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose(
            config_name="ppo_trainer",
            overrides=[
                "algorithm.adv_estimator=grpo",
                f"actor_rollout_ref.rollout.n={n}",
                "trainer.v1.trainer_mode=adrpo_sync",
            ],
        )


@pytest.fixture(scope="module")
def queue():
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    # One storage unit: the controller and each unit reserve a CPU, and Ray has two here.
    tq.init({"backend": {"SimpleStorage": {"num_data_storage_units": 1}}})
    yield tq
    tq.close()
    if started:
        ray.shutdown()


def _put_batch(
    queue,
    partition: str,
    rewards: np.ndarray,
    weights: np.ndarray | None,
    lengths: np.ndarray,
    valid: np.ndarray | None = None,
):
    from tensordict import TensorDict
    from transfer_queue import KVBatchMeta
    from verl.utils import tensordict_utils as tu

    n_prompts, n = rewards.shape
    keys, rows = [], []
    for p in range(n_prompts):
        for r in range(n):
            length = int(lengths[p, r])
            scores = torch.zeros(length, dtype=torch.float32)
            scores[-1] = float(rewards[p, r])  # verl puts the sample's reward on its last token
            keys.append(f"prompt{p}_{r}_0")
            rows.append(
                {
                    "uid": f"prompt{p}",
                    "response_mask": torch.ones(length, dtype=torch.int64),
                    "rm_scores": scores,
                    "extra_fields": {
                        "reward_extra_info": {"score": float(rewards[p, r])}
                        | ({} if weights is None else {"adrpo_weight": float(weights[p, r])})
                        | ({} if valid is None else {"reward_valid": float(valid[p, r])})
                    },
                }
            )
    fields = tu.list_of_dict_to_tensordict(rows)  # what verl's agent loop stores with
    assert isinstance(fields, TensorDict)
    queue.kv_batch_put(keys=keys, partition_id=partition, fields=fields, tags=[{} for _ in keys])
    return KVBatchMeta(keys=keys, tags=[{} for _ in keys], partition_id=partition)


def _advantages(queue, meta) -> list[torch.Tensor]:
    data = queue.kv_batch_get(keys=meta.keys, partition_id=meta.partition_id, select_fields=["advantages"])
    return [row.clone() for row in data["advantages"].unbind()]


def test_adrpo_advantages_equal_grpo_times_weights(queue) -> None:
    from membuilder.training.adrpo import AdrpoSyncTrainer, weights_from_extra_fields
    from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

    n_prompts, n = 3, 4
    rng = np.random.default_rng(7)
    rewards = rng.uniform(0, 1, size=(n_prompts, n)).round(3)
    rewards[2] = [0.5, 0.5, 0.25, 0.75]
    weights = np.array([[4, 4, 4, 4], [1, 1, 0, 1], [1, 4, 1, 0]], dtype=np.float64)
    lengths = rng.integers(3, 9, size=(n_prompts, n))
    config = _verl_config(n)

    grpo = object.__new__(PPOTrainerSync)  # the stock trainer's own method, no setup needed for it
    grpo.config = config
    meta = _put_batch(queue, "grpo", rewards, weights, lengths)
    metrics: dict = {}
    grpo._compute_advantage(meta, metrics)
    expected = _advantages(queue, meta)

    adrpo = object.__new__(AdrpoSyncTrainer)
    adrpo.config = config
    meta2 = _put_batch(queue, "adrpo", rewards, weights, lengths)
    metrics2: dict = {}
    adrpo._compute_advantage(meta2, metrics2)
    got = _advantages(queue, meta2)

    flat_w = weights.reshape(-1)
    assert len(got) == len(expected) == n_prompts * n
    nonzero = 0
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g.shape == e.shape == (int(lengths.reshape(-1)[i]),)
        torch.testing.assert_close(g, e * float(flat_w[i]), rtol=0, atol=1e-6)
        nonzero += int(e.abs().sum() > 0)
    assert nonzero >= n_prompts * n - 2  # GRPO gave real, non-trivial advantages to weight
    # GRPO itself: within a prompt, advantages are the rewards standardised over its n rollouts.
    first = [e[0].item() for e in expected[8:12]]
    r = rewards[2]
    np.testing.assert_allclose(first, (r - r.mean()) / (r.std(ddof=1) + 1e-6), rtol=1e-5)
    assert metrics2["adrpo/masked_samples"] == 2.0
    assert metrics2["adrpo/weight_mean"] == pytest.approx(flat_w.mean())
    # The weights read back are the ones stored with the samples.
    stored = queue.kv_batch_get(keys=meta2.keys, partition_id="adrpo", select_fields=["extra_fields"])
    np.testing.assert_array_equal(weights_from_extra_fields(list(stored["extra_fields"])), flat_w)


def test_unscored_samples_leave_their_group(queue) -> None:
    """A sample whose reward failed (placeholder 0, weight 0) must not shift its group's statistics."""
    from membuilder.training.adrpo import AdrpoSyncTrainer
    from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

    rewards = np.array([[0.2, 0.9, 0.0, 0.5]])
    weights = np.array([[1.0, 4.0, 0.0, 1.0]])
    valid = np.array([[1, 1, 0, 1]])
    lengths = np.array([[4, 5, 6, 3]])
    adrpo = object.__new__(AdrpoSyncTrainer)
    adrpo.config = _verl_config(4)
    meta = _put_batch(queue, "unscored", rewards, weights, lengths, valid)
    adrpo._compute_advantage(meta, {})
    got = _advantages(queue, meta)
    # verl's GRPO over the three scored rollouts alone (a group of 3), then the weights.
    grpo = object.__new__(PPOTrainerSync)
    grpo.config = _verl_config(3)
    ref = _put_batch(
        queue, "scored_only", rewards[:, [0, 1, 3]], weights[:, [0, 1, 3]], lengths[:, [0, 1, 3]]
    )
    grpo._compute_advantage(ref, {})
    expected = _advantages(queue, ref)
    for g, e, w in zip([got[0], got[1], got[3]], expected, [1.0, 4.0, 1.0]):
        torch.testing.assert_close(g, e * w, rtol=0, atol=1e-6)
    assert float(got[2].abs().sum()) == 0.0
    # The group ids verl stores are restored afterwards.
    uids = queue.kv_batch_get(keys=meta.keys, partition_id="unscored", select_fields=["uid"])["uid"]
    assert [str(u) for u in uids] == ["prompt0"] * 4


def test_missing_weight_is_an_error(queue) -> None:
    """Samples scored by another reward function carry no weight: refuse, never train unweighted."""
    from membuilder.training.adrpo import AdrpoSyncTrainer, MissingWeightError

    trainer = object.__new__(AdrpoSyncTrainer)
    trainer.config = _verl_config(2)
    meta = _put_batch(queue, "noweight", np.array([[1.0, 0.0]]), None, np.array([[3, 4]]))
    with pytest.raises(MissingWeightError, match="adrpo_weight"):
        trainer._compute_advantage(meta, {})


def test_scale_advantages_padded_and_jagged() -> None:
    from membuilder.training.adrpo import scale_advantages

    padded = torch.tensor([[1.0, 2.0, 0.0], [3.0, 4.0, 5.0]])
    torch.testing.assert_close(
        scale_advantages(padded, [2.0, 0.0]), torch.tensor([[2.0, 4.0, 0.0], [0.0, 0.0, 0.0]])
    )
    jagged = torch.nested.as_nested_tensor(
        [torch.tensor([1.0, 2.0]), torch.tensor([3.0])], layout=torch.jagged
    )
    rows = scale_advantages(jagged, np.array([4.0, 1.0])).unbind()
    torch.testing.assert_close(rows[0], torch.tensor([4.0, 8.0]))
    torch.testing.assert_close(rows[1], torch.tensor([3.0]))
    with pytest.raises(ValueError, match="weights"):
        scale_advantages(padded, [1.0])
