"""Turbo++: the two-step student's losses and its discriminator's (methods.md §6), as pure functions.

Legend (tensor-name suffixes): B samples in the batch, C latent channels, H x W latent grid. `logits_B` are
discriminator outputs, one logit per sample (`zray.models.discriminator`).

The student samples `1 -> sigma_2 -> 0` (`zray.sampling.two_step_sample`) giving x0_1, x_s2, x0_2; the teacher
(8 steps, shift 3) from the same noise gives x_T4 (its state after 4 of 8 steps, at sigma_2 = 0.75) and
x0_T (its output). D sees re-noised latents: "real" are teacher outputs, "fake" student outputs.

    L_D    = E[relu(1 - D(real))] + E[relu(1 + D(fake))]                   hinge discriminator loss
    L_adv  = -E[D(fake)]                                                   generator adversarial loss
    L_1    = E ||x_s2 - x_T4||^2   (step1 = "regression", the default)     step-1 loss
           = -E[D(x0_1)]           (step1 = "adversarial")
           = 0                     (step1 = "none")
    L_reg  = E ||x0_2 - x0_T||^2                                           optional paired regression
    L_G    = lam_adv L_adv(x0_2) + lam_1 L_1 + lam_reg L_reg

Squared errors are averaged over every element (B, C, H, W). Teacher targets are detached here: the teacher
is never trained by these losses. `lam_1` may decay linearly to 0 over a number of steps (`decayed_weight`).
"""

from __future__ import annotations

from typing import Literal

import torch

Step1Loss = Literal["regression", "adversarial", "none"]
STEP1_LOSSES: tuple[str, ...] = ("regression", "adversarial", "none")


def _check_logits(name: str, logits_B: torch.Tensor) -> None:
    if logits_B.ndim != 1 or logits_B.numel() == 0:
        raise ValueError(f"{name} has shape {tuple(logits_B.shape)}: expected (B,), one logit per sample, B >= 1")


def _check_pair(name: str, pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"{name}: prediction has shape {tuple(pred.shape)} but its target has "
                         f"{tuple(target.shape)}: expected equal (B, C, H, W)")


def discriminator_hinge_loss(real_logits_B: torch.Tensor,
                             fake_logits_B: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """L_D = E[relu(1 - D(real))] + E[relu(1 + D(fake))] (real = teacher outputs, fake = the student's).

    Pass fake logits computed from detached student latents: the discriminator step does not train the student.
    Metrics: the loss, each term, the mean logits and the fraction of each side on its correct side of 0.
    """
    _check_logits("real_logits_B", real_logits_B)
    _check_logits("fake_logits_B", fake_logits_B)
    real_term = torch.relu(1.0 - real_logits_B).mean()
    fake_term = torch.relu(1.0 + fake_logits_B).mean()
    loss = real_term + fake_term
    real, fake = real_logits_B.detach(), fake_logits_B.detach()
    return loss, {"d_loss": float(loss.detach()), "d_real_term": float(real_term.detach()),
                  "d_fake_term": float(fake_term.detach()), "d_real_mean": float(real.mean()),
                  "d_fake_mean": float(fake.mean()), "d_real_acc": float((real > 0).float().mean()),
                  "d_fake_acc": float((fake < 0).float().mean())}


def adversarial_loss(fake_logits_B: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """L_adv = -E[D(fake)]: the generator's hinge-GAN loss; gradient flows through D into the fake latents."""
    _check_logits("fake_logits_B", fake_logits_B)
    loss = -fake_logits_B.mean()
    return loss, {"adv_loss": float(loss.detach())}


def regression_loss(pred_BCHW: torch.Tensor, target_BCHW: torch.Tensor,
                    name: str = "regression") -> tuple[torch.Tensor, dict[str, float]]:
    """E ||pred - target||^2 over every element; the target is detached (a teacher latent)."""
    _check_pair(name, pred_BCHW, target_BCHW)
    loss = (pred_BCHW.float() - target_BCHW.detach().float()).square().mean()
    return loss, {f"{name}_loss": float(loss.detach())}


def step1_regression_loss(x_s2_BCHW: torch.Tensor,
                          teacher_mid_BCHW: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """L_1 = E ||x_s2 - x_T4||^2: the student's re-noised step-1 state onto the teacher's state at sigma_2."""
    return regression_loss(x_s2_BCHW, teacher_mid_BCHW, "step1")


def decayed_weight(step: int, initial: float, decay_steps: int) -> float:
    """`initial`, decayed linearly to 0 at `step = decay_steps` (0 there and after); `decay_steps = 0`: constant."""
    if step < 0:
        raise ValueError(f"step={step} is not allowed: expected an integer >= 0")
    if decay_steps < 0:
        raise ValueError(f"decay_steps={decay_steps} is not allowed: expected an integer >= 0 (0 = no decay)")
    if decay_steps == 0:
        return float(initial)
    return float(initial) * max(0.0, 1.0 - step / decay_steps)


def generator_loss(
    fake_logits_B: torch.Tensor,
    *,
    step1: Step1Loss = "regression",
    x_s2_BCHW: torch.Tensor | None = None,
    teacher_mid_BCHW: torch.Tensor | None = None,
    step1_fake_logits_B: torch.Tensor | None = None,
    x0_2_BCHW: torch.Tensor | None = None,
    teacher_x0_BCHW: torch.Tensor | None = None,
    lam_adv: float = 1.0,
    lam_1: float = 1.0,
    lam_reg: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """L_G = lam_adv L_adv(x0_2) + lam_1 L_1 + lam_reg L_reg (methods.md §6).

    `fake_logits_B` is D on the student's final x0_2 (with gradient). The step-1 loss needs, by `step1`:
    "regression": `x_s2_BCHW` and `teacher_mid_BCHW`; "adversarial": `step1_fake_logits_B` (D on x0_1);
    "none": nothing (and no lam_1 term). `lam_reg > 0` needs `x0_2_BCHW` and `teacher_x0_BCHW` (the paired
    teacher output from the same noise and prompt). Inputs a term does not use must be left out, so that a
    mis-wired call fails instead of silently dropping a loss.
    """
    if step1 not in STEP1_LOSSES:
        raise ValueError(f"step1={step1!r} is not allowed: expected one of {STEP1_LOSSES}")
    for name, value in (("lam_adv", lam_adv), ("lam_1", lam_1), ("lam_reg", lam_reg)):
        if value < 0:
            raise ValueError(f"{name}={value} is not allowed: expected a float >= 0")
    given = {"x_s2_BCHW": x_s2_BCHW is not None, "teacher_mid_BCHW": teacher_mid_BCHW is not None,
             "step1_fake_logits_B": step1_fake_logits_B is not None}
    needed = {"regression": ("x_s2_BCHW", "teacher_mid_BCHW"), "adversarial": ("step1_fake_logits_B",),
              "none": ()}[step1]
    for name, present in given.items():
        if present != (name in needed):
            raise ValueError(f"step1={step1!r} {'needs' if name in needed else 'does not use'} {name}: "
                             f"expected exactly {needed or 'no step-1 inputs'}")
    if (x0_2_BCHW is None) != (teacher_x0_BCHW is None):
        raise ValueError("x0_2_BCHW and teacher_x0_BCHW go together: expected both (the paired regression) or neither")
    if lam_reg > 0 and x0_2_BCHW is None:
        raise ValueError(f"lam_reg={lam_reg} needs x0_2_BCHW and teacher_x0_BCHW: expected both, or lam_reg=0")

    adv, metrics = adversarial_loss(fake_logits_B)
    loss = lam_adv * adv
    metrics["d_fake_mean"] = float(fake_logits_B.detach().mean())
    if step1 == "regression":
        l1, m = step1_regression_loss(x_s2_BCHW, teacher_mid_BCHW)
        loss = loss + lam_1 * l1
        metrics |= m
    elif step1 == "adversarial":
        l1, _ = adversarial_loss(step1_fake_logits_B)
        loss = loss + lam_1 * l1
        metrics["step1_loss"] = float(l1.detach())
    if x0_2_BCHW is not None:
        reg, m = regression_loss(x0_2_BCHW, teacher_x0_BCHW, "reg")
        loss = loss + lam_reg * reg
        metrics |= m
    metrics["g_loss"] = float(loss.detach())
    return loss, metrics
