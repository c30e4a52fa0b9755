"""The Ray Train learner: crash + resume reproduces an uninterrupted run, loss falls, HF export, clear errors.

One local Ray cluster for the module (starting Ray Train and DeepSpeed dominates the runtime). The task is a
tiny MLP regression (with dropout, so the RNG state matters on resume) on a synthetic Ray Data dataset. The crash
test runs DeepSpeed ZeRO-2 on 2 workers; the loss test runs the DDP baseline on 1 worker.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")
pytest.importorskip("deepspeed")

from actors.learner import fit  # noqa: E402
from zray.config import LearnerConfig  # noqa: E402
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
def ray_cluster():
    # Ray Train's controller polls workers every 2 s by default; polling faster shortens each fit's tail.
    previous = os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.5"
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
    if previous is None:
        os.environ.pop("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")
    else:
        os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = previous


@pytest.fixture(scope="module")
def dataset(ray_cluster):
    ray.data.DataContext.get_current().enable_progress_bars = False
    return ray.data.from_items(_rows(), override_num_blocks=4)


ZERO2 = LearnerConfig(num_workers=2, backend="deepspeed", zero_stage=2, precision="fp32", lr=3e-3, warmup_steps=2,
                      micro_batch_size=8, grad_accum_steps=2, max_steps=8, checkpoint_every=3, keep_checkpoints=2,
                      log_every=2, seed=5)


@pytest.fixture(scope="module")
def uninterrupted(dataset, tmp_path_factory):
    storage = tmp_path_factory.mktemp("runs")
    return fit(MLPRegression(), ZERO2, datasets={"train": dataset}, storage_path=storage, name="straight")


def test_crash_and_resume_reaches_the_uninterrupted_state(dataset, uninterrupted, tmp_path):
    task = MLPRegression()
    # 8 steps, checkpoints at 3, 6 and 8; the first attempt dies right after checkpoint 3. 12 micro batches
    # per worker per epoch (96 rows each), 2 per step: the crash and the resume fall in the middle of the first
    # epoch, and the run goes on into the second one.
    with pytest.raises(Exception, match="injected failure after checkpointing step 3"):
        fit(task, ZERO2, datasets={"train": dataset}, storage_path=tmp_path, name="crashy",
            extra_config={"_fail_after_step": 3})
    crashed = read_learner_state(tmp_path / "crashy" / "checkpoint_000003")
    assert crashed["step"] == 3 and crashed["consumed_micro_batches"] == 6

    resumed = fit(task, ZERO2, datasets={"train": dataset}, storage_path=tmp_path, name="crashy", resume=True)
    assert resumed.final_step == uninterrupted.final_step == 8

    expected, got = _load(task, uninterrupted.hf_dir), _load(task, resumed.hf_dir)
    initial = task.build_model().state_dict()
    for key in expected:
        assert not torch.allclose(expected[key], initial[key], atol=1e-3), f"{key} did not train"
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-7, msg=f"{key} differs")
    # The metric history carries across the crash and matches, step for step.
    straight = {h["step"]: h["loss"] for h in uninterrupted.history}
    again = {h["step"]: h["loss"] for h in resumed.history}
    assert sorted(again) == sorted(straight) == [2.0, 3.0, 4.0, 6.0, 8.0]  # log_every=2, plus checkpoints
    for step in straight:
        assert again[step] == pytest.approx(straight[step], rel=1e-6), step
    # keep_checkpoints=2: the checkpoints at steps 6 and 8 remain.
    assert [p.name for p in resumed.checkpoints] == ["checkpoint_000006", "checkpoint_000008"]


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
