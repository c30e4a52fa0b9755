"""GDSO and GRPO losses (methods.md §2): hand-computed values, the invariants, finite-difference gradients."""

import math

import pytest
import torch

from zray.losses.gdso import (
    gdso_loss,
    gdso_rewards,
    pairwise_gap_loss,
    pairwise_gap_rewards,
    pointwise_ce_loss,
    pointwise_rewards,
    side_advantages,
)
from zray.losses.grpo import group_advantages, grpo_policy_loss, k3_kl

# One pair, G = 2: s_w = 4.0, s_l = 2.0, mu_w = [4.0, 3.0], mu_l = [2.0, 3.0]; R = 4.
MU = torch.tensor([[[4.0, 3.0], [2.0, 3.0]]], dtype=torch.float64)
LABELS = torch.tensor([[4.0, 2.0]], dtype=torch.float64)


def test_pointwise_rewards_by_hand():
    expected = torch.tensor([[[1.0, 0.75], [1.0, 0.75]]], dtype=torch.float64)
    assert torch.allclose(pointwise_rewards(MU, LABELS), expected)


def test_pairwise_gap_rewards_by_hand():
    # w,0: |(4-2)-2| + |(4-3)-2| = 1 -> 1 - 1/8; w,1: |1-2| + |0-2| = 3 -> 1 - 3/8; the loser side mirrors it.
    expected = torch.tensor([[[0.875, 0.625], [0.875, 0.625]]], dtype=torch.float64)
    assert torch.allclose(pairwise_gap_rewards(MU, LABELS), expected)


def test_total_rewards_and_side_advantages_by_hand():
    rewards = gdso_rewards(MU, LABELS, lam_pt=1.0, lam_pw=1.0)
    assert torch.allclose(rewards, torch.tensor([[[1.875, 1.375], [1.875, 1.375]]], dtype=torch.float64))
    adv = side_advantages(rewards, eps=0.0)
    # mean 1.625, unbiased std 0.5 / sqrt(2) -> +-1/sqrt(2)
    assert torch.allclose(adv, torch.tensor([[[1, -1], [1, -1]]], dtype=torch.float64) / math.sqrt(2))
    weighted = gdso_rewards(MU, LABELS, lam_pt=0.5, lam_pw=0.0)
    assert torch.allclose(weighted, 0.5 * pointwise_rewards(MU, LABELS))


def test_advantages_are_per_side():
    rewards = torch.tensor([[[1.0, 0.0, 0.5], [10.0, 10.0, 10.0]]])
    adv = side_advantages(rewards)
    assert torch.allclose(adv[0, 0].mean(), torch.tensor(0.0), atol=1e-6)
    assert torch.equal(adv[0, 1], torch.zeros(3))  # equal rewards in a group: zero advantage
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(torch.ones(3, 1))


def test_pairwise_gap_loss_by_hand_and_zero_exactly_at_the_labelled_gap():
    # Cross errors: w side [0, 1, 1, 2], l side the same: 8 / (2 * G^2 * R) = 8 / 32.
    assert pairwise_gap_loss(MU, LABELS).item() == pytest.approx(0.25)
    exact = torch.tensor([[[3.7, 3.7, 3.7], [1.7, 1.7, 1.7]]], dtype=torch.float64)  # every difference = 2.0
    assert pairwise_gap_loss(exact, LABELS).item() == pytest.approx(0.0, abs=1e-12)
    for i in range(3):
        for side in range(2):
            moved = exact.clone()
            moved[0, side, i] += 0.1
            assert pairwise_gap_loss(moved, LABELS).item() > 1e-3
    # A larger margin than labelled is penalised too (not Bradley-Terry).
    wider = torch.tensor([[[5.0, 5.0, 5.0], [1.0, 1.0, 1.0]]], dtype=torch.float64)
    assert pairwise_gap_loss(wider, LABELS).item() == pytest.approx(2.0 / 4.0)


def test_pointwise_ce_by_hand():
    q = torch.full((1, 2, 2, 9), 0.05, dtype=torch.float64)
    q[0, 0, :, 6] = 0.6  # label 4.0 has index 6
    q[0, 1, 0, 2] = 0.6  # label 2.0 has index 2
    q[0, 1, 1, 2] = 0.6
    q = q / q.sum(-1, keepdim=True)
    expected = -torch.log(q[0, 0, :, 6]).sum() - torch.log(q[0, 1, :, 2]).sum()
    loss = pointwise_ce_loss(q.log(), torch.tensor([[6, 2]]))
    assert loss.item() == pytest.approx(expected.item() / 4)


def test_k3_kl_by_hand():
    cur = torch.log(torch.tensor([0.5, 0.5]))
    ref = torch.log(torch.tensor([0.5, 0.25]))
    assert torch.allclose(k3_kl(cur, ref), torch.tensor([0.0, 0.5 + math.log(2) - 1]))


def test_grpo_policy_loss_by_hand():
    logp = torch.log(torch.tensor([[0.5, 0.5]], dtype=torch.float64))
    old = torch.log(torch.tensor([[0.4, 0.5]], dtype=torch.float64))
    ref = torch.log(torch.tensor([[0.5, 0.25]], dtype=torch.float64))
    mask = torch.ones(1, 2, dtype=torch.float64)
    adv = torch.tensor([1.0], dtype=torch.float64)
    kl_2 = 0.5 + math.log(2) - 1
    # ratio [1.25, 1.0] -> clipped [1.2, 1.0]; policy per token [-1.2, -1.0]
    loss, metrics = grpo_policy_loss(logp, old, ref, adv, mask, clip_eps=0.2, beta=0.1, aggregation="sum")
    assert loss.item() == pytest.approx(-2.2 + 0.1 * kl_2)
    assert metrics["clip_frac"] == pytest.approx(0.5)
    loss_mean, _ = grpo_policy_loss(logp, old, ref, adv, mask, clip_eps=0.2, beta=0.1, aggregation="mean")
    assert loss_mean.item() == pytest.approx((-2.2 + 0.1 * kl_2) / 2)
    padded_mask = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    loss_pad, _ = grpo_policy_loss(logp, old, ref, adv, padded_mask, clip_eps=0.2, beta=0.1)
    assert loss_pad.item() == pytest.approx(-1.2)


def test_clipping_stops_the_gradient_outside_the_trust_region():
    logp = torch.log(torch.tensor([[0.6], [0.3]], dtype=torch.float64)).requires_grad_()
    old = torch.log(torch.tensor([[0.4], [0.5]], dtype=torch.float64))  # ratios 1.5 (A > 0) and 0.6 (A < 0)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    loss, _ = grpo_policy_loss(logp, old, old, adv, torch.ones(2, 1, dtype=torch.float64), clip_eps=0.2, beta=0.0)
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros_like(logp))


def _rollout(seed: int, pairs: int = 2, group: int = 3, tokens: int = 4):
    gen = torch.Generator().manual_seed(seed)
    shape = (pairs, 2, group, tokens)
    logp = (-torch.rand(shape, generator=gen, dtype=torch.float64) - 0.1).requires_grad_()
    old = logp.detach() + 0.05 * torch.randn(shape, generator=gen, dtype=torch.float64)
    ref = logp.detach() + 0.05 * torch.randn(shape, generator=gen, dtype=torch.float64)
    mask = torch.ones(shape, dtype=torch.float64)
    mask[..., -1] = (torch.rand(shape[:3], generator=gen) > 0.5).double()
    logits = torch.randn(pairs, 2, group, 9, generator=gen, dtype=torch.float64).requires_grad_()
    labels = torch.tensor([[4.5, 2.0], [3.0, 1.5]], dtype=torch.float64)[:pairs]
    return logp, old, ref, mask, logits, labels


def test_alpha_zero_reduces_gdso_to_grpo_with_expectation_rewards():
    logp, old, ref, mask, logits, labels = _rollout(0)
    log_q = torch.log_softmax(logits, -1)
    mu = (log_q.exp() * torch.arange(1.0, 5.01, 0.5, dtype=torch.float64)).sum(-1)
    adv = side_advantages(gdso_rewards(mu, labels, lam_pt=1.0, lam_pw=0.0))
    gdso, _ = gdso_loss(logp_P2GT=logp, old_logp_P2GT=old, ref_logp_P2GT=ref, mask_P2GT=mask, advantages_P2G=adv,
                        log_q_P2GK=log_q, labels_P2=labels, alpha_pt=0.0, alpha_pw=0.0)
    grpo, _ = grpo_policy_loss(logp.flatten(0, 2), old.flatten(0, 2), ref.flatten(0, 2), adv.flatten(),
                               mask.flatten(0, 2))
    assert gdso.item() == pytest.approx(grpo.item(), rel=1e-12)
    gdso.backward()
    assert logits.grad is None or torch.equal(logits.grad, torch.zeros_like(logits))


def test_equal_rewards_give_zero_policy_gradient():
    logp, old, ref, mask, _, _ = _rollout(1)
    adv = side_advantages(torch.full((2, 2, 3), 0.7, dtype=torch.float64))
    loss, _ = grpo_policy_loss(logp.flatten(0, 2), old.flatten(0, 2), ref.flatten(0, 2), adv.flatten(),
                               mask.flatten(0, 2), beta=0.0)
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros_like(logp))


def test_direct_terms_add_to_the_policy_term():
    logp, old, ref, mask, logits, labels = _rollout(2)
    log_q = torch.log_softmax(logits, -1)
    adv = torch.zeros(2, 2, 3, dtype=torch.float64)
    loss, metrics = gdso_loss(logp_P2GT=logp, old_logp_P2GT=old, ref_logp_P2GT=ref, mask_P2GT=mask,
                              advantages_P2G=adv, log_q_P2GK=log_q, labels_P2=labels, alpha_pt=0.5, alpha_pw=0.25)
    mu = (log_q.exp() * torch.arange(1.0, 5.01, 0.5, dtype=torch.float64)).sum(-1)
    index = torch.round((labels - 1.0) / 0.5).long()
    policy, _ = grpo_policy_loss(logp.flatten(0, 2), old.flatten(0, 2), ref.flatten(0, 2), adv.flatten(),
                                 mask.flatten(0, 2))
    expected = (policy.item() + 0.5 * pointwise_ce_loss(log_q, index).item()
                + 0.25 * pairwise_gap_loss(mu, labels).item())
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    assert metrics["ce_loss"] > 0 and metrics["pw_loss"] > 0


def test_finite_difference_gradients():
    logp, old, ref, mask, logits, labels = _rollout(3, pairs=1, group=2, tokens=3)
    adv = side_advantages(gdso_rewards(torch.rand(1, 2, 2, dtype=torch.float64) * 4 + 1, labels[:1]))

    def full(logp_, logits_):
        loss, _ = gdso_loss(logp_P2GT=logp_, old_logp_P2GT=old, ref_logp_P2GT=ref, mask_P2GT=mask,
                            advantages_P2G=adv, log_q_P2GK=torch.log_softmax(logits_, -1), labels_P2=labels[:1],
                            clip_eps=10.0, beta=0.1)  # wide clip: no kink near the evaluation point
        return loss

    assert torch.autograd.gradcheck(full, (logp, logits), eps=1e-6, atol=1e-6)
    mu = (torch.rand(1, 2, 3, dtype=torch.float64) * 4 + 1).requires_grad_()
    assert torch.autograd.gradcheck(lambda m: pairwise_gap_loss(m, labels[:1]), (mu,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("mu_shape, labels_shape", [((2, 3), (1, 2)), ((1, 3, 2), (1, 3)), ((1, 2, 2), (2, 2))])
def test_bad_shapes_name_the_expected_layout(mu_shape, labels_shape):
    with pytest.raises(ValueError, match="expected"):
        pairwise_gap_loss(torch.zeros(mu_shape), torch.zeros(labels_shape))


def test_penalize_malformed_sets_the_penalty_and_keeps_the_rest():
    from zray.losses.gdso import penalize_malformed, side_advantages

    rewards = torch.tensor([[[1.5, 1.2, 0.9], [1.0, 1.0, 1.0]]])
    ok = torch.tensor([[[True, False, True], [True, True, False]]])
    out = penalize_malformed(rewards, ok, 1.0)
    assert torch.allclose(out, torch.tensor([[[1.5, 0.2, 0.9], [1.0, 1.0, 0.0]]]))
    adv = side_advantages(out)
    assert adv[0, 1, 2] < 0 < adv[0, 1, 0]  # the malformed output is pushed down within its group
    all_bad = penalize_malformed(rewards, torch.zeros_like(ok), 1.0)  # still ranked by score quality
    assert torch.allclose(side_advantages(all_bad), side_advantages(rewards), atol=1e-5)
    with pytest.raises(ValueError, match="does not match"):
        penalize_malformed(rewards, ok[..., :2], 1.0)
