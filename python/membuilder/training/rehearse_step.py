"""One ADRPO optimizer step on a Hugging Face causal LM, computed with verl's own functions.

verl 0.9.1 cannot run a training step without a GPU, so the CPU rehearsal
(:mod:`membuilder.training.rehearse`) drives the step itself. Everything that is *math* is
verl's, called on the tensors laid out the way verl's engine lays them out:

* GRPO advantages: :func:`verl.trainer.ppo.core_algos.compute_grpo_outcome_advantage` (the
  sample's reward on its last response token, groups by prompt uid, ``norm_adv_by_std_in_grpo``);
* the policy loss: :func:`verl.workers.utils.losses.ppo_loss` — the loss function verl's engine
  workers call — which runs the registered policy loss (``vanilla``: clipped PPO with dual clip),
  :func:`~verl.trainer.ppo.core_algos.agg_loss` and the KL loss
  :func:`~verl.trainer.ppo.core_algos.kl_penalty` (``low_var_kl``) against a frozen reference;
* the actor settings: verl's own :class:`verl.workers.config.FSDPActorConfig` dataclass.

Ours are only the two steps verl does not have: the ADRPO weighting (GRPO advantages times each
sample's attribution weight, :func:`membuilder.training.adrpo.scale_advantages`, the same function
the GPU trainer uses) with failed samples given a group of their own, and the log-probabilities
of a Hugging Face model laid out as verl's engine returns them (one jagged row per sequence, the
log-probability of the *next* token at every position, logits divided by the rollout temperature).

One difference from the GPU trainer, on purpose: a sample with weight 0 (its reward could not be
computed) is taken out of the loss mask here, so it contributes exactly nothing — not to the
policy term, not to the KL term, not to the token count of the token mean. verl's trainer keeps
it in the mask with advantage 0 (its KL term still pulls and its tokens still count).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from membuilder.training.adrpo import scale_advantages


@dataclass
class StepConfig:
    """Settings of the step; the defaults are the paper's (``run_adrpo.sh``)."""

    lr: float = 1e-6
    kl_coef: float = 0.02
    kl_type: str = "low_var_kl"
    clip_ratio: float = 0.2
    clip_ratio_c: float = 3.0
    loss_agg_mode: str = "token-mean"
    grad_clip: float = 1.0
    weight_decay: float = 0.01
    temperature: float = 0.8  # the rollout temperature; verl divides logits by it for log-probs
    norm_adv_by_std: bool = True


@dataclass
class RolloutBatch:
    """n rollouts of each prompt: token ids, the prompt's uid, and what the reward scorer returned.

    ``weights`` are the ADRPO attribution weights (α for the dominant agent, 1 otherwise, 0 for a
    sample whose reward failed); ``valid`` is False for such a failed sample.
    """

    prompt_ids: list[torch.Tensor]
    response_ids: list[torch.Tensor]
    uids: list[str]
    rewards: Sequence[float]
    weights: Sequence[float]
    valid: Sequence[bool] | None = None

    def __post_init__(self) -> None:
        n = len(self.prompt_ids)
        lens = {len(self.response_ids), len(self.uids), len(self.rewards), len(self.weights)}
        if self.valid is not None:
            lens.add(len(self.valid))
        if lens != {n}:
            raise ValueError(f"rollout batch fields have different lengths: {sorted(lens)} vs {n}")
        if any(len(p) == 0 for p in self.prompt_ids) or any(len(r) == 0 for r in self.response_ids):
            raise ValueError("every prompt and every response needs at least one token")

    def __len__(self) -> int:
        return len(self.prompt_ids)

    @property
    def is_valid(self) -> np.ndarray:
        if self.valid is None:
            return np.ones(len(self), dtype=bool)
        return np.asarray(self.valid, dtype=bool)


@dataclass
class StepMetrics:
    loss: float
    pg_loss: float
    kl: float  # mean low_var_kl over the trained tokens (before the step)
    grad_norm: float
    pg_clipfrac: float
    ppo_kl: float
    trained_samples: int
    masked_samples: int
    trained_tokens: int
    advantages: list[float] = field(default_factory=list)  # per sample, after weighting
    skipped: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def actor_config(cfg: StepConfig) -> Any:
    """verl's own actor config dataclass with the step's settings (what ``ppo_loss`` reads)."""
    from verl.workers.config import FSDPActorConfig, PolicyLossConfig

    return FSDPActorConfig(
        strategy="fsdp",
        ppo_mini_batch_size=1,
        ppo_micro_batch_size_per_gpu=1,
        clip_ratio=cfg.clip_ratio,
        clip_ratio_c=cfg.clip_ratio_c,
        loss_agg_mode=cfg.loss_agg_mode,
        entropy_coeff=0.0,
        use_kl_loss=cfg.kl_coef > 0,
        kl_loss_coef=cfg.kl_coef,
        kl_loss_type=cfg.kl_type,
        grad_clip=cfg.grad_clip,
        policy_loss=PolicyLossConfig(loss_mode="vanilla"),
        use_dynamic_bsz=False,
        rollout_n=1,
    )


def _nested(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.nested.as_nested_tensor(list(rows), layout=torch.jagged)


def sequence_log_probs(
    model: Any, prompt_ids: Sequence[torch.Tensor], response_ids: Sequence[torch.Tensor], temperature: float
) -> torch.Tensor:
    """Per-position log-probability of the next token, one jagged row per prompt+response sequence.

    This is the layout verl's engine hands ``ppo_loss`` (``model_output["log_probs"]``): position t
    holds log p(token t+1 | tokens ≤ t) under logits / temperature (the last position wraps around
    and is never read). Sequences are right-padded into one forward pass.
    """
    seqs = [torch.cat([p, r]).long() for p, r in zip(prompt_ids, response_ids)]
    lens = [len(s) for s in seqs]
    width = max(lens)
    pad = 0
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1)
    nxt = torch.roll(ids, shifts=-1, dims=1)
    tok = logp.gather(-1, nxt.unsqueeze(-1)).squeeze(-1)
    return _nested([tok[i, : lens[i]] for i in range(len(seqs))])


def response_log_probs(
    model: Any, prompt_ids: Sequence[torch.Tensor], response_ids: Sequence[torch.Tensor], temperature: float
) -> list[torch.Tensor]:
    """The log-probability of every response token (one 1-D tensor per sample)."""
    return _response_rows(
        sequence_log_probs(model, prompt_ids, response_ids, temperature), prompt_ids, response_ids
    )


def _response_rows(
    seq: torch.Tensor, prompt_ids: Sequence[torch.Tensor], response_ids: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    return [
        row[len(p) - 1 : len(p) - 1 + len(r)] for row, p, r in zip(seq.unbind(), prompt_ids, response_ids)
    ]


def weighted_advantages(batch: RolloutBatch, cfg: StepConfig | None = None) -> list[torch.Tensor]:
    """verl's GRPO advantages times each sample's ADRPO weight, one row of response length per sample.

    A failed sample (``valid`` False) first gets a group of its own, so its placeholder reward does
    not enter its prompt's mean and standard deviation (as the GPU trainer does); its weight 0 then
    zeroes its advantage.
    """
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

    cfg = cfg or StepConfig()
    lens = [len(r) for r in batch.response_ids]
    width = max(lens)
    mask = torch.zeros((len(batch), width), dtype=torch.float32)
    rewards = torch.zeros((len(batch), width), dtype=torch.float32)
    for i, n in enumerate(lens):
        mask[i, :n] = 1
        rewards[i, n - 1] = float(batch.rewards[i])  # verl puts the outcome on the last token
    valid = batch.is_valid
    index = np.array([u if valid[i] else f"{u}#unscored{i}" for i, u in enumerate(batch.uids)], dtype=object)
    adv, _returns = compute_grpo_outcome_advantage(
        token_level_rewards=rewards,
        response_mask=mask,
        index=index,
        norm_adv_by_std_in_grpo=cfg.norm_adv_by_std,
    )
    adv = scale_advantages(adv, np.asarray(batch.weights, dtype=np.float64))
    return [adv[i, :n].clone() for i, n in enumerate(lens)]


def build_loss_data(
    batch: RolloutBatch,
    advantages: Sequence[torch.Tensor],
    old_log_probs: Sequence[torch.Tensor],
    ref_log_probs: Sequence[torch.Tensor] | None,
) -> Any:
    """The TensorDict verl's engine passes to ``ppo_loss`` for one micro-batch (= the whole batch).

    Samples with weight 0 get an all-zero response mask: no policy term, no KL term, and no tokens
    in the token-mean's count.
    """
    from verl.utils import tensordict_utils as tu

    weights = np.asarray(batch.weights, dtype=np.float64)
    masks = [
        torch.full((len(r),), 0 if weights[i] == 0 else 1, dtype=torch.int64)
        for i, r in enumerate(batch.response_ids)
    ]
    fields: dict[str, torch.Tensor] = {
        "prompts": _nested([p.long() for p in batch.prompt_ids]),
        "responses": _nested([r.long() for r in batch.response_ids]),
        "response_mask": _nested(masks),
        "old_log_probs": _nested([t.detach().float() for t in old_log_probs]),
        "advantages": _nested([a.float() for a in advantages]),
    }
    if ref_log_probs is not None:
        fields["ref_log_prob"] = _nested([t.detach().float() for t in ref_log_probs])
    trained_tokens = int(sum(int(m.sum()) for m in masks))
    return tu.get_tensordict(
        fields,
        non_tensor_dict={
            "dp_size": 1,
            "batch_num_tokens": trained_tokens,
            "global_batch_size": int((weights != 0).sum()),
        },
    )


def adrpo_loss(actor_cfg: Any, log_probs: torch.Tensor, data: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl's ``ppo_loss`` on the policy's jagged log-probs and the batch's TensorDict."""
    from verl.workers.utils.losses import ppo_loss

    return ppo_loss(actor_cfg, {"log_probs": log_probs}, data)


def _metric_value(m: Any) -> float:
    """A plain float from what ``ppo_loss`` returns (verl ``Metric`` objects, tensors or floats)."""
    if hasattr(m, "aggregate"):
        m = m.aggregate()
    return float(m.detach().item() if isinstance(m, torch.Tensor) else m)


class AdrpoStep:
    """The optimizer step of the rehearsal: policy (trained), frozen reference, AdamW.

    ``step(batch)`` computes the old log-probs (the policy before the update, as verl's
    ``compute_log_prob`` does) and the reference log-probs, the weighted GRPO advantages, verl's
    ``ppo_loss``, backpropagates, clips the gradient norm at ``grad_clip`` and steps AdamW. One PPO
    epoch with one mini-batch, so the importance ratio is 1 at the step (as with the paper's
    ``ppo_mini_batch_size`` = batch size).
    """

    def __init__(self, policy: Any, reference: Any | None, cfg: StepConfig | None = None) -> None:
        self.cfg = cfg or StepConfig()
        if reference is None and self.cfg.kl_coef > 0:
            raise ValueError("the KL loss (kl_coef > 0) needs a frozen reference model")
        self.policy = policy
        self.reference = reference
        if reference is not None:
            reference.eval()
            for p in reference.parameters():
                p.requires_grad_(False)
        self.actor_cfg = actor_config(self.cfg)
        self.optimizer = torch.optim.AdamW(
            [p for p in policy.parameters() if p.requires_grad],
            lr=self.cfg.lr,
            weight_decay=self.cfg.weight_decay,
        )

    def loss(self, batch: RolloutBatch) -> tuple[torch.Tensor, dict[str, Any], Any, list[torch.Tensor]]:
        """verl's loss on ``batch`` with gradients attached to the policy (no optimizer step).

        The old log-probs are the policy's own, detached, from the same forward pass: with one
        PPO epoch of one mini-batch the policy has not moved between verl's ``compute_log_prob``
        and the update, so a second forward would give the same numbers (this model has no
        dropout) at the cost of a third of the step's compute on a CPU.
        """
        t = self.cfg.temperature
        ref = None
        if self.cfg.kl_coef > 0:
            with torch.no_grad():
                ref = response_log_probs(self.reference, batch.prompt_ids, batch.response_ids, t)
        self.policy.train()
        log_probs = sequence_log_probs(self.policy, batch.prompt_ids, batch.response_ids, t)
        old = _response_rows(log_probs.detach(), batch.prompt_ids, batch.response_ids)
        adv = weighted_advantages(batch, self.cfg)
        data = build_loss_data(batch, adv, old, ref)
        loss, metrics = adrpo_loss(self.actor_cfg, log_probs, data)
        return loss, metrics, data, adv

    def step(self, batch: RolloutBatch) -> StepMetrics:
        weights = np.asarray(batch.weights, dtype=np.float64)
        masked = int((weights == 0).sum())
        if masked == len(batch):
            return StepMetrics(
                loss=float("nan"), pg_loss=float("nan"), kl=float("nan"), grad_norm=0.0, pg_clipfrac=0.0,
                ppo_kl=0.0, trained_samples=0, masked_samples=masked, trained_tokens=0,
                advantages=[0.0] * len(batch), skipped="every sample has weight 0",
            )  # fmt: skip
        self.optimizer.zero_grad(set_to_none=True)
        loss, metrics, data, adv = self.loss(batch)
        loss.backward()
        params = [p for p in self.policy.parameters() if p.grad is not None]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip))
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)  # verl skips a non-finite update too
            skipped = f"non-finite gradient norm {grad_norm}"
        else:
            self.optimizer.step()
            skipped = None
        kl = _metric_value(metrics["kl_loss"]) if "kl_loss" in metrics else 0.0
        return StepMetrics(
            loss=float(loss.detach()),
            pg_loss=_metric_value(metrics["actor/pg_loss"]),
            kl=kl,
            grad_norm=grad_norm,
            pg_clipfrac=_metric_value(metrics.get("actor/pg_clipfrac", 0.0)),
            ppo_kl=_metric_value(metrics.get("actor/ppo_kl", 0.0)),
            trained_samples=len(batch) - masked,
            masked_samples=masked,
            trained_tokens=int(data["batch_num_tokens"]),
            advantages=[float(a[-1]) for a in adv],
            skipped=skipped,
        )
