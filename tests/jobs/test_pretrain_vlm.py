"""`zray pretrain-vlm` on the tiny_cpu recipe: Ray Train (1 worker) end to end, artefacts, clear errors."""

import dataclasses
import json
from pathlib import Path

import pytest

from jobs.cli import main
from jobs.recipes import tiny_cpu
from zray.data import ensure_world


def test_cli_rejects_an_unknown_model(capsys):
    with pytest.raises(SystemExit) as info:
        main(["pretrain-vlm", "--model", "critic"])
    assert info.value.code == 2
    assert "invalid choice: 'critic'" in capsys.readouterr().err


def test_world_of_another_config_is_refused_and_the_same_config_accepted(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    world = tiny_cpu().world
    (data / "manifest.json").write_text(json.dumps({"world_config": dataclasses.asdict(world)}))
    assert ensure_world(world, data) == data  # the manifest's config: accepted, nothing rebuilt
    with pytest.raises(ValueError, match="another WorldConfig"):
        ensure_world(dataclasses.replace(world, seed=world.seed + 1), data)


def test_student_max_steps_must_not_be_negative():
    from zray.config import PretrainVLMConfig

    with pytest.raises(ValueError, match="student_max_steps"):
        PretrainVLMConfig(student_max_steps=-1)


@pytest.mark.parametrize("name", ["position_weight", "cover_weight"])
def test_loss_weights_must_not_be_negative(name):
    from zray.config import ConfigError, PretrainVLMConfig

    with pytest.raises(ConfigError, match=f"PretrainVLMConfig.{name}"):
        PretrainVLMConfig(**{name: -0.1})


def test_tiny_cpu_job_end_to_end(readme_pipeline):
    """The student role as `zray run --recipe tiny_cpu` pre-trained it (the README's first command, run once per
    session): vision warm-up, captioning, the instruction phase."""
    from zray.models.vlm import load_vlm

    cfg = tiny_cpu()
    run = readme_pipeline["run_dir"]
    record = json.loads((run / "pretrain_vlm" / "metrics.json").read_text())["student"]
    run_dir = run / "pretrain_vlm" / "student"
    assert cfg.pretrain_vlm.student_max_steps == 0  # the student's cap is the learner's
    assert record["steps"] == cfg.pretrain_vlm.learner.max_steps == 4
    assert [p["step"] for p in record["curve"]] == [2, 4]  # every eval_every=2 steps, the final one included
    for name in ("metrics.json", "summary.md", "descriptions.png", "learning_curve.png", "final/config.json"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    final = record["final"]
    assert final["num_images"] == cfg.pretrain_vlm.num_eval_images
    assert all(0.0 <= final[k] <= 1.0 for k in ("background", "colour", "shape", "count", "exact"))
    assert record["slices"][0]["slice"] == "all" and record["slices"][0]["shape"] == final["shape"]
    assert "Final accuracy by slice" in (run_dir / "summary.md").read_text()
    model, processor = load_vlm(run_dir / "final")  # the trained model loads without zray's task
    # captioning trained the vision heads too (vision_aux_weight > 0); they sit where vLLM does not look
    from zray.models.vision_heads import HEAD_FILE

    assert (run_dir / "final" / HEAD_FILE).is_file()
    assert [p.name for p in (run_dir / "final").glob("*.safetensors")] == ["model.safetensors"]
    assert model.config.model_type == "qwen2_5_vl"
    # the instruction phase followed captioning, from its model; its model is the base of train-teacher / -student
    from zray.training.runs import pretrained_vlm_dir

    instruct = record["instruct"]
    assert instruct["steps"] == cfg.pretrain_vlm.instruct_learner.max_steps
    assert Path(instruct["model_dir"]) == pretrained_vlm_dir(run, "student", instruct=True)
    assert (Path(instruct["model_dir"]) / "config.json").is_file()
    ev = instruct["eval"]
    assert ev["num_examples"] == cfg.world.candidates_per_prompt * 4  # one held-out prompt's candidates x dimensions
    assert 0.0 <= ev["format_fail_sampled"] <= 1.0 and set(ev["dimensions"]) == {"alignment", "realism",
                                                                                  "aesthetics", "plausibility"}
    assert "Instruction phase" in (run_dir / "summary.md").read_text()
