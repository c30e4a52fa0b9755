"""Reward-gradient fine-tuning (ReFL, extended to earlier steps; DRaFT-K), as pure functions (methods.md §5).

Legend (tensor-name suffixes): B samples, C latent channels, H x W latent grid, D rubric dimensions. Sampler
conventions are `zray.sampling`'s: `x_sigma = (1 - sigma) x0 + sigma eps`, the network is called at
`t = 1 - sigma` and predicts `u = x0 - eps`, so `x0_hat = x_sigma + sigma u` and an Euler step is
`x_next = x_sigma + (sigma - sigma_next) u`.

One update of an N-step sampler along sigmas `s_0 = 1 > s_1 > ... > s_N = 0` (step i calls the network at
`s_{i-1}`, i = 1..N) takes gradient through a window of steps `first..last` only (`truncated_sample`):

    x_0 = eps
    x_i = x_{i-1} + (s_{i-1} - s_i) u_i,   u_i = f_i(x_{i-1}, 1 - s_{i-1}, c)    i = 1 .. last - 1
    x0_hat = x_{last-1} + s_{last-1} u_last                                        the jump at step `last`

with steps before `first` run without gradient (their output is a constant). Two windows (`grad_window`):

- ReFL, extended: `first = last = k`, `k ~ U{k_min .. k_max}` over the whole schedule (early steps included):
  one network call with gradient at `s_{k-1}`, then the jump to x0_hat;
- DRaFT-K: `first = N - K + 1, last = N`: the last K steps with gradient (the last one's jump is the Euler step
  to `s_N = 0`, so x0_hat is the sampler's output).

The Turbo++ student is the case N = 2 with sigmas 1 -> sigma_2 -> 0 and its two step networks f_1, f_2: its
re-noise with the same eps, x_s2 = (1 - sigma_2)(eps + u_1) + sigma_2 eps = eps + (1 - sigma_2) u_1, is this
Euler step (`zray.sampling.two_step_sample`).

The objective, on the decoded image of x0_hat scored by the frozen student (`refl_loss`):

    R_b = sum_d w_d mu_bd                     (w: equal 1 / D by default, so R stays on the 1..5 scale)
    L   = -mean_b R_b + lam_fm L_fm           (L_fm: the optional flow-matching regulariser, a plain MSE)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from zray.sampling import ModelFn, euler_step, model_time, x0_from_velocity


def grad_window(num_steps: int, *, k_min: int = 1, k_max: int = 0, draft_k: int = 0,
                generator: torch.Generator | None = None) -> tuple[int, int]:
    """(first, last): the 1-based steps that take gradient in one update of an N-step sampler.

    `draft_k > 0`: DRaFT-K, (N - K + 1, N). Else ReFL: k uniform over `k_min .. k_max` (`k_max = 0` = N), (k, k),
    drawn from torch's global RNG (or `generator`), so a learner's seeded, checkpointed RNG makes it reproducible.
    """
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps={num_steps!r} is not allowed: expected an integer >= 1")
    if not isinstance(draft_k, int) or not 0 <= draft_k <= num_steps:
        raise ValueError(f"draft_k={draft_k!r} is not allowed: expected an integer in [0, {num_steps}] "
                         f"(0 = ReFL's one step; K = the last K of the {num_steps} steps)")
    if draft_k:
        return num_steps - draft_k + 1, num_steps
    hi = num_steps if k_max == 0 else k_max
    if not (isinstance(k_min, int) and isinstance(hi, int) and 1 <= k_min <= hi <= num_steps):
        raise ValueError(f"k_min={k_min!r}, k_max={k_max!r} are not allowed for a {num_steps}-step sampler: expected "
                         f"1 <= k_min <= k_max <= {num_steps} (k_max = 0 means {num_steps})")
    k = k_min + int(torch.randint(hi - k_min + 1, (1,), generator=generator))
    return k, k


def truncated_sample(model_fns: Sequence[ModelFn], sigmas: torch.Tensor, noise_BCHW: torch.Tensor, cond: Any, *,
                     first: int, last: int) -> torch.Tensor:
    """x0_hat [B, C, H, W]: steps 1 .. last of the sampler (module docstring), gradient only for steps first..last.

    `model_fns[i - 1]` runs step i (the same function N times for a one-network sampler); `sigmas` is [N + 1],
    strictly decreasing, ending at 0. `first = last + 1` runs every step without gradient. Steps in the window run
    in the caller's grad mode.
    """
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32)
    num_steps = sigmas.numel() - 1
    if sigmas.ndim != 1 or num_steps < 1 or float(sigmas[-1]) != 0.0 or not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError(f"sigmas={sigmas.tolist()} is not allowed: expected [N + 1] strictly decreasing values "
                         "ending at 0")
    if len(model_fns) != num_steps:
        raise ValueError(f"{len(model_fns)} model functions for {num_steps} steps: expected one per step")
    if not (isinstance(last, int) and isinstance(first, int) and 1 <= last <= num_steps and 1 <= first <= last + 1):
        raise ValueError(f"first={first!r}, last={last!r} are not allowed: expected 1 <= first <= last + 1 and "
                         f"1 <= last <= {num_steps}")
    x = noise_BCHW.to(torch.float32)
    batch = x.shape[0]
    for i in range(1, last + 1):
        sigma = float(sigmas[i - 1])
        t_B = model_time(torch.tensor(sigma)).to(x.device).expand(batch)
        with torch.set_grad_enabled(torch.is_grad_enabled() and i >= first):
            u = model_fns[i - 1](x, t_B, cond)
            if u.shape != x.shape:
                raise ValueError(f"step {i} model output has shape {tuple(u.shape)}: expected the input's "
                                 f"{tuple(x.shape)}")
            u = u.to(torch.float32)
            x = x0_from_velocity(x, u, sigma) if i == last else euler_step(x, u, sigma, float(sigmas[i]))
    return x


def check_weights(weights: Sequence[float], num_dimensions: int) -> list[float]:
    """The aggregation weights: `num_dimensions` finite floats, or equal weights 1 / D for an empty sequence."""
    if num_dimensions < 1:
        raise ValueError(f"num_dimensions={num_dimensions} is not allowed: expected an integer >= 1")
    if len(weights) == 0:
        return [1.0 / num_dimensions] * num_dimensions
    out = [float(w) for w in weights]
    if len(out) != num_dimensions or not all(math.isfinite(w) for w in out):
        raise ValueError(f"weights={tuple(weights)!r} is not allowed: expected {num_dimensions} finite floats, one per "
                         "dimension (or none: equal weights)")
    return out


def aggregate_reward(mu_BD: torch.Tensor, weights_D: torch.Tensor) -> torch.Tensor:
    """R_B = sum_d w_d mu_Bd."""
    if mu_BD.ndim != 2 or weights_D.ndim != 1 or mu_BD.shape[1] != weights_D.shape[0]:
        raise ValueError(f"mu has shape {tuple(mu_BD.shape)} and weights {tuple(weights_D.shape)}: expected (B, D) "
                         "and (D,)")
    return mu_BD @ weights_D.to(mu_BD)


def refl_loss(mu_BD: torch.Tensor, weights_D: torch.Tensor, *, fm_loss: torch.Tensor | None = None,
              fm_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """L = -mean_b R_b + fm_weight * fm_loss (module docstring); metrics: `reward` (mean R), `fm` when given.

    `mu_BD` are the frozen student's expected scores of the generated images (with gradient to the generator);
    `fm_loss` a scalar (the flow-matching MSE), required when `fm_weight > 0`.
    """
    if fm_weight < 0:
        raise ValueError(f"fm_weight={fm_weight} is not allowed: expected a float >= 0")
    if fm_weight > 0 and fm_loss is None:
        raise ValueError(f"fm_weight={fm_weight} but fm_loss is None: expected the flow-matching loss")
    reward_B = aggregate_reward(mu_BD, weights_D)
    loss = -reward_B.mean()
    metrics = {"reward": float(reward_B.detach().mean())}
    if fm_loss is not None:
        if fm_loss.ndim != 0:
            raise ValueError(f"fm_loss has shape {tuple(fm_loss.shape)}: expected a scalar")
        metrics["fm"] = float(fm_loss.detach())
        if fm_weight > 0:
            loss = loss + fm_weight * fm_loss
    return loss, metrics
