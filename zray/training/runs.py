"""Run bookkeeping on disk: which checkpoints a learner run holds, how long it trained, and its exported model.

A learner run (`actors.learner.fit`) lives in `<storage>/<name>/`: `checkpoint_<step>/` directories (each with
`hf/` and `learner.json`, the step and the logged history; `task_state.safetensors` for a task with worker-side
state), Ray Train's `checkpoint_manager_snapshot.json` (what a resumed run restores from) and, once a job exports
it, `final/` (the model in Hugging Face / diffusers format).
Every job asks these questions through this module, so they have one answer. No Ray, no torch.

Which checkpoints a run holds is what Ray Train registered in its snapshot, never a listing of the run dir: Ray
Train copies each worker's part into `checkpoint_<step>/` in place (in no set order) and registers the checkpoint
only once every part is there, so a directory a crash left half copied (or half deleted, when an old one is
dropped) is not in the snapshot and is never chosen.

Records a job writes into its run dir go through `write_text_atomic` / `write_json_atomic` (or `atomic_path` for
another writer, e.g. Parquet; `atomic_dir` for a whole folder, e.g. `final/`): a temporary name beside the target,
then a rename, so a crash mid-write leaves the old file or the new one, never a torn file that loads.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

LEARNER_STATE_FILE = "learner.json"  # in every checkpoint: step, data position, history, config
TASK_STATE_FILE = "task_state.safetensors"  # in a checkpoint of a StatefulTask with state: its task_state()
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of a run's checkpoints
FINAL_DIR = "final"


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` (`.<name>.tmp-<pid>`, same folder, so the rename stays on one filesystem)
    for a writer to fill; on a clean exit it is flushed to disk and renamed onto `path` (readers see the old file
    or the new one), on an exception it is removed and `path` is left as it was.

        with atomic_path(out / "preds.parquet") as tmp:
            pq.write_table(table, str(tmp))
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the data reaches the disk before the name does
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """A fresh temporary folder beside `path` (`.<name>.tmp-<pid>`) for a writer to fill; on a clean exit it
    replaces `path`: an existing `path` is renamed aside (`.<name>.old-<pid>`), the new folder renamed into place,
    the old one deleted. A crash leaves the old folder, the new one or (between the two renames) none, with the
    old one beside it, never a partial one under `path`; on an exception the temporary folder is removed and the
    old one kept. An earlier write cut between its renames is undone first (its old folder put back), and other
    leftovers removed (a folder has one writer at a time)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    set_aside = sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if set_aside and not path.exists():
        os.replace(set_aside[-1], path)
    for leftover in [*path.parent.glob(f".{path.name}.tmp-*"), *path.parent.glob(f".{path.name}.old-*")]:
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not path.exists():
            os.replace(old, path)  # the new folder did not get in: the old one stays
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """`text` at `path` (its folder created), through a temporary file and a rename (`atomic_path`); returns it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def write_json_atomic(path: str | os.PathLike, payload: Any) -> Path:
    """`payload` as indented JSON at `path` (values JSON lacks as `str`), atomically (`write_text_atomic`)."""
    return write_text_atomic(path, json.dumps(payload, indent=2, default=str))


def _read_json(path: Path, what: str) -> Any:
    """A JSON file's content; a file that does not parse raises ValueError naming it (line and column included)."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}): {what}") from None


def _snapshot(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """Ray Train's snapshot of the run in `run_dir`, or None when it has none."""
    path = Path(run_dir) / SNAPSHOT_FILE
    if not path.is_file():
        return None
    snapshot = _read_json(path, "Ray Train writes this file in place, so a crash can cut it, and then neither Ray "
                                "Train nor zray can resume the run: move the run dir aside and start it again")
    if not isinstance(snapshot, dict):
        raise ValueError(f"{path} holds a JSON {type(snapshot).__name__}: expected Ray Train's checkpoint manager "
                         "snapshot (an object)")
    return snapshot


def _dir_name(entry: Any, path: Path) -> str:
    if not isinstance(entry, dict) or not isinstance(entry.get("checkpoint_dir_name"), str):
        raise ValueError(f"{path}: a checkpoint entry {entry!r} has no checkpoint_dir_name: expected Ray Train's "
                         "checkpoint manager snapshot")
    return entry["checkpoint_dir_name"]


def checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The checkpoints Ray Train registered for the run in `run_dir` (its snapshot's kept checkpoints and its
    latest), oldest first; [] without a snapshot. A `checkpoint_*` directory the snapshot does not name (a copy
    a crash cut, or an old checkpoint half deleted) is not one."""
    snapshot = _snapshot(run_dir)
    if snapshot is None:
        return []
    path = Path(run_dir) / SNAPSHOT_FILE
    entries = list(snapshot.get("checkpoint_results") or [])
    if snapshot.get("latest_checkpoint_result"):
        entries.append(snapshot["latest_checkpoint_result"])
    return sorted({Path(run_dir) / _dir_name(e, path) for e in entries})


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint Ray Train resumes the run in `run_dir` from (its snapshot's latest), or None: a run that
    never checkpointed, or a directory without Ray Train's snapshot, has nothing to resume. A newer
    `checkpoint_*` directory the snapshot does not name (a crash cut its copy) is never returned; a registered
    one that is gone or whose learner.json does not parse raises ValueError naming the file."""
    snapshot = _snapshot(run_dir)
    if snapshot is None or not snapshot.get("latest_checkpoint_result"):
        return None
    ckpt = Path(run_dir) / _dir_name(snapshot["latest_checkpoint_result"], Path(run_dir) / SNAPSHOT_FILE)
    if not (ckpt / LEARNER_STATE_FILE).is_file() or not (ckpt / "hf").is_dir():
        raise ValueError(f"{ckpt} is the latest checkpoint in {Path(run_dir) / SNAPSHOT_FILE} but lacks "
                         f"{LEARNER_STATE_FILE if not (ckpt / LEARNER_STATE_FILE).is_file() else 'hf/'}: the run "
                         "dir was changed outside Ray Train; move it aside and start the run again")
    read_learner_state(ckpt)  # parses, or names the file
    return ckpt


def has_checkpoint(run_dir: str | os.PathLike) -> bool:
    return latest_checkpoint(run_dir) is not None


def read_learner_state(checkpoint_dir: str | os.PathLike) -> dict[str, Any]:
    """The learner.json of a checkpoint: step, micro batches consumed, history, config; one that does not parse
    raises ValueError naming it."""
    return _read_json(Path(checkpoint_dir) / LEARNER_STATE_FILE, "a checkpoint's learner state is written whole "
                      "before Ray Train registers the checkpoint, so this one was changed or damaged since")


def export_final(hf_dir: str | os.PathLike, run_dir: str | os.PathLike) -> Path:
    """Copy a checkpoint's exported model (`hf_dir`) to `run_dir/final`, replacing an older one (`atomic_dir`: a
    crash leaves the old `final/`, the new one or none, never a partial one); returns it."""
    final = Path(run_dir) / FINAL_DIR
    with atomic_dir(final) as tmp:
        shutil.copytree(hf_dir, tmp, dirs_exist_ok=True)
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


def seed_run_name(name: str, k: int) -> str:
    """The folder of a run's k-th seed (a method's, a variant's): the name itself for the first, so what reads
    `<name>/final` reads the run of the configured seed; `<name>_seed<k>` after it."""
    return name if k == 0 else f"{name}_seed{k}"


def pretrained_vlm_dir(out_dir: str | os.PathLike, role: str, *, instruct: bool) -> Path:
    """Where `zray pretrain-vlm` leaves the base VLM of `role` ("teacher" or "student") under a run's `out_dir`:
    after its instruction phase when that phase ran for the role (`instruct`), else after captioning."""
    if role not in ("teacher", "student"):
        raise ValueError(f"role={role!r} is not allowed: expected 'teacher' or 'student'")
    return Path(out_dir).resolve() / "pretrain_vlm" / (f"{role}_instruct" if instruct else role) / FINAL_DIR
