"""`zray run`: the whole system, one stage after the other, into one run directory, with a report at the end.

    zray run --recipe tiny_cpu                          # smoke: every stage with tiny models (minutes)
    zray run --recipe dev                               # the real tables on this CPU (hours; resumable)
    zray run --recipe dev --stages train_student,serve  # some stages (their inputs must be done)
    zray run --recipe dev --fresh                       # set every earlier output aside and start over

Stages (`zray.pipeline.plan.STAGES`), each the job of its own command, so a stage's folder is what that command
writes: data (`zray data`), pretrain_vlm, pretrain_generator, train_teacher (`--method all`: zero-shot, SFT, GRPO,
GDSO and the table), train_student (`--method all`: SFT, OPD, RISD beside the teacher), serve (the reward service
over the RISD student, checked over HTTP on the test candidates, then stopped), distill_generator (the recipe's
Turbo++ variants), reward_finetune (the Turbo++ student on the RISD reward). One Ray instance serves every stage
(or the cluster at RAY_ADDRESS: `ray job submit --working-dir . -- zray run --recipe R`).

A stage is skipped when its record says done with the same config fingerprint; a record left "running" (the run
was cut: Ctrl-C, a crash, a lost node) resumes the stage from its latest checkpoint; a changed config re-runs the
stage and everything downstream, after setting the old output aside in `<out_dir>/superseded/`
(`zray.pipeline.plan`). After every stage, `<out_dir>/report.md` is rewritten (`zray.pipeline.report`).

This module and jobs/cli.py are the two dispatchers: they alone import other jobs.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import time
from pathlib import Path
from typing import Any

from zray.config import ConfigError, RunConfig
from zray.pipeline.plan import (BY_NAME, STAGES, decide, finish_record, fingerprints, note_progress, read_record,
                                select_stages, start_record, supersede)
from zray.pipeline.report import first_table, summary_of, write_report


def run_pipeline(cfg: RunConfig, *, stages: str | None = None, fresh: bool = False) -> Path:
    """Run (or skip, or resume) each selected stage in order; returns the report's path."""
    from actors.learner import init_ray

    cfg = dataclasses.replace(cfg, out_dir=str(Path(cfg.out_dir).resolve()))
    out = Path(cfg.out_dir)
    selected = select_stages(stages)
    if fresh:
        for stage in STAGES:
            moved = supersede(out, stage.name)
            if moved:
                print(f"[run] --fresh: {stage.name} set aside in {moved}")
    prints = fingerprints(cfg)
    check_inputs(out, selected, prints)
    init_ray(cpus_needed(cfg))
    actions: dict[str, str] = {}
    clock = time.perf_counter()
    for number, stage in enumerate(selected, start=1):
        record = read_record(out, stage.name)
        action = decide(record, prints[stage.name], (out / stage.name).exists())
        head = f"[run {number}/{len(selected)}] {stage.name} ({stage.title})"
        if action == "skip":
            actions[stage.name] = "skipped (done, same config)"
            print(f"{head}: done before with the same config, skipped")
            continue
        if action == "rerun":
            why = "its config changed" if record else "its folder was written outside the pipeline"
            print(f"{head}: {why}; the old output is set aside in {supersede(out, stage.name)}")
        print(f"{head}: {'resuming from its latest checkpoint' if action == 'resume' else 'running'}")
        running = start_record(out, stage.name, prints[stage.name], cfg, record if action == "resume" else None)
        started = time.perf_counter()
        try:
            result = RUNNERS[stage.name](cfg, action == "resume")
        except BaseException:  # Ctrl-C included: the record stays "running", the next invocation resumes it
            note_progress(out, running, time.perf_counter() - started)
            write_report(out, cfg, {**actions, stage.name: "cut (resumes next time)"})
            print(f"{head}: stopped; `zray run` with the same recipe and settings resumes it")
            raise
        done = finish_record(out, running, time.perf_counter() - started, summary_of(result))
        actions[stage.name] = {"resume": "resumed", "rerun": "re-ran (config changed)" if record
                               else "re-ran (unrecorded folder set aside)"}.get(action, "ran")
        write_report(out, cfg, actions)
        print(f"{head}: done in {done['wall_s'] / 60:.1f} min")
    report = write_report(out, cfg, actions)
    print(first_table(report))
    print(f"[run] {len(selected)} stages in {(time.perf_counter() - clock) / 60:.1f} min; report: {report}")
    return report


def check_inputs(out: Path, selected: tuple[Any, ...], prints: dict[str, str]) -> None:
    """Each selected stage's dependencies are selected too, or done with their current fingerprint."""
    names = {s.name for s in selected}
    for stage in selected:
        for dep in stage.deps:
            if dep in names:
                continue
            record = read_record(out, dep)
            if not record or record["status"] != "done" or record["fingerprint"] != prints[dep]:
                state = ("not run" if not record else "not finished" if record["status"] != "done"
                         else "done with another config")
                raise ConfigError(f"--stages: stage {stage.name!r} needs {dep!r} ({BY_NAME[dep].title}), which is "
                                  f"{state} in {out}: add it to --stages, or run without --stages")


def cpus_needed(cfg: RunConfig) -> float:
    """The logical CPUs the largest stage asks Ray for (learner workers, engine actors, Serve replicas)."""
    engines = cfg.vllm.num_engines * cfg.vllm.cpus_per_engine
    learners = [cfg.pretrain_vlm.learner, cfg.pretrain_generator.vae, cfg.pretrain_generator.flow,
                cfg.train_teacher.learner, cfg.train_student.learner, cfg.distill_generator.learner,
                cfg.reward_finetune.learner]
    largest = max(lc.num_workers * lc.cpus_per_worker for lc in learners)
    return max(largest + 2 * engines, cfg.serve.num_replicas * cfg.serve.cpus_per_replica + 1) + 1


# ------------------------------------------------------------------------------------------------ the stages


def stage_data(cfg: RunConfig, resume: bool) -> dict[str, Any]:
    from jobs.build_data import run_build_data

    manifest = run_build_data(cfg)
    return {f"rows_{k}": v["rows"] for k, v in manifest.get("files", {}).items() if isinstance(v, dict) and "rows" in v}


def stage_pretrain_vlm(cfg: RunConfig, resume: bool) -> dict[str, Any]:
    from jobs.pretrain_vlm import run_pretrain_vlm

    return run_pretrain_vlm(cfg, model="both", resume=resume)


def stage_pretrain_generator(cfg: RunConfig, resume: bool) -> dict[str, Any]:
    from jobs.pretrain_generator import run_pretrain_generator

    return run_pretrain_generator(cfg, resume=resume)


def stage_train_teacher(cfg: RunConfig, resume: bool) -> dict[str, Any]:
    from jobs.train_teacher import run_train_teacher

    records = run_train_teacher(cfg, method="all", resume=resume)
    return {f"pooled_hpa_{m}": r["evaluation"]["pooled"]["hpa"] for m, r in records.items()}


def stage_train_student(cfg: RunConfig, resume: bool) -> dict[str, Any]:
    from jobs.train_student import run_train_student

    records = run_train_student(cfg, method="all", resume=resume)
    return {f"pooled_hpa_{m}": (r.get("evaluation") or {}).get("pooled", {}).get("hpa") for m, r in records.items()}


def stage_serve(cfg: RunConfig, resume: bool) -> dict[str, Any]:
    """Deploy the reward service over the RISD student, score the test candidates over HTTP, compare with the
    student's own evaluation, stop the service; `serve/summary.md` and `serve/check.json`."""
    from ray import serve

    from jobs.serve import run_serve
    from zray.pipeline.service_check import check_service

    env = cfg.serve.auth_token_env
    if env and not os.environ.get(env):  # this check's own token, in this process only
        os.environ[env] = secrets.token_urlsafe(24)
        print(f"[run] serve: {env} was not set; a random token is used for this check")
    url = run_serve(cfg, detach=True)
    try:
        return check_service(cfg, url, token=os.environ.get(env) if env else None)
    finally:
        serve.shutdown()


def stage_distill_generator(cfg: RunConfig, resume: bool) -> dict[str, Any]:
    from jobs.distill_generator import run_distill_generator

    return run_distill_generator(cfg, resume=resume)


def stage_reward_finetune(cfg: RunConfig, resume: bool) -> dict[str, Any]:
    from jobs.reward_finetune import run_reward_finetune

    return run_reward_finetune(cfg, "turbo", resume=resume)


RUNNERS = {"data": stage_data, "pretrain_vlm": stage_pretrain_vlm, "pretrain_generator": stage_pretrain_generator,
           "train_teacher": stage_train_teacher, "train_student": stage_train_student, "serve": stage_serve,
           "distill_generator": stage_distill_generator, "reward_finetune": stage_reward_finetune}
