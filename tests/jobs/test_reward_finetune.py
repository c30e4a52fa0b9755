"""`zray reward-finetune` on the tiny_cpu recipe: Ray Train (1 worker) end to end, evaluations beside the judge,
resume, the reward-hacking stop, and clear errors for missing inputs."""

import dataclasses
import json

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
    for name in ("metrics.json", "summary.md", "reward_vs_judge.json", "reward_vs_judge.png",
                 f"train/final/{BASE_LORA_FILE}", "train/final/reward_finetune.json"):
        assert (root / name).is_file(), name
    assert list((root / "train" / "tensorboard").glob("events.out.tfevents.*"))
    assert record["steps"] == 1 and [r["step"] for r in record["evaluations"]] == [0, 1]
    first = record["evaluations"][0]
    assert first["gap"] == 0.0 and 1.0 <= first["judge"]["alignment"] <= 5.0
    assert 1.0 <= first["student"]["alignment"] <= 5.0 and 1.0 <= first["student_reward"] <= 5.0
    assert len(first["per_prompt"]["judge_alignment"]) == cfg.reward_finetune.num_eval_prompts
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
    monkeypatch.setattr(job, "widened", lambda records, threshold: {**records[-1], "gap": 9.0})
    three = dataclasses.replace(cfg, reward_finetune=dataclasses.replace(
        cfg.reward_finetune, learner=dataclasses.replace(cfg.reward_finetune.learner, max_steps=3)))
    stopped = job.run_reward_finetune(three, resume=True)
    assert stopped["steps"] == 2 and stopped["stopped_by_gap"] and stopped["hacking"]["gap"] == 9.0
    assert "the run stopped there" in (root / "summary.md").read_text()
