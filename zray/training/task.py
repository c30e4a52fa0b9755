"""The contract between a job and the generic learner: a `LearnerTask` says what to train.

A task is built in the driver and shipped to every Ray Train worker (so it holds only plain, picklable
configuration: paths, dataclasses, numbers). In each worker the learner calls, in order:

    model = task.build_model()                          # fresh weights (or from an HF-format dir)
    engine = <DeepSpeed or DDP around model>            # the learner's business, not the task's
    for batch_rows in <this worker's shard of the Ray Data split "train">:
        batch = task.collate(batch_rows)                # numpy columns -> tensors
        loss, metrics = task.loss(engine_module, batch) # forward only; the learner does backward/step
    task.save_pretrained(unwrapped_model, dir)          # Hugging Face format, at every checkpoint
    task.load_pretrained(unwrapped_model, dir)          # on resume (optimizer state is restored separately)

`metrics` values are Python floats; the learner averages them over workers and logging steps. The learner adds
`data_s` (collate time) and `update_s` (forward, backward, optimizer) per step.

An `OnlineTask` makes its batches from the policy being trained (RL rollouts). Every `updates_per_rollout`
steps the learner first calls, on every rank, `task.before_rollout(engine, rollout_index=i)` (e.g. send the
current weights to the rollout engines; every rank must call it, as gathering ZeRO-3 weights is collective),
then `collate` (which rolls out), and reuses those batches for the next `updates_per_rollout - 1` steps.
`fp32_keys` names batch entries never cast to bf16 (log-probs).

A `StatefulTask` keeps worker-side state beyond the model that a resumed run needs (GDSO's pi_ref): rank 0
saves `task.task_state()` in every checkpoint (`task_state.safetensors`), and on resume every rank gets it back
through `task.load_task_state(state)` right after `build_model`. The state must be the same on every rank.
Such state lives in a typed attribute the task creates in `build_model` (never in the pickled configuration).

`collate` may also put plain Python values in the batch (e.g. a dict of float metrics of the rollout it came
from): the learner moves and casts tensors only.

A `LengthGrouped` task also says how long each row's sequence will be (`row_lengths`, any monotone proxy such
as characters); with `LearnerConfig.length_window > 0` the learner then batches rows of similar length
together, so less of each micro batch is padding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch


@runtime_checkable
class LearnerTask(Protocol):
    name: str  # short identifier used in run names, logs and TensorBoard tags

    def build_model(self) -> torch.nn.Module:
        """The module to train, on CPU, in train mode; same initial weights on every worker (seeded)."""
        ...

    def collate(self, rows: dict[str, Any]) -> dict[str, Any]:
        """A Ray Data batch (dict of numpy arrays / lists, `batch_format="numpy"`) -> model inputs (tensors)."""
        ...

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Scalar loss with gradient, plus float metrics. `model` may be a DeepSpeed/DDP wrapper: call it."""
        ...

    def save_pretrained(self, model: torch.nn.Module, out_dir: Path) -> None:
        """Write the (unwrapped, full) model in Hugging Face / diffusers format under `out_dir`."""
        ...

    def load_pretrained(self, model: torch.nn.Module, ckpt_dir: Path) -> None:
        """Load weights written by `save_pretrained` into `model` in place."""
        ...


@runtime_checkable
class OnlineTask(LearnerTask, Protocol):
    updates_per_rollout: int  # K gradient updates per rollout batch
    fp32_keys: tuple[str, ...]

    def before_rollout(self, engine: Any, *, rollout_index: int) -> None:
        """Called on every rank before the rollout `rollout_index` (0-based): e.g. sync weights to the engines."""
        ...


@runtime_checkable
class LengthGrouped(LearnerTask, Protocol):
    def row_lengths(self, columns: dict[str, np.ndarray]) -> np.ndarray:
        """The sequence length (or a monotone proxy) of every row of a shard's columns, shape (num_rows,)."""
        ...


@runtime_checkable
class StatefulTask(LearnerTask, Protocol):
    def task_state(self) -> dict[str, torch.Tensor]:
        """Worker-side state to checkpoint (same on every rank; {} for none yet). Called on rank 0."""
        ...

    def load_task_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what `task_state` returned, on every rank, after `build_model`."""
        ...
