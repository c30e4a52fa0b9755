"""zray.sampling: schedules against methods.md §6 and diffusers' scheduler; steps by hand; sampler algebra."""

import subprocess
import sys

import pytest
import torch

from zray.sampling import (euler_step, flow_sigmas, flow_target, model_time, noise_latents, sample,
                           sample_train_sigmas, shift_sigmas, x0_from_velocity)

SPEC_8_STEP = [1.0, 0.9545, 0.9, 0.8333, 0.75, 0.6429, 0.5, 0.3]  # methods.md §6


def test_eight_step_sigmas_match_the_spec():
    sigmas = flow_sigmas(8, shift=3.0)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (9,)
    assert sigmas[:-1].tolist() == pytest.approx(SPEC_8_STEP, abs=5e-5)
    assert sigmas[-1].item() == 0.0


def test_two_step_sigmas_stop_at_the_turbo_intermediate():
    assert flow_sigmas(2, shift=3.0).tolist() == pytest.approx([1.0, 0.75, 0.0])


@pytest.mark.parametrize("steps", [1, 2, 4, 8, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_sigmas_match_flow_match_euler_scheduler(steps, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift, use_dynamic_shifting=False)
    # as ZImagePipeline calls it: its default sigmas linspace(1, 1/N, N), mu is ignored without dynamic shifting
    sched.set_timesteps(steps, sigmas=torch.linspace(1.0, 1.0 / steps, steps).tolist(), mu=0.5)
    ours = flow_sigmas(steps, shift)
    assert torch.allclose(ours, sched.sigmas.float(), atol=1e-6)
    # the pipeline calls the transformer with (1000 - timestep) / 1000 = 1 - sigma
    assert torch.allclose(model_time(ours[:-1]), (1000 - sched.timesteps.float()) / 1000, atol=1e-6)


def test_flow_sigmas_rejects_bad_steps():
    with pytest.raises(ValueError, match="num_steps=0"):
        flow_sigmas(0)
    with pytest.raises(ValueError, match="shift=0"):
        shift_sigmas(torch.tensor([0.5]), 0.0)


def test_train_sigmas_follow_the_shifted_density():
    sigmas = sample_train_sigmas(20000, 3.0, torch.Generator().manual_seed(0))
    assert 0.0 <= sigmas.min() and sigmas.max() <= 1.0
    # P(sigma > 0.75) = P(u > 0.5) under shift 3, since shift_sigmas(0.5) = 0.75
    assert (sigmas > 0.75).float().mean().item() == pytest.approx(0.5, abs=0.02)


def test_noising_target_and_jump_are_consistent():
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 2, 2, generator=gen), torch.randn(3, 4, 2, 2, generator=gen)
    sigma = torch.tensor([1.0, 0.5, 0.0])
    x = noise_latents(x0, eps, sigma)
    assert torch.allclose(x[0], eps[0]) and torch.allclose(x[2], x0[2])
    assert torch.allclose(x[1], 0.5 * x0[1] + 0.5 * eps[1])
    u = flow_target(x0, eps)  # the exact model output
    assert torch.allclose(x0_from_velocity(x, u, sigma), x0, atol=1e-6)
    # an Euler step with the exact u lands on the same straight path
    x_next = euler_step(x, u, sigma[1], 0.25)
    assert torch.allclose(x_next[1], noise_latents(x0, eps, 0.25)[1], atol=1e-6)


def test_euler_step_by_hand():
    x, u = torch.full((1, 1, 1, 1), 2.0), torch.full((1, 1, 1, 1), -1.0)
    assert euler_step(x, u, 0.75, 0.5).item() == pytest.approx(2.0 + 0.25 * -1.0)


def test_sampler_with_an_oracle_reaches_x0_and_passes_t():
    """A model that returns x0 - eps exactly reaches x0 in any number of steps; t = 1 - sigma each call."""
    gen = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 4, 3, 3, generator=gen), torch.randn(2, 4, 3, 3, generator=gen)
    seen = []

    def oracle(x, t, cond):
        seen.append(t.clone())
        assert cond == "c" and t.shape == (2,)
        return flow_target(x0, eps)

    for steps in (2, 8):
        seen.clear()
        out, traj = sample(oracle, eps, flow_sigmas(steps), "c", return_trajectory=True)
        assert torch.allclose(out, x0, atol=1e-5)
        assert len(traj) == steps + 1 and torch.equal(traj[0], eps)
        assert torch.allclose(torch.stack([t[0] for t in seen]), 1 - flow_sigmas(steps)[:-1])
    # Turbo++: the 8-step teacher's state after 4 steps sits at sigma 0.75
    _, traj = sample(oracle, eps, flow_sigmas(8), "c", return_trajectory=True)
    assert torch.allclose(traj[4], noise_latents(x0, eps, 0.75), atol=1e-5)


def test_sampler_rejects_increasing_sigmas():
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample(lambda x, t, c: x, torch.zeros(1, 1, 1, 1), torch.tensor([0.0, 1.0]), None)


def test_sampling_module_is_pure():
    code = ("import sys, zray.sampling\n"
            "print(','.join(m for m in ('ray', 'vllm', 'transformers', 'diffusers', 'deepspeed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
