"""zray.pipeline.report: the run's report.md, built only from the stages' records, tables and plots."""

from __future__ import annotations

import dataclasses
import json

from zray.config import RunConfig
from zray.pipeline.plan import finish_record, note_progress, start_record
from zray.pipeline.report import first_table, write_report


def _done(out, stage: str, cfg: RunConfig, wall_s: float, summary=None) -> None:
    finish_record(out, start_record(out, stage, "f", cfg, None), wall_s, summary or {})


def test_the_report_shows_records_tables_and_plots_of_what_ran(tmp_path):
    cfg = RunConfig(out_dir=str(tmp_path))
    _done(tmp_path, "data", cfg, 12.0, {"rows": 40, "seconds": 26.7})
    (tmp_path / "data").mkdir()
    _done(tmp_path, "train_teacher", cfg, 150.0)
    teacher = tmp_path / "train_teacher"
    for sub in ("curves", "checkpoint_000001", "tensorboard"):
        (teacher / sub).mkdir(parents=True)
    (teacher / "results.md").write_text("# Teacher\n\n| method | HPA |\n|---|---|\n| gdso | 0.6 |\n\n"
                                        "![hpa](hpa.png)\n![abs](/abs/x.png)\n")
    for png in ("hpa.png", "curves/loss.png", "checkpoint_000001/skip.png", "tensorboard/skip.png"):
        (teacher / png).write_bytes(b"png")
    note_progress(tmp_path, start_record(tmp_path, "train_student", "f", cfg, None), 30.0)
    (tmp_path / "train_student").mkdir()

    report = write_report(tmp_path, cfg, {"data": "skipped (done, same config)", "train_teacher": "ran"})
    text = report.read_text()

    table = first_table(report).splitlines()
    assert len(table) == 2 + 8
    assert "| data | Shapes world (Parquet) | done | skipped (done, same config) | 12 s | 1 | `data/` |" in table
    assert "| train_teacher |" in table[5] and "| done | ran | 2.5 min | 1 |" in table[5]
    assert "| running | - | 30 s | 1 |" in table[6]
    assert "| pretrain_vlm |" in table[3] and "| not run | - | - | - |" in table[3]
    assert "Total wall time of the finished stages: 2.7 min." in text  # 12 s + 150 s; the running stage is not counted
    assert "**Smoke run.**" in text
    assert "### Teacher" in text  # the stage's headings two levels down
    assert "![hpa](train_teacher/hpa.png)" in text and "![abs](/abs/x.png)" in text
    assert "![train_teacher/curves/loss.png](train_teacher/curves/loss.png)" in text
    assert "skip.png" not in text
    assert "rows: 40, seconds: 26.7" in text  # a stage without its own table shows its summary
    summary = json.loads((tmp_path / "pipeline" / "summary.json").read_text())
    assert summary["stages"]["train_student"]["status"] == "running" and summary["stages"]["serve"] is None


def test_a_dev_report_has_no_smoke_banner(tmp_path):
    cfg = dataclasses.replace(RunConfig(out_dir=str(tmp_path)), name="dev", size="dev")
    text = write_report(tmp_path, cfg).read_text()
    assert "Smoke run" not in text and "recipe `dev`" in text
