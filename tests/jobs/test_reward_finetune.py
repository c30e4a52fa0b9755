"""`zray reward-finetune` on the tiny_cpu recipe: Ray Train (1 worker) end to end, evaluations beside the judge,
GSB against step 0, the grid, resume, the reward-hacking stop, and clear errors for missing inputs."""

import dataclasses
import json
import shutil

import pytest

from jobs.cli import build_parser, main
from jobs.recipes import tiny_cpu
from zray.config import ConfigError


def _cfg(out_dir, **changes):
    cfg = dataclasses.replace(tiny_cpu(), out_dir=str(out_dir))
    return dataclasses.replace(cfg, reward_finetune=dataclasses.replace(cfg.reward_finetune, **changes))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """An (untrained) generator pipeline of the recipe's size and a tiny student reward."""
    from zray.models.tiny import build_tiny_vlm, build_tiny_zimage

    cfg, root = tiny_cpu(), tmp_path_factory.mktemp("reward_finetune_inputs")
    return {"generator_dir": str(build_tiny_zimage(cfg.generator, root / "pipe", image_size=cfg.world.image_size)),
            "reward_dir": str(build_tiny_vlm(cfg.student, root / "student", image_size=cfg.world.image_size))}


def test_cli_has_the_command():
    args = build_parser().parse_args(["reward-finetune", "--generator", "turbo", "--generator-dir", "g",
                                      "--reward-dir", "r", "--resume"])
    assert (args.command, args.generator, args.generator_dir, args.reward_dir, args.resume) == \
        ("reward-finetune", "turbo", "g", "r", True)


def test_missing_inputs_are_clear_errors(tmp_path, inputs, capsys):
    from jobs.reward_finetune import run_reward_finetune

    with pytest.raises(ConfigError, match=r"reward_finetune.generator_dir=.*zray pretrain-generator --recipe tiny_cpu"):
        run_reward_finetune(_cfg(tmp_path))
    with pytest.raises(ConfigError, match=r"generator_dir=.*turbo_student.json.*zray distill-generator"):
        run_reward_finetune(_cfg(tmp_path), "turbo")
    with pytest.raises(ConfigError, match=r"reward_finetune.k_max=3 is not allowed with --generator turbo"):
        run_reward_finetune(_cfg(tmp_path, k_max=3), "turbo")
    with pytest.raises(ConfigError, match=r"reward_dir=.*zray train-student --method risd"):
        run_reward_finetune(_cfg(tmp_path, generator_dir=inputs["generator_dir"],
                                 pipeline_dir=inputs["generator_dir"]))
    reasoning = tmp_path / "opd_student"
    shutil.copytree(inputs["reward_dir"], reasoning)
    (reasoning / "zray_scoring.json").write_text(json.dumps({"form": "reasoning", "method": "opd"}))
    with pytest.raises(ConfigError, match=r"reward_dir=.*says form 'reasoning'.*expected a direct-form student"):
        run_reward_finetune(_cfg(tmp_path, generator_dir=inputs["generator_dir"],
                                 pipeline_dir=inputs["generator_dir"], reward_dir=str(reasoning)))
    assert main(["reward-finetune", "--set", f"out_dir={tmp_path}"]) == 2
    assert "reward_finetune.generator_dir=" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="learner.lr_schedule='cosine' is not allowed"):
        _cfg(tmp_path, learner=dataclasses.replace(tiny_cpu().reward_finetune.learner, lr_schedule="cosine"))


def test_tiny_cpu_job_end_to_end_resume_and_stop(tmp_path, inputs, ray_session, monkeypatch):
    pytest.importorskip("deepspeed")
    from safetensors.torch import load_file

    import jobs.reward_finetune as job
    from zray.models.reward_generator import BASE_LORA_FILE

    cfg = _cfg(tmp_path / "run", **inputs)
    one = dataclasses.replace(cfg, reward_finetune=dataclasses.replace(
        cfg.reward_finetune, learner=dataclasses.replace(cfg.reward_finetune.learner, max_steps=1)))
    record = job.run_reward_finetune(one)  # step 0 evaluated, one segment of one step, evaluated
    root = tmp_path / "run" / "reward_finetune" / "base"
    for name in ("metrics.json", "summary.md", "reward_vs_judge.json", "reward_vs_judge.png", "grid.png",
                 f"train/final/{BASE_LORA_FILE}", "train/final/reward_finetune.json"):
        assert (root / name).is_file(), name
    assert list((root / "train" / "tensorboard").glob("events.out.tfevents.*"))
    assert record["steps"] == 1 and [r["step"] for r in record["evaluations"]] == [0, 1]
    first = record["evaluations"][0]
    assert first["gap"] == 0.0 and 1.0 <= first["judge"]["alignment"] <= 5.0
    assert 1.0 <= first["student"]["alignment"] <= 5.0 and 1.0 <= first["student_reward"] <= 5.0
    assert len(first["per_prompt"]["judge_alignment"]) == cfg.reward_finetune.num_eval_prompts
    _check_gsb(record, json.loads((root / "metrics.json").read_text()))
    assert record["grid_columns"] == [f"base {cfg.reward_finetune.base_steps}-step", "base + reward grad"]
    assert "| GSB vs step 0 (G / S / B) | net |" in (root / "summary.md").read_text()
    grid_written = (root / "grid.png").stat().st_mtime_ns
    assert {"loss", "reward", "mu_alignment", "grad_last"} <= set(record["history"][-1])
    lora = load_file(str(root / "train" / "final" / BASE_LORA_FILE))
    assert all(k.startswith("transformer.") for k in lora)  # diffusers' pipeline LoRA format
    assert any(float(v.abs().max()) > 0 for k, v in lora.items() if "lora_B" in k)  # trained (B starts at 0)
    with pytest.raises(FileExistsError, match="--resume"):
        job.run_reward_finetune(one)

    again = job.run_reward_finetune(cfg, resume=True)  # the recipe's 2 steps: continues at step 1
    assert again["steps"] == 2 and [r["step"] for r in again["evaluations"]] == [0, 1, 2]
    assert again["evaluations"][:2] == record["evaluations"]  # kept, not recomputed
    assert [h["step"] for h in again["history"]] == [1, 2]
    saved = json.loads((root / "reward_vs_judge.json").read_text())
    assert [r["step"] for r in saved] == [0, 1, 2] and all("gap" in r for r in saved)

    # a widened gap stops the run before the next segment (here forced: the stop path, not the judge's verdict)
    monkeypatch.setattr(job, "alarm", lambda records, gap_threshold, decline_threshold:
                        ({**records[-1], "gap": 9.0}, "the gap reached +9.000 (threshold 0.5)"))
    three = dataclasses.replace(cfg, reward_finetune=dataclasses.replace(
        cfg.reward_finetune, learner=dataclasses.replace(cfg.reward_finetune.learner, max_steps=3)))
    stopped = job.run_reward_finetune(three, resume=True)
    assert stopped["steps"] == 2 and stopped["stopped_by_gap"] and stopped["hacking"]["gap"] == 9.0
    summary = (root / "summary.md").read_text()
    assert "the gap reached +9.000 (threshold 0.5); the run stopped there" in summary and "reward hacking)" in summary
    assert stopped["hacking"]["alarm"] == "the gap reached +9.000 (threshold 0.5)"
    assert all("decline" in r for r in stopped["evaluations"])
    _check_gsb(stopped, json.loads((root / "metrics.json").read_text()))
    assert (root / "grid.png").stat().st_mtime_ns > grid_written  # rewritten: step 0 and 2 re-sampled on resume


def _check_gsb(record, saved):
    """GSB against step 0 in every evaluation and for the last one; fractions sum to 1; net = good - bad; equal to
    the GSB of the saved per-prompt judge alignments."""
    from zray.evaluation.turbo import gsb

    assert saved["gsb_vs_start"] == record["gsb_vs_start"] == record["evaluations"][-1]["gsb_vs_start"]
    assert record["evaluations"][0]["gsb_vs_start"] == {"good": 0.0, "same": 1.0, "bad": 0.0, "net": 0.0}
    start = record["evaluations"][0]["per_prompt"]["judge_alignment"]
    for r in record["evaluations"]:
        g = r["gsb_vs_start"]
        assert g["good"] + g["same"] + g["bad"] == pytest.approx(1.0) and g["net"] == pytest.approx(g["good"] - g["bad"])
        assert min(g["good"], g["same"], g["bad"]) >= 0.0
        assert g == gsb(r["per_prompt"]["judge_alignment"], start)
    assert saved["grid"].endswith("grid.png") and saved["grid_columns"] == record["grid_columns"]


def test_turbo_grid_columns(inputs):
    """The turbo grid: the base pipeline sampled with base_steps and naively with 2 steps from the same noise, beside
    the student's images as given and after (here stand-ins)."""
    from jobs.reward_finetune import grid_columns
    from zray.models.generator import initial_noise, load_zimage

    cfg = tiny_cpu()
    size = cfg.world.image_size
    noise = initial_noise(load_zimage(inputs["generator_dir"]), 2, 0, height=size, width=size)
    start, final = ["s0", "s1"], ["f0", "f1"]
    columns = grid_columns("turbo", start, final, pipeline_dir=inputs["generator_dir"], prompts=["a red circle"] * 2,
                           noise=noise, base_steps=3, shift=3.0)
    assert list(columns) == ["teacher 3-step", "naive 2-step", "Turbo++", "Turbo++ + reward grad"]
    assert columns["Turbo++"] is start and columns["Turbo++ + reward grad"] is final
    teacher, naive = columns["teacher 3-step"], columns["naive 2-step"]
    assert len(teacher) == len(naive) == 2 and teacher[0].size == (size, size)
    assert teacher[0].tobytes() != naive[0].tobytes()  # a different number of steps from the same noise
    assert grid_columns("base", start, final, pipeline_dir=inputs["generator_dir"], prompts=[], noise=noise,
                        base_steps=8, shift=3.0) == {"base 8-step": start, "base + reward grad": final}
