"""`zray pretrain-vlm`: pre-train the tiny teacher and/or student VLM: vision warm-up, captioning, instruction phase.

    zray pretrain-vlm --recipe dev --model teacher            # the calibrated 20-minute run
    zray pretrain-vlm --recipe dev --model teacher --resume   # continue it from its latest checkpoint

`--resume` continues each role from its latest checkpoint (a role without one starts fresh) within what is
left of `time_budget_s`: the budget is for the whole run, so a run whose budget is spent is only evaluated.

Steps: resolve the world (build `<out_dir>/data` if missing, refuse one built from another WorldConfig),
build each tiny model from its VLMConfig (or start from `VLMConfig.checkpoint`), read captions_train with
Ray Data, train with the generic learner (`actors.learner.fit`: Ray Train + DeepSpeed, checkpoints in HF
format, TensorBoard events), then evaluate on `num_eval_images` held-out caption images. With
`pretrain_vlm.instruct` (the roles of `instruct_roles`), an instruction phase follows (`zray.tasks.instruct`: the
scoring conversation from ground-truth rationales, never the score token), evaluated for format failures and
rationale accuracy; its model (`<role>_instruct/final`) is the base of train-teacher and train-student.

Outputs under `<out_dir>/pretrain_vlm/<role>/` (next to Ray Train's checkpoints and `tensorboard/`):
`final/` (the trained model, Hugging Face format: loads in transformers and vLLM), `metrics.json`,
`summary.md`, `descriptions.png` (held-out images, generated description, truth), `learning_curve.png`
(training loss and answer-token accuracy vs step; held-out accuracy of the evaluated checkpoints).
`<out_dir>/pretrain_vlm/summary.md` and `metrics.json` gather the roles.

`eval_every > 0` also evaluates every kept checkpoint whose step is a multiple of it, after training (so
the evaluations do not eat the time budget; keep `learner.keep_checkpoints` large enough).

Calibration of the dev recipe, every trial and its figures: docs/experiments.md (pretrain-vlm).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from zray.config import RunConfig, VLMConfig, to_dict
from zray.data import ensure_world, read_ray_dataset, read_table
from zray.data.render import decode_png
from zray.data.scene import Defects, Scene
from zray.evaluation.captions import ATTRIBUTES, caption_metrics, caption_slices, describe_images, score_caption
from zray.models.tiny import build_once, build_tiny_vlm, count_parameters
from zray.models.vlm import load_vlm
from zray.rubric import DIMENSIONS
from zray.tasks.caption import CaptionTask
from zray.training.runs import (checkpoints, elapsed_by_step, export_final, latest_checkpoint, read_learner_state,
                                remaining_budget, trained_seconds, write_text_atomic)

ROLES = ("teacher", "student")
NUM_GRID_IMAGES = 12
MAX_GRID_LINES = 8  # of a generated description in the grid (an untrained model rambles)


def run_pretrain_vlm(cfg: RunConfig, model: str = "both", resume: bool = False) -> dict[str, Any]:
    """Train and evaluate the chosen role(s) (`teacher`, `student` or `both`); returns {role: metrics}."""
    from actors.learner import LearnerResult, fit, init_ray

    roles = ROLES if model == "both" else (model,)
    if any(r not in ROLES for r in roles):
        raise ValueError(f"model={model!r} is not allowed: expected 'teacher', 'student' or 'both'")
    pcfg = cfg.pretrain_vlm
    out = Path(cfg.out_dir).resolve()
    root = out / "pretrain_vlm"
    data_dir = ensure_world(cfg.world, out / "data")
    eval_rows = read_table(data_dir / "captions_test.parquet", "captions").to_pylist()
    if pcfg.num_eval_images > len(eval_rows):
        raise ValueError(f"pretrain_vlm.num_eval_images={pcfg.num_eval_images} is not allowed: captions_test has "
                         f"{len(eval_rows)} images (world.num_caption_test_images)")
    eval_rows = eval_rows[:pcfg.num_eval_images]
    truth = ([Scene.from_json(r["scene_json"]) for r in eval_rows],  # parsed once: every evaluation scores on it
             [Defects.from_json(r["defects_json"]) for r in eval_rows])
    init_ray(pcfg.learner.num_workers * pcfg.learner.cpus_per_worker + 2)
    columns = ["image", "description"] + (["scene_json"] if pcfg.vision_aux_weight else [])
    train = read_ray_dataset(data_dir / "captions_train.parquet", "captions").select_columns(columns)

    results: dict[str, Any] = {}
    for role in roles:
        vlm_cfg: VLMConfig = getattr(cfg, role)
        init_dir = init_model(vlm_cfg, root / "init" / role, cfg.world.image_size)
        vision_s = 0.0
        if pcfg.vision_warmup:
            init_dir, vision_s = warm_up_vision(init_dir, pcfg, data_dir, root, role, resume)
        task = CaptionTask(model_dir=str(init_dir), name=f"caption_{role}", style=pcfg.caption_style,
                           vision_aux_weight=pcfg.vision_aux_weight, map_weight=pcfg.map_weight,
                           cover_weight=pcfg.cover_weight, position_weight=pcfg.position_weight)
        learner = pcfg.learner
        if role == "student" and pcfg.student_max_steps:
            learner = dataclasses.replace(learner, max_steps=pcfg.student_max_steps)
        latest = latest_checkpoint(root / role) if resume else None  # --resume: only roles that have started
        budget = remaining_budget(max(pcfg.time_budget_s - vision_s, 1.0) if pcfg.time_budget_s else 0.0, latest)
        print(f"[pretrain-vlm] {role}: {count_parameters(init_dir):,} parameters, {pcfg.caption_style} captions, "
              f"budget {f'{budget:.0f} s' if pcfg.time_budget_s else 'none'}, max {learner.max_steps} steps"
              + (f", resuming {latest.name}" if latest else ""))
        if latest is not None and pcfg.time_budget_s > 0 and budget <= 0:
            state = read_learner_state(latest)  # the time budget is spent: evaluate the latest checkpoint again
            fitted = LearnerResult(history=state["history"], hf_dir=latest / "hf", final_checkpoint=latest,
                                   checkpoints=checkpoints(root / role), run_dir=root / role, wall_s=0.0,
                                   final_step=int(state["step"]))
        else:
            fitted = fit(task, learner, datasets={"train": train}, storage_path=root, name=role,
                         resume=latest is not None, time_budget_s=budget)
        run_dir = fitted.run_dir
        final_dir = export_final(fitted.hf_dir, run_dir)

        train_s = elapsed_by_step(fitted.history)
        curve = []
        for ckpt in fitted.checkpoints:
            step = int(read_learner_state(ckpt)["step"])
            if ckpt != fitted.final_checkpoint and pcfg.eval_every and step % pcfg.eval_every == 0:
                metrics, _ = evaluate(ckpt / "hf", eval_rows, truth, pcfg.max_new_tokens)
                curve.append({"step": step, "train_s": train_s.get(step), **metrics})
        clock = time.perf_counter()
        metrics, predictions = evaluate(final_dir, eval_rows, truth, pcfg.max_new_tokens)
        eval_s = time.perf_counter() - clock
        slices = caption_slices(predictions, *truth)
        curve.append({"step": fitted.final_step, "train_s": train_s.get(fitted.final_step), **metrics})

        record = {"role": role, "model_dir": str(final_dir), "num_params": count_parameters(final_dir),
                  "vision_warmup_s": vision_s,
                  "steps": fitted.final_step, "train_s": train_s.get(fitted.final_step), "fit_wall_s": fitted.wall_s,
                  "steps_per_s": fitted.final_step / max(train_s.get(fitted.final_step) or 1e-9, 1e-9),
                  "eval_s": eval_s, "caption_style": pcfg.caption_style, "final": metrics, "slices": slices,
                  "curve": curve,
                  "last_loss": fitted.history[-1]["loss"] if fitted.history else None,
                  "samples": [{"image_id": r["image_id"], "prediction": p, "truth": _styled(r, pcfg.caption_style)}
                              for r, p in zip(eval_rows[:NUM_GRID_IMAGES], predictions, strict=False)],
                  "config": to_dict(cfg.pretrain_vlm), "vlm": dataclasses.asdict(vlm_cfg)}
        write_text_atomic(run_dir / "metrics.json", json.dumps(record, indent=2))
        save_description_grid(run_dir / "descriptions.png", eval_rows[:NUM_GRID_IMAGES], predictions,
                              pcfg.caption_style, title=f"{role}: held-out images after {fitted.final_step} steps")
        save_learning_curve(run_dir / "learning_curve.png", fitted.history, curve, title=f"{role} captioning")
        print(f"[pretrain-vlm] {role}: " + ", ".join(f"{k} {metrics[k]:.1%}" for k in (*ATTRIBUTES, "exact"))
              + f" on {len(eval_rows)} held-out images after {fitted.final_step} steps -> {run_dir}")
        if pcfg.instruct and role in pcfg.instruct_roles:
            record["instruct"] = instruct_phase(final_dir, cfg, root, role, resume)
            write_text_atomic(run_dir / "metrics.json", json.dumps(record, indent=2))
        write_text_atomic(run_dir / "summary.md", summary_markdown({role: record}))
        results[role] = record

    everything = json.loads((root / "metrics.json").read_text()) if (root / "metrics.json").exists() else {}
    everything.update(results)
    write_text_atomic(root / "metrics.json", json.dumps(everything, indent=2))
    write_text_atomic(root / "summary.md", summary_markdown(everything))
    return results


# ------------------------------------------------------------------------------------------ setup


def init_model(vlm_cfg: VLMConfig, path: Path, image_size: int) -> Path:
    """The initial weights: `vlm_cfg.checkpoint` if set, else a tiny model built (once) under `path`."""
    return Path(build_once(vlm_cfg, path, build_tiny_vlm, image_size)["path"])


def warm_up_vision(init_dir: Path, pcfg: Any, data_dir: Path, root: Path, role: str,
                   resume: bool) -> tuple[Path, float]:
    """Phase 1: `VisionWarmupTask` on the captions' images and scenes; returns (warmed HF dir, training seconds).

    A finished warm-up (its `final/` dir) is reused on `--resume`; a cut one continues from its checkpoint."""
    from actors.learner import fit
    from zray.tasks.vision_warmup import VisionWarmupTask

    run_dir = root / f"{role}_vision"
    final_dir = run_dir / "final"
    if resume and (final_dir / "config.json").is_file():
        return final_dir, trained_seconds(read_learner_state(latest_checkpoint(run_dir))["history"])
    train = read_ray_dataset(data_dir / "captions_train.parquet", "captions").select_columns(["image", "scene_json"])
    latest = latest_checkpoint(run_dir) if resume else None
    budget = remaining_budget(pcfg.vision_time_budget_s, latest)
    budget = max(budget, 1.0) if pcfg.vision_time_budget_s else 0.0  # a spent budget still saves a final model
    task = VisionWarmupTask(model_dir=str(init_dir), name=f"vision_{role}", map_weight=pcfg.map_weight,
                            cover_weight=pcfg.cover_weight)
    fitted = fit(task, pcfg.vision, datasets={"train": train}, storage_path=root, name=f"{role}_vision",
                 resume=latest is not None, time_budget_s=budget)
    export_final(fitted.hf_dir, run_dir)
    seconds = trained_seconds(fitted.history)
    last = fitted.history[-1] if fitted.history else {}
    print(f"[pretrain-vlm] {role}: vision warm-up {fitted.final_step} steps in {seconds:.0f} s, loss "
          f"{last.get('loss', float('nan')):.3f}; all scene attributes right on {last.get('attribute_exact', 0.0):.0%}"
          f", whole object map right on {last.get('object_map_exact', 0.0):.0%} of the last training images")
    return final_dir, seconds


def instruct_phase(caption_dir: Path, cfg: RunConfig, root: Path, role: str, resume: bool) -> dict[str, Any]:
    """The instruction phase: `InstructTask` from the captioning model on fresh instruction examples, then the
    scoring conversation evaluated on other fresh examples; the model goes to `<root>/<role>_instruct/final`.
    A finished phase is reused on `--resume`; a cut one continues from its checkpoint. Returns its record."""
    import ray

    from actors.learner import fit
    from zray.data.rationales import INSTRUCT_STREAM, instruct_corpus
    from zray.evaluation.instruct import evaluate_instruct
    from zray.tasks.instruct import InstructTask

    pcfg = cfg.pretrain_vlm
    run_dir = root / f"{role}_instruct"
    final_dir = run_dir / "final"
    if not (resume and (final_dir / "config.json").is_file()):
        corpus = instruct_corpus(cfg.world, pcfg.num_instruct_prompts)
        latest = latest_checkpoint(run_dir) if resume else None
        budget = remaining_budget(pcfg.instruct_time_budget_s, latest)
        budget = max(budget, 1.0) if pcfg.instruct_time_budget_s else 0.0
        fitted = fit(InstructTask(model_dir=str(caption_dir), name=f"instruct_{role}"), pcfg.instruct_learner,
                     datasets={"train": ray.data.from_arrow(corpus)}, storage_path=root, name=f"{role}_instruct",
                     resume=latest is not None, time_budget_s=budget)
        export_final(fitted.hf_dir, run_dir)
    state = read_learner_state(latest_checkpoint(run_dir))
    rows = instruct_corpus(cfg.world, pcfg.num_instruct_eval_prompts, stream=INSTRUCT_STREAM + 2,
                           progress=False).to_pylist()
    model, processor = load_vlm(final_dir)
    clock = time.perf_counter()
    metrics, answers = evaluate_instruct(model, processor, rows, max_new_tokens=pcfg.instruct_max_new_tokens,
                                         seed=cfg.seed)
    record = {"model_dir": str(final_dir), "steps": int(state["step"]), "train_s": trained_seconds(state["history"]),
              "num_train_examples": pcfg.num_instruct_prompts * cfg.world.candidates_per_prompt * len(DIMENSIONS),
              "eval": metrics, "eval_s": time.perf_counter() - clock, "samples": answers[:8]}
    write_text_atomic(run_dir / "metrics.json", json.dumps(record, indent=2))
    dims = metrics["dimensions"]
    print(f"[pretrain-vlm] {role}: instruction phase {record['steps']} steps; zero-shot sampling format failures "
          f"{metrics['format_fail_sampled']:.1%}, greedy rationales exact {metrics['exact']:.1%}, alignment drawn "
          f"{dims.get('alignment', {}).get('drawn', float('nan')):.1%} on {metrics['num_examples']} held-out "
          f"examples -> {run_dir}")
    return record


# ------------------------------------------------------------------------------------------ evaluation


def _styled(row: dict[str, Any], style: str) -> str:
    from zray.data.captions import restyle

    return restyle(row["description"], style)


def evaluate(model_dir: Path, rows: list[dict[str, Any]], truth: tuple[list[Scene], list[Defects]],
             max_new_tokens: int) -> tuple[dict[str, float], list[str]]:
    """Greedy descriptions of the rows' images by the model in `model_dir`, and their `caption_metrics` against
    `truth` (the rows' scenes and defects, parsed once per run).

    One intra-op thread: a tiny model's decoding gains nothing from more, and on a shared CPU spinning OpenMP
    threads made it several times slower (200 images: 9 s with one thread, over 40 s with two)."""
    import torch

    model, processor = load_vlm(model_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        predictions = describe_images(model, processor, [decode_png(r["image"]) for r in rows], max_new_tokens)
    finally:
        torch.set_num_threads(threads)
    metrics = caption_metrics(predictions, *truth)
    return metrics, predictions


# ------------------------------------------------------------------------------------------ reports


def summary_markdown(records: dict[str, dict[str, Any]]) -> str:
    keys = (*ATTRIBUTES, "exact", "defects")
    lines = ["# Base VLM pre-training (captioning)", "",
             "| model | params | steps | train min | steps/s | " + " | ".join(keys) + " |",
             "|---|---|---|---|---|" + "---|" * len(keys)]
    for role, r in records.items():
        train_min = (r["train_s"] or 0.0) / 60
        lines.append(f"| {role} | {r['num_params']:,} | {r['steps']} | {train_min:.1f} | {r['steps_per_s']:.2f} | "
                     + " | ".join(f"{r['final'].get(k, float('nan')):.1%}" for k in keys) + " |")
    for role, r in records.items():
        n, nrel = int(r["final"]["num_images"]), int(r["final"]["num_relation_images"])
        lines += ["", f"## {role}", "", f"Held-out images: {n} ({nrel} with a relation); caption style "
                  f"`{r['caption_style']}`; model `{r['model_dir']}`.", "",
                  "| step | train min | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
        for point in r["curve"]:
            lines.append(f"| {point['step']} | {(point['train_s'] or 0.0) / 60:.1f} | "
                         + " | ".join(f"{point.get(k, float('nan')):.1%}" for k in keys) + " |")
        if r.get("slices"):
            lines += ["", "Final accuracy by slice of the held-out images:", "",
                      "| slice | images | shape | count | exact |", "|---|---|---|---|---|"]
            lines += [f"| {row['slice']} | {int(row['images'])} | {row['shape']:.1%} | {row['count']:.1%} | "
                      f"{row['exact']:.1%} |" for row in r["slices"]]
        if r.get("instruct"):
            ins = r["instruct"]
            m = ins["eval"]
            lines += ["", f"Instruction phase: {ins['steps']} steps on {ins['num_train_examples']} examples, model "
                      f"`{ins['model_dir']}`; on {m['num_examples']} held-out examples, format failures "
                      f"{m['format_fail_sampled']:.1%} sampled at temperature 1 ({m['format_fail_greedy']:.1%} "
                      f"greedy), greedy rationales exact {m['exact']:.1%}.", "",
                      "| dimension | " + " | ".join(("exact", "drawn", "verdict", "defects")) + " |", "|---|---|---|---|---|"]
            for dim, d in m["dimensions"].items():
                lines.append(f"| {dim} | " + " | ".join(f"{d[k]:.1%}" if k in d else "-"
                                                       for k in ("exact", "drawn", "verdict", "defects")) + " |")
    return "\n".join(lines) + "\n"


def save_description_grid(path: Path, rows: list[dict[str, Any]], predictions: list[str], style: str,
                          title: str) -> None:
    """Held-out images, each with its generated description and the truth; wrong attributes named."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 3
    n = min(len(rows), len(predictions))
    grid_rows = max(1, -(-n // cols))
    fig, axes = plt.subplots(grid_rows, 2 * cols, figsize=(4.6 * cols, 2.5 * grid_rows), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 2.6] * cols})
    for ax in axes.flat:
        ax.set_axis_off()
    for k in range(n):
        row, pred = rows[k], predictions[k]
        image_ax, text_ax = axes[k // cols, 2 * (k % cols)], axes[k // cols, 2 * (k % cols) + 1]
        image_ax.imshow(decode_png(row["image"]))
        scored = score_caption(pred, Scene.from_json(row["scene_json"]), Defects.from_json(row["defects_json"]))
        wrong = [a for a in ATTRIBUTES if scored[a] is False]
        verdict = "exact" if scored["exact"] else "wrong: " + (", ".join(wrong) or "colour-shape pairing")
        text_ax.text(0, 1.02, verdict, va="bottom", ha="left", fontsize=6.5, transform=text_ax.transAxes,
                     color="green" if scored["exact"] else "red")
        shown = "\n".join(pred.split("\n")[:MAX_GRID_LINES])
        text_ax.text(0, 1, f"generated:\n{shown}\n\ntruth:\n{_styled(row, style)}", va="top", ha="left",
                     fontsize=5.2, family="monospace", transform=text_ax.transAxes)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=140)
    plt.close(fig)


def save_learning_curve(path: Path, history: list[dict[str, float]], curve: list[dict[str, Any]], title: str) -> None:
    """Left: training loss (and answer-token accuracy) vs step. Right: held-out accuracy vs step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = [h["step"] for h in history]
    key = "caption_loss" if history and "caption_loss" in history[0] else "loss"  # without the vision loss
    left.plot(steps, [h[key] for h in history], color="C0", label="caption loss")
    if history and "vision_loss" in history[0]:
        left.plot(steps, [h["vision_loss"] for h in history], color="C2", alpha=0.7, label="vision loss")
        left.legend(loc="upper center", fontsize=8)
    left.set_yscale("log")
    left.set_xlabel("step")
    left.set_ylabel("answer-token cross-entropy")
    if history and "token_acc" in history[0]:
        twin = left.twinx()
        twin.plot(steps, [h["token_acc"] for h in history], color="C1", alpha=0.6, label="token accuracy")
        twin.set_ylim(0, 1)
        twin.set_ylabel("answer-token accuracy")
    left.set_title(f"{title}: training")
    for k, key in enumerate((*ATTRIBUTES, "exact")):
        points = [(p["step"], p[key]) for p in curve if p.get(key) == p.get(key)]  # drop NaN
        if points:
            right.plot(*zip(*points), marker="o", color=f"C{k}", label=key)
    right.set_ylim(0, 1.02)
    right.axhline(0.9, color="gray", lw=0.6, ls="--")
    right.axhline(0.7, color="gray", lw=0.6, ls=":")
    right.set_xlabel("step")
    right.set_ylabel("held-out accuracy")
    right.set_title(f"{title}: held-out images")
    right.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
