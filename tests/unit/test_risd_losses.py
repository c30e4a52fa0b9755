"""RISD loss (methods.md §3): forward KL = soft-label CE - teacher entropy, by hand; n-sample averaging; gradient."""

import math

import pytest
import torch

from zray.losses.risd import risd_loss

K = 9


def _half_half() -> torch.Tensor:
    """q_T with mass 0.5 on bins 0 and 1, none elsewhere (teacher zeros: 0 log 0 = 0)."""
    q = torch.zeros(1, K, dtype=torch.float64)
    q[0, :2] = 0.5
    return q


def _random_q(batch: int, seed: int, *lead: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(2.0 * torch.randn(batch, *lead, K, generator=gen, dtype=torch.float64), dim=-1)


def test_uniform_student_by_hand():
    # q_S uniform: CE = log 9, H(q_T) = log 2, KL = log 9 - log 2 = log 4.5
    loss, metrics = risd_loss(torch.zeros(1, K, dtype=torch.float64), _half_half())
    assert loss.item() == pytest.approx(math.log(4.5), abs=1e-12)
    assert metrics["ce"] == pytest.approx(math.log(9), abs=1e-12)
    assert metrics["teacher_entropy"] == pytest.approx(math.log(2), abs=1e-12)
    assert metrics["student_entropy"] == pytest.approx(math.log(9), abs=1e-12)
    assert metrics["mu_teacher"] == pytest.approx(1.25) and metrics["mu_student"] == pytest.approx(3.0)
    assert metrics["mu_abs_err"] == pytest.approx(1.75)


def test_equals_soft_label_ce_minus_teacher_entropy():
    logits = torch.randn(4, K, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    q_T = _random_q(4, 2)
    loss, metrics = risd_loss(logits, q_T)
    ce = -(q_T * torch.log_softmax(logits, -1)).sum(-1).mean()
    entropy = -(q_T * q_T.log()).sum(-1).mean()
    assert loss.item() == pytest.approx((ce - entropy).item(), abs=1e-12)
    assert metrics["ce"] == pytest.approx(ce.item(), abs=1e-12)
    assert metrics["teacher_entropy"] == pytest.approx(entropy.item(), abs=1e-12)
    assert loss.item() > 0


def test_zero_when_student_equals_teacher_with_teacher_zeros():
    q_T = _half_half().repeat(2, 1)
    logits = q_T.log().requires_grad_(True)  # -inf where the teacher has no mass
    loss, _ = risd_loss(logits, q_T)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().max() == 0.0
    # log-probs of the score tokens over a full vocabulary (not normalised over the nine) give the same loss
    shifted, _ = risd_loss(_random_q(3, 5).log() - 2.5, _random_q(3, 5))
    assert shifted.item() == pytest.approx(0.0, abs=1e-12)


def test_n_sample_averaging():
    one_hots = torch.zeros(1, 2, K, dtype=torch.float64)
    one_hots[0, 0, 0] = one_hots[0, 1, 1] = 1.0  # two reasoning samples, each sure of a different bin
    loss, metrics = risd_loss(torch.zeros(1, K, dtype=torch.float64), one_hots)
    assert loss.item() == pytest.approx(math.log(4.5), abs=1e-12)  # the KL to their mean, not the mean KL (log 9)
    assert metrics["teacher_entropy"] == pytest.approx(math.log(2), abs=1e-12)
    logits = torch.randn(3, K, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    q_BnK = _random_q(3, 4, 5)
    assert risd_loss(logits, q_BnK)[0].item() == pytest.approx(risd_loss(logits, q_BnK.mean(1))[0].item(), abs=1e-12)
    assert risd_loss(logits, q_BnK[:, :1])[0].item() == pytest.approx(risd_loss(logits, q_BnK[:, 0])[0].item(),
                                                                      abs=1e-12)


def test_gradient_is_softmax_minus_teacher():
    batch = 5
    logits = torch.randn(batch, K, dtype=torch.float64, generator=torch.Generator().manual_seed(6)).requires_grad_()
    q_T = _random_q(batch, 7, 3)
    loss, _ = risd_loss(logits, q_T)
    loss.backward()
    expected = (torch.softmax(logits.detach(), -1) - q_T.mean(1)) / batch
    assert torch.allclose(logits.grad, expected, atol=1e-12)


def test_teacher_gets_no_gradient():
    q_T = _random_q(2, 8).requires_grad_()
    logits = torch.zeros(2, K, dtype=torch.float64, requires_grad=True)
    risd_loss(logits, q_T)[0].backward()
    assert q_T.grad is None and logits.grad is not None


def test_bf16_student_is_upcast():
    logits = torch.randn(2, K, generator=torch.Generator().manual_seed(9))
    q_T = _random_q(2, 10).float()
    loss16, _ = risd_loss(logits.bfloat16(), q_T)
    assert loss16.dtype == torch.float32
    assert loss16.item() == pytest.approx(risd_loss(logits.bfloat16().float(), q_T)[0].item(), abs=1e-6)


@pytest.mark.parametrize("student, teacher, match", [
    ((2, 8), (2, 9), r"student logits shape \(2, 8\): expected \(B, 9\)"),
    ((2, 1, 9), (2, 9), r"student logits shape \(2, 1, 9\)"),
    ((2, 9), (3, 9), r"teacher q shape \(3, 9\): expected \(2, 9\) or \(2, n, 9\)"),
    ((2, 9), (2, 9, 1), r"teacher q shape \(2, 9, 1\)"),
    ((2, 9), (2, 0, 9), r"at least one sample"),
    ((2, 9), (2, 1, 2, 9), r"teacher q shape \(2, 1, 2, 9\)"),
])
def test_shape_errors(student, teacher, match):
    q = torch.full(teacher, 1.0 / K)
    with pytest.raises(ValueError, match=match):
        risd_loss(torch.zeros(student), q)


def test_teacher_not_a_distribution():
    with pytest.raises(ValueError, match="sum to 1"):
        risd_loss(torch.zeros(1, K), torch.full((1, K), 0.2))
    bad = torch.full((1, K), 1.0 / K)
    bad[0, 0] = -bad[0, 0]
    with pytest.raises(ValueError, match="negative or non-finite"):
        risd_loss(torch.zeros(1, K), bad)
