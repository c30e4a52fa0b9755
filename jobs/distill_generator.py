"""`zray distill-generator`: Turbo++ (methods.md §6), a two-step student distilled from the 8-step base generator.

    zray distill-generator --recipe dev                          # the recipe's variants (Turbo++ and its ablations)
    zray distill-generator --recipe dev --variant shared         # one variant
    zray distill-generator --recipe dev --resume                 # finished variants kept, a cut one resumes

Steps: resolve the world and the teacher (`distill_generator.teacher_dir`, default this run's
`pretrain_generator/pipeline`); precompute `num_teacher_samples` teacher samples into Parquet
(`zray.data.teacher_samples`; resumable) unless `teacher_samples="online"`; judge the held-out prompts sampled by
the teacher with 8 steps and naively with 2 steps (the references); then for each variant
(`zray.config.turbo_variant`) train the student with the generic learner (`zray.tasks.turbo.TurboTask`: Ray Train
+ DeepSpeed, checkpoints, TensorBoard, resume) and judge it on the same prompts from the same noise.

Outputs under `<out_dir>/distill_generator/`: `teacher_samples/` (Parquet), `<variant>/` (the Ray Train run:
checkpoints, `tensorboard/`, `final/` in `TwoStepStudent` layout, `phase.json`, and `pipeline/`: the student as a
folder diffusers alone samples, with its two-step recipe in `pipeline/README.md`), `references.json`,
`metrics.json`, `results.md` (the table: `zray.evaluation.turbo`), `samples.png` (teacher | naive 2-step |
variants, same noise). Experiment records: docs/experiments.md.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

from zray.config import RunConfig, to_dict, turbo_variant
from zray.data import ensure_world, head_rows, read_table
from zray.data.render import decode_png
from zray.evaluation.turbo import compare_to_references, judge_generator, results_markdown, save_variant_grid
from zray.models.generator import initial_noise, load_zimage, sample_images, to_pil
from zray.models.turbo import TwoStepStudent, sample_two_step_images
from zray.models.turbo_export import export_two_step_pipeline

NUM_GRID = 8


def teacher_pipeline_dir(cfg: RunConfig) -> Path:
    """The 8-step teacher: `distill_generator.teacher_dir`, else this run's pretrain-generator pipeline."""
    path = Path(cfg.distill_generator.teacher_dir or Path(cfg.out_dir) / "pretrain_generator" / "pipeline")
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"no ZImagePipeline at {str(path)!r} (distill_generator.teacher_dir): run "
                                "`zray pretrain-generator` first or set distill_generator.teacher_dir")
    from zray.models.generator import check_generator_architecture

    return check_generator_architecture(path, "distill_generator.teacher_dir").resolve()


def run_distill_generator(cfg: RunConfig, resume: bool = False,
                          variants: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Train and judge every variant; returns the metrics record (also written to metrics.json)."""
    import ray.data
    from tqdm import tqdm

    from actors.learner import fit_phase, init_ray
    from zray.data.teacher_samples import collect_teacher_samples
    from zray.tasks.turbo import TurboTask

    dcfg = cfg.distill_generator
    variants = tuple(variants or dcfg.variants)
    for v in variants:
        turbo_variant(dcfg.turbo, v)  # a bad name fails before anything runs
    out = Path(cfg.out_dir).resolve()
    root = out / "distill_generator"
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data_dir = ensure_world(cfg.world, out / "data")
    teacher_dir = teacher_pipeline_dir(cfg)
    eval_rows = head_rows(data_dir / "generator_test.parquet", "generator", dcfg.num_eval_prompts,
                          "distill_generator.num_eval_prompts")
    if dcfg.teacher_samples == "online":  # every train prompt; the teacher samples inside each step
        train_rows = read_table(data_dir / "generator_train.parquet", "generator").to_pylist()
    else:
        train_rows = head_rows(data_dir / "generator_train.parquet", "generator", dcfg.num_teacher_samples,
                               "distill_generator.num_teacher_samples")
    print(f"[distill-generator] teacher {teacher_dir}; variants {', '.join(variants)}; {len(eval_rows)} held-out "
          f"prompts; teacher samples: {dcfg.teacher_samples}")

    # 1. The discriminator's real data: precomputed teacher samples (or world rows for online sampling).
    if dcfg.teacher_samples == "online":
        train = ray.data.from_items([{k: r[k] for k in ("image_id", "prompt", "image")} for r in train_rows])
    else:
        with tqdm(total=dcfg.num_teacher_samples, desc="teacher samples", unit="sample") as bar:
            table = collect_teacher_samples(
                teacher_dir, train_rows, out_dir=root / "teacher_samples", seed=cfg.seed,
                steps=dcfg.turbo.teacher_steps, shift=dcfg.turbo.teacher_shift, mid_steps=dcfg.turbo.teacher_mid_steps,
                image_size=cfg.world.image_size, progress=lambda done, total: bar.update(done - bar.n))
        train = ray.data.from_arrow(table)

    # 2. References: the teacher with 8 steps and naively with 2, same noise as every student.
    pipe = load_zimage(teacher_dir)
    prompts = [r["prompt"] for r in eval_rows]
    renders = [decode_png(r["image"]) for r in eval_rows]
    noise = initial_noise(pipe, len(eval_rows), cfg.seed + 1, height=cfg.world.image_size,
                          width=cfg.world.image_size)
    images: dict[str, list[Any]] = {}
    references: dict[str, dict[str, Any]] = {}
    for key, steps in (("teacher", dcfg.turbo.teacher_steps), ("two_step", 2)):
        images[key] = [im for i in range(0, len(prompts), 50) for im in to_pil(sample_images(
            pipe, prompts[i:i + 50], noise[i:i + 50], steps, dcfg.turbo.teacher_shift))]
    for key, steps in (("teacher", dcfg.turbo.teacher_steps), ("two_step", 2)):
        metrics, alignment = judge_generator(images[key], prompts, renders=renders, teacher_images=images["teacher"])
        references[key] = {"metrics": {**metrics, "steps": steps}, "alignment": alignment}
    (root / "references.json").write_text(json.dumps(references, indent=1))

    # 3. Each variant: train (resumable), then judge from the same noise.
    init_ray(dcfg.learner.num_workers * dcfg.learner.cpus_per_worker + 1)
    rows = {"teacher 8-step": references["teacher"]["metrics"], "naive 2-step": references["two_step"]["metrics"]}
    for variant in variants:
        task = TurboTask(teacher_dir, turbo_variant(dcfg.turbo, variant), teacher_samples=dcfg.teacher_samples,
                         image_size=cfg.world.image_size, disc_grad_clip=dcfg.disc_grad_clip)
        phase = fit_phase(task, dcfg.learner, train, root, variant, resume, dcfg.time_budget_s,
                          tag="distill-generator")
        student = TwoStepStudent.from_pretrained(phase["final_dir"]).eval()
        export_dir = root / variant / "pipeline"
        if not (export_dir / "README.md").is_file():  # written last: kept on --resume, a cut export is redone
            shutil.rmtree(export_dir, ignore_errors=True)
            export_two_step_pipeline(phase["final_dir"], teacher_dir, export_dir, sigma_2=dcfg.turbo.sigma_2,
                                     renoise=dcfg.turbo.renoise)
        images[variant] = to_pil(sample_two_step_images(student, pipe, prompts, noise, sigma_2=dcfg.turbo.sigma_2))
        metrics, alignment = judge_generator(images[variant], prompts, renders=renders,
                                             teacher_images=images["teacher"])
        rows[variant] = {**metrics, "steps": 2, **compare_to_references(metrics, alignment, references),
                         "train_steps": phase["steps"], "train_s": phase["train_s"]}
        m = rows[variant]
        print(f"[distill-generator] {variant}: {phase['steps']} steps ({phase['train_s'] / 60:.1f} min); main colour "
              f"{m['main_colour']:.1%}, Frechet to renders {m['frechet_to_renders']:.3f}; gap closed "
              f"{m['gap_closed_frechet_to_renders']:.0%} (Frechet) / {m['gap_closed_main_colour']:.0%} (main colour)")

    record = {"teacher_dir": str(teacher_dir), "variants": list(variants), "rows": rows,
              "total_s": time.perf_counter() - started,
              "config": {"distill_generator": to_dict(dcfg), "world_image_size": cfg.world.image_size}}
    (root / "metrics.json").write_text(json.dumps(record, indent=2))
    notes = [f"Teacher: `{teacher_dir}`; teacher samples: {dcfg.teacher_samples}"
             + ("" if dcfg.teacher_samples == "online" else f" ({dcfg.num_teacher_samples} precomputed)")
             + f"; learner: {dcfg.learner.max_steps} steps max, micro batch {dcfg.learner.micro_batch_size}, "
             f"lr {dcfg.learner.lr}, budget {dcfg.time_budget_s:.0f} s per variant.",
             "Variants: " + "; ".join(f"{v} = {_diff(dcfg.turbo, v) or 'the recipe as configured'}" for v in variants)]
    (root / "results.md").write_text(results_markdown(rows, num_prompts=len(prompts), notes=notes))
    grid = {"teacher 8-step": images["teacher"], "naive 2-step": images["two_step"],
            **{v: images[v] for v in variants}}
    save_variant_grid(root / "samples.png", prompts, grid, NUM_GRID)
    print(f"[distill-generator] done in {record['total_s'] / 60:.1f} min -> {root / 'results.md'}")
    return record


def _diff(turbo: Any, variant: str) -> str:
    """The TurboConfig fields a variant changes, as `name=value` pairs."""
    changed = turbo_variant(turbo, variant)
    return ", ".join(f"{f.name}={getattr(changed, f.name)!r}" for f in dataclasses.fields(turbo)
                     if getattr(changed, f.name) != getattr(turbo, f.name))

