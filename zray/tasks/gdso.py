"""GDSO and GRPO as an online learner task: rollouts from the teacher engines, losses on the Ray Train workers.

How methods.md §2 maps onto the learner (`actors/learner/worker_loop.py` runs it in every Ray Train worker):

    for rollout i (every K = updates_per_rollout learner steps):
        before_rollout(i):  outer iteration start (i % M == 0): pi_ref <- pi_theta
                            pi_old <- pi_theta: rank 0 sends the full weights to every engine, version i + 1,
                            checked by checksum readback (`RolloutSource.load_weights`); all ranks wait for it
        collate(pairs):     G rollouts per side from the engines (RolloutBatch of version i + 1), rewards
                            (r_pt, r_pw from the rollout's mu; minus format_penalty for a malformed output), per-side
                            advantages, pi_ref's log-probs of the sampled tokens (teacher forcing, no grad)
        loss, K times:      pi_theta's log-probs and q by teacher forcing; L = L_grpo + a_pt L_ce + a_pw L_pw

The trained model and pi_ref are `PolicyModel`s (zray.models.teacher_forcing): the VLM with a forward that
returns the response log-probs and q, the LM head applied in chunks of tokens (no B x T x V logits); their state
dicts are the VLM's under Hugging Face names, so `engine.full_state_dict()` is what the engines load.

GRPO (the baseline) is the same loop with reward r_pt only and no direct terms (lam_pw = alpha_pt = alpha_pw =
0). Each worker rolls out its own pairs (the learner's data shard); the engines serve all workers.

The rollouts come from a `RolloutSource` given by the job (`actors.engine_pool.EnginePool` over TeacherEngine
actors): this module imports no Ray. The task itself is plain configuration, shipped to every worker; what a
worker builds and changes while training (pi_ref, the weights version, the last sync time) is its
`PolicyState`, created in `build_model`. Resuming is exact for pi_ref: every checkpoint carries it
(`task_state`), so a run resumed in the middle of an outer iteration keeps the reference it had.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from zray.checksum import sync_checksum
from zray.config import TrainTeacherConfig
from zray.losses.gdso import gdso_loss, gdso_rewards, penalize_malformed, side_advantages
from zray.models.teacher_forcing import PolicyModel, forced_logprobs, rollout_inputs
from zray.models.vlm import (cached_processor, load_vlm_weights, save_vlm, served_dtype, trainable_vlm,
                            write_scoring_file)
from zray.rubric import BUILTIN_RUBRIC, Rubric, ScoreRequest
from zray.scores import score_token_ids
from zray.tasks.score_sft import pair_requests
from zray.types import RolloutBatch, WeightVersionError

ROLLOUT_METRICS = "rollout_metrics"  # batch key: {name: float} of the rollout a batch came from
REF_PREFIX = "ref."  # task_state keys: pi_ref's state dict under this prefix


class RolloutSource(Protocol):
    """What GDSO needs of the rollout engines (`actors.engine_pool.EnginePool` is one)."""

    def generate(self, requests: list[ScoreRequest], *, group_size: int, max_reasoning_tokens: int,
                 temperature: float, seed: int | None) -> RolloutBatch: ...

    verify_columns: int  # how the engines check a weight update: zray.checksum.sync_checksum's `columns`

    def load_weights(self, weights: dict[str, torch.Tensor], *, version: int, checksum: str) -> Any: ...


def send_weights(source: RolloutSource, weights: dict[str, torch.Tensor], *, dtype: torch.dtype | None,
                 version: int) -> Any:
    """Have the engines of `source` serve `weights` as `version`, sent in the dtype they serve (`dtype`; None: as
    they are) with the checksum of what is sent, full or sampled as `source.verify_columns` says (the engines
    verify it by readback); returns their reports."""
    sent = {k: v.to(dtype) for k, v in weights.items()} if dtype is not None else weights
    return source.load_weights(sent, version=version,
                               checksum=sync_checksum(sent, columns=source.verify_columns, version=version))


def serve_model(source: RolloutSource, model_dir: str | Path, *, dtype: torch.dtype | None, version: int) -> Any:
    """Have the engines of `source` serve the VLM saved in `model_dir` as `version` (`send_weights` of its state
    dict: the names and layout the learner syncs every rollout); returns their reports."""
    return send_weights(source, trainable_vlm(model_dir).state_dict(), dtype=dtype, version=version)


@dataclass
class PolicyState:
    """A worker's mutable side of the task (built in `GDSOTask.build_model`, never pickled)."""

    ref: PolicyModel                     # pi_ref: frozen copy of the policy, reset at each outer iteration
    served_dtype: torch.dtype | None     # the dtype the engines serve (weights are sent in it); None: as trained
    ref_fresh: bool = False              # pi_ref holds a policy of this run (False until the first reset)
    version: int = 0                     # weights version last sent to the engines
    rollout_index: int = 0
    sync_s: float = 0.0                  # seconds of the last before_rollout (weight sync)


@dataclass(kw_only=True, eq=False)
class GDSOTask:
    """An `OnlineTask` and `StatefulTask` (zray.training.task): see the module docstring."""

    model_dir: str
    cfg: TrainTeacherConfig
    rollouts: RolloutSource
    seed: int = 0
    name: str = "teacher_gdso"
    rubric: Rubric = BUILTIN_RUBRIC  # the dimensions' anchors in the scoring prompt (an import's rubric)
    fp32_keys: tuple[str, ...] = ("old_logp", "ref_logp", "advantages", "labels")
    policy: PolicyState | None = field(default=None, init=False, repr=False)  # set on the workers

    def __post_init__(self) -> None:
        if self.cfg.method not in ("gdso", "grpo"):
            raise ValueError(f"GDSOTask: train_teacher.method={self.cfg.method!r} is not allowed: expected 'gdso' "
                             "or 'grpo' (SFT is zray.tasks.score_sft.ScoreSFTTask)")
        if self.rollouts is None:
            raise ValueError("GDSOTask.rollouts is None: expected a RolloutSource (e.g. an EnginePool)")

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "policy": None}  # worker state stays on its worker

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

    def _policy(self) -> PolicyState:
        if self.policy is None:
            raise RuntimeError(f"{self.name}: build_model() has not run in this process (the learner calls it first)")
        return self.policy

    # ------------------------------------------------------------------------------------- LearnerTask
    def build_model(self) -> PolicyModel:
        """pi_theta as a `PolicyModel` (teacher forcing without B x T x V logits; its state dict is the VLM's, under
        Hugging Face names), and this worker's `PolicyState` with pi_ref (a frozen PolicyModel)."""
        score_ids = score_token_ids(self.processor)
        ref = PolicyModel(trainable_vlm(self.model_dir), score_ids).eval()
        ref.requires_grad_(False)
        # The engines serve the checkpoint's dtype (TeacherEngine loads it with that dtype): send weights in it.
        self.policy = PolicyState(ref=ref, served_dtype=served_dtype(self.model_dir))
        return PolicyModel(trainable_vlm(self.model_dir), score_ids).train()

    def before_rollout(self, engine: Any, *, rollout_index: int) -> None:
        policy = self._policy()
        t0 = time.perf_counter()
        reset = rollout_index % self.cfg.inner_steps == 0 or not policy.ref_fresh
        weights = None
        if engine.rank == 0 or reset or engine.zero_stage == 3:  # ZeRO-3's gather is a collective of all ranks
            weights = engine.full_state_dict()
        if reset:
            policy.ref.load_state_dict(weights)  # outer iteration: pi_ref <- pi_theta
            policy.ref_fresh = True
        version = rollout_index + 1
        if engine.rank == 0:
            send_weights(self.rollouts, weights, dtype=policy.served_dtype, version=version)
        if dist.is_initialized():
            dist.barrier()
        policy.version, policy.rollout_index, policy.sync_s = version, rollout_index, time.perf_counter() - t0

    def collate(self, rows: dict[str, Any]) -> dict[str, Any]:
        policy, c = self._policy(), self.cfg
        requests, labels_P2 = pair_requests(rows, rubric=self.rubric)
        t0 = time.perf_counter()
        rank = dist.get_rank() if dist.is_initialized() else 0
        rollout = self.rollouts.generate(requests, group_size=c.group_size,
                                         max_reasoning_tokens=c.max_reasoning_tokens, temperature=c.temperature,
                                         seed=self.seed * 7919 + policy.rollout_index * 131 + rank)
        if rollout.weights_version != policy.version:
            raise WeightVersionError(f"rollout came from weights version {rollout.weights_version}, but the learner "
                                     f"synced version {policy.version}")
        rollout_s = time.perf_counter() - t0
        num_pairs, group = labels_P2.shape[0], c.group_size
        mu_P2G = rollout.mu_NG.view(num_pairs, 2, group)
        ok_P2G = rollout.format_ok_NG.view(num_pairs, 2, group)
        coef = self.coefficients
        rewards = gdso_rewards(mu_P2G, labels_P2, lam_pt=coef["lam_pt"], lam_pw=coef["lam_pw"])
        rewards = penalize_malformed(rewards, ok_P2G, c.format_penalty)
        advantages = side_advantages(rewards)
        t1 = time.perf_counter()
        batch: dict[str, Any] = rollout_inputs(self.processor, rollout, [r.image for r in requests])
        with torch.no_grad():
            ref_logp, _ = forced_logprobs(policy.ref, batch, score_token_ids(self.processor))
        batch.update(ref_logp=ref_logp, advantages=advantages.reshape(-1), labels=labels_P2)
        batch[ROLLOUT_METRICS] = {
            "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
            "adv_abs_mean": float(advantages.abs().mean()),
            "format_fail_frac": float(rollout.num_malformed()) / rollout.mu_NG.numel(),
            "response_tokens": float(rollout.policy_mask_NGT.sum(-1).float().mean()),
            "rollout_gap": float(mu_P2G[:, 0].mean() - mu_P2G[:, 1].mean()),
            "rollout_s": rollout_s, "ref_s": time.perf_counter() - t1, "sync_s": policy.sync_s,
            "weights_version": float(policy.version)}
        return batch

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
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
        metrics.update(batch[ROLLOUT_METRICS])
        return loss, metrics

    def save_pretrained(self, model: torch.nn.Module, out_dir: Path) -> None:
        vlm = model.vlm if isinstance(model, PolicyModel) else model
        write_scoring_file(save_vlm(vlm, self.model_dir, out_dir), form="reasoning", method=self.cfg.method)

    def load_pretrained(self, model: torch.nn.Module, ckpt_dir: Path) -> None:
        load_vlm_weights(model, ckpt_dir)  # a PolicyModel's state dict is its VLM's

    # ------------------------------------------------------------------------------------- StatefulTask
    def task_state(self) -> dict[str, torch.Tensor]:
        """pi_ref's weights once it holds a policy of this run (empty before the first rollout)."""
        policy = self._policy()
        if not policy.ref_fresh:
            return {}
        return {REF_PREFIX + k: v.detach().cpu() for k, v in policy.ref.state_dict().items()}

    def load_task_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore pi_ref from a checkpoint's `task_state` (an empty state leaves it to the next rollout)."""
        policy = self._policy()
        ref_state = {k[len(REF_PREFIX):]: v for k, v in state.items() if k.startswith(REF_PREFIX)}
        if not ref_state:
            return
        policy.ref.load_state_dict(ref_state, strict=True)
        policy.ref_fresh = True
