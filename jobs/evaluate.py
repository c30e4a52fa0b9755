"""`zray evaluate`: HPA, Margin HPA, PLCC and SRCC of a reward model on the Shapes test pairs (methods.md §4).

    zray evaluate --recipe dev --model runs/dev/train_teacher/gdso/final            # form from zray_scoring.json
    zray evaluate --recipe tiny_cpu --model DIR --form direct --name student-init   # student form

`--model` is any Hugging Face format Qwen-VL dir. This job starts one vLLM engine actor on it and hands it to
`zray.evaluation.rewards.evaluate_reward_model` (forms, metrics and outputs are described there); the training
jobs call that function with their own engines.
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
