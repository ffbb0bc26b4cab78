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
    # Sequences per forward/backward pass (verl's ``ppo_micro_batch_size_per_gpu``; 0: the whole
    # batch at once). Gradients accumulate over the micro-batches, each loss normalised by the whole
    # batch's token count as verl's engine does, so the update is the same at any size; what changes
    # is peak memory (a 1.5k-token sequence of a 135M model holds ~2 GB of activations).
    micro_batch_size: int = 1


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

    def select(self, idx: Sequence[int]) -> RolloutBatch:
        """The samples at ``idx``, in that order (a micro-batch)."""
        return RolloutBatch(
            [self.prompt_ids[i] for i in idx],
            [self.response_ids[i] for i in idx],
            [self.uids[i] for i in idx],
            [self.rewards[i] for i in idx],
            [self.weights[i] for i in idx],
            None if self.valid is None else [self.valid[i] for i in idx],
        )

    def trained_counts(self) -> tuple[int, int]:
        """(response tokens, samples) of the samples with a non-zero weight: the loss's denominators."""
        keep = [i for i, w in enumerate(self.weights) if w != 0]
        return sum(len(self.response_ids[i]) for i in keep), len(keep)

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
    holds log p(token t+1 | tokens ≤ t) under logits / temperature. Sequences are right-padded into
    one forward pass. Only the positions from the batch's first response token on get logits
    (``logits_to_keep``): the vocabulary projection of a ~1.5k-token prompt is most of the memory a
    forward takes (49k-way logits per position), and verl reads only the response positions
    (``no_padding_2_padding``), so the positions before them hold 0 and never reach the loss.
    """
    seqs = [torch.cat([p, r]).long() for p, r in zip(prompt_ids, response_ids)]
    lens = [len(s) for s in seqs]
    width = max(lens)
    first = min(len(p) for p in prompt_ids) - 1  # the first position whose next token is a response token
    pad = 0
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=width - first).logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1)
    nxt = torch.roll(ids, shifts=-1, dims=1)[:, first:]
    tok = logp.gather(-1, nxt.unsqueeze(-1)).squeeze(-1)
    tok = torch.cat([tok.new_zeros((len(seqs), first)), tok], dim=1)
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
    *,
    batch_num_tokens: int | None = None,
    global_batch_size: int | None = None,
) -> Any:
    """The TensorDict verl's engine passes to ``ppo_loss`` for one micro-batch.

    Samples with weight 0 get an all-zero response mask: no policy term, no KL term, and no tokens
    in the token-mean's count. ``batch_num_tokens`` / ``global_batch_size`` are the whole batch's
    trained tokens and samples when ``batch`` is one micro-batch of it (default: this batch's own).
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
    own_tokens, own_samples = batch.trained_counts()
    if batch_num_tokens is None:
        batch_num_tokens = own_tokens
    if global_batch_size is None:
        global_batch_size = own_samples
    return tu.get_tensordict(
        fields,
        non_tensor_dict={
            "dp_size": 1,
            "batch_num_tokens": batch_num_tokens,
            "global_batch_size": global_batch_size,
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

    def _loss_on(
        self,
        batch: RolloutBatch,
        advantages: Sequence[torch.Tensor],
        idx: Sequence[int],
        counts: tuple[int, int],
    ) -> tuple[torch.Tensor, dict[str, Any], Any]:
        """verl's ``ppo_loss`` on the samples ``idx`` of ``batch``, normalised by the whole batch's ``counts``."""
        sub = batch.select(idx)
        t = self.cfg.temperature
        ref = None
        if self.cfg.kl_coef > 0:
            with torch.no_grad():
                ref = response_log_probs(self.reference, sub.prompt_ids, sub.response_ids, t)
        log_probs = sequence_log_probs(self.policy, sub.prompt_ids, sub.response_ids, t)
        old = _response_rows(log_probs.detach(), sub.prompt_ids, sub.response_ids)
        data = build_loss_data(
            sub,
            [advantages[i] for i in idx],
            old,
            ref,
            batch_num_tokens=counts[0],
            global_batch_size=counts[1],
        )
        loss, metrics = adrpo_loss(self.actor_cfg, log_probs, data)
        return loss, metrics, data

    def loss(self, batch: RolloutBatch) -> tuple[torch.Tensor, dict[str, Any], Any, list[torch.Tensor]]:
        """verl's loss on the whole ``batch`` in one pass, gradients attached (no optimizer step).

        The old log-probs are the policy's own, detached, from the same forward pass: with one
        PPO epoch of one mini-batch the policy has not moved between verl's ``compute_log_prob``
        and the update, so a second forward would give the same numbers (this model has no
        dropout) at the cost of a third of the step's compute on a CPU.
        """
        self.policy.train()
        adv = weighted_advantages(batch, self.cfg)
        loss, metrics, data = self._loss_on(batch, adv, range(len(batch)), batch.trained_counts())
        return loss, metrics, data, adv

    def step(self, batch: RolloutBatch) -> StepMetrics:
        """One update: advantages over the whole batch, loss and backward per micro-batch, AdamW.

        Weight-0 samples are left out of the micro-batches: their loss mask is all zero, so they
        would add exactly nothing (``test_weight_zero_samples_contribute_exactly_zero_gradient``).
        """
        weights = np.asarray(batch.weights, dtype=np.float64)
        masked = int((weights == 0).sum())
        if masked == len(batch):
            return StepMetrics(
                loss=float("nan"), pg_loss=float("nan"), kl=float("nan"), grad_norm=0.0, pg_clipfrac=0.0,
                ppo_kl=0.0, trained_samples=0, masked_samples=masked, trained_tokens=0,
                advantages=[0.0] * len(batch), skipped="every sample has weight 0",
            )  # fmt: skip
        self.optimizer.zero_grad(set_to_none=True)
        self.policy.train()
        adv = weighted_advantages(batch, self.cfg)
        counts = batch.trained_counts()
        trained = [i for i in range(len(batch)) if weights[i] != 0]
        size = self.cfg.micro_batch_size if self.cfg.micro_batch_size > 0 else len(trained)
        loss = pg_loss = kl = 0.0
        clipfrac: list[float] = []
        ppo_kl: list[float] = []
        for start in range(0, len(trained), size):
            part, metrics, _data = self._loss_on(batch, adv, trained[start : start + size], counts)
            part.backward()
            # verl sums the normalised micro-batch terms (loss, pg_loss, kl_loss) and averages the rest
            loss += float(part.detach())
            pg_loss += _metric_value(metrics["actor/pg_loss"])
            kl += _metric_value(metrics["kl_loss"]) if "kl_loss" in metrics else 0.0
            clipfrac.append(_metric_value(metrics.get("actor/pg_clipfrac", 0.0)))
            ppo_kl.append(_metric_value(metrics.get("actor/ppo_kl", 0.0)))
        params = [p for p in self.policy.parameters() if p.grad is not None]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip))
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)  # verl skips a non-finite update too
            skipped = f"non-finite gradient norm {grad_norm}"
        else:
            self.optimizer.step()
            skipped = None
        return StepMetrics(
            loss=loss,
            pg_loss=pg_loss,
            kl=kl,
            grad_norm=grad_norm,
            pg_clipfrac=float(np.mean(clipfrac)),
            ppo_kl=float(np.mean(ppo_kl)),
            trained_samples=len(trained),
            masked_samples=masked,
            trained_tokens=counts[0],
            advantages=[float(a[-1]) for a in adv],
            skipped=skipped,
        )
