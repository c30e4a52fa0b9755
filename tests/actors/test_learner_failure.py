"""Fault tolerance of the Ray Train learner: a worker process that dies mid-run is restarted by Ray Train
(`LearnerConfig.max_failures`) from the run's latest registered checkpoint, and the run ends with exactly the
parameters of an uninterrupted one; with max_failures=0 the same death ends the fit with a clear error.

The death is deterministic: the test hook `extra_config={"_exit_after_step": ...}` makes one worker's process call
`os._exit(1)` once Ray Train has registered checkpoint 3 (a marker file makes it happen once). The task is the tiny
MLP regression of tests/actors/test_learner.py (copied: with dropout, so the RNG state matters), on DeepSpeed ZeRO-2
with 2 workers, so a restart must restore the optimizer shards, data positions and RNG states of both ranks.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from zray.config import ConfigError, LearnerConfig

NUM_FEATURES, NUM_TARGETS = 8, 2


# ---------------------------------------------------------------------------------------------- config (no Ray)


def test_max_failures_defaults_to_2_and_is_validated():
    assert LearnerConfig().max_failures == 2
    assert LearnerConfig(max_failures=0).max_failures == 0
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ConfigError, match=r"LearnerConfig\.max_failures=.* is not allowed: expected an integer "
                                              r">= 0"):
            LearnerConfig(max_failures=bad)


def test_exit_hook_is_checked_before_ray_starts(tmp_path):
    from actors.learner import fit

    cfg = LearnerConfig(num_workers=2)
    for bad in ({"step": 3, "rank": 2, "marker": "m"}, {"step": 3}, 3):
        with pytest.raises(ValueError, match=r"extra_config\['_exit_after_step'\]=.* is not allowed"):
            fit(MLPRegression(), cfg, datasets={"train": object()}, storage_path=tmp_path, name="x",
                extra_config={"_exit_after_step": bad})


# ---------------------------------------------------------------------------------------------- the task


@dataclass(frozen=True)
class MLPRegression:
    """A LearnerTask: y = f(x) with a 2-layer MLP (with dropout), mean squared error, safetensors export."""

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
        return torch.nn.functional.mse_loss(pred.float(), batch["y"]), {}

    def save_pretrained(self, model, out_dir: Path) -> None:
        from safetensors.torch import save_file

        out_dir.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / "model.safetensors"))

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


# 8 steps, checkpoints at 3, 6 and 8; 12 micro batches per worker per epoch, 2 per step: the death and the restart
# fall in the first epoch, and the run goes on into the second one.
ZERO2 = LearnerConfig(num_workers=2, backend="deepspeed", zero_stage=2, precision="fp32", lr=3e-3, warmup_steps=2,
                      micro_batch_size=8, grad_accum_steps=2, max_steps=8, checkpoint_every=3, keep_checkpoints=2,
                      log_every=2, seed=5)


@pytest.fixture(scope="module")
def ray_learner(ray_session):
    """`ray` with Ray Train and DeepSpeed importable, and this module shipped by value to the workers."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("deepspeed")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this module by name
    return ray


@pytest.fixture(scope="module")
def dataset(ray_learner):
    ray_learner.data.DataContext.get_current().enable_progress_bars = False
    return ray_learner.data.from_items(_rows(), override_num_blocks=4)


@pytest.fixture(scope="module")
def uninterrupted(dataset, tmp_path_factory):
    from actors.learner import fit

    return fit(MLPRegression(), replace(ZERO2, max_failures=0), datasets={"train": dataset},
               storage_path=tmp_path_factory.mktemp("runs"), name="straight")


def _attempts(run_dir: Path) -> list[dict]:
    from actors.learner.worker_loop import ATTEMPTS_FILE

    return [json.loads(line) for line in (run_dir / ATTEMPTS_FILE).read_text().splitlines()]


# ---------------------------------------------------------------------------------------------- a worker dies


def test_a_dead_worker_is_restarted_from_the_last_checkpoint_and_the_run_matches_an_uninterrupted_one(
        dataset, uninterrupted, tmp_path):
    from actors.learner import fit

    task, marker = MLPRegression(), tmp_path / "rank1_died"
    # A half-written checkpoint on disk, newer than the one the worker dies after (as a worker that died while
    # uploading checkpoint 6 would leave it): Ray Train never registered it, so the restart must not restore it.
    half = tmp_path / "healed" / "checkpoint_000006"
    (half / "engine").mkdir(parents=True)
    (half / "learner.json").write_text(json.dumps({"step": 6, "history": [], "half_written": True}))

    healed = fit(task, replace(ZERO2, max_failures=1), datasets={"train": dataset}, storage_path=tmp_path,
                 name="healed", extra_config={"_exit_after_step": {"step": 3, "rank": 1, "marker": str(marker)}})

    assert marker.read_text() == "rank 1 exits after checkpoint 3\n"  # the worker did die, once
    assert healed.restarts == 1 and uninterrupted.restarts == 0
    first, second = _attempts(healed.run_dir)  # one fit, two attempts: fresh, then from checkpoint 3
    assert first["fit"] == second["fit"]
    assert (first["step"], first["checkpoint"]) == (0, None)
    assert (second["step"], second["checkpoint"]) == (3, "checkpoint_000003")
    assert healed.final_step == uninterrupted.final_step == 8

    expected, got = _load(task, uninterrupted.hf_dir), _load(task, healed.hf_dir)
    initial = task.build_model().state_dict()
    for key in expected:
        assert not torch.allclose(expected[key], initial[key], atol=1e-3), f"{key} did not train"
        assert torch.equal(got[key], expected[key]), f"{key} differs from the uninterrupted run"
    # The history carries across the restart, step for step (no step logged twice, none missing).
    straight = {h["step"]: h["loss"] for h in uninterrupted.history}
    again = {h["step"]: h["loss"] for h in healed.history}
    assert [h["step"] for h in healed.history] == [2.0, 3.0, 4.0, 6.0, 8.0]
    assert again == straight
    # The restarted attempt wrote checkpoint 6 over the half-written directory; keep_checkpoints=2 kept 6 and 8.
    assert [p.name for p in healed.checkpoints] == ["checkpoint_000006", "checkpoint_000008"]
    assert json.loads((half / "learner.json").read_text())["step"] == 6
    assert "half_written" not in json.loads((half / "learner.json").read_text())
    # The restarted attempt continued this fit's clock (the time budget's) from checkpoint 3, not from its own start.
    clock_6, clock_8 = (json.loads((p / "learner.json").read_text())["fit"] for p in healed.checkpoints)
    assert clock_6["id"] == clock_8["id"] == first["fit"]
    assert clock_6["first_step"] == clock_8["first_step"] == 0
    assert 0 < clock_6["elapsed_s"] < clock_8["elapsed_s"]


def test_with_max_failures_0_a_dead_worker_fails_the_fit_with_a_clear_error(dataset, tmp_path):
    from actors.learner import fit

    ray = pytest.importorskip("ray")
    marker = tmp_path / "rank1_died"
    with pytest.raises(ray.train.TrainingFailedError) as failed:
        fit(MLPRegression(), replace(ZERO2, max_failures=0), datasets={"train": dataset}, storage_path=tmp_path,
            name="fragile", extra_config={"_exit_after_step": {"step": 3, "rank": 1, "marker": str(marker)}})
    assert marker.exists()
    assert isinstance(failed.value, ray.train.WorkerGroupError)  # Ray Train's own report: which rank died, how
    assert "The actor died unexpectedly" in str(failed.value)
    notes = "\n".join(getattr(failed.value, "__notes__", []))
    assert "failed after 0 restart(s) (LearnerConfig.max_failures=0)" in notes, notes
    assert "fit(..., resume=True) continues it from checkpoint_000003" in notes, notes
    assert len(_attempts(tmp_path / "fragile")) == 1  # no restart
