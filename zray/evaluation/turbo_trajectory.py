"""How close each step of a two-step sampler stays to the 8-step teacher's trajectory from the same noise (the
"teacher-aligned" part of Turbo++, methods.md §6), in latent space; no judge needed:

- `mid_mse_to_teacher`: the state handed to step 2 (x_s2, at sigma_2) against the teacher's state at the same
  sigma (after `mid_steps` of its steps): what step 1 passes on;
- `x0_mse_to_teacher`: the final latent against the teacher's final latent from the same noise;
- `step2_alone_mse_to_teacher`: step 2 started from the teacher's own state at sigma_2 instead, against the
  teacher's final latent: step 2's error given a perfect step 1. What `x0_mse_to_teacher` adds to it is the cost,
  at the end, of step 1's error.

Each value is the mean over prompts and latent elements of the squared difference. The teacher's network in both
steps (`two_step_sample` with one network) is naive 2-step sampling when sigma_2 is the 2-step schedule's middle
sigma (0.75 at shift 3). Tensor legend: B prompts, C latent channels, H x W latent grid; `cond` one entry per
prompt (a list, sliced with the batch).
"""

from __future__ import annotations

from typing import Any

import torch

from zray.sampling import ModelFn, sample, turbo_step2, two_step_sample

X0_MSE_TO_TEACHER = "x0_mse_to_teacher"  # the final latent's; also a metric of the summary over seeds
TRAJECTORY_KEYS: tuple[str, ...] = ("mid_mse_to_teacher", X0_MSE_TO_TEACHER, "step2_alone_mse_to_teacher")


@torch.no_grad()
def teacher_trajectory(teacher_fn: ModelFn, noise_BCHW: torch.Tensor, cond: list[Any], sigmas: torch.Tensor,
                       mid_steps: int, batch_size: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """(the teacher's state after `mid_steps` of its Euler steps along `sigmas`, its final latent), both
    [B, C, H, W], from `noise_BCHW`."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32)
    if not isinstance(mid_steps, int) or not 1 <= mid_steps < sigmas.numel() - 1:
        raise ValueError(f"mid_steps={mid_steps!r} is not allowed: expected an integer in [1, {sigmas.numel() - 1})")
    _check_batch(noise_BCHW, cond)
    mids, finals = [], []
    for i in range(0, noise_BCHW.shape[0], batch_size):
        x0, states = sample(teacher_fn, noise_BCHW[i:i + batch_size], sigmas, cond[i:i + batch_size],
                            return_trajectory=True)
        mids.append(states[mid_steps])
        finals.append(x0)
    return torch.cat(mids), torch.cat(finals)


@torch.no_grad()
def trajectory_errors(step1_fn: ModelFn, step2_fn: ModelFn, noise_BCHW: torch.Tensor, cond: list[Any],
                      teacher_mid_BCHW: torch.Tensor, teacher_x0_BCHW: torch.Tensor, *, sigma_2: float,
                      batch_size: int = 50) -> dict[str, float]:
    """TRAJECTORY_KEYS (module docstring) of the two-step sampler `step1_fn`, `step2_fn` from `noise_BCHW`, against
    the teacher's state at `sigma_2` and its final latent (`teacher_trajectory`) from the same noise."""
    _check_batch(noise_BCHW, cond)
    for name, t in (("teacher_mid_BCHW", teacher_mid_BCHW), ("teacher_x0_BCHW", teacher_x0_BCHW)):
        if t.shape != noise_BCHW.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}: expected the noise's {tuple(noise_BCHW.shape)}")
    sums = dict.fromkeys(TRAJECTORY_KEYS, 0.0)
    for i in range(0, noise_BCHW.shape[0], batch_size):
        sl, c = slice(i, i + batch_size), cond[i:i + batch_size]
        _, x_s2, x0 = two_step_sample(step1_fn, step2_fn, noise_BCHW[sl], c, sigma_2=sigma_2)
        alone = turbo_step2(step2_fn, teacher_mid_BCHW[sl], sigma_2, c)
        target = teacher_x0_BCHW[sl].to(torch.float32)
        sums["mid_mse_to_teacher"] += float(((x_s2 - teacher_mid_BCHW[sl].to(torch.float32)) ** 2).sum())
        sums[X0_MSE_TO_TEACHER] += float(((x0 - target) ** 2).sum())
        sums["step2_alone_mse_to_teacher"] += float(((alone - target) ** 2).sum())
    return {k: v / noise_BCHW.numel() for k, v in sums.items()}


def trajectory_markdown(rows: dict[str, dict[str, float]], *, sigma_2: float, mid_steps: int,
                        teacher_steps: int) -> list[str]:
    """results.md's table of `trajectory_errors` rows (name -> its TRAJECTORY_KEYS)."""
    head = (f"| generator | state at sigma {sigma_2:g} vs the teacher's after {mid_steps} of {teacher_steps} steps "
            "| final latent vs the teacher's | step 2 from the teacher's state |")
    lines = ["", "## Teacher alignment of the two steps (latent MSE to the teacher from the same noise)", "", head,
             "|" + "---|" * (head.count("|") - 1)]
    for name, m in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{m[k]:.5f}" for k in TRAJECTORY_KEYS) + " |")
    lines += ["", "The first column is what step 1 hands to step 2; the last is step 2's own error given the teacher's "
              "state; the middle one less the last is what step 1's error costs at the end "
              "(zray/evaluation/turbo_trajectory.py)."]
    return lines


def _check_batch(noise_BCHW: torch.Tensor, cond: list[Any]) -> None:
    if noise_BCHW.dim() != 4 or len(cond) != noise_BCHW.shape[0]:
        raise ValueError(f"{len(cond)} conditions for noise of shape {tuple(noise_BCHW.shape)}: expected "
                         "[B, C, H, W] noise and one condition per prompt")
