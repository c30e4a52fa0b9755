"""The per-worker training loop that `actors.learner.fit` runs in every Ray Train worker.

One optimizer step = `grad_accum_steps` micro batches of `micro_batch_size` rows on every worker. Every
`log_every` steps (and at the end) the workers average their loss and task metrics over the window and over
workers (all_gather); rank 0 writes them to TensorBoard and the progress bar, and every worker appends them to its
history. `samples_per_s` is the global batch over the slowest worker's mean step time (forward, backward,
optimizer; logging and checkpoints excluded). Every `checkpoint_every` steps and at the end, each worker writes its
part of a checkpoint into a scratch dir (engine state, its RNG and data position; rank 0 also the Hugging Face
export and learner.json) and calls `ray.train.report` with it and the last metrics (all workers report at the same
steps); Ray Train merges the parts into `run_dir/checkpoint_<step>`. With a time budget, one MAX all-reduce of the
elapsed time per step serves both the stop (all workers stop after the same step, and checkpoint it) and the
budget schedule.

Every attempt starts from `ray.train.get_checkpoint()`: nothing on a fresh run, the run's latest checkpoint on
`fit(..., resume=True)`, and, when Ray Train restarts the worker group after a worker failure
(`LearnerConfig.max_failures`), the latest checkpoint this run registered. Only registered checkpoints are restored:
a `checkpoint_<step>` directory a dead attempt was still writing is never read (the restarted attempt writes it
again). A restart within one fit also carries the fit's time-budget clock (the training seconds that led to the
checkpoint: work lost with the failed attempt is not counted). Rank 0 appends one line per attempt to
`run_dir/attempts.jsonl` (fit id, the step and checkpoint it started from), from which `fit` counts its restarts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from zray.config import LearnerConfig
from zray.training.engine import StepInfo, TrainEngine
from zray.training.runs import LEARNER_STATE_FILE, TASK_STATE_FILE, budget_end_step, read_learner_state
from zray.training.shards import ShardBatches
from zray.training.task import LearnerTask, LengthGrouped, OnlineTask, StatefulTask


ATTEMPTS_FILE = "attempts.jsonl"  # in run_dir: one line per attempt that reached the loop (rank 0 writes it)


class InjectedFailure(RuntimeError):
    """Raised by `extra_config={"_fail_after_step": N}`: a crash right after checkpoint N (tests)."""


def _exit_once_for_test(spec: dict[str, Any] | None, *, rank: int, step: int) -> None:
    """`extra_config={"_exit_after_step": {"step": N, "rank": R, "marker": path}}` (tests): worker R's process dies
    abruptly (`os._exit(1)`, no exception, no clean-up) once Ray Train has registered checkpoint N, unless `marker`
    exists; it creates `marker` first, so the restarted attempt (which starts from checkpoint N) does not die again."""
    if spec is None or rank != spec["rank"] or step != spec["step"]:
        return
    try:
        fd = os.open(spec["marker"], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    # report() returns once this worker's part is queued; wait until the controller has registered the checkpoint,
    # so that the restart deterministically continues from it.
    ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
    os.write(fd, f"rank {rank} exits after checkpoint {step}\n".encode())
    os.close(fd)
    os._exit(1)


# ---------------------------------------------------------------------------------------------- RNG and data


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------- metrics


class _Window:
    """Sums of loss and task metrics over the micro batches since the last log."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.micro = 0
        self.steps = 0
        self.seconds = 0.0

    def add(self, loss: float, metrics: dict[str, float]) -> None:
        self.micro += 1
        for key, value in {"loss": loss, **metrics}.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)

    def averaged(self) -> dict[str, float]:
        """Means over this window, averaged over workers (every worker calls it: it is a collective)."""
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (self.sums, self.micro, self.seconds))
        keys = sorted({k for sums, _, _ in parts for k in sums})
        out = {}
        for key in keys:
            values = [sums[key] / micro for sums, micro, _ in parts if key in sums and micro]
            out[key] = float(np.mean(values))
        out["step_time_s"] = max(seconds for _, _, seconds in parts) / max(1, self.steps)
        return out


class _Display:
    """Rank 0's progress bar (rendered on the driver through Ray's tqdm) and TensorBoard writer."""

    def __init__(self, task_name: str, cfg: LearnerConfig, run_dir: Path, start_step: int) -> None:
        from ray.experimental import tqdm_ray
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events an earlier, crashed attempt logged after the step this one starts from.
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)
        self.bar = tqdm_ray.tqdm(total=cfg.max_steps, desc=task_name, unit="step")
        self.bar.update(start_step)
        self.task_name = task_name

    def log(self, step: int, steps_done: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            if key != "step":
                self.writer.add_scalar(f"{self.task_name}/{key}", value, step)
        self.writer.flush()
        self.bar.set_description(f"{self.task_name} loss {metrics['loss']:.4f} "
                                 f"{metrics['samples_per_s']:.1f} samples/s")
        if "schedule_steps" in metrics:  # a budget schedule: the bar ends where the budget is expected to
            self.bar.total = int(metrics["schedule_steps"])
        self.bar.update(steps_done)

    def close(self) -> None:
        self.writer.close()
        self.bar.close()


# ---------------------------------------------------------------------------------------------- checkpoints


def _save_checkpoint(engine: TrainEngine, task: LearnerTask, cfg: LearnerConfig, *, step: int, consumed: int,
                     history: list[dict[str, float]], fit_clock: dict[str, Any]) -> Path:
    """This worker's part of a checkpoint in a fresh scratch dir (every worker calls it)."""
    rank = engine.rank
    scratch = Path(tempfile.mkdtemp(prefix=f"zray_ckpt_rank{rank}_"))
    engine.save(scratch / "engine")
    with engine.gathered_params() as model:
        if rank == 0:
            task.save_pretrained(model, scratch / "hf")
    torch.save({"step": step, "consumed": consumed, "rng": _rng_state()}, scratch / f"worker_{rank}.pt")
    if rank == 0:
        state = {"step": step, "consumed_micro_batches": consumed, "world_size": engine.world_size,
                 "backend": engine.backend, "precision": engine.precision, "task": task.name,
                 "config": dataclasses.asdict(cfg), "history": history, "fit": fit_clock}
        (scratch / LEARNER_STATE_FILE).write_text(json.dumps(state, indent=1))
        if isinstance(task, StatefulTask):
            from safetensors.torch import save_file

            task_state = task.task_state()
            if task_state:  # cloned: safetensors refuses tensors that share storage (tied weights)
                save_file({k: v.detach().cpu().clone().contiguous() for k, v in task_state.items()},
                          str(scratch / TASK_STATE_FILE))
    return scratch


def _restore(engine: TrainEngine, task: LearnerTask, ckpt_dir: Path,
             cfg: LearnerConfig) -> tuple[int, int, list[dict[str, float]], dict[str, Any]]:
    """Load engine state, the task's state, this rank's RNG and data position; returns (step, consumed, history,
    the fit clock of the attempt that wrote the checkpoint: {"id", "first_step", "elapsed_s"}, {} before it existed)."""
    state = read_learner_state(ckpt_dir)
    if state["world_size"] != engine.world_size or state["backend"] != engine.backend:
        raise ValueError(f"checkpoint {ckpt_dir} was written by {state['world_size']} {state['backend']} workers; "
                         f"this run has {engine.world_size} {engine.backend} workers (resume needs the same)")
    data_keys = ("micro_batch_size", "seed", "length_window")
    then = {k: state["config"].get(k, 0) for k in data_keys}  # checkpoints before length_window had none (0)
    now = {k: getattr(cfg, k) for k in data_keys}
    if then != now:
        raise ValueError(f"checkpoint {ckpt_dir} used {then}; this run has {now}: the data position would not "
                         "carry over")
    engine.load(ckpt_dir / "engine")
    if isinstance(task, StatefulTask) and (ckpt_dir / TASK_STATE_FILE).is_file():
        from safetensors.torch import load_file

        task.load_task_state(load_file(str(ckpt_dir / TASK_STATE_FILE)))
    worker = torch.load(ckpt_dir / f"worker_{engine.rank}.pt", weights_only=False)
    _set_rng_state(worker["rng"])
    return int(state["step"]), int(worker["consumed"]), list(state["history"]), dict(state.get("fit") or {})


def _record_attempt(run_dir: Path, fit_id: str, *, step: int, checkpoint: str | None, restart: bool) -> None:
    """Rank 0: one line in run_dir/ATTEMPTS_FILE for this attempt, and a line on the driver's log for a restart."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ATTEMPTS_FILE, "a") as f:
        f.write(json.dumps({"fit": fit_id, "step": step, "checkpoint": checkpoint, "time": time.time()}) + "\n")
    if restart:
        print(f"[learner] worker group restarted after a failure: continuing {run_dir.name} from {checkpoint} "
              f"(step {step})", flush=True)


# ---------------------------------------------------------------------------------------------- the loop


def _agreed_elapsed(started: float, device: torch.device) -> float:
    """Seconds since `started`, the largest over the ranks (a MAX all-reduce), so every rank takes the same budget
    decisions: whether to stop after this step, and where the budget schedule ends."""
    elapsed = torch.tensor([time.perf_counter() - started], dtype=torch.float64, device=device)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed.item())


def train_loop_per_worker(config: dict[str, Any]) -> None:
    task: LearnerTask = config["task"]
    cfg: LearnerConfig = config["cfg"]
    run_dir = Path(config["run_dir"])
    budget_s: float = config["time_budget_s"]
    fail_after = config.get("fail_after_step")
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")
    if not cfg.use_gpu:
        # Ray does not cap torch's intra-op threads to the worker's CPUs; oversubscribed threads on a shared
        # CPU were measured 20x slower (132 s vs 5.7 s for one test).
        torch.set_num_threads(cfg.cpus_per_worker)

    _seed_all(cfg.seed)  # identical initial weights on every worker
    model = task.build_model()
    engine = TrainEngine(model, cfg, device=device, deepspeed_overrides=config.get("deepspeed"))
    _seed_all(cfg.seed + 7919 * (rank + 1))  # per-rank streams (dropout, noise) from here on

    # The latest checkpoint Ray Train registered for this run (None on a fresh run): after `resume=True`, and after a
    # restart of the worker group within this fit (a worker failure, LearnerConfig.max_failures). Never a directory
    # found on disk: one a failed attempt was writing is incomplete and unregistered.
    step, consumed, history, clock = 0, 0, [], {}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            step, consumed, history, clock = _restore(engine, task, Path(ckpt_dir), cfg)
    # A restart within this fit continues the fit's budget clock and schedule origin from the checkpoint; a new fit
    # (fresh or resume=True) starts both here.
    fit_id = config["fit_id"]
    restart_of_this_fit = clock.get("id") == fit_id
    first_step = int(clock["first_step"]) if restart_of_this_fit else step
    spent_s = float(clock["elapsed_s"]) if restart_of_this_fit else 0.0
    if rank == 0:
        _record_attempt(run_dir, fit_id, step=step, checkpoint=Path(checkpoint.path).name if checkpoint else None,
                        restart=restart_of_this_fit)
    if step >= cfg.max_steps:
        return  # finished before: the latest checkpoint is the result
    lengths_of = task.row_lengths if isinstance(task, LengthGrouped) else None
    batches = ShardBatches(ray.train.get_dataset_shard("train"), cfg, rank=rank, lengths_of=lengths_of)
    if batches.batches_per_epoch != config["batches_per_epoch"]:
        raise RuntimeError(f"worker {rank} got {batches.batches_per_epoch} batches per epoch, expected "
                           f"{config['batches_per_epoch']} (shards must be equal)")
    display = _Display(task.name, cfg, run_dir, step) if rank == 0 else None
    global_batch = cfg.micro_batch_size * cfg.grad_accum_steps * engine.world_size
    window, logged_step, started = _Window(), step, time.perf_counter() - spent_s
    fit_schedule = cfg.budget_schedule and budget_s > 0
    # Online tasks (zray.training.task.OnlineTask) make their batches from the current policy (rollouts): a new
    # rollout every `updates_per_rollout` steps, announced by `before_rollout` on every rank, reused in between.
    online = isinstance(task, OnlineTask)
    updates_per_rollout = task.updates_per_rollout if online else 1
    keep_dtype = tuple(getattr(task, "fp32_keys", ()))
    cached: list[dict[str, Any]] = []
    try:
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            info: StepInfo | None = None
            fresh = not online or step % updates_per_rollout == 0 or len(cached) != cfg.grad_accum_steps
            if online and fresh:
                task.before_rollout(engine, rollout_index=step // updates_per_rollout)
                cached = []
            data_s = 0.0
            for micro in range(cfg.grad_accum_steps):
                if fresh:
                    t_data = time.perf_counter()
                    batch = engine.prepare_batch(task.collate(batches[consumed]), keep_dtype=keep_dtype)
                    data_s += time.perf_counter() - t_data
                    consumed += 1
                    if online:
                        cached.append(batch)
                else:
                    batch = cached[micro]
                with engine.accumulation_context():
                    with engine.autocast():
                        loss, metrics = task.loss(engine.module, batch)
                    info = engine.backward_step(loss)
                window.add(loss.item(), {**metrics, "data_s": data_s / cfg.grad_accum_steps,
                                         "update_s": (time.perf_counter() - t0 - data_s) / cfg.grad_accum_steps})
            step += 1
            window.steps += 1
            window.seconds += time.perf_counter() - t0
            elapsed = _agreed_elapsed(started, device) if budget_s > 0 else 0.0  # one collective per step
            stop = step >= cfg.max_steps or (budget_s > 0 and elapsed > budget_s)
            log_now = stop or step % cfg.log_every == 0
            ckpt_now = stop or step % cfg.checkpoint_every == 0
            if not (log_now or ckpt_now):
                continue
            if fit_schedule and not stop:
                engine.set_schedule_steps(budget_end_step(step, first_step, elapsed, budget_s, cfg.max_steps))
            metrics = window.averaged()
            if fit_schedule:
                metrics["schedule_steps"] = float(engine.scheduler.lr_lambdas[0].total_steps)
            metrics.update(step=float(step), lr=info.lr, grad_norm=info.grad_norm,
                           samples_per_s=global_batch / metrics["step_time_s"],
                           epoch=consumed / config["batches_per_epoch"])
            history.append(metrics)
            if display is not None:
                display.log(step, step - logged_step, metrics)
            logged_step, window = step, _Window()
            if ckpt_now:
                fit_clock = {"id": fit_id, "first_step": first_step,
                             "elapsed_s": elapsed if budget_s > 0 else time.perf_counter() - started}
                scratch = _save_checkpoint(engine, task, cfg, step=step, consumed=consumed, history=history,
                                           fit_clock=fit_clock)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(scratch)),
                                 checkpoint_dir_name=f"checkpoint_{step:06d}")
                shutil.rmtree(scratch, ignore_errors=True)
                if fail_after is not None and step == fail_after:
                    raise InjectedFailure(f"injected failure after checkpointing step {step} (rank {rank})")
                _exit_once_for_test(config.get("exit_after_step"), rank=rank, step=step)
            if stop:
                break
    finally:
        if display is not None:
            display.close()
