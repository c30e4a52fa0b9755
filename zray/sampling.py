"""Flow-matching sampler math (pure torch): sigma schedules, noising, Euler steps and the N-step sampler.

Conventions (Z-Image, ../shared/spec/methods.md §5-6), checked against `diffusers.ZImagePipeline`:

- Noising: `x_sigma = (1 - sigma) * x0 + sigma * eps`; sigma = 1 is pure noise, sigma = 0 the clean latent.
- The network is called with `t = 1 - sigma` (0 at pure noise, 1 at the clean latent) and predicts
  `u = x0 - eps` (the pipeline negates the model output and feeds it to `FlowMatchEulerDiscreteScheduler.step`,
  which is the same Euler step). So `x0_hat = x_sigma + sigma * u` and
  `x_next = x_sigma + (sigma - sigma_next) * u`.
- Schedules: N sigmas `linspace(1, 1/N, N)` (the pipeline's default), time-shifted with
  `shift * s / (1 + (shift - 1) * s)` (the scheduler's static shift), then a final 0. With shift 3, N = 8
  gives 1.0, 0.9545, 0.9, 0.8333, 0.75, 0.6429, 0.5, 0.3, 0 (the Turbo++ teacher) and N = 2 gives 1.0, 0.75, 0.
- Training draws sigma as `shift_sigmas(u)` with `u ~ U(0, 1)`, so that training time matches the shifted
  sampling schedule.

Tensor legend: B batch, C latent channels, H x W latent grid; `sigma_B` one sigma per sample.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

# model_fn(x_BCHW, t_B, cond) -> u_BCHW, the velocity-like output with u = x0 - eps.
ModelFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """The static time shift `shift * s / (1 + (shift - 1) * s)` (shift > 1 moves sigmas toward noise)."""
    if shift <= 0:
        raise ValueError(f"shift={shift} is not allowed: expected a float > 0")
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def flow_sigmas(num_steps: int, shift: float = 3.0) -> torch.Tensor:
    """[num_steps + 1] float32 sigmas from 1 down to a final 0, as `ZImagePipeline` uses them."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps={num_steps!r} is not allowed: expected an integer >= 1")
    base = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
    sigmas = shift_sigmas(base, shift)
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(torch.float32)


def sample_train_sigmas(num: int, shift: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """[num] training sigmas: `shift_sigmas(u)`, u ~ U(0, 1) (the sampling schedule's density)."""
    u = torch.rand(num, generator=generator)
    return shift_sigmas(u, shift)


def _per_sample(sigma: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """A scalar or [B] sigma as a tensor broadcastable to `like` ([B, ...])."""
    sigma = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    if sigma.ndim == 0:
        return sigma
    if sigma.ndim != 1 or sigma.shape[0] != like.shape[0]:
        raise ValueError(f"sigma has shape {tuple(sigma.shape)}: expected a scalar or [{like.shape[0]}]")
    return sigma.view(-1, *([1] * (like.ndim - 1)))


def noise_latents(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """`x_sigma = (1 - sigma) x0 + sigma eps`; x0, noise [B, ...], sigma scalar or [B]."""
    if x0.shape != noise.shape:
        raise ValueError(f"x0 has shape {tuple(x0.shape)} but noise has {tuple(noise.shape)}: expected equal")
    s = _per_sample(sigma, x0)
    return (1.0 - s) * x0 + s * noise


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The regression target of the model output u: `x0 - eps` (what `ZImagePipeline` expects)."""
    return x0 - noise


def model_time(sigma: torch.Tensor | float) -> torch.Tensor:
    """The time the network is called with: `t = 1 - sigma`."""
    return 1.0 - torch.as_tensor(sigma)


def x0_from_velocity(x_sigma: torch.Tensor, u: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """`x0_hat = x_sigma + sigma u` (one jump to the clean estimate)."""
    return x_sigma + _per_sample(sigma, x_sigma) * u


def euler_step(x_sigma: torch.Tensor, u: torch.Tensor, sigma: torch.Tensor | float,
               sigma_next: torch.Tensor | float) -> torch.Tensor:
    """`x_next = x_sigma + (sigma - sigma_next) u` (FlowMatchEulerDiscreteScheduler.step on -u)."""
    return x_sigma + (_per_sample(sigma, x_sigma) - _per_sample(sigma_next, x_sigma)) * u


def sample(model_fn: ModelFn, noise: torch.Tensor, sigmas: torch.Tensor, cond: Any,
           return_trajectory: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """Euler-sample from `noise` [B, C, H, W] (x at sigmas[0]) along `sigmas` ([N + 1], ending at 0).

    Calls `model_fn(x, t, cond)` with `t = 1 - sigma` as a [B] tensor, once per step. Runs with whatever grad
    mode the caller set (no `no_grad` here: reward-gradient training differentiates through it). With
    `return_trajectory`, also returns the states [x at sigmas[0], ..., x at sigmas[N]] (Turbo++ uses the
    8-step teacher's state at sigma 0.75, i.e. index 4).
    """
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32)
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas has shape {tuple(sigmas.shape)}: expected [N + 1] with N >= 1")
    if not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError(f"sigmas={sigmas.tolist()} is not allowed: expected strictly decreasing values")
    x = noise.to(torch.float32)
    trajectory = [x]
    batch = x.shape[0]
    for i in range(sigmas.numel() - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        t_B = model_time(sigma).to(x.device).expand(batch)
        u = model_fn(x, t_B, cond).to(torch.float32)
        x = euler_step(x, u, sigma.item(), sigma_next.item())
        trajectory.append(x)
    return (x, trajectory) if return_trajectory else x
