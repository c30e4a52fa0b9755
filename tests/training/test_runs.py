"""Run bookkeeping (`zray.training.runs`): checkpoints found, training time summed, budgets, the exported model."""

import json

from zray.training.runs import (SNAPSHOT_FILE, elapsed_by_step, export_final, has_checkpoint, latest_checkpoint,
                                remaining_budget, trained_seconds)


def _checkpoint(run_dir, step, history=None):
    ckpt = run_dir / f"checkpoint_{step:06d}"
    (ckpt / "hf").mkdir(parents=True)
    (ckpt / "learner.json").write_text(json.dumps({"step": step, "history": history or []}))
    return ckpt


def test_elapsed_and_trained_seconds():
    history = [{"step": 10, "step_time_s": 0.5}, {"step": 30, "step_time_s": 0.25}]
    assert elapsed_by_step(history) == {10: 5.0, 30: 10.0}
    assert trained_seconds(history) == 10.0
    assert trained_seconds([]) == 0.0


def test_remaining_budget_counts_the_training_of_earlier_runs(tmp_path):
    ckpt = _checkpoint(tmp_path, 30, [{"step": 10, "step_time_s": 0.5}, {"step": 30, "step_time_s": 0.25}])
    assert remaining_budget(100.0, None) == 100.0  # nothing trained yet
    assert remaining_budget(100.0, ckpt) == 90.0
    assert remaining_budget(8.0, ckpt) == -2.0  # spent: the caller only evaluates
    assert remaining_budget(0.0, ckpt) == 0.0  # no budget stays no budget


def test_latest_checkpoint_is_the_highest_complete_one_of_a_resumable_run(tmp_path):
    assert latest_checkpoint(tmp_path) is None and not has_checkpoint(tmp_path)
    _checkpoint(tmp_path, 1000)
    _checkpoint(tmp_path, 2000)
    (tmp_path / "checkpoint_003000").mkdir()  # a crash while writing it: no learner.json
    assert latest_checkpoint(tmp_path) is None  # no Ray Train snapshot: nothing Ray Train could resume
    (tmp_path / SNAPSHOT_FILE).write_text(json.dumps({"latest_checkpoint_result": None}))
    assert not has_checkpoint(tmp_path)
    entries = [{"checkpoint_dir_name": f"checkpoint_{s:06d}", "metrics": {}} for s in (1000, 2000)]
    (tmp_path / SNAPSHOT_FILE).write_text(json.dumps({"checkpoint_results": entries,
                                                      "latest_checkpoint_result": entries[-1]}))
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint_002000" and has_checkpoint(tmp_path)


def test_export_final_replaces_an_older_export(tmp_path):
    hf = tmp_path / "checkpoint_000002" / "hf"
    hf.mkdir(parents=True)
    (hf / "config.json").write_text("{}")
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "stale.bin").write_text("old")
    final = export_final(hf, tmp_path)
    assert final == tmp_path / "final"
    assert sorted(p.name for p in final.iterdir()) == ["config.json"]
