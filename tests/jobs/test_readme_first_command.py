"""The README's first command, run exactly as written (the `readme_pipeline` fixture of tests/conftest.py): the
install check, then `zray run --recipe tiny_cpu`, the whole pipeline with tiny models into `runs/tiny_cpu`, every
stage for real (Ray Train learners, vLLM engines, Ray Serve over HTTP, diffusers). The jobs' own end-to-end checks
read the same run (tests/jobs/test_train_teacher.py, test_train_student.py, test_pretrain_vlm.py); the driver's
skip / resume / re-run logic is tested with stand-in stages in tests/jobs/test_run_pipeline.py."""

import json
import re


def test_readme_first_command_runs_the_whole_pipeline(readme_pipeline):
    assert "zray run --recipe tiny_cpu" in readme_pipeline["command"]
    run = readme_pipeline["run_dir"]
    report = run / "report.md"
    assert report.stat().st_mtime >= readme_pipeline["started"]  # written by this run
    text = report.read_text()
    stages = ("data", "pretrain_vlm", "pretrain_generator", "train_teacher", "train_student", "serve",
              "distill_generator", "reward_finetune")
    for stage in stages:
        record = json.loads((run / "pipeline" / f"{stage}.json").read_text())
        assert record["status"] == "done" and record["attempts"] == 1, stage
        assert re.search(rf"^\| {stage} \| [^|]+ \| done \| ran \| ", text, flags=re.M), stage
    assert "**Smoke run.**" in text
    assert "oracle (true scores)" in text and "judge (alignment only)" in text  # the teacher table's references
    for method in ("zero-shot", "SFT", "GRPO", "GDSO", "OPD", "RISD"):
        assert f"| {method} |" in text, method
    # the service served the trained RISD student: the same expected scores as the student's own evaluation
    check = json.loads((run / "serve" / "check.json").read_text())
    assert check["errors"] == 0 and check["requests"] > 0
    assert check["compared"] == check["requests"] * 4 and check["max_abs_diff_expected_score"] < 1e-4, check
    assert (run / "reward_finetune" / "turbo" / "grid.png").stat().st_size > 10_000
    assert "![reward_finetune/turbo/grid.png](reward_finetune/turbo/grid.png)" in text
    # every learner stage's training curves, in the report
    for curves in ("train_teacher/gdso/training.png", "train_student/risd/training.png",
                   "distill_generator/turbo/training.png", "pretrain_generator/loss_curves.png"):
        assert (run / curves).stat().st_size > 5_000 and f"![{curves}]({curves})" in text, curves
    assert "[run] 8 stages in" in readme_pipeline["stdout"]
    # each learner's progress bar closes with its fit: the first fit's (the teacher's vision warm-up) is not drawn
    # again by later ones (it was, for the whole run, while Ray Train routed the workers' print through its logger)
    out = readme_pipeline["stdout"]
    assert "vision_teacher loss" in out
    assert "vision_teacher loss" not in out[out.index("[run 3/8]"):]
