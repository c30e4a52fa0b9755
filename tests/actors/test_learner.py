"""The Ray Train learner: crash + resume reproduces an uninterrupted run, loss falls, HF export, clear errors.

The test session's Ray instance (`ray_session`; starting Ray Train and DeepSpeed dominates the runtime). The task is
a tiny MLP regression (with dropout, so the RNG state matters on resume) on a synthetic Ray Data dataset. The crash
test runs DeepSpeed ZeRO-2 on 2 workers; the loss test runs the DDP baseline on 1 worker. The time budget, online
(rollout) and stateful-task tests run variants of the MLP on 1 DDP worker; they record what the learner calls in
files (the calls happen in Ray Train workers).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")
pytest.importorskip("deepspeed")

from actors.learner import fit  # noqa: E402
from zray.config import ConfigError, LearnerConfig  # noqa: E402
from zray.training.runs import read_learner_state  # noqa: E402

# Ray workers cannot import this test module by name: ship the task class by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

NUM_FEATURES, NUM_TARGETS = 8, 2


@dataclass(frozen=True)
class MLPRegression:
    """A LearnerTask: y = f(x) with a 2-layer MLP, mean squared error, safetensors + config.json export."""

    name: str = "mlp"
    hidden: int = 32
    dropout: float = 0.1

    def build_model(self) -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(NUM_FEATURES, self.hidden), torch.nn.Tanh(),
                                   torch.nn.Dropout(self.dropout), torch.nn.Linear(self.hidden, NUM_TARGETS))

    def collate(self, rows):
        return {"x": torch.as_tensor(np.stack(rows["x"]), dtype=torch.float32),
                "y": torch.as_tensor(np.stack(rows["y"]), dtype=torch.float32)}

    def loss(self, model, batch):
        pred = model(batch["x"])
        loss = torch.nn.functional.mse_loss(pred.float(), batch["y"])
        return loss, {"pred_std": float(pred.detach().float().std())}

    def save_pretrained(self, model, out_dir: Path) -> None:
        from safetensors.torch import save_file

        out_dir.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / "model.safetensors"))
        (out_dir / "config.json").write_text(json.dumps({"hidden": self.hidden, "dropout": self.dropout}))

    def load_pretrained(self, model, ckpt_dir: Path) -> None:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(Path(ckpt_dir) / "model.safetensors")))


def _rows(num_rows: int = 192, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    weight = rng.normal(size=(NUM_FEATURES, NUM_TARGETS))
    x = rng.normal(size=(num_rows, NUM_FEATURES)).astype(np.float32)
    y = (np.tanh(x @ weight) + 0.05 * rng.normal(size=(num_rows, NUM_TARGETS))).astype(np.float32)
    return [{"x": x[i], "y": y[i]} for i in range(num_rows)]


def _load(task: MLPRegression, hf_dir: Path) -> dict[str, torch.Tensor]:
    model = task.build_model()
    task.load_pretrained(model, hf_dir)
    return model.state_dict()


@pytest.fixture(scope="module")
def dataset(ray_session):
    ray.data.DataContext.get_current().enable_progress_bars = False
    return ray.data.from_items(_rows(), override_num_blocks=4)


ZERO2 = LearnerConfig(num_workers=2, backend="deepspeed", zero_stage=2, precision="fp32", lr=3e-3, warmup_steps=2,
                      micro_batch_size=8, grad_accum_steps=2, max_steps=8, checkpoint_every=3, keep_checkpoints=2,
                      log_every=2, seed=5)


@pytest.fixture(scope="module")
def uninterrupted(dataset, tmp_path_factory):
    storage = tmp_path_factory.mktemp("runs")
    return fit(MLPRegression(), ZERO2, datasets={"train": dataset}, storage_path=storage, name="straight")


def test_final_checkpoint_exports_hf_and_tensorboard(uninterrupted):
    task = MLPRegression()
    hf = uninterrupted.hf_dir
    assert (hf / "config.json").is_file() and (hf / "model.safetensors").is_file()
    model = task.build_model()
    task.load_pretrained(model, hf)  # strict load through the task's own loader
    assert model(torch.zeros(3, NUM_FEATURES)).shape == (3, NUM_TARGETS)
    assert list((uninterrupted.run_dir / "tensorboard").glob("events.out.tfevents.*"))
    last = uninterrupted.history[-1]
    assert {"loss", "pred_std", "samples_per_s", "step_time_s", "lr", "grad_norm", "epoch"} <= set(last)
    assert last["samples_per_s"] > 0 and last["epoch"] == pytest.approx(16 / 12)


def test_loss_decreases_on_one_ddp_worker(dataset, tmp_path):
    cfg = LearnerConfig(num_workers=1, backend="ddp", precision="fp32", lr=1e-2,
                        warmup_steps=3, lr_schedule="cosine", micro_batch_size=16, max_steps=40,
                        checkpoint_every=40, log_every=5, seed=0)
    result = fit(MLPRegression(dropout=0.0), cfg, datasets={"train": dataset}, storage_path=tmp_path, name="fall")
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 8
    assert losses[-1] < 0.5 * losses[0], losses


def test_resume_without_checkpoint_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nothing")):
        fit(MLPRegression(), ZERO2, datasets={"train": object()}, storage_path=tmp_path, name="nothing",
            resume=True)


# ---------------------------------------------------------------------------------------------- time budget


def _count_all_reduce_calls(path: str) -> None:
    """From now on this process appends a line to `path` at every torch.distributed.all_reduce call."""
    import functools

    import torch.distributed as dist

    original = getattr(dist.all_reduce, "__wrapped__", dist.all_reduce)

    @functools.wraps(original)
    def counted(*args, **kwargs):
        with open(path, "a") as f:
            f.write("all_reduce\n")
        return original(*args, **kwargs)

    dist.all_reduce = counted


@dataclass(frozen=True)
class SlowMLP(MLPRegression):
    """MLPRegression whose collate sleeps `sleep_s` (a slow step) and whose worker counts its all_reduce calls."""

    log_dir: str = ""
    sleep_s: float = 0.25

    def build_model(self) -> torch.nn.Module:
        _count_all_reduce_calls(str(Path(self.log_dir) / "all_reduce.txt"))
        return super().build_model()

    def collate(self, rows):
        import time

        time.sleep(self.sleep_s)
        return super().collate(rows)


def test_time_budget_stops_early_with_a_final_checkpoint_and_one_collective_per_step(dataset, tmp_path):
    from zray.training.runs import trained_seconds

    task, budget_s = SlowMLP(dropout=0.0, log_dir=str(tmp_path), sleep_s=0.25), 3.0
    cfg = LearnerConfig(num_workers=1, backend="ddp", precision="fp32", micro_batch_size=8, max_steps=1000,
                        lr_schedule="cosine", budget_schedule=True, checkpoint_every=1000, log_every=2, seed=0)
    result = fit(task, cfg, datasets={"train": dataset}, storage_path=tmp_path, name="budget", time_budget_s=budget_s)
    steps = result.final_step
    # Each step takes more than sleep_s, and the run stops after the first step that ends past the budget.
    assert 2 <= steps <= budget_s / task.sleep_s + 1, steps
    assert result.final_checkpoint.name == f"checkpoint_{steps:06d}"
    assert [p.name for p in result.checkpoints] == [result.final_checkpoint.name]
    state = read_learner_state(result.final_checkpoint)
    assert state["step"] == steps and state["consumed_micro_batches"] == steps
    assert state["history"] == result.history
    logged = [int(h["step"]) for h in result.history]
    assert logged == list(range(2, steps + 1, 2)) + ([steps] if steps % 2 else [])
    assert trained_seconds(result.history) >= steps * task.sleep_s
    # The budget schedule ends where the budget does at the measured rate (each step takes more than sleep_s); the
    # stopping step leaves it as it was.
    assert all(h["step"] <= h["schedule_steps"] <= budget_s / task.sleep_s for h in result.history[:-1])
    # One MAX all-reduce of the elapsed time per step serves the stop and the budget schedule.
    assert (tmp_path / "all_reduce.txt").read_text().count("all_reduce") == steps


# ---------------------------------------------------------------------------------------------- online tasks


def _record(log_dir: str, *words: object) -> None:
    with open(Path(log_dir) / "events.txt", "a") as f:
        f.write(" ".join(str(w) for w in words) + "\n")


@dataclass(frozen=True)
class RolloutMLP(MLPRegression):
    """An OnlineTask stand-in (no engines): records every before_rollout, collate and loss call, with the rows'
    ids, in log_dir/events.txt. Also a StatefulTask whose state is empty ({}: nothing to save)."""

    log_dir: str = ""
    updates_per_rollout: int = 3
    fp32_keys: tuple[str, ...] = ()

    def before_rollout(self, engine, *, rollout_index: int) -> None:
        _record(self.log_dir, "rollout", rollout_index)

    def collate(self, rows):
        batch = super().collate(rows)
        batch["ids"] = torch.as_tensor(np.asarray(rows["id"], dtype=np.int64))
        _record(self.log_dir, "collate", ",".join(map(str, batch["ids"].tolist())))
        return batch

    def loss(self, model, batch):
        _record(self.log_dir, "loss", ",".join(map(str, batch["ids"].tolist())))
        return super().loss(model, batch)

    def task_state(self) -> dict[str, torch.Tensor]:
        _record(self.log_dir, "task_state")
        return {}

    def load_task_state(self, state: dict[str, torch.Tensor]) -> None:
        raise AssertionError("a run that is not resumed loads no task state")


def test_online_task_rolls_out_once_per_k_steps_and_reuses_the_batches(dataset, tmp_path):
    from actors.learner.worker_loop import TASK_STATE_FILE
    from zray.training.task import OnlineTask, StatefulTask

    ids_dataset = ray.data.from_items([{**row, "id": i} for i, row in enumerate(_rows())], override_num_blocks=4)
    task, k, accum, max_steps = RolloutMLP(dropout=0.0, log_dir=str(tmp_path)), 3, 2, 7
    assert isinstance(task, OnlineTask) and isinstance(task, StatefulTask) and task.updates_per_rollout == k
    cfg = LearnerConfig(num_workers=1, backend="ddp", precision="fp32", micro_batch_size=8, grad_accum_steps=accum,
                        max_steps=max_steps, checkpoint_every=max_steps, log_every=max_steps, seed=0)
    fit(task, cfg, datasets={"train": ids_dataset}, storage_path=tmp_path, name="online")
    events = [tuple(line.split()) for line in (tmp_path / "events.txt").read_text().splitlines()]
    assert events.pop() == ("task_state",)  # at the one (final) checkpoint, after the last loss
    assert not list((tmp_path / "online").rglob(TASK_STATE_FILE))  # an empty state writes no file
    collated = [ids for kind, ids in events if kind == "collate"]
    assert len(collated) == accum * -(-max_steps // k) == 6  # rollouts 0, 1, 2 (the last one used once)
    assert len(set(collated)) == len(collated)  # each rollout makes fresh micro batches
    expected = []
    for step in range(max_steps):
        if step % k == 0:
            expected.append(("rollout", str(step // k)))
        for micro in range(accum):
            ids = collated[(step // k) * accum + micro]
            if step % k == 0:
                expected.append(("collate", ids))
            expected.append(("loss", ids))  # steps 1, 2 of each rollout reuse its cached micro batches
    assert events == expected


# ---------------------------------------------------------------------------------------------- stateful tasks


@dataclass
class StatefulMLP:
    """A StatefulTask: MLPRegression (no dropout) plus worker-side state, the micro batches seen and the sum of their
    targets, made in build_model. Each task_state result is saved to log_dir/returned_<micro batches>.pt and each
    load_task_state argument to log_dir/loaded.pt."""

    log_dir: str
    name: str = "stateful"
    state: dict[str, torch.Tensor] | None = field(default=None, init=False, repr=False)

    def build_model(self) -> torch.nn.Module:
        self.state = {"micro_batches": torch.zeros((), dtype=torch.int64), "target_sum": torch.zeros(NUM_TARGETS)}
        return MLPRegression(dropout=0.0).build_model()

    def collate(self, rows):
        return MLPRegression().collate(rows)

    def loss(self, model, batch):
        self.state["micro_batches"] += 1
        self.state["target_sum"] += batch["y"].sum(0)
        return MLPRegression().loss(model, batch)

    def save_pretrained(self, model, out_dir: Path) -> None:
        MLPRegression().save_pretrained(model, out_dir)

    def load_pretrained(self, model, ckpt_dir: Path) -> None:
        MLPRegression().load_pretrained(model, ckpt_dir)

    def task_state(self) -> dict[str, torch.Tensor]:
        out = {k: v.clone() for k, v in self.state.items()}
        torch.save(out, Path(self.log_dir) / f"returned_{int(self.state['micro_batches'])}.pt")
        return out

    def load_task_state(self, state: dict[str, torch.Tensor]) -> None:
        torch.save(state, Path(self.log_dir) / "loaded.pt")
        self.state = {k: v.clone() for k, v in state.items()}


STATEFUL = LearnerConfig(num_workers=1, backend="ddp", precision="fp32", micro_batch_size=8, max_steps=6,
                         checkpoint_every=3, log_every=3, seed=0)


def _assert_same_state(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    for key in expected:
        assert got[key].dtype == expected[key].dtype and torch.equal(got[key], expected[key]), key


def test_stateful_task_resumes_with_the_state_it_checkpointed(dataset, tmp_path):
    from safetensors.torch import load_file

    from actors.learner.worker_loop import TASK_STATE_FILE
    from zray.training.task import StatefulTask

    logs = tmp_path / "logs"
    logs.mkdir()
    task = StatefulMLP(log_dir=str(logs))
    assert isinstance(task, StatefulTask)
    with pytest.raises(Exception, match="injected failure after checkpointing step 3"):
        fit(task, replace(STATEFUL, max_failures=0), datasets={"train": dataset}, storage_path=tmp_path,
            name="stateful", extra_config={"_fail_after_step": 3})  # max_failures=0: the crash reaches the caller
    assert not (logs / "loaded.pt").exists()  # a fresh run restores nothing
    returned = torch.load(logs / "returned_3.pt")
    assert int(returned["micro_batches"]) == 3 and returned["target_sum"].abs().sum() > 0
    _assert_same_state(load_file(str(tmp_path / "stateful" / "checkpoint_000003" / TASK_STATE_FILE)), returned)

    resumed = fit(task, STATEFUL, datasets={"train": dataset}, storage_path=tmp_path, name="stateful", resume=True)
    assert resumed.final_step == 6
    _assert_same_state(torch.load(logs / "loaded.pt"), returned)  # exactly what task_state gave at step 3
    final = load_file(str(resumed.final_checkpoint / TASK_STATE_FILE))
    _assert_same_state(final, torch.load(logs / "returned_6.pt"))
    assert int(final["micro_batches"]) == 6  # the resumed run continued the restored state


# ---------------------------------------------------------------------------------------------- Ray's log noise


def test_ray_runtime_env_drops_only_the_placement_group_cleaner_noise_in_a_fresh_process():
    """The worker_process_setup_hook of `ray_runtime_env()` runs in a process that has not imported zray, actors or
    torch (as a Ray worker process does at start), imports none of them, and filters only PG_CLEANER_NOISE
    warnings of PG_CLEANER_LOGGER."""
    import subprocess

    from actors.learner.trainer import PG_CLEANER_LOGGER, PG_CLEANER_NOISE, ray_runtime_env

    hook = ray_runtime_env()["worker_process_setup_hook"]
    script = f"""
import logging, pickle, sys
hook = pickle.loads(sys.stdin.buffer.read())
hook(); hook()  # a second call adds nothing
logger = logging.getLogger({PG_CLEANER_LOGGER!r})
def kept(level, msg):
    return logger.filter(logger.makeRecord(logger.name, level, "x.py", 1, msg, (), None))
print(len(logger.filters),
      kept(logging.WARNING, {PG_CLEANER_NOISE!r} + " State API may be temporarily unavailable."),
      kept(logging.ERROR, {PG_CLEANER_NOISE!r} + " (an error)"),
      kept(logging.WARNING, "Failed to clean up placement group: boom"),
      sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "zray", "actors")))
"""
    out = subprocess.run([sys.executable, "-c", script], input=ray.cloudpickle.dumps(hook), capture_output=True,
                         check=True, timeout=120)
    assert out.stdout.decode().split() == ["1", "False", "True", "True", "[]"], out.stderr.decode()


# ------------------------------------------------------------------------------ fault tolerance: a worker dies
# A worker process that dies mid-run ends the fit with a clear error when LearnerConfig.max_failures=0; with
# max_failures >= 1 Ray Train restarts the worker group from the run's latest registered checkpoint. Either way the
# run ends with exactly the parameters of the uninterrupted one (the `uninterrupted` fixture above, the same ZERO2
# run). The deaths are deterministic: the test hook `extra_config={"_exit_after_step": ...}` makes one worker's
# process call `os._exit(1)` once Ray Train has registered checkpoint N (a marker file makes it happen once).


def test_max_failures_defaults_to_2_and_is_validated():
    assert LearnerConfig().max_failures == 2
    assert LearnerConfig(max_failures=0).max_failures == 0
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ConfigError, match=r"LearnerConfig\.max_failures=.* is not allowed: expected an integer "
                                              r">= 0"):
            LearnerConfig(max_failures=bad)


def test_exit_hook_is_checked_before_ray_starts(tmp_path):
    cfg = LearnerConfig(num_workers=2)
    for bad in ({"step": 3, "rank": 2, "marker": "m"}, {"step": 3}, 3):
        with pytest.raises(ValueError, match=r"extra_config\['_exit_after_step'\]=.* is not allowed"):
            fit(MLPRegression(), cfg, datasets={"train": object()}, storage_path=tmp_path, name="x",
                extra_config={"_exit_after_step": bad})


def _attempts(run_dir: Path) -> list[dict]:
    from actors.learner.worker_loop import ATTEMPTS_FILE

    return [json.loads(line) for line in (run_dir / ATTEMPTS_FILE).read_text().splitlines()]



def test_a_dead_worker_fails_a_fit_without_restarts_and_is_restarted_within_a_resumed_one(
        dataset, uninterrupted, tmp_path):
    """One run, two deaths. Fit 1 (max_failures=0): rank 1 dies right after checkpoint 3, and the fit fails with
    Ray Train's report and a note on how to resume. Fit 2 (resume=True, max_failures=1) continues from checkpoint 3,
    not from a newer half-written directory; rank 0 dies right after checkpoint 6, and Ray Train restarts the workers
    from it. 12 micro batches per worker per epoch (96 rows each), 2 per step: both deaths fall in the first epoch, and
    the run goes on into the second one. The run ends with the uninterrupted run's parameters and history."""
    task, run = MLPRegression(), tmp_path / "run"
    with pytest.raises(ray.train.TrainingFailedError) as failed:
        fit(task, replace(ZERO2, max_failures=0), datasets={"train": dataset}, storage_path=tmp_path,
            name="run", extra_config={"_exit_after_step": {"step": 3, "rank": 1, "marker": str(tmp_path / "r1")}})
    assert (tmp_path / "r1").read_text() == "rank 1 exits after checkpoint 3\n"  # the worker did die, once
    assert isinstance(failed.value, ray.train.WorkerGroupError)  # Ray Train's own report: which rank died, how
    assert "The actor died unexpectedly" in str(failed.value)
    notes = "\n".join(getattr(failed.value, "__notes__", []))
    assert "failed after 0 restart(s) (LearnerConfig.max_failures=0)" in notes, notes
    assert "fit(..., resume=True) continues it from checkpoint_000003" in notes, notes
    assert len(_attempts(run)) == 1  # no restart
    crashed = read_learner_state(run / "checkpoint_000003")
    assert crashed["step"] == 3 and crashed["consumed_micro_batches"] == 6

    # A half-written checkpoint on disk, newer than the registered one (as a worker that died while uploading
    # checkpoint 6 would leave it): Ray Train never registered it, so neither resume nor a restart restores it.
    half = run / "checkpoint_000006"
    (half / "engine").mkdir(parents=True)
    (half / "learner.json").write_text(json.dumps({"step": 6, "history": [], "half_written": True}))
    healed = fit(task, replace(ZERO2, max_failures=1), datasets={"train": dataset}, storage_path=tmp_path,
                 name="run", resume=True,
                 extra_config={"_exit_after_step": {"step": 6, "rank": 0, "marker": str(tmp_path / "r0")}})

    assert (tmp_path / "r0").read_text() == "rank 0 exits after checkpoint 6\n"
    assert healed.restarts == 1 and uninterrupted.restarts == 0
    failed_fit, resumed, restarted = _attempts(run)  # fit 2: resumed from checkpoint 3, then restarted from 6
    assert failed_fit["fit"] != resumed["fit"] == restarted["fit"]
    assert (failed_fit["step"], failed_fit["checkpoint"]) == (0, None)
    assert (resumed["step"], resumed["checkpoint"]) == (3, "checkpoint_000003")
    assert (restarted["step"], restarted["checkpoint"]) == (6, "checkpoint_000006")
    assert healed.final_step == uninterrupted.final_step == 8

    expected, got = _load(task, uninterrupted.hf_dir), _load(task, healed.hf_dir)
    initial = task.build_model().state_dict()
    for key in expected:
        assert not torch.allclose(expected[key], initial[key], atol=1e-3), f"{key} did not train"
        assert torch.equal(got[key], expected[key]), f"{key} differs from the uninterrupted run"
    # The history carries across the crash and the restart, step for step (no step logged twice, none missing).
    straight = {h["step"]: h["loss"] for h in uninterrupted.history}
    again = {h["step"]: h["loss"] for h in healed.history}
    assert [h["step"] for h in healed.history] == [2.0, 3.0, 4.0, 6.0, 8.0]
    assert again == straight
    # Fit 2 wrote checkpoint 6 over the half-written directory; keep_checkpoints=2 kept 6 and 8.
    assert [p.name for p in healed.checkpoints] == ["checkpoint_000006", "checkpoint_000008"]
    assert "half_written" not in json.loads((half / "learner.json").read_text())
    # The restarted attempt continued fit 2's clock (the time budget's) from checkpoint 6, not from its own start;
    # fit 2's clock began at its resume (step 3).
    clock_6, clock_8 = (json.loads((p / "learner.json").read_text())["fit"] for p in healed.checkpoints)
    assert clock_6["id"] == clock_8["id"] == resumed["fit"]
    assert clock_6["first_step"] == clock_8["first_step"] == 3
    assert 0 < clock_6["elapsed_s"] < clock_8["elapsed_s"]
