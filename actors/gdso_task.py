"""GDSO and GRPO as an online learner task: rollouts from the vLLM engines, losses on the Ray Train workers.

How methods.md §2 maps onto the learner (`actors/learner_loop.py` runs it in every Ray Train worker):

    for rollout i (every K = updates_per_rollout learner steps):
        before_rollout(i):  outer iteration start (i % M == 0): pi_ref <- pi_theta
                            pi_old <- pi_theta: rank 0 sends the full weights to every engine, version i + 1,
                            checked by checksum readback (EnginePool.load_weights); all ranks wait for it
        collate(pairs):     G rollouts per side from the engines (RolloutBatch of version i + 1), rewards
                            (r_pt, r_pw from the rollout's mu; minus format_penalty for a malformed output), per-side
                            advantages, pi_ref's log-probs of the sampled tokens (teacher forcing, no grad)
        loss, K times:      pi_theta's log-probs and q by teacher forcing; L = L_grpo + a_pt L_ce + a_pw L_pw

GRPO (the baseline) is the same loop with reward r_pt only and no direct terms (lam_pw = alpha_pt = alpha_pw =
0). Each worker rolls out its own pairs (the learner's data shard); the engines serve all workers.

Resuming: the learner restores the policy, optimizer and data position; pi_ref is reset to the restored policy
at the first rollout after a resume (exact only when the checkpoint fell on an outer-iteration boundary).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from actors.engine_pool import EnginePool
from actors.teacher_engine import checkpoint_dtype
from zray.checksum import weights_checksum
from zray.config import TrainTeacherConfig
from zray.losses.gdso import gdso_loss, gdso_rewards, penalize_malformed, side_advantages
from zray.models.score_sft import pair_requests, write_scoring_file
from zray.models.teacher_forcing import forced_logprobs, rollout_inputs
from zray.models.vlm import cached_processor, load_vlm_weights, save_vlm, trainable_vlm
from zray.scores import score_token_ids
from zray.types import WeightVersionError


@dataclass(frozen=True, kw_only=True)
class GDSOTask:
    """An `OnlineTask` (zray.training.task): see the module docstring. `engines` are TeacherEngine actor handles."""

    model_dir: str
    cfg: TrainTeacherConfig
    engines: list[Any]
    seed: int = 0
    name: str = "teacher_gdso"
    fp32_keys: tuple[str, ...] = ("old_logp", "ref_logp", "advantages", "labels", "metrics")
    _state: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.cfg.method not in ("gdso", "grpo"):
            raise ValueError(f"GDSOTask: train_teacher.method={self.cfg.method!r} is not allowed: expected 'gdso' "
                             "or 'grpo' (SFT is zray.models.score_sft.ScoreSFTTask)")
        if not self.engines:
            raise ValueError("GDSOTask.engines is empty: expected at least one rollout engine actor")

    @property
    def updates_per_rollout(self) -> int:
        return self.cfg.updates_per_rollout

    @property
    def coefficients(self) -> dict[str, float]:
        """lam_pt, lam_pw, alpha_pt, alpha_pw of this method (GRPO: pointwise expectation reward only)."""
        c = self.cfg
        if c.method == "grpo":
            return {"lam_pt": 1.0, "lam_pw": 0.0, "alpha_pt": 0.0, "alpha_pw": 0.0}
        return {"lam_pt": c.lam_pt, "lam_pw": c.lam_pw, "alpha_pt": c.alpha_pt, "alpha_pw": c.alpha_pw}

    @property
    def processor(self) -> Any:
        return cached_processor(str(self.model_dir))

    # ------------------------------------------------------------------------------------- LearnerTask
    def build_model(self) -> torch.nn.Module:
        ref = trainable_vlm(self.model_dir).eval()
        ref.requires_grad_(False)
        # The engines serve the checkpoint's dtype (TeacherEngine loads it with that dtype): send weights in it.
        served = checkpoint_dtype(self.model_dir)
        self._state.update(ref=ref, pool=EnginePool(self.engines), ref_fresh=False,
                           served_dtype=None if served == "auto" else getattr(torch, served))
        return trainable_vlm(self.model_dir)

    def before_rollout(self, engine: Any, *, rollout_index: int) -> None:
        state = self._state
        t0 = time.perf_counter()
        reset = rollout_index % self.cfg.inner_steps == 0 or not state["ref_fresh"]
        weights = None
        if engine.rank == 0 or reset or engine.zero_stage == 3:  # ZeRO-3's gather is a collective of all ranks
            weights = engine.full_state_dict()
        if reset:
            state["ref"].load_state_dict(weights)  # outer iteration: pi_ref <- pi_theta
            state["ref_fresh"] = True
        version = rollout_index + 1
        if engine.rank == 0:
            served = state["served_dtype"]
            sent = {k: v.to(served) for k, v in weights.items()} if served is not None else weights
            state["pool"].load_weights(sent, version=version, checksum=weights_checksum(sent))
        if dist.is_initialized():
            dist.barrier()
        state.update(version=version, rollout_index=rollout_index, sync_s=time.perf_counter() - t0)

    def collate(self, rows: dict[str, Any]) -> dict[str, torch.Tensor]:
        state, c = self._state, self.cfg
        requests, labels_P2 = pair_requests(rows)
        t0 = time.perf_counter()
        rank = dist.get_rank() if dist.is_initialized() else 0
        rollout = state["pool"].generate(requests, group_size=c.group_size, max_reasoning_tokens=c.max_reasoning_tokens,
                                         temperature=c.temperature,
                                         seed=self.seed * 7919 + state["rollout_index"] * 131 + rank)
        if rollout.weights_version != state["version"]:
            raise WeightVersionError(f"rollout came from weights version {rollout.weights_version}, but the learner "
                                     f"synced version {state['version']}")
        rollout_s = time.perf_counter() - t0
        num_pairs, group = labels_P2.shape[0], c.group_size
        mu_P2G = rollout.mu_NG.view(num_pairs, 2, group)
        ok_P2G = rollout.format_ok_NG.view(num_pairs, 2, group)
        coef = self.coefficients
        rewards = gdso_rewards(mu_P2G, labels_P2, lam_pt=coef["lam_pt"], lam_pw=coef["lam_pw"])
        rewards = penalize_malformed(rewards, ok_P2G, c.format_penalty)
        advantages = side_advantages(rewards)
        t1 = time.perf_counter()
        batch = rollout_inputs(self.processor, rollout, [r.image for r in requests])
        with torch.no_grad():
            ref_logp, _ = forced_logprobs(state["ref"], batch, score_token_ids(self.processor))
        batch.update(ref_logp=ref_logp, advantages=advantages.reshape(-1), labels=labels_P2)
        response_tokens = rollout.policy_mask_NGT.sum(-1).float()
        batch["metrics"] = torch.tensor([
            float(rewards.mean()), float(rewards.std()), float(advantages.abs().mean()),
            float(rollout.num_malformed()) / rollout.mu_NG.numel(), float(response_tokens.mean()),
            float(mu_P2G[:, 0].mean() - mu_P2G[:, 1].mean()), rollout_s, time.perf_counter() - t1,
            state.get("sync_s", 0.0), float(state["version"])], dtype=torch.float64)
        return batch

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        labels_P2 = batch["labels"]
        num_pairs, group = labels_P2.shape[0], self.cfg.group_size
        logp_BT, log_q_BK = forced_logprobs(model, batch, score_token_ids(self.processor))
        shape = (num_pairs, 2, group, -1)
        coef = self.coefficients
        loss, metrics = gdso_loss(
            logp_P2GT=logp_BT.reshape(shape), old_logp_P2GT=batch["old_logp"].reshape(shape),
            ref_logp_P2GT=batch["ref_logp"].reshape(shape), mask_P2GT=batch["policy_mask"].reshape(shape),
            advantages_P2G=batch["advantages"].reshape(num_pairs, 2, group),
            log_q_P2GK=log_q_BK.reshape(shape), labels_P2=labels_P2, alpha_pt=coef["alpha_pt"],
            alpha_pw=coef["alpha_pw"], clip_eps=self.cfg.clip_eps, beta=self.cfg.beta,
            aggregation=self.cfg.aggregation)
        names = ("reward_mean", "reward_std", "adv_abs_mean", "format_fail_frac", "response_tokens",
                 "rollout_gap", "rollout_s", "ref_s", "sync_s", "weights_version")
        metrics.update({k: float(v) for k, v in zip(names, batch["metrics"].tolist(), strict=True)})
        return loss, metrics

    def save_pretrained(self, model: torch.nn.Module, out_dir: Path) -> None:
        write_scoring_file(save_vlm(model, self.model_dir, out_dir), form="reasoning", method=self.cfg.method)

    def load_pretrained(self, model: torch.nn.Module, ckpt_dir: Path) -> None:
        load_vlm_weights(model, ckpt_dir)
