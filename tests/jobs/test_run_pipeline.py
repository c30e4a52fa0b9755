"""`zray run` (jobs/run.py): the driver's skip / resume / re-run logic and its report, with stand-in stages (each
writes its folder and a table in milliseconds). The real stages end to end: tests/jobs/test_readme_first_command.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import jobs.run as run
from jobs.cli import main
from zray.config import ConfigError, RunConfig
from zray.pipeline.plan import STAGE_NAMES, read_record


@pytest.fixture
def calls(monkeypatch):
    """Replace every stage with a stand-in that records (stage, resume) and writes the stage's table and a plot."""
    made: list[tuple[str, bool]] = []

    def stand_in(name):
        def runner(cfg, resume):
            made.append((name, resume))
            folder = Path(cfg.out_dir) / name
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "plot.png").write_bytes(b"\x89PNG")
            table = {"train_teacher": "results.md", "reward_finetune": "turbo/summary.md"}.get(name, "summary.md")
            (folder / table).parent.mkdir(parents=True, exist_ok=True)
            (folder / table).write_text(f"# {name}\n\n| a |\n|---|\n| 1 |\n\n![grid](grid.png)\n")
            return {"value": 1.5, "nested": {"dropped": True}}
        return runner

    monkeypatch.setattr(run, "RUNNERS", {name: stand_in(name) for name in STAGE_NAMES})
    import actors.learner

    monkeypatch.setattr(actors.learner, "init_ray", lambda cpus: None)
    return made


def test_runs_every_stage_once_then_skips_them(calls, tmp_path):
    cfg = RunConfig(out_dir=str(tmp_path))
    report = run.run_pipeline(cfg)
    assert calls == [(name, False) for name in STAGE_NAMES]
    text = report.read_text()
    assert "**Smoke run.**" in text  # the tiny size says its numbers are smoke
    assert "| train_teacher | Z-Reward teacher (zero-shot, SFT, GRPO, GDSO) | done | ran |" in text
    assert "### train_teacher" in text  # the stage's own table, headings two levels down
    assert "![grid](train_teacher/grid.png)" in text and "![grid](reward_finetune/turbo/grid.png)" in text
    assert "![serve/plot.png](serve/plot.png)" in text
    assert read_record(tmp_path, "serve")["summary"] == {"value": 1.5}
    calls.clear()
    report = run.run_pipeline(cfg)
    assert calls == []
    assert "| data | Shapes world (Parquet) | done | skipped (done, same config) |" in report.read_text()


def test_a_changed_config_reruns_that_stage_and_downstream_and_keeps_the_old_output(calls, tmp_path):
    cfg = RunConfig(out_dir=str(tmp_path))
    run.run_pipeline(cfg)
    calls.clear()
    changed = dataclasses.replace(cfg, train_student=dataclasses.replace(cfg.train_student, num_distill_prompts=7))
    run.run_pipeline(changed)
    assert [name for name, _ in calls] == ["train_student", "serve", "reward_finetune"]
    kept = sorted(p.name.split("-")[0] for p in (tmp_path / "superseded").iterdir())
    assert kept == ["reward_finetune", "serve", "train_student"]
    assert read_record(tmp_path, "train_student")["config"]["train_student"]["num_distill_prompts"] == 7


def test_a_cut_stage_resumes_and_the_ones_before_it_are_skipped(calls, tmp_path, monkeypatch):
    cfg = RunConfig(out_dir=str(tmp_path))
    ran = run.RUNNERS["train_teacher"]

    def cut(cfg, resume):
        ran(cfg, resume)
        raise KeyboardInterrupt

    monkeypatch.setitem(run.RUNNERS, "train_teacher", cut)
    with pytest.raises(KeyboardInterrupt):
        run.run_pipeline(cfg)
    record = read_record(tmp_path, "train_teacher")
    assert record["status"] == "running" and record["wall_s"] >= 0.0
    assert "| train_teacher | Z-Reward teacher (zero-shot, SFT, GRPO, GDSO) | running | cut (resumes next time) |" \
        in (tmp_path / "report.md").read_text()
    monkeypatch.setitem(run.RUNNERS, "train_teacher", ran)
    calls.clear()
    run.run_pipeline(cfg)
    assert calls[0] == ("train_teacher", True)
    assert [name for name, _ in calls] == list(STAGE_NAMES[3:])
    assert read_record(tmp_path, "train_teacher")["attempts"] == 2


def test_fresh_sets_everything_aside(calls, tmp_path):
    cfg = RunConfig(out_dir=str(tmp_path))
    run.run_pipeline(cfg, stages="data")
    calls.clear()
    run.run_pipeline(cfg, stages="data", fresh=True)
    assert calls == [("data", False)]
    assert len(list((tmp_path / "superseded").iterdir())) == 1


def test_a_stage_whose_input_is_missing_is_refused_before_anything_runs(calls, tmp_path):
    cfg = RunConfig(out_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="stage 'train_student' needs 'pretrain_vlm'.*not run"):
        run.run_pipeline(cfg, stages="train_student")
    assert calls == []
    run.run_pipeline(cfg, stages="data,pretrain_vlm,train_teacher")
    calls.clear()
    run.run_pipeline(cfg, stages="train_student")
    assert calls == [("train_student", False)]


def test_cli_bad_stage_is_one_line(capsys, tmp_path):
    assert main(["run", "--stages", "train,serve", "--set", f"out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("zray: error: --stages 'train,serve' is not allowed") and "\n" not in err
