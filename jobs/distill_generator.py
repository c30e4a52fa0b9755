"""`zray distill-generator`: Turbo++ (methods.md §6), a two-step student distilled from the 8-step base generator.

    zray distill-generator --recipe dev                          # the recipe's variants (Turbo++ and its ablations)
    zray distill-generator --recipe dev --variant shared         # one variant
    zray distill-generator --recipe dev --resume                 # finished variants kept, a cut one resumes

Steps: resolve the world and the teacher (`distill_generator.teacher_dir`, default this run's
`pretrain_generator/pipeline`); precompute `num_teacher_samples` teacher samples into Parquet
(`zray.data.teacher_samples`; resumable) unless `teacher_samples="online"`; judge the held-out prompts sampled by
the teacher with 8 steps and naively with 2 steps (the references, kept for later runs with the same inputs:
`zray.evaluation.turbo_references`); then for each variant
(`zray.config.turbo_variant`) train the student with the generic learner (`zray.tasks.turbo.TurboTask`: Ray Train
+ DeepSpeed, checkpoints, TensorBoard, resume) and judge it on the same prompts from the same noise. With
`distill_generator.seeds = n`, every variant trains n times (learner seeds `seed`, `seed + 1`, ...; all variants of
one seed before the next), the k-th run in `<variant>_seed<k>/`, and results.md adds each variant's mean over the
seeds and its difference from Turbo++ seed by seed (`zray.evaluation.turbo.seed_summary`).

Outputs under `<out_dir>/distill_generator/`: `teacher_samples/` (Parquet), `<variant>/` (the Ray Train run:
checkpoints, `tensorboard/`, `final/` in `TwoStepStudent` layout, `phase.json`, `training.png` (its curves), and
`pipeline/`: the student as a folder diffusers alone samples, with its two-step recipe in `pipeline/README.md`;
`<variant>_seed<k>/` likewise),
`references.json` and `references.parquet` (their figures and images), `metrics.json`, `results.md` (the table:
`zray.evaluation.turbo`; then each two-step sampler's distance to the teacher's trajectory from the same noise,
step by step: `zray.evaluation.turbo_trajectory`), `samples.png` (teacher | naive 2-step | variants, same noise).
Experiment records: docs/experiments.md.

With `data.dir` (a `zray data import --kind prompts` folder) the prompts are the import's: the teacher samples come
from its train split (`zray.data.imported.prompt_rows`), the held-out prompts from its test split. The judge cannot
read them and there are no renders: the "renders" variant (and `turbo.real_data="renders"`) is refused, and the
results keep the Frechet distance to the teacher's samples and its gap closed (`zray.evaluation.turbo`,
`unjudged_metrics`), the grid has no judge labels.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from zray.config import TURBO_BASELINE, TURBO_VARIANTS, ConfigError, RunConfig, TurboConfig, to_dict, turbo_variant
from zray.data import ensure_world, head_rows, read_table
from zray.data.render import decode_png
from zray.evaluation.turbo import (NO_JUDGE_NOTE, compare_to_references, frechet_intervals, gap_closed_to_teacher,
                                   interval_notes, judge_generator, results_markdown, save_variant_grid,
                                   seed_markdown, seed_summary, unjudged_metrics)
from zray.evaluation.turbo_references import REFERENCES_JSON, load_references, reference_key, save_references
from zray.evaluation.turbo_trajectory import teacher_trajectory, trajectory_errors, trajectory_markdown
from zray.models.generator import encode_prompts, initial_noise, load_zimage, sample_images, to_pil, transformer_fn
from zray.models.turbo import TwoStepStudent, sample_two_step_images
from zray.models.turbo_export import export_two_step_pipeline
from zray.sampling import ModelFn, flow_sigmas
from zray.training.curves import save_curves
from zray.training.runs import seed_run_name, write_text_atomic

NUM_GRID = 8
CURVES = ("loss", "paired_loss", "step1_loss", "adv_loss", "d_loss", "d_real_acc", "d_fake_acc")  # of training.png


def teacher_pipeline_dir(cfg: RunConfig) -> Path:
    """The 8-step teacher: `distill_generator.teacher_dir`, else this run's pretrain-generator pipeline."""
    path = Path(cfg.distill_generator.teacher_dir or Path(cfg.out_dir) / "pretrain_generator" / "pipeline")
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"no ZImagePipeline at {str(path)!r} (distill_generator.teacher_dir): run "
                                "`zray pretrain-generator` first or set distill_generator.teacher_dir")
    from zray.models.generator import check_generator_architecture

    return check_generator_architecture(path, "distill_generator.teacher_dir").resolve()


def check_import_variants(cfg: RunConfig, variants: tuple[str, ...]) -> None:
    """With `data.dir`, every variant's real data must be the teacher's (a prompt list has no renders)."""
    if not cfg.data.dir:
        return
    turbo = cfg.distill_generator.turbo
    if turbo.real_data == "renders":
        raise ConfigError(f"distill_generator.turbo.real_data='renders' is not allowed with data.dir={cfg.data.dir!r}: "
                          "a prompts import has no renders; expected 'teacher'")
    if "renders" in variants:
        raise ConfigError(f"distill_generator.variants={variants!r} is not allowed with data.dir={cfg.data.dir!r}: "
                          "the 'renders' variant trains on the world's renders and a prompts import has none; expected "
                          f"variants among {tuple(v for v in TURBO_VARIANTS if v != 'renders')}")


def generator_rows(cfg: RunConfig, out: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train rows, held-out rows): the world's generator tables, or a prompts import's train / test splits."""
    from zray.data.imported import prompt_rows

    dcfg = cfg.distill_generator
    num_train = 0 if dcfg.teacher_samples == "online" else dcfg.num_teacher_samples  # online: every train prompt
    if cfg.data.dir:
        return (prompt_rows(cfg.data, "train", num_train, "distill_generator.num_teacher_samples"),
                prompt_rows(cfg.data, "test", dcfg.num_eval_prompts, "distill_generator.num_eval_prompts"))
    data_dir = ensure_world(cfg.world, out / "data")
    eval_rows = head_rows(data_dir / "generator_test.parquet", "generator", dcfg.num_eval_prompts,
                          "distill_generator.num_eval_prompts")
    train_path = data_dir / "generator_train.parquet"
    train_rows = read_table(train_path, "generator").to_pylist() if not num_train else head_rows(
        train_path, "generator", num_train, "distill_generator.num_teacher_samples")
    return train_rows, eval_rows


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
    check_import_variants(cfg, variants)
    judged = not cfg.data.dir  # the judge reads Shapes-world prompts only
    out = Path(cfg.out_dir).resolve()
    root = out / "distill_generator"
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    teacher_dir = teacher_pipeline_dir(cfg)
    train_rows, eval_rows = generator_rows(cfg, out)
    print(f"[distill-generator] teacher {teacher_dir}; variants {', '.join(variants)}; {len(eval_rows)} held-out "
          f"prompts{'' if judged else ' of ' + cfg.data.dir}; teacher samples: {dcfg.teacher_samples}")
    if not judged:
        print(f"[distill-generator] note: {NO_JUDGE_NOTE}")

    # 1. The discriminator's real data: precomputed teacher samples (or world rows for online sampling).
    if dcfg.teacher_samples == "online":
        train = ray.data.from_items([{k: r[k] for k in ("image_id", "prompt", "image") if k in r}
                                     for r in train_rows])
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
    renders = [decode_png(r["image"]) for r in eval_rows] if judged else []
    noise_seed = cfg.seed + 1
    noise = initial_noise(pipe, len(eval_rows), noise_seed, height=cfg.world.image_size, width=cfg.world.image_size)
    ref_key = reference_key(teacher_dir, prompts, seed=noise_seed, steps=dcfg.turbo.teacher_steps,
                            shift=dcfg.turbo.teacher_shift, image_size=cfg.world.image_size, judged=judged)
    kept = load_references(root, ref_key, prompts)
    if kept:
        references, images = kept
        print(f"[distill-generator] references kept from {root / REFERENCES_JSON} (same teacher, prompts, noise "
              "and code)")
    else:
        images, references = {}, {}
        for key, steps in (("teacher", dcfg.turbo.teacher_steps), ("two_step", 2)):  # the teacher's first
            images[key] = [im for i in range(0, len(prompts), 50) for im in to_pil(sample_images(
                pipe, prompts[i:i + 50], noise[i:i + 50], steps, dcfg.turbo.teacher_shift))]
            metrics, alignment = judge_generator(images[key], prompts, renders=renders,
                                                 teacher_images=images["teacher"]) \
                if judged else (unjudged_metrics(images[key], images["teacher"]), None)
            references[key] = {"metrics": {**metrics, "steps": steps}, "alignment": alignment}
        save_references(root, ref_key, references, images, prompts)

    # 3. The teacher's trajectory from the same noise, for each two-step sampler's alignment to it (latents).
    alignment_to = teacher_alignment_reference(dcfg.turbo, pipe, prompts, noise)
    trajectory = {"naive 2-step": alignment_to(transformer_fn(pipe.transformer), transformer_fn(pipe.transformer))} \
        if alignment_to else {}

    # 4. Each variant (and seed): train (resumable), then judge from the same noise.
    init_ray(dcfg.learner.num_workers * dcfg.learner.cpus_per_worker + 1)
    rows = {"teacher 8-step": references["teacher"]["metrics"], "naive 2-step": references["two_step"]["metrics"]}
    for k, variant in [(k, v) for k in range(dcfg.seeds) for v in variants]:  # every variant of a seed, then the next
        name, learner = seed_run_name(variant, k), dataclasses.replace(dcfg.learner, seed=dcfg.learner.seed + k)
        task = TurboTask(teacher_dir, turbo_variant(dcfg.turbo, variant), teacher_samples=dcfg.teacher_samples,
                         image_size=cfg.world.image_size, disc_grad_clip=dcfg.disc_grad_clip)
        phase = fit_phase(task, learner, train, root, name, resume, dcfg.time_budget_s, tag="distill-generator")
        save_curves(root / name / "training.png", phase["history"], CURVES,
                    f"Turbo++ {variant}" + (f" (learner seed {learner.seed})" if k else ""))
        student = TwoStepStudent.from_pretrained(phase["final_dir"]).eval()
        export_dir = root / name / "pipeline"
        if not (export_dir / "README.md").is_file():  # written last: kept on --resume, a cut export is redone
            shutil.rmtree(export_dir, ignore_errors=True)
            export_two_step_pipeline(phase["final_dir"], teacher_dir, export_dir, sigma_2=dcfg.turbo.sigma_2,
                                     renoise=dcfg.turbo.renoise)
        images[name] = to_pil(sample_two_step_images(student, pipe, prompts, noise, sigma_2=dcfg.turbo.sigma_2))
        if alignment_to:
            trajectory[name] = alignment_to(student.step_fn(1), student.step_fn(2))
        if not judged:
            metrics = unjudged_metrics(images[name], images["teacher"])
            rows[name] = m = {**metrics, "steps": 2, **gap_closed_to_teacher(metrics, references),
                              "train_steps": phase["steps"], "train_s": phase["train_s"]}
            print(f"[distill-generator] {name}: {phase['steps']} steps ({phase['train_s'] / 60:.1f} min); Frechet "
                  f"to teacher {m['frechet_to_teacher']:.3f}; gap closed {m['gap_closed_frechet_to_teacher']:.0%}")
            continue
        metrics, alignment = judge_generator(images[name], prompts, renders=renders,
                                             teacher_images=images["teacher"])
        rows[name] = {**metrics, "steps": 2, **compare_to_references(metrics, alignment, references),
                      "train_steps": phase["steps"], "train_s": phase["train_s"]}
        m = rows[name]
        print(f"[distill-generator] {name}: {phase['steps']} steps ({phase['train_s'] / 60:.1f} min); main colour "
              f"{m['main_colour']:.1%}, Frechet to renders {m['frechet_to_renders']:.3f}; gap closed "
              f"{m['gap_closed_frechet_to_renders']:.0%} (Frechet) / {m['gap_closed_main_colour']:.0%} (main colour)")

    record = {"teacher_dir": str(teacher_dir), "variants": list(variants), "seeds": dcfg.seeds, "rows": rows,
              "trajectory": trajectory,
              "judged": judged, "data_dir": cfg.data.dir, "total_s": time.perf_counter() - started,
              "config": {"distill_generator": to_dict(dcfg), "world_image_size": cfg.world.image_size}}
    write_results(root, cfg, record, images, prompts, renders, teacher_dir)
    grid = {"teacher 8-step": images["teacher"], "naive 2-step": images["two_step"],
            **{v: images[v] for v in variants}}  # the first seed's runs
    save_variant_grid(root / "samples.png", prompts, grid, NUM_GRID, judged=judged)
    print(f"[distill-generator] done in {record['total_s'] / 60:.1f} min -> {root / 'results.md'}")
    return record


def teacher_alignment_reference(turbo: TurboConfig, pipe: Any, prompts: list[str],
                                noise: Any) -> Callable[[ModelFn, ModelFn], dict[str, float]] | None:
    """A function (step1_fn, step2_fn) -> `trajectory_errors` against the teacher's trajectory from `noise`, or None
    when sigma_2 is not a state of the teacher's schedule (possible with `step1_loss="adversarial"`)."""
    if not turbo.sigma_2_is_teacher_state:
        print(f"[distill-generator] no teacher-alignment table: sigma_2={turbo.sigma_2} is not the teacher's sigma "
              f"after teacher_mid_steps={turbo.teacher_mid_steps} ({turbo.teacher_mid_sigma:.4f})")
        return None
    cond = encode_prompts(pipe.text_encoder, pipe.tokenizer, prompts)
    mid, x0 = teacher_trajectory(transformer_fn(pipe.transformer), noise, cond,
                                 flow_sigmas(turbo.teacher_steps, turbo.teacher_shift), turbo.teacher_mid_steps)
    return lambda step1_fn, step2_fn: trajectory_errors(step1_fn, step2_fn, noise, cond, mid, x0,
                                                        sigma_2=turbo.sigma_2)


def write_results(root: Path, cfg: RunConfig, record: dict[str, Any], images: dict[str, list[Any]],
                  prompts: list[str], renders: list[Any], teacher_dir: Path) -> None:
    """metrics.json (the record, with the Frechet intervals and the seed summary added) and results.md. The
    intervals compare each run with Turbo++'s run of the same seed."""
    dcfg, variants, judged = cfg.distill_generator, record["variants"], record["judged"]
    baseline = TURBO_BASELINE if TURBO_BASELINE in variants else None
    interval_lines: list[str] = []
    if judged and dcfg.bootstrap_samples:
        record["frechet_intervals"] = {}
        for k in range(dcfg.seeds):
            names = [seed_run_name(v, k) for v in variants]
            base_k = seed_run_name(baseline, k) if baseline else None
            found = frechet_intervals({n: images[n] for n in ("teacher", "two_step", *names)}, renders,
                                      baseline=base_k, num_samples=dcfg.bootstrap_samples, seed=cfg.seed)
            record["frechet_intervals"].update(found)
            interval_lines += interval_notes(found, baseline=base_k, num_prompts=len(prompts),
                                             num_samples=dcfg.bootstrap_samples)
    seed_lines: list[str] = []
    if dcfg.seeds > 1 and judged:
        with_trajectory = {n: {**r, **record["trajectory"].get(n, {})} for n, r in record["rows"].items()}
        record["seed_summary"] = seed_summary(with_trajectory, variants, dcfg.seeds)
        seed_lines = seed_markdown(record["seed_summary"])
    write_text_atomic(root / "metrics.json", json.dumps(record, indent=2))
    notes = [f"Prompts: data.dir `{cfg.data.dir}` (its train split trains, its test split is held out)."] * (not judged)
    notes += [f"Teacher: `{teacher_dir}`; teacher samples: {dcfg.teacher_samples}"
              + ("" if dcfg.teacher_samples == "online" else f" ({dcfg.num_teacher_samples} precomputed)")
              + f"; learner: {dcfg.learner.max_steps} steps max, micro batch {dcfg.learner.micro_batch_size}, "
              f"lr {dcfg.learner.lr}, budget {dcfg.time_budget_s:.0f} s per variant.",
              "Variants: " + "; ".join(f"{v} = {_diff(dcfg.turbo, v) or 'the recipe as configured'}" for v in variants)]
    if dcfg.seeds > 1:
        notes.append(f"Seeds: each variant trained {dcfg.seeds} times, learner seeds {dcfg.learner.seed} to "
                     f"{dcfg.learner.seed + dcfg.seeds - 1}; `<variant>_seed<k>` is the k-th"
                     + ("." if judged else "; no summary over seeds without the judge."))
    notes += interval_lines
    table = results_markdown(record["rows"], num_prompts=len(prompts), notes=notes, judged=judged)
    traj_lines = trajectory_markdown(record["trajectory"], sigma_2=dcfg.turbo.sigma_2,
                                     mid_steps=dcfg.turbo.teacher_mid_steps,
                                     teacher_steps=dcfg.turbo.teacher_steps) if record["trajectory"] else []
    write_text_atomic(root / "results.md", table + "".join(line + "\n" for line in seed_lines + traj_lines))


def _diff(turbo: Any, variant: str) -> str:
    """The TurboConfig fields a variant changes, as `name=value` pairs."""
    changed = turbo_variant(turbo, variant)
    return ", ".join(f"{f.name}={getattr(changed, f.name)!r}" for f in dataclasses.fields(turbo)
                     if getattr(changed, f.name) != getattr(turbo, f.name))

