"""HPA against training pairs seen: the checkpoints a run kept, their pairs, and each point evaluated on its weights."""

import dataclasses
import json
import os
import shutil

import pyarrow.parquet as pq
import pytest

from jobs.recipes import tiny_cpu
from zray.config import ConfigError, EvaluateConfig
from zray.evaluation.hpa_curves import curve_points, curve_table, evaluate_curve, pairs_seen
from zray.evaluation.rewards import evaluate_reward_model
from zray.tasks.gdso import serve_model
from zray.training.runs import LEARNER_STATE_FILE, SNAPSHOT_FILE

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _checkpoint(run, step, consumed, *, micro=4, workers=1, model=None):
    """A checkpoint dir with hf/ and learner.json, registered in the run's Ray Train snapshot as its latest."""
    ckpt = run / f"checkpoint_{step:06d}"
    (ckpt / "hf").mkdir(parents=True)
    if model is None:
        (ckpt / "hf" / "config.json").write_text("{}")
    else:
        shutil.copytree(model, ckpt / "hf", dirs_exist_ok=True)
    state = {"step": step, "consumed_micro_batches": consumed, "world_size": workers,
             "config": {"micro_batch_size": micro, "num_workers": workers}}
    (ckpt / LEARNER_STATE_FILE).write_text(json.dumps(state))
    snapshot = run / SNAPSHOT_FILE
    entries = json.loads(snapshot.read_text())["checkpoint_results"] if snapshot.exists() else []
    entries.append({"checkpoint_dir_name": ckpt.name, "metrics": {}})
    snapshot.write_text(json.dumps({"checkpoint_results": entries, "latest_checkpoint_result": entries[-1]}))
    return ckpt


def test_pairs_seen_counts_micro_batches_consumed_not_updates():
    # K = 2 updates per rollout: 10 steps consumed 5 micro-batches of 4 pairs on each of 2 workers
    state = {"step": 10, "consumed_micro_batches": 5, "world_size": 2, "config": {"micro_batch_size": 4}}
    assert pairs_seen(state) == 40


def test_curve_points_in_step_order_with_the_base_at_zero(tmp_path):
    run = tmp_path / "gdso"
    for step in (100, 50, 150):  # listed out of order on purpose
        _checkpoint(run, step, step)
    (run / "checkpoint_000200").mkdir()  # cut while saving: never registered, skipped
    base = tmp_path / "base"
    points = curve_points(run, base_dir=base)
    assert [(p.step, p.pairs) for p in points] == [(0, 0), (50, 200), (100, 400), (150, 600)]
    assert points[0].model_dir == base and points[1].model_dir == run / "checkpoint_000050" / "hf"
    assert {p.label for p in points} == {"gdso"}


def test_curve_points_errors_name_the_folder(tmp_path):
    with pytest.raises(ConfigError, match="is not a folder"):
        curve_points(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no checkpoint_.*keep_checkpoints"):
        curve_points(tmp_path / "empty")


def test_curve_table_rows():
    result = {"split": "heldout", "oracle_hpa": 0.93, "curves": {"sft": [
        {"step": 0, "pairs": 0, "pooled": {"hpa": 0.5, "margin_hpa": 0.51, "plcc": float("nan"), "srcc": 0.0},
         "mean_output_tokens": 1.0}]}}
    table = curve_table(result)
    assert "| sft | 0 | 0 | 0.500 | 0.510 | - | 0.000 | 1.0 |" in table
    assert "oracle (true scores): pooled HPA 0.930" in table


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return dataclasses.replace(tiny_cpu(), out_dir=str(tmp_path_factory.mktemp("run")),
                               evaluate=EvaluateConfig(num_prompts=2, max_reasoning_tokens=4, num_plot_images=1))


@pytest.fixture(scope="module")
def engine(teacher_engine, sharp_teacher_dir):
    yield teacher_engine
    serve_model(teacher_engine, sharp_teacher_dir, dtype=None, version=2000)  # restore


@pytest.mark.slow
def test_each_point_is_evaluated_on_its_own_weights(cfg, engine, tiny_zoo, sharp_teacher_dir, tmp_path):
    """Two checkpoints (the plain tiny teacher, then the sharpened one) on one engine: the sharpened point equals
    an evaluation of that model by itself, and the two points differ (the weights really changed between them)."""
    run = tmp_path / "sft"
    _checkpoint(run, 5, 5, model=tiny_zoo["teacher"]["path"])
    _checkpoint(run, 10, 10, model=sharp_teacher_dir)
    result = evaluate_curve(cfg, [curve_points(run)], engine, name="curve")
    first, last = result["curves"]["sft"]
    assert (first["pairs"], last["pairs"]) == (20, 40)
    alone = evaluate_reward_model(cfg, sharp_teacher_dir, engine, name="alone")  # the engine serves it now
    assert last["pooled"] == pytest.approx(alone["pooled"], nan_ok=True)
    out = cfg.out_dir + "/evaluate/curve"
    mu = [pq.read_table(f"{out}/sft/step_{s:06d}/predictions.parquet").column("mu").to_pylist() for s in (5, 10)]
    assert len(mu[0]) == len(mu[1]) > 0 and mu[0] != mu[1]
    assert os.path.getsize(out + "/hpa_vs_pairs.png") > 1000
    saved = json.loads(open(out + "/curve.json").read())
    assert saved["oracle_hpa"] > 0.5 and [p["step"] for p in saved["curves"]["sft"]] == [5, 10]
