"""OPD, on-policy distillation (methods.md §3): the RISD baseline, as an online learner task.

    for rollout i (every learner step):
        before_rollout(i):  pi_S_old <- pi_S: rank 0 sends the student's weights to the student engines (version
                            i + 1, verified by checksum readback); all ranks wait for it
        collate(inputs):    the student engines sample `opd_samples` reasoning + score outputs per input (the
                            teacher's reasoning form: its own reasoning, the fixed score prefix, a score token);
                            the teacher engines return log pi_T of the same tokens (`TokenScorer`)
        loss:               log pi_S of the sampled tokens by teacher forcing;
                            L = -(1/T) sum_t (log pi_T - log pi_S_old)(y_t) log pi_S(y_t)  (zray.losses.opd)

The trained student answers with reasoning, as its teacher does: the saved model carries
`zray_scoring.json` = {"form": "reasoning", "method": "opd"}. Both engine sets are given by the job (EnginePools
of engine actors): no Ray here. The forced score prefix is not sampled, so it carries no loss; the score token is
sampled (from q) and does.

Shape legend: N inputs, G = opd_samples, B = N * G sequences, T response tokens.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from zray.config import TrainStudentConfig
from zray.losses.opd import opd_loss
from zray.models.teacher_forcing import PolicyModel, forced_logprobs, rollout_inputs
from zray.models.vlm import (cached_processor, load_vlm_weights, save_vlm, served_dtype, trainable_vlm,
                            write_scoring_file)
from zray.rubric import BUILTIN_RUBRIC, Rubric
from zray.scores import score_token_ids
from zray.tasks.gdso import ROLLOUT_METRICS, RolloutSource, send_weights
from zray.tasks.risd import input_requests
from zray.types import ForcedSequence, WeightVersionError


class TokenScorer(Protocol):
    """What OPD needs of the teacher engines (`actors.engine_pool.EnginePool` is one)."""

    def token_logprobs(self, sequences: Sequence[ForcedSequence]) -> list[torch.Tensor]: ...


@dataclass
class StudentState:
    """A worker's mutable side of the task (built in `OPDTask.build_model`, never pickled)."""

    served_dtype: torch.dtype | None  # the dtype the student engines serve; None: as trained
    version: int = 0
    rollout_index: int = 0
    sync_s: float = 0.0


@dataclass(kw_only=True, eq=False)
class OPDTask:
    """An `OnlineTask` (zray.training.task): see the module docstring."""

    model_dir: str
    cfg: TrainStudentConfig
    rollouts: RolloutSource  # the student's engines
    teacher: TokenScorer  # the frozen teacher's engines
    seed: int = 0
    name: str = "student_opd"
    rubric: Rubric = BUILTIN_RUBRIC  # the dimensions' anchors in the scoring prompt (an import's rubric)
    updates_per_rollout: int = 1
    fp32_keys: tuple[str, ...] = ("old_logp", "teacher_logp")
    state: StudentState | None = field(default=None, init=False, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "state": None}

    @property
    def processor(self) -> Any:
        return cached_processor(str(self.model_dir))

    def _state(self) -> StudentState:
        if self.state is None:
            raise RuntimeError(f"{self.name}: build_model() has not run in this process (the learner calls it first)")
        return self.state

    def build_model(self) -> PolicyModel:
        self.state = StudentState(served_dtype=served_dtype(self.model_dir))
        return PolicyModel(trainable_vlm(self.model_dir), score_token_ids(self.processor)).train()

    def before_rollout(self, engine: Any, *, rollout_index: int) -> None:
        state = self._state()
        t0 = time.perf_counter()
        version = rollout_index + 1
        weights = engine.full_state_dict() if engine.rank == 0 or engine.zero_stage == 3 else None
        if engine.rank == 0:
            send_weights(self.rollouts, weights, dtype=state.served_dtype, version=version)
        if dist.is_initialized():
            dist.barrier()
        state.version, state.rollout_index, state.sync_s = version, rollout_index, time.perf_counter() - t0

    def collate(self, rows: dict[str, Any]) -> dict[str, Any]:
        state, c = self._state(), self.cfg
        requests = input_requests(rows, self.rubric)
        rank = dist.get_rank() if dist.is_initialized() else 0
        t0 = time.perf_counter()
        rollout = self.rollouts.generate(requests, group_size=c.opd_samples, max_reasoning_tokens=c.max_reasoning_tokens,
                                         temperature=c.temperature,
                                         seed=self.seed * 7919 + state.rollout_index * 131 + rank)
        if rollout.weights_version != state.version:
            raise WeightVersionError(f"rollout came from weights version {rollout.weights_version}, but the learner "
                                     f"synced version {state.version}")
        t1 = time.perf_counter()
        images = [r.image for r in requests]
        teacher = self.teacher.token_logprobs(ForcedSequence.from_rollout(rollout, images))
        t2 = time.perf_counter()
        batch: dict[str, Any] = rollout_inputs(self.processor, rollout, images)
        teacher_logp_BT = torch.zeros_like(batch["old_logp"])
        for b, logp in enumerate(teacher):
            if len(logp) != int(batch["resp_mask"][b].sum()):
                raise ValueError(f"sequence {b}: the teacher scored {len(logp)} tokens, the rollout has "
                                 f"{int(batch['resp_mask'][b].sum())}")
            teacher_logp_BT[b, : len(logp)] = logp
        batch["teacher_logp"] = torch.where(batch["policy_mask"], teacher_logp_BT, 0.0)
        mask = batch["policy_mask"]
        gap = (batch["old_logp"] - batch["teacher_logp"])[mask]
        batch[ROLLOUT_METRICS] = {
            "rollout_reverse_kl": float(gap.mean()) if gap.numel() else 0.0,
            "format_fail_frac": float(rollout.num_malformed()) / rollout.mu_NG.numel(),
            "response_tokens": float(mask.sum(-1).float().mean()), "rollout_mu": float(rollout.mu_NG.mean()),
            "rollout_s": t1 - t0, "teacher_s": t2 - t1, "sync_s": state.sync_s, "weights_version": float(state.version)}
        return batch

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        logp_BT, _ = forced_logprobs(model, batch, score_token_ids(self.processor))
        loss, metrics = opd_loss(logp_BT, batch["old_logp"], batch["teacher_logp"], batch["policy_mask"])
        metrics.update(batch[ROLLOUT_METRICS])
        return loss, metrics

    def save_pretrained(self, model: torch.nn.Module, out_dir: Path) -> None:
        vlm = model.vlm if isinstance(model, PolicyModel) else model
        write_scoring_file(save_vlm(vlm, self.model_dir, out_dir), form="reasoning", method="opd")

    def load_pretrained(self, model: torch.nn.Module, ckpt_dir: Path) -> None:
        load_vlm_weights(model, ckpt_dir)  # a PolicyModel's state dict is its VLM's
