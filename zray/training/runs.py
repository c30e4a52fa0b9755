"""Run bookkeeping on disk: which checkpoints a learner run holds, how long it trained, and its exported model.

A learner run (`actors.learner.fit`) lives in `<storage>/<name>/`: `checkpoint_<step>/` directories (each with
`hf/` and `learner.json`, the step and the logged history; `task_state.safetensors` for a task with worker-side
state), Ray Train's `checkpoint_manager_snapshot.json` (what a resumed run restores from) and, once a job exports
it, `final/` (the model in Hugging Face / diffusers format).
Every job asks these questions through this module, so they have one answer. No Ray, no torch.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

LEARNER_STATE_FILE = "learner.json"  # in every checkpoint: step, data position, history, config
TASK_STATE_FILE = "task_state.safetensors"  # in a checkpoint of a StatefulTask with state: its task_state()
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of a run's checkpoints
FINAL_DIR = "final"


def checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoints of the run in `run_dir` (those holding learner.json), oldest first."""
    return sorted(p.parent for p in Path(run_dir).glob(f"checkpoint_*/{LEARNER_STATE_FILE}"))


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run that Ray Train can resume (its snapshot records a checkpoint), or
    None: a run that never checkpointed, or a directory without Ray Train's snapshot, has nothing to resume."""
    snapshot = Path(run_dir) / SNAPSHOT_FILE
    if not snapshot.is_file() or not json.loads(snapshot.read_text()).get("latest_checkpoint_result"):
        return None
    found = checkpoints(run_dir)
    return found[-1] if found else None


def has_checkpoint(run_dir: str | os.PathLike) -> bool:
    return latest_checkpoint(run_dir) is not None


def read_learner_state(checkpoint_dir: str | os.PathLike) -> dict[str, Any]:
    """The learner.json of a checkpoint: step, micro batches consumed, history, config."""
    return json.loads((Path(checkpoint_dir) / LEARNER_STATE_FILE).read_text())


def export_final(hf_dir: str | os.PathLike, run_dir: str | os.PathLike) -> Path:
    """Copy a checkpoint's exported model (`hf_dir`) to `run_dir/final` (replacing an older one); returns it."""
    final = Path(run_dir) / FINAL_DIR
    shutil.rmtree(final, ignore_errors=True)
    shutil.copytree(hf_dir, final)
    return final


def elapsed_by_step(history: list[dict[str, float]]) -> dict[int, float]:
    """Training seconds at each logged step (sum of step_time_s over the steps since the previous log)."""
    out, total, previous = {}, 0.0, 0
    for entry in history:
        step = int(entry["step"])
        total += entry["step_time_s"] * (step - previous)
        out[step], previous = total, step
    return out


def trained_seconds(history: list[dict[str, float]]) -> float:
    """Training seconds of the whole logged history (0 when empty)."""
    return max(elapsed_by_step(history).values(), default=0.0)


def remaining_budget(budget_s: float, latest: Path | None) -> float:
    """What is left of a phase's time budget after the training logged in checkpoint `latest` (None: nothing yet);
    0 = no budget. A budget is for the whole phase, not for each resumption, so the result can be <= 0 (spent)."""
    if latest is None or budget_s <= 0:
        return budget_s
    return budget_s - trained_seconds(read_learner_state(latest)["history"])


def budget_end_step(step: int, first_step: int, elapsed_s: float, budget_s: float, max_steps: int) -> int:
    """The step a time-budgeted run is expected to end at: `step` plus what is left of the budget at the mean
    rate of the steps since `first_step` (this process's first), never past `max_steps` nor before `step`."""
    rate = (step - first_step) / max(elapsed_s, 1e-9)
    return max(step, min(max_steps, step + int(rate * max(0.0, budget_s - elapsed_s))))


def pretrained_vlm_dir(out_dir: str | os.PathLike, role: str, *, instruct: bool) -> Path:
    """Where `zray pretrain-vlm` leaves the base VLM of `role` ("teacher" or "student") under a run's `out_dir`:
    after its instruction phase when that phase ran for the role (`instruct`), else after captioning."""
    if role not in ("teacher", "student"):
        raise ValueError(f"role={role!r} is not allowed: expected 'teacher' or 'student'")
    return Path(out_dir).resolve() / "pretrain_vlm" / (f"{role}_instruct" if instruct else role) / FINAL_DIR
