"""zray.losses.refl: the gradient window (ReFL over the whole schedule, DRaFT-K), the truncated sampler and the
reward loss, against hand-computed values."""

import pytest
import torch

from zray.losses.refl import aggregate_reward, check_weights, grad_window, refl_loss, truncated_sample
from zray.sampling import flow_sigmas, sample, two_step_sample


def _linear(a):
    """u = a * x (a scalar parameter), recording the times it was called with."""
    times = []

    def fn(x, t, cond):
        times.append(t.tolist())
        return a * x
    return fn, times


@pytest.mark.parametrize("first, last, x0, grad", [
    (1, 1, 3.0, 1.0),   # k = 1: x0_hat = eps + 1 * a eps = (1 + a) eps = 3; d/da = eps = 1
    (2, 2, 4.0, 1.0),   # k = 2: x1 = (1 + 0.5 a) eps = 2 (no grad); x0_hat = x1 + 0.5 a x1 = 4; d/da = 0.5 x1 = 1
    (1, 2, 4.0, 2.0),   # DRaFT-2: x0_hat = (1 + 0.5 a)^2 eps = 4; d/da = (1 + 0.5 a) eps = 2
    (3, 2, 4.0, None),  # first = last + 1: no gradient anywhere
])
def test_truncated_sample_by_hand(first, last, x0, grad):
    a = torch.tensor(2.0, requires_grad=True)
    fn, times = _linear(a)
    out = truncated_sample([fn, fn], torch.tensor([1.0, 0.5, 0.0]), torch.ones(1, 1, 1, 1), None, first=first,
                           last=last)
    assert out.item() == pytest.approx(x0)
    assert times == [[0.0], [0.5]][:last]  # the network sees t = 1 - sigma, one call per step up to `last`
    if grad is None:
        assert not out.requires_grad
    else:
        out.sum().backward()
        assert a.grad.item() == pytest.approx(grad)


def test_truncated_sample_runs_each_step_with_its_own_network():
    a1, a2 = torch.tensor(1.0, requires_grad=True), torch.tensor(3.0, requires_grad=True)
    f1, _ = _linear(a1)
    f2, _ = _linear(a2)
    # x1 = eps + 0.5 a1 eps = 1.5 (no grad); x0_hat = x1 (1 + 0.5 a2) = 3.75; only a2 gets gradient: 0.5 x1 = 0.75
    out = truncated_sample([f1, f2], torch.tensor([1.0, 0.5, 0.0]), torch.ones(1, 1, 1, 1), None, first=2, last=2)
    out.sum().backward()
    assert out.item() == pytest.approx(3.75) and a2.grad.item() == pytest.approx(0.75) and a1.grad is None


def test_full_window_equals_the_samplers():
    torch.manual_seed(0)
    weight = torch.randn(4, 4) * 0.3

    def fn(x, t, cond):
        return torch.einsum("dc,bchw->bdhw", weight, x) * (1 + t.view(-1, 1, 1, 1)) + cond

    noise, cond = torch.randn(2, 4, 3, 3), 0.1
    sigmas = flow_sigmas(8, 3.0)
    ours = truncated_sample([fn] * 8, sigmas, noise, cond, first=1, last=8)
    assert torch.allclose(ours, sample(fn, noise, sigmas, cond), atol=1e-6)
    # the Turbo++ student: 1 -> 0.75 -> 0 with the same eps re-noised is the 2-step Euler sampler
    g = lambda x, t, c: -0.5 * fn(x, t, c)  # noqa: E731
    _, _, x0_2 = two_step_sample(fn, g, noise, cond, sigma_2=0.75)
    assert torch.allclose(truncated_sample([fn, g], torch.tensor([1.0, 0.75, 0.0]), noise, cond, first=1, last=2),
                          x0_2, atol=1e-6)


def test_grad_window_refl_covers_the_whole_schedule_and_draft_k():
    gen = torch.Generator().manual_seed(0)
    draws = [grad_window(8, generator=gen) for _ in range(800)]
    assert all(first == last for first, last in draws)
    counts = torch.bincount(torch.tensor([k for k, _ in draws]), minlength=9)[1:]
    assert (counts > 60).all(), counts  # every step 1..8, about 100 each
    assert {grad_window(8, k_min=3, k_max=5, generator=gen)[0] for _ in range(200)} == {3, 4, 5}
    assert grad_window(8, k_min=2, k_max=2) == (2, 2)
    assert grad_window(8, draft_k=3) == (6, 8) and grad_window(2, draft_k=2) == (1, 2)
    assert {grad_window(2, generator=gen) for _ in range(50)} == {(1, 1), (2, 2)}  # the Turbo++ student


@pytest.mark.parametrize("kwargs, fragment", [
    ({"k_min": 0}, "k_min=0, k_max=0 are not allowed"),
    ({"k_min": 3, "k_max": 2}, "1 <= k_min <= k_max <= 8"),
    ({"k_max": 9}, "k_max=9 are not allowed"),
    ({"draft_k": 9}, "draft_k=9 is not allowed"),
])
def test_grad_window_errors_name_the_values(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        grad_window(8, **kwargs)


def test_refl_loss_by_hand():
    mu = torch.tensor([[3.0, 5.0], [1.0, 3.0]], requires_grad=True)
    w = torch.tensor([0.25, 0.75])
    # R = [0.75 + 3.75, 0.25 + 2.25] = [4.5, 2.5]; L = -mean R = -3.5; dL/dmu_bd = -w_d / B
    loss, m = refl_loss(mu, w)
    assert loss.item() == pytest.approx(-3.5) and m == {"reward": pytest.approx(3.5)}
    loss.backward()
    assert torch.allclose(mu.grad, torch.tensor([[-0.125, -0.375], [-0.125, -0.375]]))
    loss, m = refl_loss(mu, w, fm_loss=torch.tensor(2.0), fm_weight=0.5)
    assert loss.item() == pytest.approx(-2.5) and m["fm"] == pytest.approx(2.0)
    loss, m = refl_loss(mu, w, fm_loss=torch.tensor(2.0))  # weight 0: logged, not added
    assert loss.item() == pytest.approx(-3.5) and m["fm"] == pytest.approx(2.0)
    assert aggregate_reward(mu.detach(), w).tolist() == [4.5, 2.5]


def test_weights_and_errors():
    assert check_weights((), 4) == [0.25] * 4
    assert check_weights((1, 0), 2) == [1.0, 0.0]
    with pytest.raises(ValueError, match=r"expected 3 finite floats"):
        check_weights((1.0, 2.0), 3)
    with pytest.raises(ValueError, match="expected \\(B, D\\) and \\(D,\\)"):
        aggregate_reward(torch.ones(2, 3), torch.ones(2))
    with pytest.raises(ValueError, match="fm_loss is None"):
        refl_loss(torch.ones(1, 1), torch.ones(1), fm_weight=1.0)
