"""OPD: on-policy distillation, the RISD baseline (methods.md §3, "OPD"), as a pure function.

Legend (tensor-name suffixes): B sequences sampled by the student (reasoning + score), T token positions.

The student samples y ~ pi_S_old; the teacher scores the same tokens. Per token, from rollout values (no
gradient):

    A_t    = log pi_T(y_t | y_<t, x) - log pi_S_old(y_t | y_<t, x)
    L_opd  = -(1 / T_b) sum_t A_t log pi_S(y_t | y_<t, x)        (T_b: the masked tokens of sequence b)

averaged over the sequences that have at least one token. -A_t is a one-sample estimate of the per-token
reverse KL(pi_S_old || pi_T), so the policy gradient of L_opd descends the reverse KL to the teacher.
Where the teacher agrees with the student (A = 0) the gradient is exactly zero.
"""

from __future__ import annotations

import torch


def opd_loss(
    logp_BT: torch.Tensor,
    old_logp_BT: torch.Tensor,
    teacher_logp_BT: torch.Tensor,
    mask_BT: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, float]]:
    """L_opd (methods.md §3); gradient flows through `logp_BT` only.

    Args:
        logp_BT: log pi_S of each sampled token under the current student (teacher-forced, with gradient).
        old_logp_BT: log pi_S_old of the same tokens (the sampling policy; no gradient).
        teacher_logp_BT: log pi_T of the same tokens (the frozen teacher; no gradient).
        mask_BT: 1 (or True) for the student's sampled tokens, 0 for prompt and padding. Masked-out entries
            contribute nothing to the loss or its gradient, whatever they hold (inf and nan included).
    Returns:
        (loss, metrics) with metrics loss, advantage_mean (token mean of A), reverse_kl (token mean of -A, an
        estimate of KL(pi_S_old || pi_T) per token), tokens (number of masked tokens) (floats).
    """
    if not (logp_BT.shape == old_logp_BT.shape == teacher_logp_BT.shape == mask_BT.shape) or logp_BT.dim() != 2:
        raise ValueError(f"shape mismatch: logp {tuple(logp_BT.shape)}, old {tuple(old_logp_BT.shape)}, "
                         f"teacher {tuple(teacher_logp_BT.shape)}, mask {tuple(mask_BT.shape)}: expected all equal "
                         "(B, T)")
    keep_BT = mask_BT.to(device=logp_BT.device).bool()
    advantage_BT = torch.where(keep_BT, teacher_logp_BT.detach() - old_logp_BT.detach(), 0.0).to(logp_BT.dtype)
    logp_kept_BT = logp_BT.masked_fill(~keep_BT, 0.0)
    tokens_B = keep_BT.sum(-1)
    per_seq_B = -(advantage_BT * logp_kept_BT).sum(-1) / tokens_B.clamp(min=1).to(logp_BT.dtype)
    num_seqs = (tokens_B > 0).sum().clamp(min=1)
    loss = per_seq_B.sum() / num_seqs.to(logp_BT.dtype)
    with torch.no_grad():
        num_tokens = int(tokens_B.sum())
        adv_mean = float(advantage_BT.sum() / max(num_tokens, 1))
        metrics = {"loss": float(loss), "advantage_mean": adv_mean, "reverse_kl": -adv_mean,
                   "tokens": float(num_tokens)}
    return loss, metrics
