"""GDSO: Group-wise Direct Score Optimization (methods.md §2), as pure functions.

Legend (tensor-name suffixes): P same-prompt pairs in the batch, 2 sides (index 0 = winner w, 1 = loser l),
G outputs sampled per side, K = 9 score bins, T tokens per output.

For side j with label s_j, other side jbar, gap_j = s_j - s_jbar, R = S_max - S_min = 4:

    r_pt[j,i] = 1 - |mu[j,i] - s_j| / R
    r_pw[j,i] = 1 - (1 / (G R)) sum_k |(mu[j,i] - mu[jbar,k]) - gap_j|
    r         = lam_pt r_pt + lam_pw r_pw                    (from rollout values, no gradient)
    A[j,i]    = (r[j,i] - mean_i r[j,:]) / (std_i r[j,:] + eps)          (per side's group)

    L_ce  = -(1 / 2G) sum_{j,i} log q[j,i](s_j)
    L_pw  = (1 / (2 G^2 R)) sum_{j,i,k} |(mu[j,i] - mu[jbar,k]) - gap_j|
    L     = L_grpo + alpha_pt L_ce + alpha_pw L_pw

with q, mu recomputed under the current policy for the direct terms (gradient flows through them), and
L_grpo the clipped policy term with k3 KL of `grpo.py`. Batch losses average over the P pairs.
"""

from __future__ import annotations

import torch

from zray.losses.grpo import Aggregation, group_advantages, grpo_policy_loss
from zray.scores import SCORE_MIN, SCORE_RANGE, SCORE_STEP, score_bins


def _check_sides(mu_P2G: torch.Tensor, labels_P2: torch.Tensor) -> None:
    if mu_P2G.dim() != 3 or mu_P2G.shape[1] != 2:
        raise ValueError(f"mu shape {tuple(mu_P2G.shape)}: expected (P, 2, G) with side 0 = winner, 1 = loser")
    if labels_P2.shape != mu_P2G.shape[:2]:
        raise ValueError(f"labels shape {tuple(labels_P2.shape)}: expected {tuple(mu_P2G.shape[:2])}")


def _cross_gap_errors(mu_P2G: torch.Tensor, labels_P2: torch.Tensor) -> torch.Tensor:
    """E[p, j, i, k] = |(mu[p,j,i] - mu[p,jbar,k]) - gap_j|, shape (P, 2, G, G)."""
    other_P2G = mu_P2G.flip(1)  # side jbar
    gap_P2 = labels_P2 - labels_P2.flip(1)
    diff_P2GG = mu_P2G.unsqueeze(-1) - other_P2G.unsqueeze(-2)
    return (diff_P2GG - gap_P2[..., None, None]).abs()


def pointwise_rewards(mu_P2G: torch.Tensor, labels_P2: torch.Tensor, score_range: float = SCORE_RANGE) -> torch.Tensor:
    """r_pt (P, 2, G) = 1 - |mu - s_j| / R."""
    _check_sides(mu_P2G, labels_P2)
    return 1.0 - (mu_P2G - labels_P2.unsqueeze(-1)).abs() / score_range


def pairwise_gap_rewards(mu_P2G: torch.Tensor, labels_P2: torch.Tensor,
                         score_range: float = SCORE_RANGE) -> torch.Tensor:
    """r_pw (P, 2, G) = 1 - (1 / (G R)) sum_k |(mu[j,i] - mu[jbar,k]) - gap_j|."""
    _check_sides(mu_P2G, labels_P2)
    group = mu_P2G.shape[-1]
    return 1.0 - _cross_gap_errors(mu_P2G, labels_P2).sum(-1) / (group * score_range)


def gdso_rewards(mu_P2G: torch.Tensor, labels_P2: torch.Tensor, *, lam_pt: float = 1.0, lam_pw: float = 1.0,
                 score_range: float = SCORE_RANGE) -> torch.Tensor:
    """r (P, 2, G) = lam_pt r_pt + lam_pw r_pw, from rollout expected scores (no gradient)."""
    mu = mu_P2G.detach()
    return (lam_pt * pointwise_rewards(mu, labels_P2, score_range)
            + lam_pw * pairwise_gap_rewards(mu, labels_P2, score_range))


def penalize_malformed(rewards_P2G: torch.Tensor, format_ok_P2G: torch.Tensor, penalty: float) -> torch.Tensor:
    """Rewards with `penalty` subtracted from every malformed output (no score prefix written by the model).

    Our treatment of format failures (methods.md leaves it open): a malformed output keeps the reward of the q
    read at its forced score position, minus a format penalty. Within a group that mixes well- and malformed
    outputs this pushes towards writing the prefix; in a group of only malformed outputs (a base model that never
    learnt the score prefix) the advantages still rank the outputs by their score quality, so training has a
    signal from the first step."""
    if format_ok_P2G.shape != rewards_P2G.shape:
        raise ValueError(f"format_ok {tuple(format_ok_P2G.shape)} does not match rewards {tuple(rewards_P2G.shape)}")
    return rewards_P2G - float(penalty) * (~format_ok_P2G.bool()).to(rewards_P2G.dtype)


def side_advantages(rewards_P2G: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """A (P, 2, G): rewards normalised within each side's group of G outputs."""
    return group_advantages(rewards_P2G, eps)


def pointwise_ce_loss(log_q_P2GK: torch.Tensor, label_index_P2: torch.Tensor) -> torch.Tensor:
    """L_ce = -(1 / 2G) sum_{j,i} log q[j,i](s_j), averaged over pairs. `log_q` are log-probabilities over K bins."""
    if log_q_P2GK.dim() != 4 or label_index_P2.shape != log_q_P2GK.shape[:2]:
        raise ValueError(f"log_q shape {tuple(log_q_P2GK.shape)} with label_index {tuple(label_index_P2.shape)}: "
                         "expected (P, 2, G, K) and (P, 2)")
    index_P2G1 = label_index_P2.long()[..., None, None].expand(*log_q_P2GK.shape[:3], 1)
    return -log_q_P2GK.gather(-1, index_P2G1).squeeze(-1).mean()


def pairwise_gap_loss(mu_P2G: torch.Tensor, labels_P2: torch.Tensor, score_range: float = SCORE_RANGE) -> torch.Tensor:
    """L_pw = (1 / (2 G^2 R)) sum_{j,i,k} |(mu[j,i] - mu[jbar,k]) - gap_j|, averaged over pairs.

    An L1 match to the labelled gap (not Bradley-Terry): zero exactly when every cross-pair difference
    equals the labelled gap.
    """
    _check_sides(mu_P2G, labels_P2)
    return _cross_gap_errors(mu_P2G, labels_P2).mean(dim=(1, 2, 3)).mean() / score_range


def gdso_loss(
    *,
    logp_P2GT: torch.Tensor,
    old_logp_P2GT: torch.Tensor,
    ref_logp_P2GT: torch.Tensor,
    mask_P2GT: torch.Tensor,
    advantages_P2G: torch.Tensor,
    log_q_P2GK: torch.Tensor,
    labels_P2: torch.Tensor,
    alpha_pt: float = 0.5,
    alpha_pw: float = 0.5,
    clip_eps: float = 0.2,
    beta: float = 0.01,
    aggregation: Aggregation = "sum",
    score_range: float = SCORE_RANGE,
) -> tuple[torch.Tensor, dict[str, float]]:
    """L = L_grpo + alpha_pt L_ce + alpha_pw L_pw (methods.md §2).

    `log_q_P2GK` is the current policy's log score distribution at each output's score position
    (teacher-forced); `labels_P2` are the side labels s_w, s_l on the bins. With alpha_pt = alpha_pw = 0 this
    is exactly the GRPO policy term.
    """
    lead = logp_P2GT.shape[:3]
    if advantages_P2G.shape != lead or log_q_P2GK.shape[:3] != lead:
        raise ValueError(f"advantages {tuple(advantages_P2G.shape)} / log_q {tuple(log_q_P2GK.shape)} do not match "
                         f"the outputs' leading shape {tuple(lead)} (P, 2, G)")
    policy, metrics = grpo_policy_loss(
        logp_P2GT.flatten(0, 2), old_logp_P2GT.flatten(0, 2), ref_logp_P2GT.flatten(0, 2),
        advantages_P2G.flatten(), mask_P2GT.flatten(0, 2), clip_eps=clip_eps, beta=beta, aggregation=aggregation,
    )
    mu_P2G = (log_q_P2GK.exp() * score_bins(log_q_P2GK.device, log_q_P2GK.dtype)).sum(-1)
    label_index = torch.round((labels_P2 - SCORE_MIN) / SCORE_STEP).long()
    ce = pointwise_ce_loss(log_q_P2GK, label_index)
    pw = pairwise_gap_loss(mu_P2G, labels_P2, score_range)
    loss = policy + alpha_pt * ce + alpha_pw * pw
    metrics |= {"ce_loss": float(ce.detach()), "pw_loss": float(pw.detach()), "loss": float(loss.detach()),
                "mu_mean": float(mu_P2G.detach().mean())}
    return loss, metrics
