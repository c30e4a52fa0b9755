"""`zray pretrain-generator` on the tiny_cpu recipe: Ray Train (1 worker) end to end, artefacts, resume."""

import dataclasses
import json

import pytest

from jobs.cli import build_parser
from jobs.recipes import tiny_cpu


def test_cli_has_the_command():
    args = build_parser().parse_args(["pretrain-generator", "--recipe", "tiny_cpu", "--resume"])
    assert args.command == "pretrain-generator" and args.resume


def test_tiny_cpu_job_end_to_end_and_resume(tmp_path, ray_session):
    pytest.importorskip("deepspeed")
    from diffusers import ZImagePipeline

    from jobs.pretrain_generator import run_pretrain_generator

    cfg = dataclasses.replace(tiny_cpu(), out_dir=str(tmp_path / "run"))
    pcfg = cfg.pretrain_generator
    record = run_pretrain_generator(cfg)
    root = tmp_path / "run" / "pretrain_generator"
    for name in ("metrics.json", "summary.md", "samples.png", "reconstructions.png", "loss_curves.png",
                 "pipeline/model_index.json", "vae/final/config.json", "flow/final/config.json"):
        assert (root / name).is_file(), name
    for phase in ("vae", "flow"):
        assert list((root / phase / "tensorboard").glob("events.out.tfevents.*")), phase
    assert record["vae"]["steps"] == pcfg.vae.max_steps and record["flow"]["steps"] == pcfg.flow.max_steps
    assert record["vae"]["eval"]["num"] == pcfg.num_eval_prompts
    for key in ("teacher", "two_step"):
        m = record["samples"][key]
        assert all(0.0 <= m[k] <= 1.0 for k in ("background", "main_colour", "colours_exact"))
        assert 1.0 <= m["alignment"] <= 5.0 and m["frechet_to_renders"] >= 0.0
    assert record["samples"]["teacher"]["steps"] == 8 and record["samples"]["two_step"]["steps"] == 2
    assert record["samples"]["pipeline_max_abs_diff_255"] <= 1.0  # zray's sampler == ZImagePipeline.__call__
    assert json.loads((root / "metrics.json").read_text())["flow"]["steps"] == pcfg.flow.max_steps

    # the saved teacher loads in diffusers without zray, with the trained VAE's latent scaling
    pipe = ZImagePipeline.from_pretrained(str(root / "pipeline"))
    assert pipe.scheduler.config.shift == pcfg.shift
    assert pipe.vae.config.scaling_factor == pytest.approx(record["vae"]["latent_scale"])

    # --resume keeps a finished phase (VAE) and continues a cut one from its latest checkpoint: here the flow
    # phase as if killed after its last checkpoint (no phase.json), so the learner restores it (EMA included)
    (root / "flow" / "phase.json").unlink()
    again = run_pretrain_generator(cfg, resume=True)
    assert again["vae"]["steps"] == record["vae"]["steps"] and again["flow"]["steps"] == record["flow"]["steps"]
    assert again["samples"]["teacher"] == record["samples"]["teacher"]
