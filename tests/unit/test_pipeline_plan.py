"""zray.pipeline.plan: the stage graph, fingerprints, the skip/resume/run decision, records and superseding."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from zray.config import ConfigError, RunConfig
from zray.pipeline import plan
from zray.pipeline.plan import STAGES, decide, fingerprints, read_record, select_stages, supersede


def test_stages_come_after_their_dependencies():
    seen = set()
    for stage in STAGES:
        assert set(stage.deps) <= seen, stage.name
        seen.add(stage.name)
    assert [s.name for s in STAGES] == ["data", "pretrain_vlm", "pretrain_generator", "train_teacher",
                                        "train_student", "serve", "distill_generator", "reward_finetune"]


def test_every_section_named_is_a_config_field():
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    for stage in STAGES:
        assert set(stage.sections) <= fields, stage.name


def test_a_changed_section_changes_that_stage_and_everything_downstream_only():
    base = RunConfig()
    before = fingerprints(base)
    changed = dataclasses.replace(base, train_teacher=dataclasses.replace(base.train_teacher, group_size=16))
    after = fingerprints(changed)
    differs = {name for name in before if before[name] != after[name]}
    assert differs == {"train_teacher", "train_student", "serve", "reward_finetune"}


def test_a_field_added_at_its_default_changes_no_fingerprint():
    """Only values that differ from their defaults count: code that grows the config (a new field, its default
    keeping the old behaviour) leaves a long run's records valid."""
    from zray.pipeline.plan import explicit_config

    @dataclasses.dataclass(frozen=True)
    class Before:
        lr: float = 1e-3
        steps: int = 10

    @dataclasses.dataclass(frozen=True)
    class After:  # the same config with a field added later, at its default
        lr: float = 1e-3
        steps: int = 10
        warmup: int = 0

    @dataclasses.dataclass(frozen=True)
    class Outer:
        seed: int = 0
        learner: object = dataclasses.field(default_factory=Before)

    @dataclasses.dataclass(frozen=True)
    class OuterAfter:
        seed: int = 0
        learner: object = dataclasses.field(default_factory=After)

    assert explicit_config(Outer(learner=Before(steps=5))) == explicit_config(OuterAfter(learner=After(steps=5))) \
        == {"learner": {"steps": 5}}
    assert explicit_config(OuterAfter(learner=After(steps=5, warmup=3))) == {"learner": {"steps": 5, "warmup": 3}}
    assert explicit_config(Outer()) == {} and explicit_config(RunConfig()) == {}
    # a value set equal to its default is the default; recipes differ where they set different values
    base = RunConfig()
    assert fingerprints(dataclasses.replace(base, seed=0)) == fingerprints(base)
    from jobs.recipes import dev, tiny_cpu

    assert fingerprints(tiny_cpu())["data"] != fingerprints(dev())["data"]


def test_name_and_out_dir_do_not_count():
    base = RunConfig()
    moved = dataclasses.replace(base, name="other", out_dir="/elsewhere")
    assert fingerprints(base) == fingerprints(moved)


@pytest.mark.parametrize("record, outputs, expected", [
    (None, False, "run"),
    (None, True, "rerun"),  # a folder written outside the pipeline: config unknown
    ({"status": "done", "fingerprint": "a"}, True, "skip"),
    ({"status": "done", "fingerprint": "a"}, False, "run"),  # the output was deleted
    ({"status": "done", "fingerprint": "b"}, True, "rerun"),
    ({"status": "running", "fingerprint": "a"}, True, "resume"),
    ({"status": "running", "fingerprint": "a"}, False, "run"),
    ({"status": "running", "fingerprint": "b"}, True, "rerun"),
])
def test_decide(record, outputs, expected):
    assert decide(record, "a", outputs) == expected


def test_select_stages_keeps_pipeline_order_and_names_bad_values():
    assert [s.name for s in select_stages("serve,train-student")] == ["train_student", "serve"]
    assert select_stages(None) == STAGES
    with pytest.raises(ConfigError, match="--stages 'train,serve'.*data, pretrain_vlm"):
        select_stages("train,serve")


def test_records_round_trip_and_resume_keeps_time_and_attempts(tmp_path):
    cfg = RunConfig()
    first = plan.start_record(tmp_path, "train_teacher", "fp1", cfg, None)
    plan.note_progress(tmp_path, first, 30.0)
    cut = read_record(tmp_path, "train_teacher")
    assert cut["status"] == "running" and cut["wall_s"] == 30.0 and cut["attempts"] == 1
    again = plan.start_record(tmp_path, "train_teacher", "fp1", cfg, cut)
    done = plan.finish_record(tmp_path, again, 12.0, {"pooled_hpa_gdso": 0.5})
    assert done["attempts"] == 2 and done["wall_s"] == 42.0 and done["started"] == first["started"]
    assert read_record(tmp_path, "train_teacher")["status"] == "done"
    assert set(done["config"]) == {"seed", "train_teacher", "vllm", "evaluate"}


def test_a_torn_or_foreign_record_names_the_file(tmp_path):
    path = plan.record_path(tmp_path, "data")
    path.parent.mkdir(parents=True)
    path.write_text('{"status": "do')
    with pytest.raises(ConfigError, match=r"data\.json is not valid JSON.*delete it to re-run stage 'data'"):
        read_record(tmp_path, "data")
    path.write_text(json.dumps({"status": "finished"}))
    with pytest.raises(ConfigError, match="is not a stage record"):
        read_record(tmp_path, "data")


def test_atomic_write_leaves_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "pipeline" / "data.json"
    plan.write_json_atomic(path, {"status": "done"})

    def broken(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        plan.write_json_atomic(path, {"status": "running"})
    assert json.loads(path.read_text()) == {"status": "done"}
    assert [p.name for p in path.parent.iterdir()] == ["data.json"]  # no temporary file left


def test_supersede_moves_folder_and_record_and_never_overwrites(tmp_path):
    (tmp_path / "train_teacher" / "gdso").mkdir(parents=True)
    (tmp_path / "train_teacher" / "gdso" / "x.txt").write_text("kept")
    plan.write_json_atomic(plan.record_path(tmp_path, "train_teacher"), {"status": "done", "fingerprint": "a"})
    first = supersede(tmp_path, "train_teacher")
    assert (first / "train_teacher" / "gdso" / "x.txt").read_text() == "kept"
    assert (first / "train_teacher.json").exists()
    assert not (tmp_path / "train_teacher").exists() and read_record(tmp_path, "train_teacher") is None
    (tmp_path / "train_teacher").mkdir()
    second = supersede(tmp_path, "train_teacher")
    assert second != first and second.exists() and first.exists()
    assert supersede(tmp_path, "train_teacher") is None
