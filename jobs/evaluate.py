"""`zray evaluate`: HPA, Margin HPA, PLCC and SRCC of a reward model on the Shapes test pairs (methods.md §4).

    zray evaluate --recipe dev --model runs/dev/train_teacher/gdso/final            # form from zray_scoring.json
    zray evaluate --recipe tiny_cpu --model DIR --form direct --name student-init   # student form

`--model` is any Hugging Face format Qwen-VL dir. This job starts one vLLM engine on it and hands it to
`zray.evaluation.rewards.evaluate_reward_model` (forms, metrics and outputs are described there); the training
jobs call that function with their own engines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from zray.config import RunConfig
from zray.evaluation.rewards import check_model_dir, evaluate_reward_model, evaluation_rows, resolve_form


def run_evaluate(cfg: RunConfig, model_dir: str | Path, *, form: str = "auto", name: str | None = None) -> dict[str, Any]:
    """Start a `TeacherEngine` on `model_dir`, evaluate it, stop it; returns the metrics record."""
    from actors.teacher_engine import TeacherEngine

    check_model_dir(model_dir)
    resolve_form(model_dir, form)  # bad input fails before the engine's start-up
    rows = evaluation_rows(cfg)
    engine = TeacherEngine(model_dir, cfg.vllm, seed=cfg.seed)
    try:
        return evaluate_reward_model(cfg, model_dir, engine, form=form, name=name, engine_start_s=engine.start_s,
                                     rows=rows)
    finally:
        engine.shutdown()
