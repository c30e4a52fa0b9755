"""`zray demo`: the foundation end to end on one machine.

Build the Shapes world, build the tiny model zoo, load each model through its real stack (transformers for
the teacher and student VLMs, vLLM for the teacher, diffusers for the generator), check that vLLM and
transformers decode the same score distribution, sample images, judge them, print a summary and write a
PNG grid of test candidates with their true scores (and the untrained models' expected scores).

The models are freshly initialised: the scores they give are noise until the training jobs run. The demo
proves the plumbing, not the quality.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from zray.config import RunConfig, to_dict
from zray.data import build_world, read_table
from zray.data.judge import judge_image, judge_scores
from zray.data.judge_eval import compare, judge_agreement
from zray.data.render import decode_png
from zray.data.scene import Scene
from zray.models.generator import generate, load_zimage
from zray.models.tiny import build_zoo
from zray.models.vlm import load_vlm, score_distributions_hf
from zray.rubric import DIMENSIONS, ScoreRequest
from zray.scores import expected_score
from zray.training.runs import write_text_atomic

NUM_SAMPLES = 8
DEMO_REASONING = "I see the objects and the background; I compare them with the prompt."


def run_demo(cfg: RunConfig, use_vllm: bool = True) -> dict:
    out = Path(cfg.out_dir)
    demo_dir = out / "demo"
    demo_dir.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    clock = time.perf_counter()

    print(f"[1/6] Shapes world -> {out / 'data'}")
    manifest = build_world(cfg.world, out / "data", progress=True)
    times["data_s"] = time.perf_counter() - clock

    print(f"[2/6] tiny model zoo -> {out / 'models'}")
    clock = time.perf_counter()
    zoo = build_zoo(cfg, out / "models")
    times["zoo_s"] = time.perf_counter() - clock

    table = read_table(out / "data" / "candidates_test.parquet", "candidates").slice(0, NUM_SAMPLES).to_pylist()
    images = [decode_png(row["image"]) for row in table]
    requests = [ScoreRequest(prompt=row["prompt"], image=img, dimension="alignment")
                for row, img in zip(table, images, strict=True)]
    teacher_requests = [ScoreRequest(r.prompt, r.image, r.dimension, DEMO_REASONING) for r in requests]

    print("[3/6] transformers: teacher and student VLMs")
    clock = time.perf_counter()
    teacher, teacher_proc = load_vlm(zoo["teacher"]["path"])
    student, student_proc = load_vlm(zoo["student"]["path"])
    with torch.no_grad():
        q_teacher_hf = score_distributions_hf(teacher, teacher_proc, teacher_requests)
        q_student_hf = score_distributions_hf(student, student_proc, requests)
    times["transformers_s"] = time.perf_counter() - clock
    del teacher, student

    vllm_diff = None
    if use_vllm:
        print("[4/6] vLLM: teacher engine")
        from actors.teacher_engine import TeacherEngine

        clock = time.perf_counter()
        engine = TeacherEngine(zoo["teacher"]["path"], cfg.vllm, seed=cfg.seed)
        q_teacher_vllm = torch.stack(engine.score_distributions(teacher_requests)).float()
        engine.shutdown()
        times["vllm_s"] = time.perf_counter() - clock
        vllm_diff = float((q_teacher_vllm - q_teacher_hf.float()).abs().max())
    else:
        print("[4/6] vLLM: skipped (--skip-vllm)")

    print("[5/6] diffusers: Z-Image pipeline, 8-step and 2-step samples")
    clock = time.perf_counter()
    pipe = load_zimage(zoo["generator"]["path"])
    gen_table = read_table(out / "data" / "generator_test.parquet", "generator")
    gen_prompts = gen_table.column("prompt").to_pylist()[:NUM_SAMPLES // 2]
    size = cfg.world.image_size
    samples = {steps: generate(pipe, gen_prompts, steps=steps, seed=cfg.seed, height=size, width=size)
               for steps in (8, 2)}
    gen_alignment = {steps: [judge_scores(img, p)["alignment"] for img, p in zip(imgs, gen_prompts, strict=True)]
                     for steps, imgs in samples.items()}
    times["diffusers_s"] = time.perf_counter() - clock

    print("[6/6] judge agreement on rendered images")
    clock = time.perf_counter()
    judged_exact = [compare(Scene.from_json(row["scene_json"]), judge_image(img))["exact"]
                    for img, row in zip(images, table, strict=True)]
    agreement = {"clean": judge_agreement(100, size, cfg.seed, degraded=False),
                 "degraded": judge_agreement(100, size, cfg.seed, degraded=True)}
    times["judge_s"] = time.perf_counter() - clock

    grid_path = demo_dir / "samples.png"
    save_grid(grid_path, table, images, expected_score(q_student_hf).tolist(), expected_score(q_teacher_hf).tolist(),
              samples, gen_prompts, gen_alignment)
    summary = {
        "recipe": cfg.name,
        "data": {name: entry["rows"] for name, entry in manifest["files"].items()},
        "models": {role: {"path": info["path"], "num_params": info["num_params"]} for role, info in zoo.items()},
        "vllm_vs_transformers_max_abs_diff": vllm_diff,
        "judge_agreement": {k: {m: v[m] for m in ("exact", "background", "colour", "shape", "count")}
                            for k, v in agreement.items()},
        "judge_exact_on_demo_candidates": sum(judged_exact) / len(judged_exact),
        "generated_mean_true_alignment": {f"{k}_steps": sum(v) / len(v) for k, v in gen_alignment.items()},
        "times_s": {k: round(v, 2) for k, v in times.items()},
        "grid": str(grid_path),
        "config": to_dict(cfg),
    }
    write_text_atomic(demo_dir / "summary.json", json.dumps(summary, indent=2))
    print_summary(summary)
    return summary


def print_summary(summary: dict) -> None:
    print("\n== zray demo summary ==")
    print(f"{'model':10s} {'parameters':>12s}  path")
    for role, info in summary["models"].items():
        params = f"{info['num_params']:,}" if info["num_params"] else "checkpoint"
        print(f"{role:10s} {params:>12s}  {info['path']}")
    print(f"data rows: {sum(summary['data'].values())} in {len(summary['data'])} Parquet files")
    diff = summary["vllm_vs_transformers_max_abs_diff"]
    print("vLLM vs transformers 9-bin distribution, max abs diff: " + ("skipped" if diff is None else f"{diff:.2e}"))
    for kind, figures in summary["judge_agreement"].items():
        print(f"judge on {kind} renders: " + ", ".join(f"{k} {v:.1%}" for k, v in figures.items()))
    print("generated images, mean true alignment (untrained generator): "
          + ", ".join(f"{k} {v:.2f}" for k, v in summary["generated_mean_true_alignment"].items()))
    print("times: " + ", ".join(f"{k} {v}" for k, v in summary["times_s"].items()))
    print(f"grid: {summary['grid']}")


def save_grid(path: Path, rows, images, mu_student, mu_teacher, samples, gen_prompts, gen_alignment) -> None:
    """Test candidates with their true scores and the untrained models' expected alignment; generated samples."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = len(images)
    fig, axes = plt.subplots(2, cols, figsize=(2.3 * cols, 6.4), squeeze=False)
    for ax, row, img, mu_s, mu_t in zip(axes[0], rows, images, mu_student, mu_teacher, strict=True):
        ax.imshow(img)
        ax.set_axis_off()
        truth = " ".join(f"{d[:2]}{row[f'true_{d}']:.1f}" for d in DIMENSIONS)
        ax.set_title("\n".join(textwrap.wrap(row["prompt"], 26)) + f"\ntrue {truth}\nmu S {mu_s:.2f} T {mu_t:.2f}",
                     fontsize=6.5)
    gen_cells = [(steps, i) for steps in sorted(samples, reverse=True) for i in range(len(gen_prompts))]
    for ax in axes[1]:
        ax.set_axis_off()
    for ax, (steps, i) in zip(axes[1], gen_cells, strict=False):
        ax.imshow(samples[steps][i])
        ax.set_title("\n".join(textwrap.wrap(gen_prompts[i], 26))
                     + f"\n{steps}-step, judged alignment {gen_alignment[steps][i]:.1f}", fontsize=6.5)
    fig.suptitle("Shapes test candidates (true scores; mu = untrained student S / teacher T, alignment) "
                 "and untrained Z-Image samples", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
