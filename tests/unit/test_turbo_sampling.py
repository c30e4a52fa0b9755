"""zray.sampling's Turbo++ part: the 2-step student sampler and the teacher's intermediate state (methods.md §6)."""

import pytest
import torch

from zray.sampling import (TURBO_SIGMA_2, flow_sigmas, sample, teacher_state, turbo_step1, turbo_step2,
                           two_step_sample)


def perfect_predictor(x0):
    """A model_fn that knows x0: from any x_sigma it returns the exact velocity u = (x0 - x_sigma) / sigma."""
    def fn(x, t, cond):
        sigma = (1.0 - t).view(-1, *([1] * (x.ndim - 1)))
        return (x0 - x) / sigma
    return fn


def toy_model(scale):
    """A deterministic non-trivial model_fn: depends on x, t and cond."""
    def fn(x, t, cond):
        return torch.tanh(scale * x + t.view(-1, 1, 1, 1)) + cond
    return fn


def test_sigma_2_is_the_eight_step_teachers_state_after_four_steps():
    assert TURBO_SIGMA_2 == 0.75
    assert flow_sigmas(8, 3.0)[4].item() == TURBO_SIGMA_2
    assert flow_sigmas(2, 3.0)[1].item() == TURBO_SIGMA_2


@pytest.mark.parametrize("sigma_2", [0.75, 0.5, 0.3])
def test_two_step_sampler_recovers_x0_with_a_perfect_predictor(sigma_2):
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 6, 6, generator=gen)
    eps = torch.randn(3, 4, 6, 6, generator=gen)
    fn = perfect_predictor(x0)
    x0_1, x_s2, x0_2 = two_step_sample(fn, fn, eps, None, sigma_2=sigma_2)
    torch.testing.assert_close(x0_1, x0)
    torch.testing.assert_close(x_s2, (1 - sigma_2) * x0 + sigma_2 * eps)
    torch.testing.assert_close(x0_2, x0)


def test_steps_by_hand():
    eps = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    f1, f2 = toy_model(0.5), toy_model(-1.5)
    x0_1, x_s2, x0_2 = two_step_sample(f1, f2, eps, 0.1, sigma_2=0.75)
    u1 = f1(eps, torch.zeros(2), 0.1)
    torch.testing.assert_close(x0_1, eps + u1)
    torch.testing.assert_close(x_s2, 0.25 * (eps + u1) + 0.75 * eps)
    torch.testing.assert_close(x0_2, x_s2 + 0.75 * f2(x_s2, torch.full((2,), 0.25), 0.1))
    torch.testing.assert_close(turbo_step1(f1, eps, 0.1), x0_1)
    torch.testing.assert_close(turbo_step2(f2, x_s2, 0.75, 0.1), x0_2)


def test_fresh_renoise_knob():
    gen = torch.Generator().manual_seed(2)
    eps, fresh = torch.randn(2, 3, 4, 4, generator=gen), torch.randn(2, 3, 4, 4, generator=gen)
    x0_1, x_s2, _ = two_step_sample(toy_model(1.0), toy_model(1.0), eps, 0.0, renoise=fresh)
    torch.testing.assert_close(x_s2, 0.25 * x0_1 + 0.75 * fresh)


def test_models_are_called_with_t_equal_one_minus_sigma():
    seen = []

    def fn(x, t, cond):
        seen.append(t.clone())
        return torch.zeros_like(x)

    two_step_sample(fn, fn, torch.zeros(3, 1, 2, 2), None, sigma_2=0.6)
    assert [t.tolist() for t in seen] == [[0.0] * 3, pytest.approx([0.4] * 3)]


@pytest.mark.parametrize("detach", [False, True])
def test_detach_knob_cuts_step_one_from_the_final_loss(detach):
    w1, w2 = torch.tensor(0.3, requires_grad=True), torch.tensor(-0.7, requires_grad=True)
    eps = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    f1 = lambda x, t, c: torch.tanh(w1 * x)  # noqa: E731
    f2 = lambda x, t, c: torch.tanh(w2 * x)  # noqa: E731
    _, _, x0_2 = two_step_sample(f1, f2, eps, None, detach_steps=detach)
    x0_2.square().mean().backward()
    assert w2.grad is not None and w2.grad != 0
    if detach:
        assert w1.grad is None
    else:
        assert w1.grad is not None and w1.grad != 0


def test_teacher_state_is_the_fifth_latent_of_the_eight_step_trajectory_bit_for_bit():
    gen = torch.Generator().manual_seed(4)
    eps = torch.randn(2, 4, 8, 8, generator=gen)
    cond = torch.randn(2, 4, 8, 8, generator=gen) * 0.1
    fn = toy_model(0.8)
    sigmas = flow_sigmas(8, 3.0)
    final, trajectory = sample(fn, eps, sigmas, cond, return_trajectory=True)
    mid = teacher_state(fn, eps, sigmas, cond, num_steps=4)
    assert torch.equal(mid, trajectory[4])
    assert torch.equal(teacher_state(fn, eps, sigmas, cond, num_steps=8), final)
    assert not torch.equal(mid, trajectory[3])


def test_argument_errors():
    fn = toy_model(1.0)
    eps = torch.zeros(2, 3, 4, 4)
    for bad in (0.0, 1.0, -0.2, 1.5):
        with pytest.raises(ValueError, match=f"sigma_2={bad}"):
            two_step_sample(fn, fn, eps, 0.0, sigma_2=bad)
    with pytest.raises(ValueError, match=r"renoise has shape \(2, 3, 4\)"):
        two_step_sample(fn, fn, eps, 0.0, renoise=torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match=r"step 1 model output has shape \(2, 3\)"):
        two_step_sample(lambda x, t, c: x[:, :, 0, 0], fn, eps, 0.0)
    with pytest.raises(ValueError, match=r"step 2 model output"):
        two_step_sample(fn, lambda x, t, c: x[:1], eps, 0.0)
    sigmas = flow_sigmas(8, 3.0)
    for bad in (0, 9, 2.0):
        with pytest.raises(ValueError, match=f"num_steps={bad!r}.*\\[1, 8\\]"):
            teacher_state(fn, eps, sigmas, 0.0, num_steps=bad)
    with pytest.raises(ValueError, match="sigmas has shape"):
        teacher_state(fn, eps, torch.tensor([1.0]), 0.0, num_steps=1)
