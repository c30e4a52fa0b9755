"""`zray evaluate`: HPA, Margin HPA, PLCC and SRCC of a reward model on the Shapes test pairs (methods.md §4).

    zray evaluate --recipe dev --model runs/dev/train_teacher/gdso/final            # form from zray_scoring.json
    zray evaluate --recipe tiny_cpu --model DIR --form direct --name student-init   # student form
    zray evaluate --recipe dev --curve runs/dev/train_teacher/gdso runs/dev/train_teacher/sft \
        --model runs/dev/pretrain_vlm/teacher/final --set evaluate.split=heldout       # HPA against pairs seen

`--model` is any Hugging Face format Qwen-VL dir. This job starts one vLLM engine actor on it and hands it to
`zray.evaluation.rewards.evaluate_reward_model` (forms, metrics and outputs are described there); the training
jobs call that function with their own engines. `--curve` starts the one engine on the first point and loads each
checkpoint's weights into it in turn (`zray.evaluation.hpa_curves`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from zray.config import RunConfig
from zray.evaluation.rewards import check_model_dir, evaluate_reward_model, evaluation_rows, resolve_form


def run_evaluate(cfg: RunConfig, model_dir: str | Path, *, form: str = "auto", name: str | None = None) -> dict[str, Any]:
    """Start one engine actor on `model_dir`, evaluate it, stop it; returns the metrics record.

    The engine is a Ray actor, as in every job: an in-process vLLM engine would share (and on shutdown tear down)
    vLLM's process-global state with any other engine of the calling process."""
    import time

    from actors.engine_pool import EnginePool, start_engines
    from actors.learner import init_ray

    check_model_dir(model_dir)
    resolve_form(model_dir, form)  # bad input fails before the engine's start-up
    rows = evaluation_rows(cfg)
    init_ray(cfg.vllm.cpus_per_engine + 1)
    clock = time.perf_counter()
    pool = EnginePool(start_engines(model_dir, cfg.vllm, seed=cfg.seed, num_engines=1))
    try:
        return evaluate_reward_model(cfg, model_dir, pool, form=form, name=name,
                                     engine_start_s=time.perf_counter() - clock, rows=rows)
    finally:
        pool.shutdown()


def run_curve(cfg: RunConfig, runs: list[str], *, base: str | None = None, name: str = "curve") -> dict[str, Any]:
    """HPA against training pairs seen for each training run folder in `runs` (every checkpoint; `base`, if given,
    at 0 pairs of each), on one engine actor; returns the curve record (`zray.evaluation.hpa_curves`)."""
    from actors.engine_pool import EnginePool, start_engines
    from actors.learner import init_ray
    from zray.evaluation.hpa_curves import curve_points, evaluate_curve

    labels = _run_labels(runs)
    points = [curve_points(run, label=label, base_dir=base) for run, label in zip(runs, labels)]
    for run_points in points:  # the base (first of every run) and every checkpoint's export
        for p in run_points:
            check_model_dir(p.model_dir)
    rows = evaluation_rows(cfg)
    init_ray(cfg.vllm.cpus_per_engine + 1)
    pool = EnginePool(start_engines(points[0][0].model_dir, cfg.vllm, seed=cfg.seed, num_engines=1))
    try:
        return evaluate_curve(cfg, points, pool, name=name, rows=rows)
    finally:
        pool.shutdown()


def _run_labels(runs: list[str]) -> list[str]:
    """A label per run folder: its name (gdso, sft, ...), prefixed by the run's out_dir where names repeat."""
    paths = [Path(r).resolve() for r in runs]
    names = [p.name for p in paths]
    if len(set(names)) == len(names):
        return names
    return [f"{p.parent.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]
