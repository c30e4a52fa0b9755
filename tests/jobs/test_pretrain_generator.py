"""`zray pretrain-generator` on the tiny_cpu recipe: Ray Train (1 worker) end to end, artefacts (the run is the
pipeline's: the `readme_pipeline` fixture)."""

import json

import pytest

from jobs.cli import build_parser
from jobs.recipes import tiny_cpu


def test_cli_has_the_command():
    args = build_parser().parse_args(["pretrain-generator", "--recipe", "tiny_cpu", "--resume"])
    assert args.command == "pretrain-generator" and args.resume


def test_tiny_cpu_job_end_to_end(readme_pipeline):
    """The base generator as `zray run --recipe tiny_cpu` pre-trained it (the README's first command, run once per
    session). Resume (a finished VAE phase kept, the flow phase continued from its checkpoint) is checked at the
    pipeline's level, stopped mid-stage: tests/jobs/test_pipeline_resume.py."""
    from diffusers import ZImagePipeline

    cfg = tiny_cpu()
    pcfg = cfg.pretrain_generator
    root = readme_pipeline["run_dir"] / "pretrain_generator"
    record = json.loads((root / "metrics.json").read_text())
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

    # the saved teacher loads in diffusers without zray, with the trained VAE's latent scaling
    pipe = ZImagePipeline.from_pretrained(str(root / "pipeline"))
    assert pipe.scheduler.config.shift == pcfg.shift
    assert pipe.vae.config.scaling_factor == pytest.approx(record["vae"]["latent_scale"])
