"""The rehearsal's ADRPO step on a tiny randomly initialised model of SmolLM2's architecture.

The model is built from a config (no weights are read): a Llama decoder with grouped-query
attention, SiLU MLP, RMSNorm, RoPE and tied embeddings, like SmolLM2-135M, only narrow. The step is
:class:`membuilder.training.rehearse_step.AdrpoStep`, the one ``membuilder rehearse`` runs; its
math is verl's (GRPO estimator, ``ppo_loss``, ``low_var_kl``), and these tests check that it is
wired so that gradients follow the weighted rewards.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

pytestmark = [
    pytest.mark.train,
    pytest.mark.filterwarnings("ignore:.*engine is not available:UserWarning"),
]

torch = pytest.importorskip("torch")
pytest.importorskip("verl")
transformers = pytest.importorskip("transformers")

VOCAB = 96


def tiny_smollm2(seed: int = 0):
    """SmolLM2's architecture (LlamaForCausalLM, GQA 3:1, tied embeddings, rope theta 1e5), tiny."""
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=3,
        num_key_value_heads=1,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        hidden_act="silu",
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    model.eval()  # no dropout in this architecture, but keep the forward deterministic
    return model


def _batch(rewards, weights, valid=None, seed: int = 1, n: int = 4):
    """len(rewards) // n prompts with n rollouts each, random token ids of varied lengths."""
    from membuilder.training.rehearse_step import RolloutBatch

    g = torch.Generator().manual_seed(seed)
    prompts, responses, uids = [], [], []
    for i in range(len(rewards)):
        p = i // n
        gp = torch.Generator().manual_seed(1000 + p)
        prompts.append(torch.randint(1, VOCAB, (5 + p,), generator=gp))
        responses.append(torch.randint(1, VOCAB, (int(torch.randint(3, 8, (1,), generator=g)),), generator=g))
        uids.append(f"prompt{p}")
    return RolloutBatch(prompts, responses, uids, list(rewards), list(weights), valid)


def _seq_logp(model, batch, temperature):
    from membuilder.training.rehearse_step import response_log_probs

    with torch.no_grad():
        rows = response_log_probs(model, batch.prompt_ids, batch.response_ids, temperature)
    return np.array([float(r.sum()) for r in rows])


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_one_step_moves_each_response_with_its_weighted_advantage():
    from membuilder.training.rehearse_step import AdrpoStep, StepConfig

    policy = tiny_smollm2()
    step = AdrpoStep(policy, copy.deepcopy(policy), StepConfig(lr=1e-3))
    rewards = [1.0, 0.0, 0.5, 0.25, 0.9, 0.1, 0.1, 0.6]
    weights = [4.0, 4.0, 4.0, 4.0, 1.0, 1.0, 1.0, 1.0]
    batch = _batch(rewards, weights)
    before = _seq_logp(policy, batch, step.cfg.temperature)
    metrics = step.step(batch)
    after = _seq_logp(policy, batch, step.cfg.temperature)
    adv = np.array(metrics.advantages)
    assert metrics.skipped is None and metrics.grad_norm > 0
    assert np.all(adv != 0)  # every sample has a real signal
    assert (adv > 0).sum() >= 3 and (adv < 0).sum() >= 3
    rose = after > before
    np.testing.assert_array_equal(rose, adv > 0, err_msg=f"adv={adv}, delta={after - before}")
    # The first step starts at the reference, so the KL term is zero there.
    assert metrics.kl == pytest.approx(0.0, abs=1e-7)


def test_weight_zero_samples_contribute_exactly_zero_gradient():
    from membuilder.training.rehearse_step import AdrpoStep, RolloutBatch, StepConfig

    rewards = [1.0, 0.0, 0.0, 0.5, 0.9, 0.1, 0.0, 0.6]
    weights = [1.0, 4.0, 0.0, 1.0, 1.0, 1.0, 0.0, 4.0]
    valid = [w != 0 for w in weights]
    full = _batch(rewards, weights, valid)

    policy = tiny_smollm2()
    ref = copy.deepcopy(policy)
    # Move the policy away from the reference first, so the KL term has a gradient to contribute.
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))

    def grads(batch):
        step = AdrpoStep(policy, ref, StepConfig(kl_coef=0.5))
        policy.zero_grad(set_to_none=True)
        loss, *_ = step.loss(batch)
        loss.backward()
        return float(loss.detach()), _grads(policy)

    loss_full, g_full = grads(full)

    # 1. The same batch with the weight-0 samples' tokens and rewards replaced by anything at all
    #    (same lengths, so the same padded shapes): bit-identical gradients.
    g = torch.Generator().manual_seed(99)
    scrambled = RolloutBatch(
        full.prompt_ids,
        [
            torch.randint(1, VOCAB, r.shape, generator=g) if w == 0 else r
            for r, w in zip(full.response_ids, weights)
        ],
        full.uids,
        [123.0 if w == 0 else r for r, w in zip(rewards, weights)],
        weights,
        valid,
    )
    loss_scr, g_scr = grads(scrambled)
    assert loss_scr == loss_full
    for name in g_full:
        assert torch.equal(g_full[name], g_scr[name]), name

    # 2. The batch without them: the same gradient (up to the float rounding of a different shape).
    keep = [i for i, w in enumerate(weights) if w != 0]
    without = RolloutBatch(
        [full.prompt_ids[i] for i in keep],
        [full.response_ids[i] for i in keep],
        [full.uids[i] for i in keep],
        [rewards[i] for i in keep],
        [weights[i] for i in keep],
        [True] * len(keep),
    )
    loss_wo, g_wo = grads(without)
    assert loss_wo == pytest.approx(loss_full, rel=1e-5, abs=1e-7)
    total = sum(float(v.abs().sum()) for v in g_full.values())
    assert total > 0
    for name in g_full:
        torch.testing.assert_close(g_full[name], g_wo[name], rtol=1e-4, atol=1e-7)


def test_doubling_alpha_doubles_the_dominant_agents_advantages():
    """Weights from the Rust reward kernel (what the scorer calls), advantages from verl's GRPO."""
    from membuilder import _core
    from membuilder.training.rehearse_step import weighted_advantages

    n = 4
    agents = ["semantic"] * n + ["episodic"] * n
    task = np.array([1.0, 0.5, 0.0, 0.75, 0.25, 1.0, 0.5, 0.0])
    # Every sample's retrieved memories are mostly semantic: the semantic agent dominates.
    kinds = np.array([[1, 1, 1, 0, 2, -1]] * (2 * n), dtype=np.int8)
    tokens = np.full(2 * n, 50.0)

    def advantages(alpha):
        kernel = _core.RewardKernel(_core.RewardConfig(attribution_alpha=alpha))
        scored = kernel.score(agents, np.ones(2 * n, dtype=bool), task, tokens, tokens, retrieved_kinds=kinds)
        batch = _batch(list(scored.reward), list(scored.weight))
        return np.array([a[-1].item() for a in weighted_advantages(batch)]), np.asarray(scored.weight)

    a4, w4 = advantages(4.0)
    a8, w8 = advantages(8.0)
    np.testing.assert_array_equal(w4, [4.0] * n + [1.0] * n)
    np.testing.assert_array_equal(w8, [8.0] * n + [1.0] * n)
    assert np.all(a4[:n] != 0)
    np.testing.assert_allclose(a8[:n], 2 * a4[:n], rtol=1e-6)
    np.testing.assert_array_equal(a8[n:], a4[n:])  # the other agent is untouched


def test_loss_equals_verl_functions_on_the_same_tensors():
    """Our step's loss vs. verl's core functions called by hand on padded tensors from a plain forward."""
    from membuilder.training.rehearse_step import AdrpoStep, StepConfig
    from verl.trainer.ppo.core_algos import agg_loss, compute_policy_loss_vanilla, kl_penalty

    policy = tiny_smollm2()
    ref = tiny_smollm2(seed=5)  # a different reference, so the KL term is not zero
    cfg = StepConfig(kl_coef=0.3, temperature=0.8)
    rewards = [1.0, 0.0, 0.5, 0.25, 0.9, 0.1, 0.0, 0.6]
    weights = [4.0, 4.0, 4.0, 4.0, 1.0, 0.0, 1.0, 1.0]
    batch = _batch(rewards, weights, [w != 0 for w in weights])
    step = AdrpoStep(policy, ref, cfg)
    loss, metrics, _data, adv = step.loss(batch)

    # The same quantities computed directly: one sequence at a time, no padding.
    def logp(model, i):
        p, r = batch.prompt_ids[i], batch.response_ids[i]
        ids = torch.cat([p, r]).unsqueeze(0)
        logits = model(input_ids=ids).logits[0].float() / cfg.temperature
        lp = torch.log_softmax(logits[len(p) - 1 : -1], dim=-1)
        return lp.gather(-1, r.unsqueeze(-1)).squeeze(-1)

    width = max(len(r) for r in batch.response_ids)

    def pad(rows):
        return torch.stack([torch.nn.functional.pad(x, (0, width - len(x))) for x in rows])

    with torch.no_grad():
        new = pad([logp(policy, i) for i in range(len(batch))])
        refl = pad([logp(ref, i) for i in range(len(batch))])
    mask = pad([torch.full((len(r),), float(w != 0)) for r, w in zip(batch.response_ids, weights)]).bool()
    advantages = pad(adv)
    actor = step.actor_cfg
    actor.global_batch_info.clear()  # the hand-made call: token-mean over this batch's mask
    pg, _ = compute_policy_loss_vanilla(new.clone(), new, advantages, mask, "token-mean", actor)
    kl = agg_loss(kl_penalty(new, refl, "low_var_kl"), mask, "token-mean")
    expected = pg + cfg.kl_coef * kl
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    assert float(kl) > 1e-3
    assert metrics["kl_loss"].aggregate() == pytest.approx(float(kl), rel=1e-5)


def test_every_sample_masked_is_a_skipped_step():
    from membuilder.training.rehearse_step import AdrpoStep, StepConfig

    policy = tiny_smollm2()
    before = [p.detach().clone() for p in policy.parameters()]
    step = AdrpoStep(policy, None, StepConfig(kl_coef=0.0))
    m = step.step(_batch([0.0, 0.0], [0.0, 0.0], [False, False], n=2))
    assert m.skipped == "every sample has weight 0" and m.trained_samples == 0
    assert all(torch.equal(a, b) for a, b in zip(before, policy.parameters()))


@pytest.mark.parametrize("micro", [1, 3])
def test_micro_batches_accumulate_the_whole_batchs_gradient(micro):
    """verl's micro-batching: each part normalised by the whole batch's tokens, gradients summed."""
    from membuilder.training.rehearse_step import AdrpoStep, StepConfig

    rewards = [1.0, 0.0, 0.5, 0.25, 0.9, 0.1, 0.0, 0.6]
    weights = [4.0, 4.0, 0.0, 4.0, 1.0, 1.0, 1.0, 0.0]
    batch = _batch(rewards, weights, [w != 0 for w in weights])
    ref = tiny_smollm2(seed=5)
    runs = {}
    for size in (0, micro):
        policy = tiny_smollm2()
        step = AdrpoStep(policy, ref, StepConfig(kl_coef=0.3, micro_batch_size=size, grad_clip=1e9))
        step.optimizer.step = lambda: None  # compare the accumulated gradients, not AdamW's update
        runs[size] = (step.step(batch), _grads(policy))
    (whole, g_whole), (parts, g_parts) = runs[0], runs[micro]
    assert parts.trained_samples == whole.trained_samples == 6
    assert parts.loss == pytest.approx(whole.loss, rel=1e-5, abs=1e-7)
    assert parts.kl == pytest.approx(whole.kl, rel=1e-5) and parts.kl > 0
    assert parts.grad_norm == pytest.approx(whole.grad_norm, rel=1e-5)
    assert set(g_parts) == set(g_whole)
    for name in g_whole:
        torch.testing.assert_close(g_parts[name], g_whole[name], rtol=1e-4, atol=1e-7)
