"""zray.evaluation.turbo_trajectory: each step's latent distance to the teacher's trajectory from the same noise,
checked on linear model functions where every value is known by hand."""

import pytest
import torch

from zray.evaluation.turbo_trajectory import (TRAJECTORY_KEYS, teacher_trajectory, trajectory_errors,
                                              trajectory_markdown)
from zray.sampling import flow_sigmas

A, SIGMA_2 = -0.5, 0.75  # the teacher's velocity is u = A x; sigma_2 = flow_sigmas(2, 3)[1]


def linear(offset: float = 0.0):
    """u = A x + offset: the teacher (offset 0), or a step network off by a constant velocity."""
    return lambda x, t, cond: A * x + offset


@pytest.fixture
def batch():
    noise = torch.randn(5, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    return noise, [None] * 5


def test_the_teachers_network_in_both_steps_is_the_two_step_teacher(batch):
    noise, cond = batch
    mid, x0 = teacher_trajectory(linear(), noise, cond, flow_sigmas(2, 3.0), mid_steps=1)
    errors = trajectory_errors(linear(), linear(), noise, cond, mid, x0, sigma_2=SIGMA_2)
    assert set(errors) == set(TRAJECTORY_KEYS) and max(errors.values()) < 1e-12


def test_hand_computed_errors_of_each_step(batch):
    """Step 1 off by a velocity d1: x0_1 off by d1, x_s2 by (1 - sigma_2) d1, and the linear step 2 scales that by
    (1 + sigma_2 A). Step 2 off by d2: its x0 is off by sigma_2 d2 more, from any start."""
    noise, cond = batch
    mid, x0 = teacher_trajectory(linear(), noise, cond, flow_sigmas(2, 3.0), mid_steps=1)
    d1, d2 = 0.2, 0.1
    got = trajectory_errors(linear(d1), linear(), noise, cond, mid, x0, sigma_2=SIGMA_2)
    assert got["mid_mse_to_teacher"] == pytest.approx(((1 - SIGMA_2) * d1) ** 2, rel=1e-5)
    assert got["x0_mse_to_teacher"] == pytest.approx(((1 + SIGMA_2 * A) * (1 - SIGMA_2) * d1) ** 2, rel=1e-5)
    assert got["step2_alone_mse_to_teacher"] < 1e-12
    got = trajectory_errors(linear(d1), linear(d2), noise, cond, mid, x0, sigma_2=SIGMA_2)
    assert got["step2_alone_mse_to_teacher"] == pytest.approx((SIGMA_2 * d2) ** 2, rel=1e-5)
    assert got["x0_mse_to_teacher"] == pytest.approx(((1 + SIGMA_2 * A) * (1 - SIGMA_2) * d1 + SIGMA_2 * d2) ** 2,
                                                     rel=1e-5)


def test_the_eight_step_teachers_state_after_four_steps_is_the_mid_target(batch):
    noise, cond = batch
    mid, x0 = teacher_trajectory(linear(), noise, cond, flow_sigmas(8, 3.0), mid_steps=4)
    # u = A x is linear: each Euler step multiplies x by (1 + (sigma - sigma_next) A)
    sigmas = flow_sigmas(8, 3.0).tolist()
    factors = [1 + (s - n) * A for s, n in zip(sigmas[:-1], sigmas[1:])]
    assert torch.allclose(mid, noise * torch.tensor(factors[:4]).prod(), atol=1e-6)
    assert torch.allclose(x0, noise * torch.tensor(factors).prod(), atol=1e-6)


def test_batching_does_not_change_the_values(batch):
    noise, cond = batch
    mid, x0 = teacher_trajectory(linear(), noise, cond, flow_sigmas(8, 3.0), mid_steps=4, batch_size=2)
    assert torch.equal(mid, teacher_trajectory(linear(), noise, cond, flow_sigmas(8, 3.0), mid_steps=4)[0])
    one = trajectory_errors(linear(0.3), linear(-0.1), noise, cond, mid, x0, sigma_2=SIGMA_2, batch_size=1)
    all_ = trajectory_errors(linear(0.3), linear(-0.1), noise, cond, mid, x0, sigma_2=SIGMA_2)
    assert one == pytest.approx(all_, rel=1e-6)


def test_bad_inputs_are_clear_errors(batch):
    noise, cond = batch
    with pytest.raises(ValueError, match="mid_steps=8 is not allowed: expected an integer in \\[1, 8\\)"):
        teacher_trajectory(linear(), noise, cond, flow_sigmas(8, 3.0), mid_steps=8)
    with pytest.raises(ValueError, match="4 conditions for noise of shape \\(5, 2, 3, 3\\)"):
        teacher_trajectory(linear(), noise, cond[:4], flow_sigmas(8, 3.0), mid_steps=4)
    with pytest.raises(ValueError, match="teacher_mid_BCHW has shape \\(4, 2, 3, 3\\): expected the noise's"):
        trajectory_errors(linear(), linear(), noise, cond, noise[:4], noise, sigma_2=SIGMA_2)


def test_markdown_has_one_row_per_sampler():
    rows = {"naive 2-step": dict.fromkeys(TRAJECTORY_KEYS, 0.01), "turbo": {"mid_mse_to_teacher": 0.0003,
            "x0_mse_to_teacher": 0.014, "step2_alone_mse_to_teacher": 0.006}}
    lines = trajectory_markdown(rows, sigma_2=0.75, mid_steps=4, teacher_steps=8)
    assert "| state at sigma 0.75 vs the teacher's after 4 of 8 steps |" in lines[3]
    assert "| turbo | 0.00030 | 0.01400 | 0.00600 |" in lines
    assert "| naive 2-step | 0.01000 | 0.01000 | 0.01000 |" in lines
