"""The stage graph of `zray run` and the decision, per stage, to skip, resume or (re)run it.

Every stage writes into its own folder of the run directory (`<out_dir>/<stage>/`, the folder its job writes on its
own) and has a record, `<out_dir>/pipeline/<stage>.json`: its config fingerprint, its status ("running" or "done"),
when it ran and its wall time. The fingerprint hashes the config sections the stage reads (`Stage.sections`) and the
fingerprints of the stages it depends on, so a changed config re-runs that stage and everything downstream. Only
the values that differ from their dataclass defaults count (`explicit_config`): a field added to the config later,
at a default that keeps the old behaviour (the convention), leaves every fingerprint as it was, so a long run
survives code that grows the config. Like a code change, a changed default re-runs nothing.

    decide(record, fingerprint, outputs_exist) -> "skip" | "resume" | "run" | "rerun"

- skip: the record is "done", its fingerprint matches and the stage's folder is there;
- resume: the record is "running" (the run was cut) with the same fingerprint: the job continues from its latest
  checkpoint (each job's own `--resume`);
- run: no record and no folder;
- rerun: a record with another fingerprint, or a folder with no record (written outside the pipeline, config
  unknown): the old folder is set aside into `<out_dir>/superseded/` (never deleted), then the stage runs anew.

Records are written atomically (`zray.training.runs.write_json_atomic`, also importable from here: a temporary file,
then a rename): a crash mid-write leaves the old record or the new one, never a torn file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from zray.config import ConfigError, RunConfig, to_dict
from zray.training.runs import write_json_atomic

RECORD_DIR = "pipeline"
SUPERSEDED_DIR = "superseded"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Stage:
    """One stage: `name` (also its folder under the run dir), the `RunConfig` sections it reads, the stages whose
    outputs it reads, and `title` for progress and the report."""

    name: str
    title: str
    sections: tuple[str, ...]
    deps: tuple[str, ...] = ()


STAGES: tuple[Stage, ...] = (
    Stage(name="data", title="Shapes world (Parquet)", sections=("seed", "world", "data")),
    Stage(name="pretrain_vlm", title="base VLMs (teacher, student)", sections=("seed", "teacher", "student",
                                                                               "pretrain_vlm"), deps=("data",)),
    Stage(name="pretrain_generator", title="base generator (VAE, flow)", sections=("seed", "generator",
                                                                                   "pretrain_generator"),
          deps=("data",)),
    Stage(name="train_teacher", title="Z-Reward teacher (zero-shot, SFT, GRPO, GDSO)",
          sections=("seed", "train_teacher", "vllm", "evaluate"), deps=("data", "pretrain_vlm")),
    Stage(name="train_student", title="Z-Reward student (SFT, OPD, RISD)",
          sections=("seed", "train_student", "vllm", "evaluate"), deps=("pretrain_vlm", "train_teacher")),
    Stage(name="serve", title="reward service (Ray Serve, HTTP check)", sections=("serve", "evaluate"),
          deps=("train_student",)),
    Stage(name="distill_generator", title="Turbo++ two-step generator", sections=("seed", "distill_generator"),
          deps=("pretrain_generator",)),
    Stage(name="reward_finetune", title="reward-gradient fine-tuning (Turbo++ + RISD reward)",
          sections=("seed", "reward_finetune"), deps=("distill_generator", "train_student")),
)
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}


def select_stages(spec: str | None) -> tuple[Stage, ...]:
    """The stages of a comma-separated `--stages` value (dashes or underscores), in pipeline order; all for None."""
    if spec is None:
        return STAGES
    names = [n.strip().replace("-", "_") for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown or not names:
        raise ConfigError(f"--stages {spec!r} is not allowed: expected a comma-separated subset of "
                          f"{', '.join(STAGE_NAMES)}")
    return tuple(s for s in STAGES if s.name in names)


def explicit_config(obj: Any) -> Any:
    """The parts of a config tree that differ from their dataclass defaults, nested, JSON-ready: a field equal to
    its default is left out; a nested config that differs keeps only its differing fields; any other value is kept
    whole (a tuple of configs as a list of dicts)."""
    if not dataclasses.is_dataclass(obj):
        return _plain(obj)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:  # a required field always counts
            out[f.name] = _plain(value)
            continue
        if value == default:
            continue
        nested = dataclasses.is_dataclass(value) and type(value) is type(default)
        out[f.name] = explicit_config(value) if nested else _plain(value)
    return out


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return to_dict(value)
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def fingerprints(cfg: RunConfig) -> dict[str, str]:
    """{stage: sha256 of the config sections it reads (their values that differ from the defaults) and its
    dependencies' fingerprints}, for every stage."""
    tree = explicit_config(cfg)
    found: dict[str, str] = {}
    for stage in STAGES:  # dependencies come first in STAGES
        payload = {"sections": {k: tree[k] for k in stage.sections if k in tree},
                   "deps": {d: found[d] for d in stage.deps}}
        found[stage.name] = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return found


def record_path(out_dir: str | os.PathLike, stage: str) -> Path:
    return Path(out_dir) / RECORD_DIR / f"{stage}.json"


def read_record(out_dir: str | os.PathLike, stage: str) -> dict[str, Any] | None:
    """The stage's record, or None when there is none; a record that is not a JSON object names the file."""
    path = record_path(out_dir, stage)
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON ({err}): delete it to re-run stage {stage!r}") from None
    if not isinstance(record, dict) or record.get("status") not in ("running", "done"):
        raise ConfigError(f"{path} is not a stage record (expected an object with status 'running' or 'done'): "
                          f"delete it to re-run stage {stage!r}")
    return record


def decide(record: dict[str, Any] | None, fingerprint: str, outputs_exist: bool) -> str:
    """'skip', 'resume', 'run' or 'rerun' (see the module docstring)."""
    if record is None:
        return "rerun" if outputs_exist else "run"
    if record.get("fingerprint") != fingerprint:
        return "rerun"
    if record["status"] == "done":
        return "skip" if outputs_exist else "run"
    return "resume" if outputs_exist else "run"


def supersede(out_dir: str | os.PathLike, stage: str) -> Path | None:
    """Move the stage's folder and record into `<out_dir>/superseded/<stage>-<time>/`; returns where (None when
    there was nothing to move)."""
    out = Path(out_dir)
    folder, record = out / stage, record_path(out, stage)
    if not folder.exists() and not record.exists():
        return None
    target = out / SUPERSEDED_DIR / f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}"
    suffix = 1
    while target.exists():
        target = target.with_name(f"{target.name.split('.')[0]}.{suffix}")
        suffix += 1
    target.mkdir(parents=True)
    if folder.exists():
        shutil.move(str(folder), str(target / stage))
    if record.exists():
        shutil.move(str(record), str(target / record.name))
    return target


def start_record(out_dir: str | os.PathLike, stage: str, fingerprint: str, cfg: RunConfig,
                 previous: dict[str, Any] | None) -> dict[str, Any]:
    """Mark the stage running (a resumed stage keeps its first start and the time it ran before)."""
    tree = to_dict(cfg)
    same = previous is not None and previous.get("fingerprint") == fingerprint
    record = {"stage": stage, "status": "running", "fingerprint": fingerprint,
              "config": {k: tree[k] for k in BY_NAME[stage].sections},
              "started": previous["started"] if same else time.strftime("%Y-%m-%dT%H:%M:%S"),
              "wall_s_before": float(previous.get("wall_s", 0.0)) if same else 0.0,
              "attempts": int(previous.get("attempts", 0)) + 1 if same else 1}
    write_json_atomic(record_path(out_dir, stage), record)
    return record


def finish_record(out_dir: str | os.PathLike, record: dict[str, Any], wall_s: float,
                  summary: dict[str, Any]) -> dict[str, Any]:
    """Mark the stage done with its wall time (over every attempt) and a short summary of what it produced."""
    done = {**record, "status": "done", "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "wall_s": record["wall_s_before"] + wall_s, "summary": summary}
    write_json_atomic(record_path(out_dir, record["stage"]), done)
    return done


def note_progress(out_dir: str | os.PathLike, record: dict[str, Any], wall_s: float) -> None:
    """Keep a running stage's wall time so far in its record (read when it resumes)."""
    write_json_atomic(record_path(out_dir, record["stage"]), {**record, "wall_s": record["wall_s_before"] + wall_s})
