"""GRPO policy term (methods.md §2, "policy term"), shared by GDSO and the GRPO baseline.

Legend (tensor-name suffixes): N sampled outputs (any leading layout flattened), T tokens per output.

    ratio_t   = exp(logp_t - old_logp_t)                      (pi_theta / pi_old, per token)
    policy_t  = -min(ratio_t A, clip(ratio_t, 1 - eps, 1 + eps) A)
    kl_t      = exp(ref_t - logp_t) - (ref_t - logp_t) - 1     (k3 estimator of KL(pi_theta || pi_ref))
    per_token = policy_t + beta * kl_t

Token aggregation (`aggregation`):
- "sum": sum over the output's tokens, mean over outputs (the paper's formula writes a sum);
- "mean": mean over the output's tokens, mean over outputs (the original GRPO normalisation).
"""

from __future__ import annotations

from typing import Literal

import torch

Aggregation = Literal["sum", "mean"]


def k3_kl(logp_NT: torch.Tensor, ref_logp_NT: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi_theta || pi_ref): exp(ref - cur) - (ref - cur) - 1 (>= 0)."""
    delta = ref_logp_NT - logp_NT
    return torch.exp(delta) - delta - 1.0


def group_advantages(rewards_NG: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """A[n, i] = (r[n, i] - mean_i r[n, :]) / (std_i r[n, :] + eps), normalised within each group (last axis).

    `std` is the unbiased sample standard deviation (as in TRL's GRPO). A group of equal rewards gets
    advantage exactly 0 (not a rounding residue of the mean). Computed without gradient (rewards come
    from rollout values).
    """
    if rewards_NG.shape[-1] < 2:
        raise ValueError(f"group size {rewards_NG.shape[-1]} is not allowed: expected at least 2 outputs per group")
    rewards = rewards_NG.detach()
    mean = rewards.mean(dim=-1, keepdim=True)
    std = rewards.std(dim=-1, keepdim=True, unbiased=True)
    all_equal = (rewards == rewards[..., :1]).all(dim=-1, keepdim=True)
    return torch.where(all_equal, torch.zeros_like(rewards), (rewards - mean) / (std + eps))


def _aggregate(per_token_NT: torch.Tensor, mask_NT: torch.Tensor, aggregation: Aggregation) -> torch.Tensor:
    per_output = (per_token_NT * mask_NT).sum(dim=-1)
    if aggregation == "mean":
        per_output = per_output / mask_NT.sum(dim=-1).clamp(min=1.0)
    elif aggregation != "sum":
        raise ValueError(f"aggregation={aggregation!r} is not allowed: expected 'sum' or 'mean'")
    return per_output.mean()


def grpo_policy_loss(
    logp_NT: torch.Tensor,
    old_logp_NT: torch.Tensor,
    ref_logp_NT: torch.Tensor,
    advantages_N: torch.Tensor,
    mask_NT: torch.Tensor,
    *,
    clip_eps: float = 0.2,
    beta: float = 0.01,
    aggregation: Aggregation = "sum",
) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped-ratio policy loss with a k3 KL penalty; gradient flows through `logp_NT` only.

    Args:
        logp_NT: log pi_theta of each sampled token (teacher-forced under the current policy).
        old_logp_NT: log pi_old of the same tokens (from the rollout policy; no gradient).
        ref_logp_NT: log pi_ref of the same tokens (the reference policy; no gradient).
        advantages_N: one advantage per output, applied to every one of its tokens.
        mask_NT: 1 for the output's tokens, 0 for padding.
    Returns:
        (loss, metrics) with metrics policy_loss, kl, clip_frac, ratio_mean (floats).
    """
    if logp_NT.shape != old_logp_NT.shape or logp_NT.shape != ref_logp_NT.shape or logp_NT.shape != mask_NT.shape:
        raise ValueError(f"shape mismatch: logp {tuple(logp_NT.shape)}, old {tuple(old_logp_NT.shape)}, "
                         f"ref {tuple(ref_logp_NT.shape)}, mask {tuple(mask_NT.shape)}: expected all equal")
    if advantages_N.shape != logp_NT.shape[:1]:
        raise ValueError(f"advantages shape {tuple(advantages_N.shape)}: expected ({logp_NT.shape[0]},)")
    mask = mask_NT.to(logp_NT.dtype)
    adv_N1 = advantages_N.detach().to(logp_NT.dtype).unsqueeze(-1)
    ratio = torch.exp(logp_NT - old_logp_NT.detach())
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    policy_NT = -torch.minimum(ratio * adv_N1, clipped * adv_N1)
    kl_NT = k3_kl(logp_NT, ref_logp_NT.detach())
    loss = _aggregate(policy_NT + beta * kl_NT, mask, aggregation)
    with torch.no_grad():
        num_tokens = mask.sum().clamp(min=1.0)
        metrics = {
            "policy_loss": float(_aggregate(policy_NT, mask, aggregation)),
            "kl": float((kl_NT * mask).sum() / num_tokens),
            "clip_frac": float((((ratio - clipped).abs() > 0).to(mask.dtype) * mask).sum() / num_tokens),
            "ratio_mean": float((ratio * mask).sum() / num_tokens),
        }
    return loss, metrics
