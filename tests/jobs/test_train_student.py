"""`zray train-student` on the tiny_cpu recipe: teacher targets through a vLLM engine actor, RISD, OPD (student and
teacher engines) and SFT through Ray Train, the table beside the teacher and the oracle; errors. The end-to-end run is
the pipeline's (the `readme_pipeline` fixture: `zray run --recipe tiny_cpu`)."""

import dataclasses
import json

import pytest
import torch

from jobs.cli import main
from jobs.recipes import tiny_cpu
from zray.config import ConfigError
from zray.rubric import DIMENSIONS


def _cfg(out_dir, student="", teacher=""):
    cfg = dataclasses.replace(tiny_cpu(), out_dir=str(out_dir))
    return dataclasses.replace(cfg, train_student=dataclasses.replace(cfg.train_student, base_model=str(student),
                                                                      teacher_model=str(teacher)))


def test_missing_models_are_clear_errors_naming_the_field_and_the_job_that_makes_them(tmp_path, tiny_zoo):
    from jobs.train_student import run_train_student

    with pytest.raises(ConfigError, match=r"train_student.base_model=.*zray pretrain-vlm --recipe tiny_cpu --model student"):
        run_train_student(_cfg(tmp_path))
    with pytest.raises(ConfigError, match=r"train_student.teacher_model=.*zray train-teacher --recipe tiny_cpu --method gdso"):
        run_train_student(_cfg(tmp_path, student=tiny_zoo["student"]["path"]))


def test_cli_rejects_an_unknown_method(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train-student", "--method", "dpo"])
    assert info.value.code == 2
    assert "invalid choice: 'dpo'" in capsys.readouterr().err


def test_all_methods_end_to_end(readme_pipeline):
    """SFT, OPD and RISD as `zray run --recipe tiny_cpu` trained them (the README's first command, run once per
    session): from the pipeline's instruct student base, beside its GDSO teacher, then the table."""
    from safetensors.torch import load_file

    from zray.training.runs import pretrained_vlm_dir

    cfg = tiny_cpu()
    root = readme_pipeline["run_dir"] / "train_student"
    base_dir = pretrained_vlm_dir(readme_pipeline["run_dir"], "student", instruct=True)
    records = {m: json.loads((root / m / "metrics.json").read_text()) for m in ("teacher", "sft", "opd", "risd")}
    scfg = cfg.train_student
    num_inputs = scfg.num_distill_prompts * cfg.world.candidates_per_prompt * len(DIMENSIONS)  # () = all four
    risd = json.loads((root / "risd" / "metrics.json").read_text())
    assert risd["targets"]["num_inputs"] == num_inputs
    assert risd["training"]["steps"] == scfg.learner.max_steps
    assert {"loss", "ce", "teacher_entropy", "mu_abs_err"} <= set(risd["training"]["last"])
    assert len(list((root / "targets").glob("part-*.parquet"))) >= 1
    for name in ("risd", "sft"):
        final = root / name / "final"
        assert json.loads((final / "zray_scoring.json").read_text()) == {"form": "direct", "method": name}
        assert list(json.loads((final / "zray_rubric.json").read_text())["dimensions"]) == list(DIMENSIONS)
        trained = load_file(str(final / "model.safetensors"))
        base = load_file(str(base_dir / "model.safetensors"))
        assert any(not torch.equal(trained[k], base[k]) for k in base)
        assert records[name]["evaluation"]["form"] == "direct"
        assert records[name]["evaluation"]["mean_output_tokens"] == 1.0  # the student answers in one token
    opd = json.loads((root / "opd" / "metrics.json").read_text())
    assert opd["training"]["steps"] == scfg.learner.max_steps
    last = opd["training"]["last"]
    assert last["weights_version"] == scfg.learner.max_steps  # one verified student sync per rollout
    assert {"reverse_kl", "teacher_s", "rollout_s", "sync_s"} <= set(last)
    assert json.loads((root / "opd" / "final" / "zray_scoring.json").read_text()) == {"form": "reasoning",
                                                                                      "method": "opd"}
    assert records["opd"]["evaluation"]["form"] == "reasoning"  # OPD's student reasons before its score
    assert records["teacher"]["evaluation"]["form"] == "reasoning"
    table = (root / "results.md").read_text()
    for row in ("| teacher | teacher |", "| student | SFT |", "| student | OPD |", "| student | RISD |",
                "| - | oracle (true scores) |"):
        assert row in table
    assert "queries/s" in table
