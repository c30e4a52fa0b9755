"""HPA against training pairs seen: every saved checkpoint of one or more teacher runs, evaluated in turn.

A run is the folder a training task writes (`<out_dir>/train_teacher/<method>`, or any learner run): its
registered checkpoints each hold `learner.json` (the step, the micro-batches consumed, the learner config) and
`hf/` (the model in Hugging Face format). `curve_points(run)` lists them as (pairs seen, model dir); pairs seen =
micro-batches consumed x micro-batch size x workers (a GDSO / GRPO micro-batch is a rollout's pairs, consumed once
however many updates reuse it; an SFT one is its pairs). A base model, if given, is the point at 0 pairs.

`evaluate_curve(cfg, runs, scorer, ...)` has the one `scorer` serve each point's weights in turn (`serve_model`,
the path of a GDSO step's sync: an `EnginePool` or a `TeacherEngine`) and evaluates it with
`evaluate_reward_model`, so a point costs its scoring, not an engine start. It writes
`<out_dir>/evaluate/<name>/curve.json` (every point's pooled and per-dimension metrics), `curve.md` and
`hpa_vs_pairs.png` (pooled HPA against pairs, one line per run; the oracle's ceiling on the Shapes world). The
scorer is left serving the last point's weights.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zray.config import ConfigError


@dataclass(frozen=True)
class CurvePoint:
    """One model on a curve: `pairs` training pairs seen after `step` learner steps; `model_dir` its HF dir."""

    label: str
    step: int
    pairs: int
    model_dir: Path


def pairs_seen(learner_state: Mapping[str, Any]) -> int:
    """Training pairs a checkpoint has seen, from its `learner.json`."""
    cfg = learner_state["config"]
    return int(learner_state["consumed_micro_batches"]) * int(cfg["micro_batch_size"]) * int(
        learner_state.get("world_size", cfg.get("num_workers", 1)))


def curve_points(run_dir: str | Path, *, label: str | None = None,
                 base_dir: str | Path | None = None) -> list[CurvePoint]:
    """The checkpoints Ray Train registered for `run_dir` in step order (`zray.training.runs.checkpoints`; the base
    first, at 0 pairs, if `base_dir` is given); a clear error if the folder has none."""
    from zray.training.runs import checkpoints, read_learner_state

    run_dir = Path(run_dir)
    label = label or run_dir.name
    if not run_dir.is_dir():
        raise ConfigError(f"curve run {str(run_dir)!r} is not a folder: a training run's folder is expected "
                          "(e.g. <out_dir>/train_teacher/gdso)")
    found = []
    for ckpt in checkpoints(run_dir):
        state = read_learner_state(ckpt)
        found.append(CurvePoint(label, int(state["step"]), pairs_seen(state), ckpt / "hf"))
    if not found:
        raise ConfigError(f"curve run {str(run_dir)!r} has no checkpoint_*/ that Ray Train registered: keep more "
                          "checkpoints (learner.keep_checkpoints) or point at a training run's folder")
    base = [CurvePoint(label, 0, 0, Path(base_dir))] if base_dir is not None else []
    return base + sorted(found, key=lambda p: p.step)


def evaluate_curve(cfg: Any, runs: Sequence[Sequence[CurvePoint]], scorer: Any, *, name: str = "curve",
                   rows: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Evaluate every point of every run on `cfg.evaluate.split` with `scorer`, each point's model served by it in
    turn (`zray.tasks.gdso.serve_model`, in the dtype an engine on the first point serves: the caller starts the
    scorer on that point's model); returns the curve record."""
    from zray.evaluation.rewards import compute_metrics, evaluate_reward_model, evaluation_rows, oracle_predictions
    from zray.models.vlm import served_dtype
    from zray.tasks.gdso import serve_model
    from zray.training.runs import write_text_atomic

    if not runs or not all(runs):
        raise ConfigError("evaluate_curve needs at least one run with at least one point")
    dtype = served_dtype(runs[0][0].model_dir)
    rows = evaluation_rows(cfg) if rows is None else rows
    out = Path(cfg.out_dir).resolve() / "evaluate" / name
    out.mkdir(parents=True, exist_ok=True)
    version = 1_000_000  # above any learner step: a point's version never repeats a training sync's
    curves: dict[str, list[dict[str, Any]]] = {}
    for points in runs:
        for p in points:
            serve_model(scorer, p.model_dir, dtype=dtype, version=version)
            version += 1
            record = evaluate_reward_model(cfg, p.model_dir, scorer, name=f"{name}/{p.label}/step_{p.step:06d}",
                                           rows=rows)
            curves.setdefault(p.label, []).append(
                {"step": p.step, "pairs": p.pairs, "model_dir": str(p.model_dir), "form": record["form"],
                 "pooled": record["pooled"], "dimensions": record["dimensions"],
                 "mean_output_tokens": record["mean_output_tokens"]})
    # the oracle row as train-teacher's table has it: the Shapes world's true scores (an import has none)
    oracle = None if cfg.data.dir else compute_metrics(oracle_predictions(rows))["pooled"]["hpa"]
    result = {"split": cfg.evaluate.split, "oracle_hpa": oracle, "curves": curves}
    write_text_atomic(out / "curve.json", json.dumps(result, indent=2, default=float))
    write_text_atomic(out / "curve.md", curve_table(result))
    save_curve_plot(out / "hpa_vs_pairs.png", result)
    print(curve_table(result) + f"\n[evaluate] curve -> {out}")
    return result


def curve_table(result: Mapping[str, Any]) -> str:
    """Markdown: one row per point, pooled HPA / Margin HPA / PLCC / SRCC and output tokens."""
    lines = [f"HPA against training pairs seen ({result['split']} split)", "",
             "| run | step | pairs | pooled HPA | Margin HPA | PLCC | SRCC | output tokens |",
             "|---|---|---|---|---|---|---|---|"]
    for label, points in result["curves"].items():
        for p in points:
            m = p["pooled"]
            lines.append(f"| {label} | {p['step']} | {p['pairs']} | {_f(m.get('hpa'))} | {_f(m.get('margin_hpa'))} "
                         f"| {_f(m.get('plcc'))} | {_f(m.get('srcc'))} | {p['mean_output_tokens']:.1f} |")
    if result.get("oracle_hpa") is not None:
        lines.append(f"\noracle (true scores): pooled HPA {result['oracle_hpa']:.3f}")
    return "\n".join(lines) + "\n"


def _f(value: Any) -> str:
    return "-" if value is None or value != value else f"{float(value):.3f}"


def save_curve_plot(path: Path, result: Mapping[str, Any]) -> None:
    """Pooled HPA against pairs seen, one line per run; chance (0.5) and the oracle, if known, as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, points in result["curves"].items():
        ax.plot([p["pairs"] for p in points], [p["pooled"]["hpa"] for p in points], marker="o", label=label)
    ax.axhline(0.5, color="grey", linestyle=":", label="chance")
    if result.get("oracle_hpa") is not None:
        ax.axhline(result["oracle_hpa"], color="black", linestyle="--", label="oracle (true scores)")
    ax.set_xlabel("training pairs seen")
    ax.set_ylabel(f"pooled HPA ({result['split']} split)")
    ax.set_title("HPA against training pairs seen")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
