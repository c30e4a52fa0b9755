"""`zray train-teacher`: the Z-Reward teacher with GDSO, or a baseline (GRPO, SFT, zero-shot), then its evaluation.

    zray train-teacher --recipe dev --method gdso            # one method
    zray train-teacher --recipe dev --method all             # zero-shot, SFT, GRPO, GDSO on the same data + table
    zray train-teacher --recipe dev --method gdso --resume   # continue from the latest checkpoint

Every method starts from the same base VLM (`train_teacher.base_model`, default: the teacher of
`zray pretrain-vlm` after its instruction phase, `<out_dir>/pretrain_vlm/teacher_instruct/final`, or after captioning,
`<out_dir>/pretrain_vlm/teacher/final`, when `pretrain_vlm.instruct` is off; any Hugging Face dir of a supported
architecture, `zray.models.vlm.SUPPORTED_ARCHITECTURES`) and trains on the same rows: the train split's same-prompt
pairs (`zray.data.pair_examples`) of `train_teacher.dimensions` (empty = every dimension of the rubric).

Data: the Shapes world of the run, or with `data.dir` set your own (`zray data import --kind rated`): the import's
pairs of the train split (a hash of prompt_id, `zray.data.imported`), scored with the import's rubric (its
dimensions and anchors); the evaluation is on the import's test split. Worked example: README, "Your own data".

- zero-shot: no training; the base model scores in the reasoning form.
- SFT: `ScoreSFTTask` on the generic learner (Ray Train + DeepSpeed): CE on the label bin, no reasoning (with
  `train_teacher.sft_rationales`, a diagnostic: each candidate's true rationale in context before the score).
- GRPO / GDSO: `zray.tasks.gdso.GDSOTask` on the same learner, with `vllm.num_engines` TeacherEngine actors for
  the rollouts and a verified weight sync before every rollout (see that module for the loop of methods.md §2).

Seeds: with `train_teacher.seeds = n`, each RL method runs n times, with seeds `seed`, `seed + 1`, ... (rollout
sampling, and the learner's data order and init from `learner.seed + k`): the first in `<method>/`, the others in
`<method>_seed<k>/`. The table then gives their mean ± standard error, and the ordering intervals use their mean.

Outputs under `<out_dir>/train_teacher/<method>/`: Ray Train checkpoints (HF format + optimizer state),
`tensorboard/` (every logged metric: rewards, advantages, each loss term, KL, format failures, rollout / sync /
update times), `final/` (the trained model with `zray_scoring.json`), `training.png` (curves), `metrics.json`
(evaluation + step timing). `<out_dir>/train_teacher/results.md` is the table of every method evaluated so far.

Calibration and results of the dev recipe: docs/experiments.md (train-teacher).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from zray.config import TEACHER_METHODS, ConfigError, RunConfig, to_dict
from zray.data import ensure_world
from zray.data.imported import data_rubric, imported_pairs, select_dimensions
from zray.data.pair_examples import pair_examples
from zray.evaluation.rewards import evaluation_rows, markdown_row, results_table
from zray.training.curves import save_curves
from zray.training.runs import (export_final, has_checkpoint, pretrained_vlm_dir, seed_run_name,
                               write_text_atomic)

METHOD_NAMES = {"zero_shot": "zero-shot", "sft": "SFT", "grpo": "GRPO", "gdso": "GDSO"}
RL_METHODS = ("grpo", "gdso")  # run train_teacher.seeds times each
CURVES = ("loss", "reward_mean", "kl", "ce_loss", "pw_loss", "format_fail_frac", "pair_acc", "step_time_s")


def base_model_dir(cfg: RunConfig) -> Path:
    """`train_teacher.base_model`, else the pre-trained teacher of this run; a clear error when neither exists."""
    given = cfg.train_teacher.base_model
    pcfg = cfg.pretrain_vlm
    path = Path(given) if given else pretrained_vlm_dir(cfg.out_dir, "teacher",
                                                        instruct=pcfg.instruct and "teacher" in pcfg.instruct_roles)
    if not (path / "config.json").is_file():
        hint = "" if given else (f" (run `zray pretrain-vlm --recipe {cfg.name} --model teacher` first, or set "
                                 "train_teacher.base_model)")
        raise ConfigError(f"train_teacher.base_model={str(path)!r} is not allowed: no Hugging Face model there{hint}")
    from zray.models.vlm import check_vlm_architecture

    return check_vlm_architecture(path, "train_teacher.base_model")


def run_train_teacher(cfg: RunConfig, method: str | None = None, resume: bool = False) -> dict[str, Any]:
    """Train (unless zero-shot) and evaluate one method, or all four with method="all"; returns {method: record}."""
    import ray

    from actors.engine_pool import EnginePool, start_engines
    from actors.learner import fit, init_ray
    from zray.evaluation.rewards import evaluate_reward_model
    from zray.tasks.gdso import GDSOTask
    from zray.tasks.score_sft import ScoreSFTTask

    methods = TEACHER_METHODS[::-1] if method == "all" else (method or cfg.train_teacher.method,)
    if any(m not in TEACHER_METHODS for m in methods):
        raise ConfigError(f"--method {method!r} is not allowed: expected one of {', '.join(TEACHER_METHODS)}, all")
    rationales = cfg.train_teacher.sft_rationales and "sft" in methods
    if rationales and cfg.data.dir:
        raise ConfigError(f"train_teacher.sft_rationales=True is not allowed with data.dir={cfg.data.dir!r}: the true "
                          "rationales come from the Shapes world's scenes (an import has none)")
    out = Path(cfg.out_dir).resolve()
    root = out / "train_teacher"
    base = base_model_dir(cfg)
    rubric = data_rubric(cfg.data)
    dims = select_dimensions(cfg.train_teacher.dimensions, rubric, "train_teacher.dimensions")
    # the same rows for every method; read (and checked) before any actor starts
    pairs = (imported_pairs(cfg.data, "train", dims) if cfg.data.dir
             else pair_examples(ensure_world(cfg.world, out / "data"), "train", dims, rationales=rationales))
    eval_rows = evaluation_rows(cfg)
    lcfg = cfg.train_teacher.learner
    init_ray(lcfg.num_workers * lcfg.cpus_per_worker + cfg.vllm.num_engines * cfg.vllm.cpus_per_engine + 1)
    records = {}
    runs = [(name, k) for name in methods for k in range(cfg.train_teacher.seeds if name in RL_METHODS else 1)]
    # One engine set for the whole job, started on the base model when a method first needs it: the RL methods'
    # rollouts (their weights are synced before every rollout) and every evaluation (the model to evaluate loaded
    # and verified). An engine is an actor: an in-process vLLM engine in the driver would share (and on shutdown
    # tear down) vLLM's process-global state with any other engine of the driver process.
    engines: list[Any] = []
    serving = {"dir": base, "version": 0}  # what the engines serve
    try:
        for name, k in runs:
            seed = cfg.seed + k
            tcfg = dataclasses.replace(cfg.train_teacher, method=name, dimensions=dims,
                                       learner=dataclasses.replace(lcfg, seed=lcfg.seed + k))
            run = seed_run_name(name, k)
            run_dir = root / run
            print(f"[train-teacher] {METHOD_NAMES[name]}{f' (seed {seed})' if k else ''} from {base}")
            fitted = None
            if name in ("gdso", "grpo") and not engines:
                engines = start_engines(base, cfg.vllm, seed=cfg.seed, role="teacher engines")
            if name == "zero_shot":
                final_dir = base
            else:
                train = ray.data.from_arrow(pairs)
                task = (ScoreSFTTask(model_dir=str(base), rubric=rubric, rationales=rationales) if name == "sft"
                        else GDSOTask(model_dir=str(base), cfg=tcfg, rollouts=EnginePool(engines), seed=seed,
                                      name=f"teacher_{name}", rubric=rubric))
                fitted = fit(task, tcfg.learner, datasets={"train": train}, storage_path=root, name=run,
                             resume=resume and has_checkpoint(run_dir),  # --resume: the methods that started
                             time_budget_s=tcfg.time_budget_s)
                final_dir = export_final(fitted.hf_dir, run_dir)
                if name in ("gdso", "grpo"):
                    serving = {"dir": None, "version": fitted.final_step}  # the last rollout's weights
            # The engines evaluate (as a fresh one on final_dir would): serving final_dir's weights, verified, or
            # fresh ones when they cannot serve them as a fresh engine would (another dtype).
            if not engines:
                engines = start_engines(base, cfg.vllm, seed=cfg.seed, role="teacher engines")
                serving = {"dir": base, "version": 0}
            if serving["dir"] != final_dir:
                version = serving["version"] + 1
                if serve_final_weights(EnginePool(engines), base, final_dir, version):
                    serving = {"dir": final_dir, "version": version}
                else:
                    EnginePool(engines).shutdown()
                    engines = start_engines(final_dir, cfg.vllm, seed=cfg.seed, role="teacher engines")
                    serving = {"dir": None, "version": 0}  # not the base's: reloaded before the next method
            evaluation = evaluate_reward_model(cfg, final_dir, EnginePool(engines[:1]),
                                               form="auto" if name != "zero_shot" else "reasoning",
                                               name=f"teacher_{run}", rows=eval_rows)
            if serving["dir"] is None and engines and (name, k) != runs[-1]:  # a dtype-changed engine: start anew
                EnginePool(engines).shutdown()
                engines = []
            summary = training_summary(fitted.history, fitted.final_step, fitted.wall_s) if fitted else None
            record = {"method": name, "seed": seed, "model_dir": str(final_dir), "evaluation": evaluation,
                      "training": summary, "config": to_dict(tcfg)}
            run_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(run_dir / "metrics.json", json.dumps(record, indent=2, default=str))
            if fitted is not None:
                save_curves(run_dir / "training.png", fitted.history, CURVES, f"teacher {METHOD_NAMES[name]}")
            records[run] = record
            print(f"[train-teacher] {METHOD_NAMES[name]}: pooled HPA {evaluation['pooled']['hpa']:.4f} -> {run_dir}")
    finally:
        if engines:
            EnginePool(engines).shutdown()
    table = write_results(cfg, root)
    print(table)
    return records


def serve_final_weights(pool: Any, base: Path, final_dir: Path, version: int) -> bool:
    """Have the rollout engines (started on `base`) serve the trained model of `final_dir`, verified, so that the
    evaluation needs no second engine start-up. Only when they would serve exactly what a fresh engine on
    `final_dir` serves: the same dtype (engines keep the dtype they were started with). Returns whether they do."""
    from zray.models.vlm import served_dtype
    from zray.tasks.gdso import serve_model

    served = served_dtype(base)
    if served != served_dtype(final_dir):
        return False
    serve_model(pool, final_dir, dtype=served, version=version)
    return True


def training_summary(history: list[dict[str, float]], final_step: int, wall_s: float) -> dict[str, Any]:
    """Mean per-step figures over the logged windows (one GDSO step = sync + rollout + reference + update)."""
    keys = ("step_time_s", "sync_s", "rollout_s", "ref_s", "data_s", "update_s", "reward_mean", "kl",
            "format_fail_frac", "response_tokens", "loss")
    summary: dict[str, Any] = {"steps": final_step, "fit_wall_s": wall_s}
    for key in keys:
        values = [h[key] for h in history if key in h]
        if values:
            summary[f"mean_{key}"] = sum(values) / len(values)
    summary["first"] = history[0] if history else None
    summary["last"] = history[-1] if history else None
    return summary


def write_results(cfg: RunConfig, root: Path) -> str:
    """`root/results.md`: one row per method with an evaluation so far (zero-shot, SFT, GRPO, GDSO order), then the
    reference rows on the same candidates: the oracle (the world's true scores, the ceiling) and the independent
    judge (alignment only, not learned). The judge's predictions are kept in `root/judge_predictions.json`.
    Imported data (`data.dir`) has neither true scores nor a Shapes scene to judge: no reference rows."""
    from zray.evaluation.rewards import judge_predictions, oracle_predictions, reference_record, seed_mean_record

    rows, found = [], {}
    for name in TEACHER_METHODS[::-1]:
        runs = seed_runs(root, name)
        if runs:
            found[name] = runs
            label = METHOD_NAMES[name] + (f" ({len(runs)} seeds)" if len(runs) > 1 else "")
            rows.append((label, seed_mean_record([json.loads((root / r / "metrics.json").read_text())["evaluation"]
                                                  for r in runs])))
    ordering = ordering_lines(root.parent, found)
    if cfg.data.dir:
        table = results_table(rows) + ordering
        root.mkdir(parents=True, exist_ok=True)
        write_text_atomic(root / "results.md", table + "\n")
        return table
    candidates = evaluation_rows(cfg)
    cache = root / "judge_predictions.json"
    ids = [r["candidate_id"] for r in candidates]
    cached = json.loads(cache.read_text()) if cache.exists() else None
    judged = cached["predictions"] if cached and cached.get("candidate_ids") == ids else judge_predictions(candidates)
    root.mkdir(parents=True, exist_ok=True)
    write_text_atomic(cache, json.dumps({"candidate_ids": ids, "predictions": judged}))
    table = results_table(rows) + "\n".join([
        markdown_row("oracle (true scores)", reference_record("oracle", oracle_predictions(candidates), candidates),
                     model="-"),
        markdown_row("judge (alignment only)", reference_record("judge", judged, candidates), model="-")]) + "\n" \
        + ordering
    write_text_atomic(root / "results.md", table + "\n")
    return table


def seed_runs(root: Path, method: str) -> list[str]:
    """The run folders of `method` under `root` with an evaluation: `<method>`, then `<method>_seed<k>` in order."""
    suffixes = (p.name.removeprefix(f"{method}_seed") for p in root.glob(f"{method}_seed*"))
    seeds = sorted(int(k) for k in suffixes if k.isdigit())
    names = [method, *(seed_run_name(method, k) for k in seeds)]
    return [n for n in names if (root / n / "metrics.json").exists()]


def ordering_lines(out: Path, methods: dict[str, list[str]]) -> str:
    """The paired bootstrap of each adjacent pooled-HPA difference, in the order the methods are expected to rank
    (zero-shot < SFT < GRPO < GDSO), from the evaluations' saved predictions ({method: its run folders}; several
    seeds: their mean); empty with fewer than two."""
    from zray.data.parquet import read_parquet_file
    from zray.evaluation.rewards import ordering_intervals, ordering_markdown

    found = []
    for m, runs in methods.items():
        paths = [out / "evaluate" / f"teacher_{r}" / "predictions.parquet" for r in runs]
        sets = [read_parquet_file(p).to_pylist() for p in paths if p.exists()]
        if sets:
            found.append((METHOD_NAMES[m], sets if len(sets) > 1 else sets[0]))
    if len(found) < 2:
        return ""
    seeds = " (methods with several seeds: their mean)" if any(isinstance(p[0], list) for _, p in found) else ""
    return (f"\nPooled HPA differences in the expected order, paired bootstrap over test prompts{seeds} (95%, 2,000 "
            "samples):\n\n" + ordering_markdown(ordering_intervals(found)) + "\n")
