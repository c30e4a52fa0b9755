"""RISD: Reasoning-Internalized Score Distillation (methods.md §3), as a pure function.

Legend (tensor-name suffixes): B examples (prompt, image, dimension), n teacher reasoning samples per example,
K = 9 score bins.

The teacher reasons, then scores: q_T(. | p, I, d, rho). The student scores in one token: q_S(. | p, I, d).
With n >= 1 teacher samples per example (n = 1 in the paper; averaging over n is our extension):

    qbar_T      = (1 / n) sum_i q_T(. | rho_i)                          (no gradient)
    L_risd      = KL(qbar_T || q_S) = sum_k qbar_T[k] (log qbar_T[k] - log q_S[k])
                = CE(qbar_T, q_S) - H(qbar_T)                           (per example, mean over B)

with 0 log 0 = 0 wherever the teacher puts no mass. The teacher's entropy is a constant, so the gradient is
the soft-label cross-entropy's: dL/dz_S = (softmax(z_S) - qbar_T) / B for student logits z_S. Forward KL is
mean-seeking: the student covers every bin the teacher's samples reach.
"""

from __future__ import annotations

import torch

from zray.scores import NUM_BINS, score_bins

SUM_TOLERANCE = 1e-3  # a teacher distribution must sum to 1 within this


def _teacher_mean(q_T: torch.Tensor, batch: int) -> torch.Tensor:
    """qbar_T (B, K) from q_T of shape (B, K) or (B, n, K), validated."""
    if q_T.dim() not in (2, 3) or q_T.shape[0] != batch or q_T.shape[-1] != NUM_BINS:
        raise ValueError(f"teacher q shape {tuple(q_T.shape)}: expected ({batch}, {NUM_BINS}) or "
                         f"({batch}, n, {NUM_BINS}) with n teacher reasoning samples per example")
    q = q_T.detach()
    if q.dim() == 3:
        if q.shape[1] == 0:
            raise ValueError(f"teacher q shape {tuple(q_T.shape)}: expected at least one sample per example (n >= 1)")
        q = q.mean(dim=1)
    if not bool(torch.isfinite(q).all()) or bool((q < 0).any()):
        raise ValueError("teacher q has negative or non-finite entries: expected probabilities")
    worst = float((q.sum(-1) - 1.0).abs().max()) if q.numel() else 0.0
    if worst > SUM_TOLERANCE:
        raise ValueError(f"teacher q rows sum to 1 +- {worst:.3g}: expected distributions over the {NUM_BINS} bins "
                         f"(tolerance {SUM_TOLERANCE}); renormalise score-token log-probs first "
                         "(zray.scores.distribution_from_logprobs)")
    return q


def risd_loss(student_logits_BK: torch.Tensor, teacher_q: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """L_risd = mean_B KL(qbar_T || q_S) (methods.md §3); gradient flows through `student_logits_BK` only.

    Args:
        student_logits_BK: the student's score-token logits at its score position, or log-probabilities of the
            nine score tokens (normalised or not: q_S = softmax of them either way, as in
            `zray.scores.distribution_from_logprobs`). -inf is allowed where the teacher has no mass.
        teacher_q: q_T, shape (B, K), or (B, n, K) for n reasoning samples per example (averaged over n).
    Returns:
        (loss, metrics) with metrics loss (= kl), ce (soft-label cross-entropy), teacher_entropy (of qbar_T),
        student_entropy, mu_student, mu_teacher, mu_abs_err (floats, means over B).
    """
    if student_logits_BK.dim() != 2 or student_logits_BK.shape[-1] != NUM_BINS:
        raise ValueError(f"student logits shape {tuple(student_logits_BK.shape)}: expected (B, {NUM_BINS}) "
                         "score-token logits or log-probs")
    logits = student_logits_BK.float() if student_logits_BK.dtype in (torch.float16, torch.bfloat16) \
        else student_logits_BK
    qbar_BK = _teacher_mean(teacher_q, logits.shape[0]).to(device=logits.device, dtype=logits.dtype)
    log_q_S_BK = torch.log_softmax(logits, dim=-1)
    # 0 * log q_S = 0 where the teacher has no mass (also when the student's logit there is -inf)
    ce_B = -(qbar_BK * log_q_S_BK.masked_fill(qbar_BK == 0, 0.0)).sum(-1)
    entropy_B = -torch.xlogy(qbar_BK, qbar_BK).sum(-1)
    kl_B = ce_B - entropy_B
    loss = kl_B.mean()
    with torch.no_grad():
        q_S_BK = log_q_S_BK.exp()
        bins_K = score_bins(logits.device, logits.dtype)
        mu_S_B, mu_T_B = q_S_BK @ bins_K, qbar_BK @ bins_K
        metrics = {
            "loss": float(loss),
            "ce": float(ce_B.mean()),
            "teacher_entropy": float(entropy_B.mean()),
            "student_entropy": float(-torch.xlogy(q_S_BK, q_S_BK).sum(-1).mean()),
            "mu_student": float(mu_S_B.mean()),
            "mu_teacher": float(mu_T_B.mean()),
            "mu_abs_err": float((mu_S_B - mu_T_B).abs().mean()),
        }
    return loss, metrics
