"""RISD (methods.md §3): the student learns the teacher's reasoning-conditioned score distribution, answering in one
token. Two halves:

    targets = collect_teacher_targets(source, inputs, out_dir=..., teacher_samples=n, ...)   # driver, once
    fit(RISDTask(model_dir=student_base), ..., datasets={"train": ray.data.from_arrow(targets)})

1. **Teacher targets.** Every unlabelled input (prompt, image, dimension; `zray.data.distill_inputs`) streams
   through the teacher engines (a `TeacherSource`: `actors.engine_pool.EnginePool`), which sample `n` reasoning
   traces and return q_T(. | p, I, d, rho) after each (the rollout's q at its score position). They are written in
   chunks of Parquet under `out_dir` as they arrive, so an interrupted collection resumes at the first missing
   chunk, and a finished one is reused by every later run on the same inputs and teacher.
2. **The student** (a `LearnerTask`, offline): the student form of `zray.rubric` (no reasoning; the score position
   is the first answer position), q_S = softmax of the nine score tokens' logits there, and the loss
   KL(mean_n q_T || q_S) (`zray.losses.risd`). The saved model carries `zray_scoring.json` = {"form": "direct",
   "method": "risd"}, so `zray evaluate` scores it in one token.

Shape legend: B inputs, n teacher samples per input, K = 9 score bins.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from zray.data.parquet import read_parquet_file
from zray.data.render import decode_png
from zray.losses.risd import risd_loss
from zray.models.vlm import cached_processor, load_vlm_weights, save_vlm, score_inputs, trainable_vlm, write_scoring_file
from zray.rubric import BUILTIN_RUBRIC, NUM_BINS, Rubric, ScoreRequest
from zray.scores import score_token_ids
from zray.training.runs import atomic_path, write_text_atomic
from zray.types import RolloutBatch

TARGET_COLUMNS = ("q_teacher", "teacher_mu", "teacher_tokens", "teacher_format_ok", "teacher_version")
MANIFEST = "targets.json"  # what the chunks were collected from; a mismatch refuses to mix targets


class TeacherSource(Protocol):
    """What RISD needs of the teacher engines (`actors.engine_pool.EnginePool` is one)."""

    def generate(self, requests: list[ScoreRequest], *, group_size: int, max_reasoning_tokens: int,
                 temperature: float, seed: int | None) -> RolloutBatch: ...


def input_requests(rows: dict[str, Any], rubric: Rubric = BUILTIN_RUBRIC) -> list[ScoreRequest]:
    """Student-form ScoreRequests (no reasoning) of a batch of input rows (prompt, image PNG, dimension), each
    dimension with its anchors in `rubric` (an import's rubric for imported data: custom dimensions)."""
    return [ScoreRequest(str(p), decode_png(bytes(im)), str(d), anchors=rubric.anchors_for(str(d)))
            for p, im, d in zip(rows["prompt"], rows["image"], rows["dimension"], strict=True)]


def target_columns(rollout: RolloutBatch) -> dict[str, list]:
    """The target columns of one rollout (N inputs x n samples): q_teacher (n * K floats per input, sample-major),
    the mean expected score, the mean reasoning tokens, the fraction of well-formed samples, the weights version."""
    n = rollout.num_inputs
    return {
        "q_teacher": rollout.q_NGK.reshape(n, -1).double().tolist(),
        "teacher_mu": rollout.mu_NG.double().mean(-1).tolist(),
        "teacher_tokens": rollout.num_reasoning_NG.double().mean(-1).tolist(),
        "teacher_format_ok": rollout.format_ok_NG.double().mean(-1).tolist(),
        "teacher_version": [int(rollout.weights_version)] * n,
    }


def collect_teacher_targets(source: TeacherSource, inputs: pa.Table, *, out_dir: str | Path, teacher_samples: int,
                            max_reasoning_tokens: int, temperature: float, seed: int, chunk_size: int = 256,
                            identity: dict[str, Any] | None = None,
                            progress: Callable[[int, int], None] | None = None,
                            rubric: Rubric = BUILTIN_RUBRIC) -> pa.Table:
    """`inputs` joined with the teacher's targets (TARGET_COLUMNS), collected chunk by chunk into `out_dir`.

    `identity` (e.g. the teacher dir and the input count) is written beside the chunks; collecting into a dir
    whose identity or settings differ raises ValueError rather than mixing targets of two teachers.
    `progress(done, total)` is called after each chunk. `rubric`: the anchors of the inputs' dimensions.
    """
    if chunk_size < 1 or teacher_samples < 1:
        raise ValueError(f"chunk_size={chunk_size}, teacher_samples={teacher_samples}: expected integers >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"identity": identity or {}, "num_inputs": inputs.num_rows, "teacher_samples": teacher_samples,
                "max_reasoning_tokens": max_reasoning_tokens, "temperature": temperature, "seed": seed,
                "chunk_size": chunk_size}
    manifest = out / MANIFEST
    if manifest.exists() and json.loads(manifest.read_text()) != json.loads(json.dumps(settings)):
        raise ValueError(f"{out} holds teacher targets collected with other settings ({manifest}): remove it or "
                         "choose another dir")
    write_text_atomic(manifest, json.dumps(settings, indent=2) + "\n")
    parts = []
    starts = range(0, inputs.num_rows, chunk_size)
    for c, start in enumerate(starts):
        path = out / f"part-{c:05d}.parquet"
        if not path.exists():
            chunk = inputs.slice(start, chunk_size)
            rollout = source.generate(input_requests(chunk.to_pydict(), rubric), group_size=teacher_samples,
                                      max_reasoning_tokens=max_reasoning_tokens, temperature=temperature,
                                      seed=seed * 1_000_003 + start)
            table = chunk
            for name, values in target_columns(rollout).items():
                table = table.append_column(name, pa.array(values))
            with atomic_path(path) as tmp:  # a chunk exists whole or not at all
                pq.write_table(table, str(tmp))
        parts.append(read_parquet_file(path))  # a chunk of an earlier run that does not read names its file
        if progress is not None:
            progress(min(start + chunk_size, inputs.num_rows), inputs.num_rows)
    return pa.concat_tables(parts)


@dataclass(frozen=True, kw_only=True)
class RISDTask:
    """KL(q_T || q_S) at the student-form score position (a `LearnerTask`); rows carry `q_teacher` (n * K)."""

    model_dir: str
    name: str = "student_risd"
    rubric: Rubric = BUILTIN_RUBRIC  # the dimensions' anchors in the scoring prompt (an import's rubric)
    fp32_keys: tuple[str, ...] = ("q_teacher",)  # the learner never casts the targets to bf16

    @property
    def processor(self) -> Any:
        return cached_processor(str(self.model_dir))

    def build_model(self) -> torch.nn.Module:
        return trainable_vlm(self.model_dir)

    def collate(self, rows: dict[str, Any]) -> dict[str, torch.Tensor]:
        requests = input_requests(rows, self.rubric)
        batch = {k: v for k, v in score_inputs(self.processor, requests).items() if isinstance(v, torch.Tensor)}
        q = np.stack([np.asarray(v, dtype=np.float32) for v in rows["q_teacher"]])
        if q.shape[1] % NUM_BINS:
            raise ValueError(f"q_teacher has {q.shape[1]} values per row: expected n * {NUM_BINS} (n samples)")
        batch["q_teacher"] = torch.from_numpy(q.reshape(len(requests), -1, NUM_BINS))
        return batch

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        q_teacher_BnK = batch["q_teacher"].float()
        out = model(**{k: v for k, v in batch.items() if k != "q_teacher"}, logits_to_keep=1, use_cache=False)
        ids = torch.as_tensor(score_token_ids(self.processor), device=q_teacher_BnK.device)
        return risd_loss(out.logits[:, -1, :].float()[:, ids], q_teacher_BnK)

    def save_pretrained(self, model: torch.nn.Module, out_dir: Path) -> None:
        write_scoring_file(save_vlm(model, self.model_dir, out_dir), form="direct", method="risd")

    def load_pretrained(self, model: torch.nn.Module, ckpt_dir: Path) -> None:
        load_vlm_weights(model, ckpt_dir)
