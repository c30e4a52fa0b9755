"""`zray train-student`: the Z-Reward student with RISD, or the SFT baseline, then its evaluation beside its teacher.

    zray train-student --recipe dev --method risd            # one method
    zray train-student --recipe dev --method all             # SFT, OPD and RISD from the same student base + table
    zray train-student --recipe dev --method risd --resume   # continue from the latest checkpoint

Every method starts from the same student base (`train_student.base_model`, default: the student of
`zray pretrain-vlm`, `zray.training.runs.pretrained_vlm_dir`); base and teacher may be any Hugging Face dir of a
supported architecture (`zray.models.vlm.SUPPORTED_ARCHITECTURES`), another is a one-line error.

Data: the Shapes world of the run, or with `data.dir` set your own (`zray.data.imported`): RISD / OPD distil on the
import's inputs (`imported_distill_inputs`: a `--kind scoring` import's scoring_inputs.parquet, or a `--kind rated`
import's train-split images x `train_student.dimensions`), SFT trains on a rated import's train pairs, every
scoring prompt carries the import's rubric (custom dimensions with their anchors), and the students and the teacher
are evaluated on the import's test split. A scoring import has no ratings: SFT is refused and the evaluation is
skipped (a printed note). Each student's `final/` records the rubric it was trained on (`zray_rubric.json`), the
dimensions `zray serve` then serves.

- RISD: `train_student.num_distill_prompts` fresh unlabelled prompts of the world with their candidates, in every
  dimension (`zray.data.distill_inputs`), stream through `vllm.num_engines` teacher engines serving the frozen
  teacher (`train_student.teacher_model`, default this run's GDSO teacher), which sample n reasoning traces each
  and return q_T; the targets are kept under `<out_dir>/train_student/targets/` (reused and resumed by later
  runs); then `zray.tasks.risd.RISDTask` on the generic learner (Ray Train + DeepSpeed).
- OPD: `zray.tasks.opd.OPDTask` on the same inputs, online: `vllm.num_engines` student engines (weights synced
  before every rollout) sample reasoning and a score, the teacher engines score the same tokens. The OPD student
  answers with reasoning (evaluated in the reasoning form).
- SFT: `ScoreSFTTask` (the label bin as one score token) on the labelled train pairs.

The engines are started once per job and kept (`JobEngines`): one teacher set serves the RISD targets, OPD's
token scoring and the teacher's evaluation; one student set serves OPD's rollouts and then each student's
evaluation, its final weights loaded into it and verified by checksum readback.

Outputs under `<out_dir>/train_student/`: `<method>/` (Ray Train checkpoints, `final/` with `zray_scoring.json`,
`metrics.json`, `training.png`), `teacher/metrics.json` (the teacher evaluated once, reasoning form), and
`results.md`: student methods beside their teacher and the oracle (the world's true scores; none for imported data),
with scoring throughput.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from zray.config import STUDENT_METHODS, ConfigError, RunConfig, to_dict
from zray.data import ensure_world
from zray.data.imported import data_rubric, import_kind, imported_distill_inputs, imported_pairs, select_dimensions
from zray.rubric import Rubric
from zray.training.curves import save_curves
from zray.training.runs import export_final, has_checkpoint, pretrained_vlm_dir, write_text_atomic

METHOD_NAMES = {"sft": "SFT", "opd": "OPD", "risd": "RISD", "teacher": "teacher", "oracle": "oracle"}
# the panels of <method>/training.png
CURVES = ("loss", "ce", "mu_abs_err", "ce_loss", "pair_acc", "reverse_kl", "format_fail_frac", "step_time_s")


def model_dir(given: str, default: Path, field: str, hint: str) -> Path:
    """`given`, else `default`; a clear ConfigError naming the field when there is no Hugging Face model there."""
    from zray.models.vlm import check_vlm_architecture

    path = Path(given) if given else default
    if not (path / "config.json").is_file():
        raise ConfigError(f"train_student.{field}={str(path)!r} is not allowed: no Hugging Face model there"
                          + ("" if given else f" ({hint}, or set train_student.{field})"))
    return check_vlm_architecture(path, f"train_student.{field}")


@dataclasses.dataclass(frozen=True)
class StudentData:
    """What the methods train on, read (and checked) before any actor starts: the rubric (restricted to the
    trained dimensions), the distillation inputs (RISD, OPD), the labelled train pairs (SFT), and the evaluation
    candidates (None: no evaluation, a scoring import has no ratings)."""

    rubric: Rubric
    inputs: Any
    pairs: Any
    eval_rows: list[dict[str, Any]] | None


def student_data(cfg: RunConfig, methods: tuple[str, ...]) -> StudentData:
    """The data of `methods`: the Shapes world's, or the import's in `data.dir` (module docstring)."""
    from zray.data.distill_inputs import distill_inputs
    from zray.data.pair_examples import pair_examples
    from zray.evaluation.rewards import evaluation_rows

    scfg = cfg.train_student
    full = data_rubric(cfg.data)
    dims = select_dimensions(scfg.dimensions, full, "train_student.dimensions")
    rubric = Rubric(dims, tuple(full.anchors_of(d) for d in dims), source=full.source)
    distil = any(m in ("opd", "risd") for m in methods)
    if not cfg.data.dir:
        out = Path(cfg.out_dir).resolve()
        return StudentData(rubric, distill_inputs(cfg.world, scfg.num_distill_prompts, dims) if distil else None,
                           pair_examples(ensure_world(cfg.world, out / "data"), "train", dims) if "sft" in methods
                           else None, evaluation_rows(cfg))
    rated = import_kind(cfg.data) == "rated"
    if "sft" in methods and not rated:
        raise ConfigError(f"data.dir={cfg.data.dir!r} is not allowed for --method sft: it is a "
                          f"{import_kind(cfg.data)!r} import without ratings; expected a `--kind rated` import")
    if not rated:
        print(f"[train-student] note: data.dir={cfg.data.dir!r} holds no rated images: no evaluation (import "
              "rated images and run `zray evaluate --set data.dir=...` on the students' final/ dirs)")
    return StudentData(rubric, imported_distill_inputs(cfg.data, dims) if distil else None,
                       imported_pairs(cfg.data, "train", dims) if "sft" in methods else None,
                       evaluation_rows(cfg) if rated else None)


def run_train_student(cfg: RunConfig, method: str | None = None, resume: bool = False) -> dict[str, Any]:
    """Train and evaluate one method, or all three with method="all"; evaluates the teacher once; returns
    {name: record}."""
    from actors.learner import init_ray

    methods = ("sft", "opd", "risd") if method == "all" else (method or cfg.train_student.method,)
    if any(m not in STUDENT_METHODS for m in methods):
        raise ConfigError(f"--method {method!r} is not allowed: expected one of {', '.join(STUDENT_METHODS)}, all")
    scfg = cfg.train_student
    out = Path(cfg.out_dir).resolve()
    root = out / "train_student"
    pcfg = cfg.pretrain_vlm
    base = model_dir(scfg.base_model, pretrained_vlm_dir(out, "student", instruct=pcfg.instruct
                                                          and "student" in pcfg.instruct_roles), "base_model",
                     f"run `zray pretrain-vlm --recipe {cfg.name} --model student` first")
    teacher = model_dir(scfg.teacher_model, out / "train_teacher" / "gdso" / "final", "teacher_model",
                        f"run `zray train-teacher --recipe {cfg.name} --method gdso` first")
    data = student_data(cfg, methods)
    init_ray(scfg.learner.num_workers * scfg.learner.cpus_per_worker
             + 2 * cfg.vllm.num_engines * cfg.vllm.cpus_per_engine + 1)  # OPD: student and teacher engines
    engines = JobEngines(cfg, teacher, base)
    try:
        records: dict[str, Any] = {}
        if data.eval_rows is not None:
            records["teacher"] = teacher_record(cfg, teacher, root / "teacher", engines, data.eval_rows)
        for name in methods:
            records[name] = train_method(cfg, name, base, teacher, engines, data, root, resume)
    finally:
        engines.shutdown()
    table = write_results(cfg, root)
    print(table)
    return records


class JobEngines:
    """The job's engine actors, each set started on first use and kept until the job ends (a vLLM engine takes
    seconds to start): the teacher's (RISD targets, OPD's token scoring, its own evaluation) and one student set
    (OPD's rollouts, then every student's evaluation with that student's weights loaded and verified)."""

    def __init__(self, cfg: RunConfig, teacher: Path, base: Path) -> None:
        self.cfg, self.teacher_dir, self.base = cfg, teacher, base
        self.pools: dict[str, Any] = {}
        self.start_s: dict[str, float] = {}
        self.version = 0  # of the weights last loaded into the student engines

    def _pool(self, role: str) -> Any:
        from actors.engine_pool import EnginePool, start_engines

        if role not in self.pools:
            clock = time.perf_counter()
            model = self.teacher_dir if role == "teacher" else self.base
            engines = start_engines(model, self.cfg.vllm, seed=self.cfg.seed, role=f"{role} engines")
            self.pools[role] = EnginePool(engines)
            self.start_s[role] = time.perf_counter() - clock
        return self.pools[role]

    def teacher(self) -> Any:
        return self._pool("teacher")

    def student(self) -> Any:
        return self._pool("student")

    def serve_student(self, model_dir: Path) -> Any:
        """The student engines serving the weights of `model_dir` (a new version, verified by checksum readback)."""
        from zray.models.vlm import served_dtype
        from zray.tasks.gdso import serve_model

        pool = self.student()
        self.version = max(self.version, pool.version()) + 1
        serve_model(pool, model_dir, dtype=served_dtype(self.base), version=self.version)
        return pool

    def shutdown(self) -> None:
        for pool in self.pools.values():
            pool.shutdown()
        self.pools.clear()


def train_method(cfg: RunConfig, name: str, base: Path, teacher: Path, engines: JobEngines, data: StudentData,
                 root: Path, resume: bool) -> dict[str, Any]:
    """Fit one student method from `base`, evaluate it on the student engines, write `<root>/<name>/metrics.json`."""
    import ray

    from actors.learner import fit
    from zray.models.vlm import write_rubric_file
    from zray.tasks.opd import OPDTask
    from zray.tasks.risd import RISDTask
    from zray.tasks.score_sft import ScoreSFTTask

    scfg = cfg.train_student
    run_dir = root / name
    print(f"[train-student] {METHOD_NAMES[name]}: student {base}, teacher {teacher}")
    collect: dict[str, Any] = {}
    if name == "sft":
        task: Any = ScoreSFTTask(model_dir=str(base), name="student_sft", rubric=data.rubric)
        train = ray.data.from_arrow(data.pairs)
    elif name == "opd":
        train = ray.data.from_arrow(data.inputs)
        task = OPDTask(model_dir=str(base), cfg=scfg, rollouts=engines.student(), teacher=engines.teacher(),
                       seed=cfg.seed, rubric=data.rubric)
    else:
        targets, collect = teacher_targets(cfg, teacher, data.inputs, root / "targets", engines, data.rubric)
        task = RISDTask(model_dir=str(base), rubric=data.rubric)
        train = ray.data.from_arrow(targets.select(["prompt", "image", "dimension", "q_teacher"]))
    fitted = fit(task, scfg.learner, datasets={"train": train}, storage_path=root, name=name,
                 resume=resume and has_checkpoint(run_dir), time_budget_s=scfg.time_budget_s)
    final_dir = export_final(fitted.hf_dir, run_dir)
    save_curves(run_dir / "training.png", fitted.history, CURVES, f"student {METHOD_NAMES[name]}")
    write_rubric_file(final_dir, data.rubric)  # what `zray serve` serves
    evaluation = None if data.eval_rows is None else evaluate_on(
        cfg, final_dir, f"student_{name}", engines.serve_student(final_dir), engines.start_s.get("student"),
        data.eval_rows)
    record = {"method": name, "model_dir": str(final_dir), "evaluation": evaluation, "targets": collect,
              "training": {"steps": fitted.final_step, "fit_wall_s": fitted.wall_s,
                           "last": fitted.history[-1] if fitted.history else None},
              "config": to_dict(dataclasses.replace(scfg, method=name))}
    write_text_atomic(run_dir / "metrics.json", json.dumps(record, indent=2, default=str))
    score = "no evaluation" if evaluation is None else f"pooled HPA {evaluation['pooled']['hpa']:.4f}"
    print(f"[train-student] {METHOD_NAMES[name]}: {score} -> {run_dir}")
    return record


def teacher_targets(cfg: RunConfig, teacher: Path, inputs: Any, targets_dir: Path, engines: JobEngines,
                    rubric: Rubric) -> tuple[Any, dict[str, Any]]:
    """The teacher's q_T for every distillation input, collected through the teacher engines into `targets_dir` (or
    read back from it); returns (targets table, a summary of the collection)."""
    from tqdm import tqdm

    from zray.tasks.risd import collect_teacher_targets

    scfg = cfg.train_student
    bar = tqdm(total=inputs.num_rows, desc="teacher targets", unit="input")
    clock = time.perf_counter()

    class LazyPool:  # the engines only if a chunk is missing (a finished collection needs none)
        def generate(self, requests, **kwargs):
            return engines.teacher().generate(requests, **kwargs)

    def progress(done: int, total: int) -> None:
        bar.update(done - bar.n)

    try:
        targets = collect_teacher_targets(
            LazyPool(), inputs, out_dir=targets_dir, teacher_samples=scfg.teacher_samples,
            max_reasoning_tokens=scfg.max_reasoning_tokens, temperature=scfg.temperature, seed=cfg.seed,
            identity=targets_identity(cfg, teacher, rubric), progress=progress, rubric=rubric)
    finally:
        bar.close()
    column = targets.column
    summary = {"num_inputs": targets.num_rows, "teacher_samples": scfg.teacher_samples,
               "mean_teacher_tokens": float(sum(column("teacher_tokens").to_pylist()) / targets.num_rows),
               "teacher_format_ok": float(sum(column("teacher_format_ok").to_pylist()) / targets.num_rows),
               "collect_wall_s": time.perf_counter() - clock}
    print(f"[train-student] teacher targets: {summary}")
    return targets, summary


def targets_identity(cfg: RunConfig, teacher: Path, rubric: Rubric) -> dict[str, Any]:
    """What the teacher targets were collected from (a change refuses to mix targets): the teacher, the inputs'
    source (the world and the prompt count, or the import and its manifest's checksums) and the rubric."""
    identity: dict[str, Any] = {"teacher": str(teacher.resolve()), "dimensions": list(rubric.dimensions)}
    if not cfg.data.dir:
        return {**identity, "world": to_dict(cfg.world), "num_distill_prompts": cfg.train_student.num_distill_prompts}
    manifest = json.loads((Path(cfg.data.dir) / "manifest.json").read_text())
    return {**identity, "data": {**to_dict(cfg.data), "dir": str(Path(cfg.data.dir).resolve()),
                                 "files": {k: v["sha256"] for k, v in manifest["files"].items()}},
            "rubric": rubric.to_dict()}


def evaluate_on(cfg: RunConfig, model: Path, name: str, pool: Any, engine_start_s: float | None,
                rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Evaluate `model` (the weights `pool` serves) on `rows` (the test candidates), in its own form."""
    from zray.evaluation.rewards import evaluate_reward_model

    return evaluate_reward_model(cfg, model, pool, form="auto", name=name, engine_start_s=engine_start_s, rows=rows)


def teacher_record(cfg: RunConfig, teacher: Path, record_dir: Path, engines: JobEngines,
                   rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The teacher's evaluation (its own form), made once per teacher dir and evaluation config."""
    path = record_dir / "metrics.json"
    key = {"model_dir": str(teacher.resolve()), "evaluate": to_dict(cfg.evaluate), "data": to_dict(cfg.data)}
    if path.exists():
        record = json.loads(path.read_text())
        if record.get("key") == json.loads(json.dumps(key)):
            return record
    print(f"[train-student] evaluating the teacher {teacher}")
    pool = engines.teacher()
    record = {"key": key, "method": "teacher", "model_dir": str(teacher),
              "evaluation": evaluate_on(cfg, teacher, "student_teacher", pool, engines.start_s.get("teacher"), rows)}
    record_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(record, indent=2, default=str))
    return record


def write_results(cfg: RunConfig, root: Path) -> str:
    """`root/results.md`: the teacher, each student method evaluated so far and the oracle (the world only: an
    import has no true scores), with throughput."""
    from zray.evaluation.rewards import (RESULTS_HEADER, evaluation_rows, markdown_row, oracle_predictions,
                                         reference_record)

    lines = [RESULTS_HEADER]
    speeds = []
    for name in ("teacher", "sft", "opd", "risd"):
        path = root / name / "metrics.json"
        if not path.exists():
            continue
        evaluation = json.loads(path.read_text())["evaluation"]
        if evaluation is None:  # a scoring import: nothing to evaluate on
            continue
        lines.append(markdown_row(METHOD_NAMES[name], evaluation, model="teacher" if name == "teacher" else "student"))
        speeds.append(f"{METHOD_NAMES[name]} {evaluation['queries_per_s']:.1f}")
    if not cfg.data.dir:
        rows = evaluation_rows(cfg)
        lines.append(markdown_row("oracle (true scores)", reference_record("oracle", oracle_predictions(rows), rows),
                                  model="-"))
    table = "\n".join(lines) + "\n\nScoring throughput on the test queries (queries/s, `vllm.num_engines` engines each): " \
        + (", ".join(speeds) or "none (no evaluation: data.dir holds no rated images)") + "\n"
    root.mkdir(parents=True, exist_ok=True)
    write_text_atomic(root / "results.md", table)
    return table
