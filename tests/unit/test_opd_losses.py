"""OPD loss (methods.md §3): hand-computed value and gradient, zero gradient on agreement, masking."""

import math

import pytest
import torch

from zray.losses.opd import opd_loss


def test_zero_gradient_when_teacher_agrees():
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.1], [0.9, 0.3, 0.7]], dtype=torch.float64)).requires_grad_()
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    loss, metrics = opd_loss(logp, logp.detach(), logp.detach(), mask)
    loss.backward()
    assert loss.item() == 0.0 and logp.grad.abs().max() == 0.0
    assert metrics["advantage_mean"] == 0.0 and metrics["reverse_kl"] == 0.0 and metrics["tokens"] == 5.0


def test_small_case_by_hand():
    # seq 0: 2 tokens, A = (-1 - -2, -3 - -1) = (1, -2), logp = (-1.5, -0.5)
    #   L_0 = -(1/2) (1 * -1.5 + -2 * -0.5) = -(1/2)(-0.5) = 0.25
    # seq 1: 1 token (the second is padding), A = (-0.5 - -1.0) = 0.5, logp = -2.0: L_1 = -(0.5 * -2.0) = 1.0
    logp = torch.tensor([[-1.5, -0.5], [-2.0, -7.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-2.0, -1.0], [-1.0, -9.0]], dtype=torch.float64)
    teacher = torch.tensor([[-1.0, -3.0], [-0.5, -1.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    loss, metrics = opd_loss(logp, old, teacher, mask)
    assert loss.item() == pytest.approx((0.25 + 1.0) / 2)
    loss.backward()
    # dL/dlogp[b, t] = -A[b, t] / (T_b * num_sequences)
    expected = torch.tensor([[-1 / 4, 2 / 4], [-0.5 / 2, 0.0]], dtype=torch.float64)
    assert torch.allclose(logp.grad, expected)
    assert metrics["tokens"] == 3.0
    assert metrics["advantage_mean"] == pytest.approx((1 - 2 + 0.5) / 3)
    assert metrics["reverse_kl"] == pytest.approx(-(1 - 2 + 0.5) / 3)
    assert metrics["loss"] == pytest.approx(0.625)


def test_masked_tokens_contribute_nothing():
    gen = torch.Generator().manual_seed(0)
    logp, old, teacher = (-torch.rand(3, 4, generator=gen, dtype=torch.float64) * 3 for _ in range(3))
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    base, _ = opd_loss(logp, old, teacher, mask)
    junk = [t.clone() for t in (logp, old, teacher)]
    for t, value in zip(junk, (-math.inf, math.nan, 123.0)):
        t[~mask] = value
    cur = junk[0].requires_grad_()
    loss, metrics = opd_loss(cur, junk[1], junk[2], mask)
    loss.backward()
    assert loss.item() == pytest.approx(base.item(), abs=1e-12)
    assert torch.isfinite(cur.grad).all() and (cur.grad[~mask] == 0).all()
    assert metrics["tokens"] == 6.0 and math.isfinite(metrics["advantage_mean"])


def test_per_sequence_mean_then_mean_over_sequences():
    # each sequence's loss is a token mean, so a long sequence weighs as much as a short one
    logp = torch.tensor([[-1.0, -1.0, -1.0, -1.0], [-1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    old = torch.zeros_like(logp)
    teacher = torch.full_like(logp, 1.0)  # A = 1 everywhere
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    loss, _ = opd_loss(logp, old, teacher, mask)
    assert loss.item() == pytest.approx(1.0)  # both sequences: -(1/T) sum 1 * -1 = 1
    # a sequence with no tokens is left out of the mean
    empty = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]])
    assert opd_loss(logp, old, teacher, empty)[0].item() == pytest.approx(1.0)


def test_no_gradient_to_old_or_teacher():
    logp = torch.full((1, 2), -1.0, requires_grad=True)
    old = torch.full((1, 2), -1.2, requires_grad=True)
    teacher = torch.full((1, 2), -0.8, requires_grad=True)
    opd_loss(logp, old, teacher, torch.ones(1, 2))[0].backward()
    assert old.grad is None and teacher.grad is None and logp.grad is not None


@pytest.mark.parametrize("shapes", [((2, 3), (2, 3), (2, 3), (2, 4)), ((2, 3), (2, 2), (2, 3), (2, 3)),
                                    ((6,), (6,), (6,), (6,))])
def test_shape_errors(shapes):
    with pytest.raises(ValueError, match=r"shape mismatch.*expected all equal \(B, T\)"):
        opd_loss(*(torch.zeros(s) for s in shapes))
