"""`zray train-teacher` on the tiny_cpu recipe: GDSO through vLLM engines + Ray Train, SFT, zero-shot, errors.
The end-to-end run is the pipeline's (the `readme_pipeline` fixture: `zray run --recipe tiny_cpu`)."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from jobs.cli import main
from jobs.recipes import tiny_cpu
from zray.config import ConfigError


def test_missing_base_model_is_a_clear_error(tmp_path):
    from jobs.train_teacher import base_model_dir

    with pytest.raises(ConfigError, match=r"train_teacher.base_model=.*pretrain-vlm"):
        base_model_dir(dataclasses.replace(tiny_cpu(), out_dir=str(tmp_path)))


def test_sft_rationales_on_imported_data_is_refused_before_any_work(tmp_path):
    from jobs.train_teacher import run_train_teacher
    from zray.config import DataConfig

    base = tiny_cpu()
    cfg = dataclasses.replace(base, out_dir=str(tmp_path / "run"), data=DataConfig(dir=str(tmp_path / "import")),
                              train_teacher=dataclasses.replace(base.train_teacher, sft_rationales=True))
    with pytest.raises(ConfigError, match=r"train_teacher.sft_rationales=True is not allowed with data.dir="):
        run_train_teacher(cfg, method="sft")
    assert not (tmp_path / "run").exists()


def test_seed_runs_are_found_in_order_and_their_mean_ordered(tmp_path):
    """`<method>`, `<method>_seed1`, ... with an evaluation are one method's seeds; the ordering lines use their
    mean (a method with one run: that run)."""
    from jobs.train_teacher import ordering_lines, seed_runs
    from zray.evaluation.rewards import save_predictions
    from zray.training.runs import seed_run_name

    root = tmp_path / "train_teacher"
    humans = [1.0, 2.0, 3.0]
    for run, mus in (("gdso", [1.0, 2.0, 3.0]), ("gdso_seed2", [3.0, 2.0, 1.0]), ("gdso_seed10", [1.0, 2.0, 3.0]),
                     ("sft", [3.0, 2.0, 1.0])):
        (root / run).mkdir(parents=True)
        (root / run / "metrics.json").write_text("{}")
        preds = [{"candidate_id": f"q{k}-{i}", "prompt_id": f"q{k}", "dimension": "alignment", "mu": mu, "human": h,
                  "q": [], "reasoning": None, "num_output_tokens": 1}
                 for k in range(4) for i, (mu, h) in enumerate(zip(mus, humans))]
        (tmp_path / "evaluate" / f"teacher_{run}").mkdir(parents=True)
        save_predictions(tmp_path / "evaluate" / f"teacher_{run}" / "predictions.parquet", preds)
    (root / "gdso_seed3").mkdir()  # no evaluation: not a run of the table
    assert seed_runs(root, "gdso") == ["gdso", "gdso_seed2", "gdso_seed10"] and seed_runs(root, "grpo") == []
    assert (seed_run_name("gdso", 0), seed_run_name("gdso", 2)) == ("gdso", "gdso_seed2")
    lines = ordering_lines(tmp_path, {"sft": ["sft"], "gdso": seed_runs(root, "gdso")})
    assert "(methods with several seeds: their mean)" in lines
    assert "- GDSO - SFT: +0.667 [+0.667, +0.667] (holds" in lines  # 2 of 3 seeds right on every pair, SFT never
    with pytest.raises(ConfigError, match=r"TrainTeacherConfig.seeds=0 is not allowed"):
        dataclasses.replace(tiny_cpu().train_teacher, seeds=0)


def test_rollout_engines_evaluate_the_final_model_only_in_the_dtype_a_fresh_engine_would_serve(tiny_zoo, tmp_path):
    from jobs.train_teacher import serve_final_weights
    from zray.checksum import weights_checksum

    class Pool:
        loads = []
        verify_columns = 0

        def load_weights(self, weights, *, version, checksum):
            assert weights_checksum(weights) == checksum
            self.loads.append((version, {v.dtype for v in weights.values()}, sorted(weights)))

    teacher = Path(tiny_zoo["teacher"]["path"])
    assert serve_final_weights(Pool(), teacher, teacher, version=7)
    version, dtypes, names = Pool.loads[-1]
    assert version == 7 and dtypes == {torch.float32} and "lm_head.weight" in names  # the learner's sync names
    bf16 = tmp_path / "bf16"
    shutil.copytree(teacher, bf16)
    config = json.loads((bf16 / "config.json").read_text())
    (bf16 / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    assert not serve_final_weights(Pool(), teacher, bf16, version=8)  # a fresh engine would serve bf16
    assert len(Pool.loads) == 1


def test_cli_rejects_an_unknown_method(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train-teacher", "--method", "dpo"])
    assert info.value.code == 2
    assert "invalid choice: 'dpo'" in capsys.readouterr().err


def test_all_methods_end_to_end(readme_pipeline):
    """The four methods as `zray run --recipe tiny_cpu` trained them (the README's first command, run once per
    session): from the pipeline's instruct base teacher, then the table."""
    from safetensors.torch import load_file

    from zray.training.runs import pretrained_vlm_dir

    cfg = tiny_cpu()
    root = readme_pipeline["run_dir"] / "train_teacher"
    base_dir = pretrained_vlm_dir(readme_pipeline["run_dir"], "teacher", instruct=True)
    base = load_file(str(base_dir / "model.safetensors"))
    records = {m: json.loads((root / m / "metrics.json").read_text()) for m in ("gdso", "grpo", "sft", "zero_shot")}

    gdso = records["gdso"]
    history = json.loads((root / "gdso" / "metrics.json").read_text())["training"]
    assert history["steps"] == cfg.train_teacher.learner.max_steps
    last = history["last"]
    for key in ("reward_mean", "adv_abs_mean", "policy_loss", "ce_loss", "pw_loss", "kl", "format_fail_frac",
                "rollout_s", "sync_s", "ref_s", "update_s", "clip_frac", "response_tokens"):
        assert key in last and last[key] == last[key], key  # present and not NaN
    assert last["weights_version"] == cfg.train_teacher.learner.max_steps  # one verified sync per rollout
    assert last["kl"] > 0  # pi_ref stayed the step-0 policy within the outer iteration while pi_theta moved
    final = root / "gdso" / "final"
    assert json.loads((final / "zray_scoring.json").read_text()) == {"form": "reasoning", "method": "gdso"}
    trained = load_file(str(final / "model.safetensors"))
    assert any(not torch.equal(trained[k], base[k]) for k in base)
    assert (root / "gdso" / "training.png").stat().st_size > 0
    assert 0.0 <= gdso["evaluation"]["pooled"]["hpa"] <= 1.0

    grpo = json.loads((root / "grpo" / "metrics.json").read_text())
    assert grpo["training"]["steps"] == cfg.train_teacher.learner.max_steps
    assert grpo["training"]["last"]["weights_version"] == cfg.train_teacher.learner.max_steps
    assert grpo["config"]["method"] == "grpo"
    assert json.loads((root / "grpo" / "final" / "zray_scoring.json").read_text()) == {"form": "reasoning",
                                                                                       "method": "grpo"}
    assert records["grpo"]["evaluation"]["form"] == "reasoning" and (root / "grpo" / "training.png").is_file()

    sft_final = root / "sft" / "final"
    assert json.loads((sft_final / "zray_scoring.json").read_text())["form"] == "direct"
    assert records["sft"]["evaluation"]["form"] == "direct"
    assert records["zero_shot"]["evaluation"]["form"] == "reasoning"
    assert records["zero_shot"]["model_dir"] == str(base_dir)
    table = (root / "results.md").read_text()
    assert all(f"| teacher | {name} |" in table for name in ("zero-shot", "SFT", "GRPO", "GDSO"))
    assert "| - | oracle (true scores) |" in table and "| - | judge (alignment only) |" in table
    # the paired bootstrap of each adjacent difference, from the saved predictions (tests/evaluation/test_ordering.py)
    for line in ("- SFT - zero-shot: ", "- GRPO - SFT: ", "- GDSO - GRPO: "):
        assert line in table, line
    assert (root / "judge_predictions.json").is_file()
