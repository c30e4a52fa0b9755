"""The generic learner on Ray Train: `fit(task, cfg, ...)` trains any `LearnerTask` with N workers.

    result = fit(task, cfg, datasets={"train": ds}, storage_path="/abs/runs", name="vlm")
    result.hf_dir        # the final model, Hugging Face format (task.save_pretrained)
    result.history       # one dict per logged step: loss, task metrics, samples_per_s, step_time_s, lr, ...

Layout of a run (`storage_path/name/`, written by Ray Train and rank 0):

    checkpoint_000050/   hf/ (task.save_pretrained), engine/ (DeepSpeed or DDP state, one optimizer shard per
                         rank under ZeRO), worker_<rank>.pt (data position + RNG states), learner.json (step,
                         metrics history, config)
    tensorboard/         event files with every logged metric (rank 0)
    checkpoint_manager_snapshot.json   Ray Train's list of checkpoints (what `resume=True` continues from)
    attempts.jsonl       one line per attempt (fit id, the step and checkpoint it started from; rank 0)

Determinism. The driver splits "train" into `num_workers` equal, materialised, contiguous shards
(`Dataset.split(equal=True)`: deterministic, unlike the `streaming_split` Ray Train uses by default), handed to
the workers through `ray.train.get_dataset_shard("train")` by a small `DataConfig`. Each worker reads its shard
once into memory and serves micro batch i as slice i of a permutation seeded by (seed, epoch, rank)
(`ShardBatches`; incomplete last batches are dropped, so all workers step in lockstep). The data position is the
number of micro batches a worker has consumed, so resuming is a lookup, not a replay. Checkpoints also carry the
optimizer (per-rank ZeRO shards), the LR schedule, DeepSpeed's counters and every rank's torch / numpy / python
RNG states, so a resumed run reproduces the uninterrupted run's parameters (tests/actors/test_learner.py checks
it). Each worker's shard must fit in its memory (fine for the Shapes corpora; stream for larger data).

Metrics go to TensorBoard, the progress bar and the history every `log_every` steps, and to Ray Train
(`ray.train.report`) with each checkpoint only: a report waits until Ray Train's controller has taken the
previous one, which it polls every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default), so reporting every few
steps would throttle a fast loop.

Fault tolerance. A worker that fails (raises, or its process dies: OOM kill, lost node) fails the attempt; Ray Train
then restarts the whole worker group, up to `LearnerConfig.max_failures` times per `fit` (`FailureConfig`), and the
new workers continue from the latest checkpoint Ray Train registered for the run (`ray.train.get_checkpoint()`;
never a half-written one) with the state a resume restores, so the run ends with the parameters of an
uninterrupted one (tests/actors/test_learner.py checks it). The steps since that checkpoint are done again;
`LearnerResult.restarts` counts the restarts. Past `max_failures`, `fit` raises and the run can be continued later.

Placement. Each worker asks for `cpus_per_worker` CPUs, a GPU with `use_gpu` and `LearnerConfig.resources` (custom
resources, e.g. {"learner_node": 1}, that only the learner's nodes advertise); Ray Train packs the workers into its
own placement group. `fit` first checks that the cluster can hold them (actors/placement.py): a PlacementError
naming "learner <name>" and the missing resource, at once.

`resume=True` restarts the run `storage_path/name` from its latest checkpoint (Ray Train V2 restores a run from
its snapshot when it is started again with the same name and storage path); `resume=False` refuses a run
directory that already holds checkpoints, so nothing is continued or overwritten by accident.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from actors.learner.worker_loop import ATTEMPTS_FILE, train_loop_per_worker
from actors.placement import check_feasible, learner_bundles
from zray.config import LearnerConfig
from zray.training.runs import (SNAPSHOT_FILE, export_final, has_checkpoint, read_learner_state, trained_seconds,
                                write_json_atomic)
from zray.training.task import LearnerTask, LengthGrouped

@dataclass(frozen=True)
class LearnerResult:
    history: list[dict[str, float]]  # logged metrics, including steps from before a resume
    hf_dir: Path                      # final model in Hugging Face format
    final_checkpoint: Path
    checkpoints: list[Path]           # the kept checkpoints, oldest first (the last is `final_checkpoint`)
    run_dir: Path
    wall_s: float                     # this call's wall time (sharding the data, Ray Train start to finish)
    final_step: int
    restarts: int = 0                 # worker-group restarts after failures in this call (<= cfg.max_failures)


class _PresplitDataConfig(DataConfig):
    """Hands each worker a fixed, deterministic shard of the named datasets (others go to every worker whole)."""

    def __init__(self, shards: dict[str, list[Any]]) -> None:
        super().__init__(datasets_to_split=[])
        self._shards = shards

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output = super().configure(datasets, world_size, worker_handles, worker_node_ids, **kwargs)
        for name in datasets:
            if name in self._shards:
                if len(self._shards[name]) != world_size:
                    raise ValueError(f"{name!r} was split into {len(self._shards[name])} shards for {world_size} "
                                     "workers")
                for rank in range(world_size):
                    output[rank][name] = self._shards[name][rank].iterator()
        return output


# Ray Train's PlacementGroupCleaner (a detached actor started with every fit) asks Ray's State API every second
# whether the run's controller is alive. The State API is the dashboard's HTTP server, which a Ray started with
# include_dashboard=False (as `init_ray` and the tests start it) does not run: each check then logs this warning,
# for the whole run.
PG_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
PG_CLEANER_NOISE = "Failed to query Ray Train Controller actor state."


def _placement_group_cleaner_quieter() -> Callable[[], None]:
    """A function that adds, once per process, a filter to PG_CLEANER_LOGGER dropping its PG_CLEANER_NOISE warnings
    (its other records, and errors, pass). Nested, so cloudpickle ships it by value: a Ray worker process runs it
    at start (`worker_process_setup_hook`) without importing this module (torch, Ray Train)."""
    logger_name, noise = PG_CLEANER_LOGGER, PG_CLEANER_NOISE

    def install() -> None:
        import logging

        logger = logging.getLogger(logger_name)
        if any(getattr(f, "drops", None) == noise for f in logger.filters):
            return

        def keep(record: logging.LogRecord) -> bool:
            return record.levelno > logging.WARNING or not str(record.msg).startswith(noise)

        keep.drops = noise  # marks the filter as installed
        logger.addFilter(keep)

    return install


def ray_runtime_env() -> dict[str, Any]:
    """The job-level runtime env the learner wants: every Ray worker process drops PlacementGroupCleaner's State
    API warnings (`PG_CLEANER_NOISE`). `init_ray` uses it; pass it to your own `ray.init(runtime_env=...)`."""
    return {"worker_process_setup_hook": _placement_group_cleaner_quieter()}


# Ray Train settings every fit starts with, unless the environment sets them (the driver passes them on to the
# controller and the workers): the controller polls its workers every 0.5 s instead of 2 s (a fit returns up to a
# poll sooner after its workers finish), and the workers' print() is not routed through Train's logger: through it,
# a progress bar's last state (closed) never reached the driver, which kept redrawing every finished fit's bar.
TRAIN_ENV_DEFAULTS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def init_ray(cpus_needed: float) -> None:
    """Join the cluster at RAY_ADDRESS, or start a local Ray instance with at least `cpus_needed` logical CPUs (and
    at least this machine's count), with `ray_runtime_env()`; nothing if Ray is already initialised (tests,
    notebooks: their `ray.init` decides the runtime env). RAY_ADDRESS=local (Ray's own word) starts a new local
    instance even where another runs on this machine."""
    import ray

    if ray.is_initialized():
        return
    joins = os.environ.get("RAY_ADDRESS", "") not in ("", "local")
    local = {} if joins else {"num_cpus": max(math.ceil(cpus_needed), os.cpu_count() or 1)}
    ray.init(**local, include_dashboard=False, log_to_driver=True, runtime_env=ray_runtime_env())


def scaling_config(cfg: LearnerConfig, name: str) -> ScalingConfig:
    """Ray Train's ScalingConfig for `cfg`: `num_workers` workers of `cpus_per_worker` CPUs, a GPU each with
    `use_gpu`, and `cfg.resources` (custom resources that pick the learner's nodes). Ray Train packs them into its
    own placement group (PACK); with Ray running, the cluster is checked first, so a learner it can never hold is a
    PlacementError naming "learner <name>" and the resource instead of a fit that waits forever."""
    import ray

    if ray.is_initialized():
        check_feasible(f"learner {name}", learner_bundles(cfg), "PACK")
    return ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                         resources_per_worker={"CPU": cfg.cpus_per_worker, **cfg.resources})


def _shard_train_split(ds: Any, cfg: LearnerConfig) -> tuple[list[Any], int]:
    """`num_workers` equal, materialised, contiguous shards (in dataset order); returns them and batches/epoch.

    No global shuffle (a Ray Data random_shuffle costs ~5 s even on a tiny set here): each worker permutes its
    shard every epoch, so a global batch is a stratified sample (micro_batch_size rows from each shard).
    """
    shards = ds.split(cfg.num_workers, equal=True)
    rows = shards[0].count()
    batches_per_epoch = rows // cfg.micro_batch_size
    if batches_per_epoch < 1:
        raise ValueError(f"datasets['train'] gives {rows} rows per worker ({cfg.num_workers} workers), fewer than "
                         f"LearnerConfig.micro_batch_size={cfg.micro_batch_size}: use more rows or smaller batches")
    return shards, batches_per_epoch


def fit(task: LearnerTask, cfg: LearnerConfig, *, datasets: dict[str, Any], storage_path: str | os.PathLike,
        name: str, resume: bool = False, time_budget_s: float = 0.0,
        extra_config: dict[str, Any] | None = None) -> LearnerResult:
    """Train `task` on `datasets["train"]` with `cfg.num_workers` Ray Train workers; return the final result.

    `storage_path` is a local (or shared, on a multi-node cluster) directory; the run lives in
    `storage_path/name`. `time_budget_s > 0` stops after that many seconds of training (all workers agree on the
    step) and still writes a final checkpoint; a restart after a failure continues this call's budget clock.

    A worker failure (an exception, or a worker process that dies) restarts the worker group from the run's latest
    registered checkpoint, up to `cfg.max_failures` times in this call; the result then equals an uninterrupted
    run's, and `LearnerResult.restarts` says how many restarts it took. One more failure ends the call: it raises
    Ray Train's `TrainingFailedError` (with a note naming max_failures and the checkpoint that `resume=True`
    continues from).

    `extra_config` keys: "deepspeed" (a dict merged into the DeepSpeed config, e.g. ZeRO offload), and for tests
    "_fail_after_step" (every worker raises right after checkpointing that step, as a crash would) and
    "_exit_after_step" ({"step": N, "rank": R, "marker": path}: worker R's process exits abruptly once checkpoint N
    is registered, once: only while `marker` does not exist, which it creates).
    """
    if not isinstance(task, LearnerTask):
        raise TypeError(f"task={task!r} does not implement zray.training.task.LearnerTask")
    if "train" not in datasets:
        raise ValueError(f"datasets has keys {sorted(datasets)}; the learner needs a 'train' split")
    if time_budget_s < 0:
        raise ValueError(f"time_budget_s={time_budget_s!r} is not allowed: expected a float >= 0 (0 = no limit)")
    extra = dict(extra_config or {})
    unknown = sorted(set(extra) - {"deepspeed", "_fail_after_step", "_exit_after_step"})
    if unknown:
        raise ValueError(f"extra_config has unknown keys {unknown}; allowed: 'deepspeed', '_fail_after_step', "
                         "'_exit_after_step'")
    exit_spec = extra.get("_exit_after_step")
    if exit_spec is not None and (not isinstance(exit_spec, dict) or set(exit_spec) != {"step", "rank", "marker"}
                                  or not 0 <= exit_spec["rank"] < cfg.num_workers):
        raise ValueError(f"extra_config['_exit_after_step']={exit_spec!r} is not allowed: expected "
                         f"{{'step': int, 'rank': 0..{cfg.num_workers - 1}, 'marker': path}}")
    if cfg.length_window and not isinstance(task, LengthGrouped):
        raise ValueError(f"LearnerConfig.length_window={cfg.length_window} is not allowed for task {task.name!r}: it "
                         "has no row_lengths (zray.training.task.LengthGrouped); use 0")
    if "deepspeed" in extra and cfg.backend != "deepspeed":
        raise ValueError(f"extra_config['deepspeed'] given but LearnerConfig.backend={cfg.backend!r}")

    if "://" in str(storage_path):
        raise ValueError(f"storage_path={str(storage_path)!r} is not allowed: expected a local or shared-filesystem "
                         "directory (the learner reads checkpoints and writes TensorBoard files there directly)")
    storage = Path(storage_path).expanduser().resolve()
    run_dir = storage / name
    if resume and not has_checkpoint(run_dir):
        raise FileNotFoundError(f"resume=True but there is no checkpoint to resume in {run_dir} "
                                f"(no {SNAPSHOT_FILE} with a checkpoint): start it with resume=False first")
    if not resume and has_checkpoint(run_dir):
        raise FileExistsError(f"{run_dir} already holds checkpoints of a run named {name!r}: pass resume=True to "
                              "continue it, or choose another name")

    start = time.perf_counter()
    scaling = scaling_config(cfg, name)  # before the data is split: an impossible placement fails at once
    shards, batches_per_epoch = _shard_train_split(datasets["train"], cfg)
    fit_id = uuid.uuid4().hex  # tells a restart within this call (same id) from a new call on the same run
    loop_config = {"task": task, "cfg": cfg, "run_dir": str(run_dir), "resume": resume, "fit_id": fit_id,
                   "time_budget_s": float(time_budget_s), "batches_per_epoch": batches_per_epoch,
                   "deepspeed": extra.get("deepspeed"), "fail_after_step": extra.get("_fail_after_step"),
                   "exit_after_step": exit_spec}
    for key, value in TRAIN_ENV_DEFAULTS.items():  # read by Ray Train when the trainer starts; a user's setting wins
        os.environ.setdefault(key, value)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=scaling,
        run_config=RunConfig(name=name, storage_path=str(storage),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=cfg.max_failures)),
        datasets=datasets,
        dataset_config=_PresplitDataConfig({"train": shards}),
    )
    try:
        result = trainer.fit()
    except Exception as err:
        latest = _registered_latest(run_dir)
        err.add_note(f"[zray learner] the run {run_dir} failed after {_restarts(run_dir, fit_id)} restart(s) "
                     f"(LearnerConfig.max_failures={cfg.max_failures}); "
                     + (f"fit(..., resume=True) continues it from {latest}" if latest else
                        "it has no checkpoint to resume"))
        raise
    wall_s = time.perf_counter() - start
    if result.error is not None:  # fit() raises in Ray 2.60; kept for versions that return the error
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"the run {run_dir} finished without a checkpoint")
    final = Path(result.checkpoint.path)
    state = read_learner_state(final)
    kept = sorted({Path(ckpt.path) for ckpt, _ in (result.best_checkpoints or [])} | {final})
    return LearnerResult(history=state["history"], hf_dir=final / "hf", final_checkpoint=final, checkpoints=kept,
                         run_dir=run_dir, wall_s=wall_s, final_step=int(state["step"]),
                         restarts=_restarts(run_dir, fit_id))


def _registered_latest(run_dir: Path) -> str | None:
    """The directory name of the latest checkpoint Ray Train registered for the run (what a restart or `resume=True`
    continues from), from its snapshot; None without one. A newer directory on disk may be a half-written one."""
    path = run_dir / SNAPSHOT_FILE
    if not path.is_file():
        return None
    latest = json.loads(path.read_text()).get("latest_checkpoint_result") or {}
    return latest.get("checkpoint_dir_name")


def _restarts(run_dir: Path, fit_id: str) -> int:
    """How many times the fit `fit_id` restarted its workers: its attempts in run_dir/ATTEMPTS_FILE, less one."""
    path = run_dir / ATTEMPTS_FILE
    if not path.is_file():
        return 0
    attempts = sum(json.loads(line)["fit"] == fit_id for line in path.read_text().splitlines() if line.strip())
    return max(0, attempts - 1)


def fit_phase(task: Any, learner_cfg: Any, dataset: Any, root: Path, name: str, resume: bool,
              budget_s: float, tag: str = "learner") -> dict[str, Any]:
    """Train one phase with the learner into `root/name` (final weights in `root/name/final`).

    With `resume`, a phase that finished before (its `phase.json` exists) is kept as it is, and a phase that
    has checkpoints continues from its latest one.
    """
    run_dir = root / name
    done = run_dir / "phase.json"
    if resume and done.exists():
        print(f"[{tag}] {name}: finished before, kept ({run_dir / 'final'})")
        return {**json.loads(done.read_text()), "final_dir": run_dir / "final"}
    # --resume continues a phase that checkpointed and starts one that never did
    fitted = fit(task, learner_cfg, datasets={"train": dataset}, storage_path=root, name=name,
                 resume=resume and has_checkpoint(run_dir), time_budget_s=budget_s)
    final_dir = export_final(fitted.hf_dir, run_dir)
    record = {"steps": fitted.final_step, "train_s": trained_seconds(fitted.history), "wall_s": fitted.wall_s,
              "history": fitted.history}
    write_json_atomic(done, record)
    return {**record, "final_dir": final_dir}
