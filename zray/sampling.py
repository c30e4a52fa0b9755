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


# ------------------------------------------------------------------ Turbo++ two-step student (methods.md §6)

TURBO_SIGMA_2 = 0.75  # the 8-step shift-3 teacher's sigma after 4 of its 8 steps: flow_sigmas(8, 3.0)[4]


def _check_sigma_2(sigma_2: float) -> float:
    sigma_2 = float(sigma_2)
    if not 0.0 < sigma_2 < 1.0:
        raise ValueError(f"sigma_2={sigma_2} is not allowed: expected a float in (0, 1)")
    return sigma_2


def _call(model_fn: ModelFn, x: torch.Tensor, sigma: float, cond: Any, name: str) -> torch.Tensor:
    """`model_fn(x, t = 1 - sigma as [B], cond)` in float32, its output checked against x's shape."""
    t_B = model_time(torch.tensor(sigma, dtype=torch.float32)).to(x.device).expand(x.shape[0])
    u = model_fn(x, t_B, cond)
    if u.shape != x.shape:
        raise ValueError(f"{name} model output has shape {tuple(u.shape)}: expected the input's {tuple(x.shape)}")
    return u.to(torch.float32)


def turbo_step1(model_fn: ModelFn, noise: torch.Tensor, cond: Any) -> torch.Tensor:
    """Step 1 at sigma 1: `u1 = f1(eps, t = 0, c)`, `x0_1 = eps + u1` (`x0_from_velocity` at sigma 1)."""
    x = noise.to(torch.float32)
    return x0_from_velocity(x, _call(model_fn, x, 1.0, cond, "step 1"), 1.0)


def turbo_step2(model_fn: ModelFn, x_s2: torch.Tensor, sigma_2: float, cond: Any) -> torch.Tensor:
    """Step 2 at sigma_2: `u2 = f2(x_s2, t = 1 - sigma_2, c)`, `x0_2 = x_s2 + sigma_2 u2`."""
    sigma_2 = _check_sigma_2(sigma_2)
    x = x_s2.to(torch.float32)
    return x0_from_velocity(x, _call(model_fn, x, sigma_2, cond, "step 2"), sigma_2)


def two_step_sample(step1_fn: ModelFn, step2_fn: ModelFn, noise: torch.Tensor, cond: Any, *,
                    sigma_2: float = TURBO_SIGMA_2, detach_steps: bool = False,
                    renoise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Turbo++ student's sampler `1 -> sigma_2 -> 0` with step-decoupled model functions: (x0_1, x_s2, x0_2).

        x0_1 = eps + f1(eps, t = 0, c)                          step 1, a jump to the clean estimate
        x_s2 = (1 - sigma_2) x0_1 + sigma_2 eps'                re-noise; eps' = eps (default) or `renoise`
        x0_2 = x_s2 + sigma_2 f2(x_s2, t = 1 - sigma_2, c)      step 2

    `noise` [B, C, H, W] is eps. Re-noising with the same eps is the spec's choice (methods.md §6); pass fresh
    noise of the same shape as `renoise` for the other variant. `detach_steps` cuts the graph between the steps
    (x_s2 is detached before step 2): the "no end-to-end" baseline, where step 1 gets gradient only from losses
    on x0_1 / x_s2. Runs in the caller's grad mode.
    """
    sigma_2 = _check_sigma_2(sigma_2)
    eps = noise.to(torch.float32)
    if renoise is not None and renoise.shape != eps.shape:
        raise ValueError(f"renoise has shape {tuple(renoise.shape)}: expected the noise's {tuple(eps.shape)}")
    x0_1 = turbo_step1(step1_fn, eps, cond)
    x_s2 = noise_latents(x0_1, eps if renoise is None else renoise.to(eps), sigma_2)
    x0_2 = turbo_step2(step2_fn, x_s2.detach() if detach_steps else x_s2, sigma_2, cond)
    return x0_1, x_s2, x0_2


def teacher_state(model_fn: ModelFn, noise: torch.Tensor, sigmas: torch.Tensor, cond: Any,
                  num_steps: int = 4) -> torch.Tensor:
    """The teacher's latent after `num_steps` of the Euler steps along `sigmas` (x at `sigmas[num_steps]`).

    It is `sample` on the first `num_steps + 1` sigmas, so it equals bit for bit the state at index `num_steps`
    of `sample(..., return_trajectory=True)` on the full schedule from the same noise. With the 8-step teacher
    (`flow_sigmas(8, 3.0)`) and `num_steps = 4` this is the step-1 regression target at sigma 0.75.
    """
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32)
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas has shape {tuple(sigmas.shape)}: expected [N + 1] with N >= 1")
    num_total = sigmas.numel() - 1
    if not isinstance(num_steps, int) or not 1 <= num_steps <= num_total:
        raise ValueError(f"num_steps={num_steps!r} is not allowed: expected an integer in [1, {num_total}]")
    return sample(model_fn, noise, sigmas[: num_steps + 1], cond)
