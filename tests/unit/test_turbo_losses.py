"""zray.losses.turbo: Turbo++ hinge GAN, step-1 regression and the generator loss, against hand-computed values."""

import pytest
import torch

from zray.losses.turbo import (adversarial_loss, decayed_weight, discriminator_hinge_loss, generator_loss,
                               regression_loss, step1_regression_loss)


def test_hinge_discriminator_loss_by_hand():
    real = torch.tensor([2.0, 0.5, -1.0])   # relu(1 - r) = 0, 0.5, 2   -> mean 2.5 / 3
    fake = torch.tensor([-3.0, 0.0])        # relu(1 + f) = 0, 1        -> mean 0.5
    loss, m = discriminator_hinge_loss(real, fake)
    assert loss.item() == pytest.approx(2.5 / 3 + 0.5)
    assert m["d_real_term"] == pytest.approx(2.5 / 3) and m["d_fake_term"] == pytest.approx(0.5)
    assert m["d_real_mean"] == pytest.approx(0.5) and m["d_fake_mean"] == pytest.approx(-1.5)
    assert m["d_real_acc"] == pytest.approx(2 / 3) and m["d_fake_acc"] == pytest.approx(0.5)
    assert m["d_loss"] == pytest.approx(loss.item())


def test_hinge_is_zero_beyond_the_margins_and_gradients_by_hand():
    loss, _ = discriminator_hinge_loss(torch.tensor([1.0, 5.0]), torch.tensor([-1.0, -4.0]))
    assert loss.item() == 0.0
    real = torch.tensor([0.0, 2.0], requires_grad=True)
    fake = torch.tensor([0.5, -2.0], requires_grad=True)
    discriminator_hinge_loss(real, fake)[0].backward()
    assert real.grad.tolist() == [-0.5, 0.0] and fake.grad.tolist() == [0.5, 0.0]


def test_adversarial_loss_by_hand():
    fake = torch.tensor([1.0, -3.0, 0.5, 0.5], requires_grad=True)
    loss, m = adversarial_loss(fake)
    assert loss.item() == pytest.approx(0.25) and m["adv_loss"] == pytest.approx(0.25)
    loss.backward()
    assert fake.grad.tolist() == [-0.25] * 4


def test_step1_regression_by_hand_and_target_is_detached():
    x_s2 = torch.tensor([[[[1.0, 2.0]]], [[[0.0, -1.0]]]], requires_grad=True)  # (2, 1, 1, 2)
    target = torch.tensor([[[[0.0, 0.0]]], [[[1.0, 1.0]]]], requires_grad=True)
    loss, m = step1_regression_loss(x_s2, target)
    assert loss.item() == pytest.approx((1 + 4 + 1 + 4) / 4) and m["step1_loss"] == pytest.approx(2.5)
    loss.backward()
    assert target.grad is None
    torch.testing.assert_close(x_s2.grad, 2 * (x_s2 - target).detach() / 4)


def test_generator_loss_combines_the_terms():
    fake = torch.tensor([1.0, 3.0])                         # L_adv = -2
    x_s2, mid = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)   # L_1 = 1
    x0_2, x0_t = torch.full((2, 1, 2, 2), 3.0), torch.ones(2, 1, 2, 2)  # L_reg = 4
    loss, m = generator_loss(fake, x_s2_BCHW=x_s2, teacher_mid_BCHW=mid, x0_2_BCHW=x0_2, teacher_x0_BCHW=x0_t,
                             lam_adv=0.5, lam_1=2.0, lam_reg=0.25)
    assert loss.item() == pytest.approx(0.5 * -2 + 2.0 * 1 + 0.25 * 4)
    assert m == pytest.approx({"adv_loss": -2.0, "d_fake_mean": 2.0, "step1_loss": 1.0, "reg_loss": 4.0,
                               "g_loss": 2.0})
    loss, m = generator_loss(fake, step1="adversarial", step1_fake_logits_B=torch.tensor([-1.0, 0.0]),
                             lam_adv=1.0, lam_1=3.0)
    assert loss.item() == pytest.approx(-2.0 + 3.0 * 0.5) and m["step1_loss"] == pytest.approx(0.5)
    loss, m = generator_loss(fake, step1="none", lam_1=5.0)
    assert loss.item() == pytest.approx(-2.0) and "step1_loss" not in m


def test_generator_loss_gradients_reach_both_steps_latents():
    fake = torch.tensor([0.3, -0.2], requires_grad=True)
    x_s2 = torch.randn(2, 3, 2, 2, requires_grad=True)
    loss, _ = generator_loss(fake, x_s2_BCHW=x_s2, teacher_mid_BCHW=torch.zeros(2, 3, 2, 2), lam_1=0.0)
    loss.backward()
    assert fake.grad.tolist() == [-0.5, -0.5]
    assert torch.equal(x_s2.grad, torch.zeros_like(x_s2))  # lam_1 = 0: in the graph, no contribution


def test_decayed_weight():
    assert decayed_weight(0, 2.0, 0) == 2.0 and decayed_weight(10**6, 2.0, 0) == 2.0
    assert decayed_weight(0, 2.0, 4) == 2.0
    assert decayed_weight(1, 2.0, 4) == pytest.approx(1.5)
    assert decayed_weight(4, 2.0, 4) == 0.0 and decayed_weight(9, 2.0, 4) == 0.0
    with pytest.raises(ValueError, match="decay_steps=-1"):
        decayed_weight(0, 1.0, -1)
    with pytest.raises(ValueError, match="step=-2"):
        decayed_weight(-2, 1.0, 3)


def test_errors_name_the_layout():
    with pytest.raises(ValueError, match=r"real_logits_B has shape \(2, 1\): expected \(B,\)"):
        discriminator_hinge_loss(torch.zeros(2, 1), torch.zeros(2))
    with pytest.raises(ValueError, match=r"fake_logits_B has shape \(0,\)"):
        adversarial_loss(torch.zeros(0))
    with pytest.raises(ValueError, match=r"step1: prediction has shape \(2, 1, 2, 2\)"
                       r" but its target has \(2, 1, 2, 1\)"):
        step1_regression_loss(torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 1))
    with pytest.raises(ValueError, match="reg: prediction"):
        regression_loss(torch.zeros(1, 2), torch.zeros(2, 1), "reg")
    fake = torch.zeros(2)
    with pytest.raises(ValueError, match="step1='regression' needs x_s2_BCHW"):
        generator_loss(fake)
    with pytest.raises(ValueError, match="step1='none' does not use x_s2_BCHW"):
        generator_loss(fake, step1="none", x_s2_BCHW=torch.zeros(2, 1, 1, 1))
    with pytest.raises(ValueError, match="step1='adversarial' needs step1_fake_logits_B"):
        generator_loss(fake, step1="adversarial")
    with pytest.raises(ValueError, match="step1='gan' is not allowed"):
        generator_loss(fake, step1="gan")
    with pytest.raises(ValueError, match="lam_reg=0.5 needs x0_2_BCHW"):
        generator_loss(fake, step1="none", lam_reg=0.5)
    with pytest.raises(ValueError, match="go together"):
        generator_loss(fake, step1="none", x0_2_BCHW=torch.zeros(2, 1, 1, 1))
    with pytest.raises(ValueError, match="lam_adv=-1"):
        generator_loss(fake, step1="none", lam_adv=-1)
