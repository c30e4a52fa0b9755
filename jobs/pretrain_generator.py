"""`zray pretrain-generator`: pre-train the tiny Z-Image generator (VAE, then flow transformer) on the Shapes world.

    zray pretrain-generator --recipe dev              # the calibrated 40-minute run (2-core CPU)
    zray pretrain-generator --recipe dev --resume     # continue: finished phases are kept, a cut one resumes

Steps: resolve the world (build `<out_dir>/data` if missing); build the tiny Z-Image pipeline from
`GeneratorConfig` (or start from `GeneratorConfig.checkpoint`); train the VAE on generator_train with the
generic learner (`actors.learner.fit`: Ray Train + DeepSpeed, checkpoints in diffusers format, TensorBoard);
set the VAE's latent `shift_factor` / `scaling_factor` from training images (latents about N(0, 1)); judge
held-out reconstructions (colour kept, reported before the transformer trains); train the transformer on the
frozen VAE and text encoder (`FlowTask`); assemble the final `ZImagePipeline` directory (the Turbo++ teacher);
sample held-out prompts with 8 steps and with 2 steps from the same noise (zray's sampler, which
`metrics.json` records agreeing with `ZImagePipeline.__call__`) and judge them.

Outputs under `<out_dir>/pretrain_generator/`: `pipeline/` (loads with `ZImagePipeline.from_pretrained`),
`vae/` and `flow/` (Ray Train runs: checkpoints, `tensorboard/`, `final/`), `metrics.json`, `summary.md`,
`samples.png` (reference render | 8-step | 2-step, same noise, with prompts and verdicts), `reconstructions.png`,
`loss_curves.png`. Metric definitions: `zray/evaluation/generator.py`.

Calibration of the dev recipe and its figures: docs/experiments.md (pretrain-generator).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from zray.config import GeneratorConfig, RunConfig, to_dict
from zray.data import ensure_world, head_rows, read_ray_dataset, read_table
from zray.data.render import decode_png
from zray.evaluation.generator import frechet_to, judge_many, summarise
from zray.evaluation.generator_report import (save_loss_curves, save_reconstruction_grid, save_sample_grid,
                                             summary_markdown)
from zray.models.generator import decode_images, initial_noise, load_zimage, pil_to_tensor, sample_images, to_pil
from zray.models.tiny import build_once, build_tiny_zimage, count_parameters
from zray.tasks.flow import FlowTask
from zray.tasks.vae import VAETask
from zray.training.runs import write_text_atomic

NUM_GRID = 12
NUM_LATENT_STAT_IMAGES = 512
NUM_EQUIVALENCE_PROMPTS = 4
EVAL_BATCH = 50


def run_pretrain_generator(cfg: RunConfig, resume: bool = False) -> dict[str, Any]:
    """Train and evaluate the base generator; returns the metrics record (also written to metrics.json)."""
    from actors.learner import fit_phase, init_ray

    pcfg = cfg.pretrain_generator
    out = Path(cfg.out_dir).resolve()
    root = out / "pretrain_generator"
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data_dir = ensure_world(cfg.world, out / "data")
    eval_rows = head_rows(data_dir / "generator_test.parquet", "generator", pcfg.num_eval_prompts,
                          "pretrain_generator.num_eval_prompts")
    init_dir = init_pipeline(cfg.generator, root / "init", cfg.world.image_size)
    init_ray(max(pcfg.vae.num_workers * pcfg.vae.cpus_per_worker,
                 pcfg.flow.num_workers * pcfg.flow.cpus_per_worker) + 1)
    train = read_ray_dataset(data_dir / "generator_train.parquet", "generator")
    print(f"[pretrain-generator] world {data_dir}; pipeline {count_parameters(init_dir):,} parameters; "
          f"{len(eval_rows)} held-out prompts")

    # 1. VAE: reconstruction, then latent scaling, then the colour check before anything else trains.
    vae_task = VAETask(init_dir / "vae", object_weight=pcfg.vae_object_weight, kl_weight=pcfg.vae_kl_weight)
    vae_phase = fit_phase(vae_task, pcfg.vae, train.select_columns(["image"]), root, "vae", resume,
                          pcfg.vae_time_budget_s, tag="pretrain-generator")
    vae_dir = vae_phase["final_dir"]
    latent_stats = set_latent_scaling(vae_dir, data_dir / "generator_train.parquet")
    vae_eval, reconstructions = evaluate_vae(vae_dir, eval_rows)
    save_reconstruction_grid(root / "reconstructions.png", eval_rows[:NUM_GRID], reconstructions[:NUM_GRID])
    print(f"[pretrain-generator] VAE after {vae_phase['steps']} steps ({vae_phase['train_s'] / 60:.1f} min): colour "
          f"kept {vae_eval['main_colour']:.1%}, colours exact {vae_eval['colours_exact']:.1%}, background "
          f"{vae_eval['background']:.1%}, PSNR {vae_eval['psnr']:.1f} dB on {len(eval_rows)} held-out images")

    # 2. Flow transformer on the frozen VAE and text encoder.
    flow_init = assemble_pipeline(init_dir, root / "flow_init", vae_dir=vae_dir, shift=pcfg.shift)
    flow_task = FlowTask(flow_init, shift=pcfg.shift, cache_encodings=pcfg.flow_cache_encodings,
                         ema_decay=pcfg.flow_ema_decay)
    flow_columns = train.select_columns(["image_id", "image", "prompt"])
    flow_phase = fit_phase(flow_task, pcfg.flow, flow_columns, root, "flow", resume, pcfg.flow_time_budget_s,
                           tag="pretrain-generator")
    pipeline_dir = assemble_pipeline(init_dir, root / "pipeline", vae_dir=vae_dir, shift=pcfg.shift,
                                     transformer_dir=flow_phase["final_dir"])

    # 3. Held-out prompts: 8-step (teacher) and 2-step (naive baseline) samples from the same noise.
    samples = evaluate_samples(pipeline_dir, eval_rows, pcfg.sample_steps, pcfg.shift, seed=cfg.seed)
    save_sample_grid(root / "samples.png", eval_rows[:NUM_GRID], samples, pcfg.sample_steps)
    save_loss_curves(root / "loss_curves.png", vae_phase["history"], flow_phase["history"])
    record = {
        "pipeline_dir": str(pipeline_dir), "num_params": {
            part: count_parameters(pipeline_dir / part) for part in ("vae", "transformer", "text_encoder")},
        "vae": {"steps": vae_phase["steps"], "train_s": vae_phase["train_s"], "fit_wall_s": vae_phase["wall_s"],
                "latent_shift": latent_stats[0], "latent_scale": latent_stats[1], "eval": vae_eval},
        "flow": {"steps": flow_phase["steps"], "train_s": flow_phase["train_s"], "fit_wall_s": flow_phase["wall_s"],
                 "last_loss": flow_phase["history"][-1]["loss"] if flow_phase["history"] else None},
        "samples": samples["metrics"], "renders": samples["renders"], "total_s": time.perf_counter() - started,
        "config": {"pretrain_generator": to_dict(pcfg), "generator": dataclasses.asdict(cfg.generator)},
    }
    write_text_atomic(root / "metrics.json", json.dumps(record, indent=2))
    write_text_atomic(root / "summary.md", summary_markdown(record))
    s = samples["metrics"]
    print(f"[pretrain-generator] {pcfg.sample_steps}-step samples: background {s['teacher']['background']:.1%}, main "
          f"colour {s['teacher']['main_colour']:.1%}, alignment {s['teacher']['alignment']:.2f}, Frechet "
          f"{s['teacher']['frechet_to_renders']:.3f}; 2-step: main colour {s['two_step']['main_colour']:.1%}, "
          f"Frechet {s['two_step']['frechet_to_renders']:.3f}; total {record['total_s'] / 60:.1f} min -> {root}")
    return record


# ------------------------------------------------------------------------------------------ setup


def init_pipeline(gen_cfg: GeneratorConfig, path: Path, image_size: int) -> Path:
    """The initial pipeline: `gen_cfg.checkpoint` if set, else a tiny one built (once) under `path`."""
    return Path(build_once(gen_cfg, path, build_tiny_zimage, image_size)["path"])


@torch.no_grad()
def set_latent_scaling(vae_dir: Path, train_parquet: Path) -> tuple[float, float]:
    """Set the VAE's `shift_factor` / `scaling_factor` so training latents are about N(0, 1); returns them."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(vae_dir), dtype=torch.float32).eval()
    images = read_table(train_parquet, "generator").column("image").to_pylist()[:NUM_LATENT_STAT_IMAGES]
    z = torch.cat([vae.encode(decode_images(images[i:i + EVAL_BATCH])).latent_dist.mode()
                   for i in range(0, len(images), EVAL_BATCH)])
    shift, scale = float(z.mean()), float(1.0 / z.std().clamp_min(1e-6))
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    vae.save_pretrained(str(vae_dir))
    return shift, scale


def assemble_pipeline(init_dir: Path, out_dir: Path, *, vae_dir: Path, shift: float,
                      transformer_dir: Path | None = None) -> Path:
    """A `ZImagePipeline` folder: text encoder and tokenizer from `init_dir`, the given VAE (and transformer),
    a FlowMatchEuler scheduler with `shift` (static), as the 8-step teacher samples."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    pipe = ZImagePipeline.from_pretrained(str(init_dir), dtype=torch.float32)
    pipe.register_modules(vae=AutoencoderKL.from_pretrained(str(vae_dir), dtype=torch.float32),
                          scheduler=FlowMatchEulerDiscreteScheduler.from_config(
                              pipe.scheduler.config, shift=shift, use_dynamic_shifting=False))
    if transformer_dir is not None:
        pipe.register_modules(transformer=ZImageTransformer2DModel.from_pretrained(str(transformer_dir),
                                                                                   dtype=torch.float32))
    shutil.rmtree(out_dir, ignore_errors=True)
    pipe.save_pretrained(str(out_dir))
    return out_dir


# ------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def evaluate_vae(vae_dir: Path, rows: list[dict[str, Any]]) -> tuple[dict[str, float], list[Any]]:
    """Judge the reconstructions (posterior mean) of held-out renders against their prompts; PSNR too."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(vae_dir), dtype=torch.float32).eval()
    images = decode_images([r["image"] for r in rows])
    recon = torch.cat([vae(images[i:i + EVAL_BATCH]).sample for i in range(0, len(rows), EVAL_BATCH)])
    recon01 = (recon * 0.5 + 0.5).clamp(0, 1)
    mse = float(((recon01 - (images * 0.5 + 0.5)) ** 2).mean())
    pil = to_pil(recon01)
    metrics = summarise(judge_many(pil, [r["prompt"] for r in rows]))
    metrics["psnr"] = float(10 * torch.log10(torch.tensor(1.0 / max(mse, 1e-12))))
    return metrics, pil


@torch.no_grad()
def evaluate_samples(pipeline_dir: Path, rows: list[dict[str, Any]], steps: int, shift: float,
                     seed: int) -> dict[str, Any]:
    """8-step and 2-step samples of the same noise, judged and compared to the prompts' reference renders."""
    pipe = load_zimage(pipeline_dir)
    prompts = [r["prompt"] for r in rows]
    renders = [decode_png(r["image"]) for r in rows]
    size = renders[0].size[1]
    noise = initial_noise(pipe, len(rows), seed, height=size, width=size)
    images: dict[str, list[Any]] = {}
    for key, n in (("teacher", steps), ("two_step", 2)):
        images[key] = []
        for i in range(0, len(rows), EVAL_BATCH):
            images[key] += to_pil(sample_images(pipe, prompts[i:i + EVAL_BATCH], noise[i:i + EVAL_BATCH], n, shift))
    metrics = {key: {**summarise(judge_many(images[key], prompts)), "steps": n,
                     "frechet_to_renders": frechet_to(images[key], renders)}
               for key, n in (("teacher", steps), ("two_step", 2))}
    metrics["two_step"]["frechet_to_teacher"] = frechet_to(images["two_step"], images["teacher"])
    # zray's sampler and ZImagePipeline.__call__ give the same images (same noise, same prompts)
    k = min(NUM_EQUIVALENCE_PROMPTS, len(rows))
    ours = pil_to_tensor(images["teacher"][:k])
    theirs = pipe(prompt=prompts[:k], height=size, width=size, num_inference_steps=steps, guidance_scale=0.0,
                  latents=noise[:k], max_sequence_length=64, output_type="pil").images
    metrics["pipeline_max_abs_diff_255"] = float((ours - pil_to_tensor(theirs)).abs().max() * 127.5)
    renders_judged = summarise(judge_many(renders, prompts))
    return {"metrics": metrics, "renders": renders_judged, "images": images, "prompts": prompts, "references": renders}
