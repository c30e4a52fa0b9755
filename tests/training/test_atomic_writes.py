"""Atomic writes and honest reads: a write cut by an exception or a crash leaves the old file (or folder) and never
a torn one that loads; a checkpoint Ray Train did not register is never chosen; a truncated or corrupt Parquet
input names the file (and, where the footer reads, the rows and the column)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from zray.data.importers import ImportRejected, import_data
from zray.data.parquet import SCHEMAS, DataError, read_parquet_file, read_table, write_table
from zray.training.runs import (SNAPSHOT_FILE, atomic_path, checkpoints, export_final, has_checkpoint,
                                latest_checkpoint, read_learner_state, write_json_atomic, write_text_atomic)

ROOT = Path(__file__).resolve().parents[2]


def _torn_write_text(monkeypatch):
    """Path.write_text writes the first half of its text, then fails (a full disk mid-write)."""
    real = Path.write_text

    def torn(self, text, *args, **kwargs):
        real(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError("No space left on device")

    monkeypatch.setattr(Path, "write_text", torn)


# ---- text and JSON records ----------------------------------------------------------------------------------


def test_a_record_write_cut_midway_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = write_json_atomic(tmp_path / "run" / "metrics.json", {"step": 1})
    _torn_write_text(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        write_json_atomic(path, {"step": 2, "history": list(range(100))})
    with pytest.raises(OSError, match="No space left"):
        write_text_atomic(tmp_path / "run" / "results.md", "| method | HPA |\n" * 50)
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"step": 1}
    assert sorted(os.listdir(path.parent)) == ["metrics.json"]  # no results.md, no temporary file


def test_a_crashed_writer_never_leaves_a_torn_target(tmp_path):
    """A process killed mid-write (os._exit: no exception handler runs) leaves the old record whole; its
    temporary file stays behind under a hidden name no reader opens."""
    path = write_json_atomic(tmp_path / "summary.json", {"done": 1})
    code = (f"import os, pathlib\nfrom zray.training.runs import write_text_atomic\n"
            "def torn(self, text, *a, **k):\n"
            "    with open(self, 'w') as f:\n        f.write(text[:10]); f.flush()\n    os._exit(9)\n"
            f"pathlib.Path.write_text = torn\nwrite_text_atomic({str(path)!r}, '{{\"done\": 2, \"more\": [1, 2, 3]}}')\n")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 9
    assert json.loads(path.read_text()) == {"done": 1}
    leftovers = [p.name for p in tmp_path.iterdir() if p != path]
    assert len(leftovers) == 1 and leftovers[0].startswith(".summary.json.tmp-")


# ---- Parquet outputs ----------------------------------------------------------------------------------------


def _prompt_rows(num):
    return [{"pair_id": f"p{i:04d}", "split": "train", "prompt_id": f"q{i // 4}", "dimension": "alignment",
             "winner_id": f"a{i}", "loser_id": f"b{i}", "winner_label": 4.0, "loser_label": 3.0, "gap": 1.0}
            for i in range(num)]


def test_a_parquet_write_cut_midway_keeps_the_old_table(tmp_path, monkeypatch):
    path = tmp_path / "pairs_train.parquet"
    write_table(_prompt_rows(8), "pairs", path)
    real = pq.write_table

    def torn(table, where, **kwargs):
        real(table.slice(0, 2), where, **kwargs)
        Path(where).write_bytes(Path(where).read_bytes()[:-20])  # the footer half written
        raise OSError("No space left on device")

    monkeypatch.setattr(pq, "write_table", torn)
    with pytest.raises(OSError, match="No space left"):
        write_table(_prompt_rows(40), "pairs", path)
    with pytest.raises(OSError, match="No space left"):
        with atomic_path(tmp_path / "predictions.parquet") as tmp:  # the writer of every other Parquet output
            pq.write_table(pa.table({"x": [1, 2, 3]}), str(tmp))
    monkeypatch.undo()
    assert read_table(path, "pairs").num_rows == 8
    assert sorted(os.listdir(tmp_path)) == ["pairs_train.parquet"]


# ---- checkpoints ------------------------------------------------------------------------------------------


def _snapshot(run_dir, steps, latest):
    """Ray Train's own snapshot of a run that registered `steps` (its pydantic model, so the format is Ray's)."""
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import (_CheckpointManagerState,
                                                                                _TrainingResultState)

    results = {s: _TrainingResultState(checkpoint_dir_name=f"checkpoint_{s:06d}", metrics={"step": s}) for s in steps}
    state = _CheckpointManagerState(
        checkpoint_results=[results[s] for s in steps], checkpoint_report_indices=list(range(len(steps))),
        latest_checkpoint_result=results[latest], pending_training_results=[], pending_validation_specs=[],
        current_report_index=len(steps), validated_checkpoint_dir_names=[],
        timed_out_validation_checkpoint_dir_names=[], failed_validation_checkpoint_dir_names=[])
    (run_dir / SNAPSHOT_FILE).write_text(state.model_dump_json())


def _checkpoint(run_dir, step, *, hf=True, learner=True):
    ckpt = run_dir / f"checkpoint_{step:06d}"
    ckpt.mkdir(parents=True)
    if hf:
        (ckpt / "hf").mkdir()
        (ckpt / "hf" / "config.json").write_text("{}")
    if learner:
        (ckpt / "learner.json").write_text(json.dumps({"step": step, "history": [{"step": step, "loss": 1.0}]}))
    return ckpt


def test_a_half_copied_checkpoint_is_never_the_latest(tmp_path):
    """Ray Train copies a checkpoint's files into checkpoint_<step>/ in place and registers it only when every
    worker's part is there: checkpoint_000004 below is a copy a crash cut (learner.json torn, or hf/ missing), and
    checkpoint_000001 an old one whose deletion a crash cut; neither is in the snapshot, so neither is chosen."""
    half_deleted = _checkpoint(tmp_path, 1, hf=False)
    for step in (2, 3):
        _checkpoint(tmp_path, step)
    cut = _checkpoint(tmp_path, 4, learner=False)
    (cut / "learner.json").write_text('{"step": 4, "history": [{"st')
    _snapshot(tmp_path, steps=[2, 3], latest=3)
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint_000003" and has_checkpoint(tmp_path)
    assert checkpoints(tmp_path) == [tmp_path / "checkpoint_000002", tmp_path / "checkpoint_000003"]
    shutil.rmtree(cut / "hf")  # a cut copy with a whole learner.json but no hf/: the same answer
    (cut / "learner.json").write_text(json.dumps({"step": 4, "history": []}))
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint_000003"
    assert half_deleted not in checkpoints(tmp_path)


def test_a_damaged_registered_checkpoint_or_snapshot_names_the_file(tmp_path):
    _checkpoint(tmp_path, 2)
    ckpt = _checkpoint(tmp_path, 3)
    _snapshot(tmp_path, steps=[2, 3], latest=3)
    (ckpt / "learner.json").write_text('{"step": 3, "hist')  # changed after Ray Train registered it
    with pytest.raises(ValueError, match=r"checkpoint_000003/learner\.json is not valid JSON \(.*line 1 column"):
        latest_checkpoint(tmp_path)
    with pytest.raises(ValueError, match=r"checkpoint_000003/learner\.json is not valid JSON"):
        read_learner_state(ckpt)
    shutil.rmtree(ckpt / "hf")
    with pytest.raises(ValueError, match=r"checkpoint_000003 is the latest checkpoint in .* but lacks hf/"):
        latest_checkpoint(tmp_path)
    text = (tmp_path / SNAPSHOT_FILE).read_text()
    (tmp_path / SNAPSHOT_FILE).write_text(text[: len(text) // 2])  # Ray Train writes its snapshot in place
    with pytest.raises(ValueError, match=rf"{SNAPSHOT_FILE} is not valid JSON .*move the run dir aside"):
        has_checkpoint(tmp_path)


# ---- the exported model -----------------------------------------------------------------------------------


def _model(folder, tag, num_files=3):
    folder.mkdir(parents=True)
    for i in range(num_files):
        (folder / f"part{i}.safetensors").write_text(f"{tag}-{i}")
    (folder / "config.json").write_text(json.dumps({"tag": tag}))
    return folder


def _export_of(final):
    """The tag of a whole export (every part and the config agree), else the files found."""
    files = sorted(p.name for p in final.iterdir())
    tag = json.loads((final / "config.json").read_text())["tag"]
    assert files == ["config.json", "part0.safetensors", "part1.safetensors", "part2.safetensors"], files
    assert all((final / f"part{i}.safetensors").read_text() == f"{tag}-{i}" for i in range(3))
    return tag


def test_an_export_cut_by_an_exception_keeps_the_old_final(tmp_path, monkeypatch):
    run = tmp_path / "run"
    export_final(_model(tmp_path / "old_hf", "old"), run)
    new_hf = _model(tmp_path / "new_hf", "new")

    def copy_one_then_fail(src, dst, **kwargs):  # the first file lands, then the disk is full
        shutil.copy2(Path(src) / "part0.safetensors", Path(dst) / "part0.safetensors")
        raise OSError("No space left on device")

    monkeypatch.setattr(shutil, "copytree", copy_one_then_fail)
    with pytest.raises(OSError, match="No space left"):
        export_final(new_hf, run)
    monkeypatch.undo()
    assert _export_of(run / "final") == "old" and sorted(os.listdir(run)) == ["final"]

    real_replace, calls = os.replace, []

    def fail_second_rename(src, dst):  # the old final is set aside, then the new one does not get in
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_second_rename)
    with pytest.raises(OSError, match="rename failed"):
        export_final(new_hf, run)
    monkeypatch.undo()
    assert _export_of(run / "final") == "old" and sorted(os.listdir(run)) == ["final"]
    export_final(new_hf, run)
    assert _export_of(run / "final") == "new" and sorted(os.listdir(run)) == ["final"]


@pytest.mark.parametrize("crash_at", ["copy", "between_renames"])
def test_an_export_cut_by_a_crash_leaves_the_old_final_or_none(tmp_path, crash_at):
    """The process dies (os._exit) mid-copy or between the two renames: final/ is the old export or absent,
    never a partial one; the next export puts things right (and removes the leftovers)."""
    run = tmp_path / "run"
    export_final(_model(tmp_path / "old_hf", "old"), run)
    new_hf = _model(tmp_path / "new_hf", "new")
    patch = {"copy": ("shutil", "copytree", "def crash(src, dst, **k):\n"
                      "    shutil.copy2(os.path.join(src, 'part0.safetensors'), dst)\n    os._exit(9)\n"),
             "between_renames": ("os", "replace", "n = []\ndef crash(src, dst):\n    if n: os._exit(9)\n"
                                 "    n.append(1); return real(src, dst)\n")}[crash_at]
    module, name, body = patch
    code = (f"import os, shutil\nfrom zray.training.runs import export_final\nreal = {module}.{name}\n{body}"
            f"{module}.{name} = crash\nexport_final({str(new_hf)!r}, {str(run)!r})\n")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 9
    final = run / "final"
    if crash_at == "copy":
        assert _export_of(final) == "old"
    else:
        assert not final.exists()  # none, and the old export whole beside it
        (old,) = run.glob(".final.old-*")
        assert _export_of(old) == "old"
    export_final(new_hf, run)
    assert _export_of(final) == "new" and sorted(os.listdir(run)) == ["final"]


# ---- truncated and corrupt Parquet inputs -------------------------------------------------------------------


def _corrupt_page(path, row_group, column):
    """Overwrite the page header of one column chunk (Parquet written without dictionary or compression)."""
    meta = pq.ParquetFile(str(path)).metadata
    names = [meta.schema.column(i).name for i in range(meta.num_columns)]
    offset = meta.row_group(row_group).column(names.index(column)).data_page_offset
    data = bytearray(path.read_bytes())
    data[offset:offset + 8] = b"\xff" * 8
    path.write_bytes(bytes(data))


def test_a_truncated_parquet_file_names_the_file(tmp_path):
    """A truncated Parquet file has lost its footer (the schema and the row groups' places), so no row or column
    can be named: the message names the file and says 'row n/a, column n/a: not a readable Parquet file (Parquet
    magic bytes not found in footer ...)'."""
    path = tmp_path / "pairs_train.parquet"
    write_table(_prompt_rows(50), "pairs", path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    pattern = r"file '.*pairs_train\.parquet', row n/a, column n/a: not a readable Parquet file \(.*magic bytes"
    with pytest.raises(DataError, match=pattern):
        read_table(path, "pairs")
    with pytest.raises(DataError, match=pattern):
        read_parquet_file(path)


def test_a_corrupt_parquet_page_names_the_file_rows_and_column(tmp_path):
    """With the footer whole, the reader names the row group's rows and the column whose data does not decode
    (the finest place the format gives: a page's values are decoded together)."""
    path = tmp_path / "pairs_test.parquet"
    table = pa.Table.from_pylist(_prompt_rows(30), schema=SCHEMAS["pairs"])
    pq.write_table(table, str(path), row_group_size=10, use_dictionary=False, compression="none")
    _corrupt_page(path, row_group=1, column="winner_id")
    pattern = r"pairs_test\.parquet', row 10-19 \(row group 1\), column winner_id: Parquet data does not read"
    with pytest.raises(DataError, match=pattern):
        read_table(path, "pairs")


def test_the_importer_names_a_truncated_or_corrupt_parquet_source(tmp_path):
    source = tmp_path / "prompts.parquet"
    prompts = pa.table({"prompt": [f"a red circle number {i}" for i in range(120)]})
    pq.write_table(prompts, str(source), row_group_size=50, use_dictionary=False, compression="none")
    _corrupt_page(source, row_group=1, column="prompt")
    with pytest.raises(ImportRejected, match=r"the source does not read") as info:
        import_data(source, tmp_path / "out", kind="prompts")
    (error,) = info.value.errors
    assert (error.file, error.row, error.column) == (str(source), 51, "prompt")  # rows are 1-based here
    assert "rows 51-100 (row group 1)" in error.why
    pq.write_table(prompts, str(source))
    source.write_bytes(source.read_bytes()[:-30])
    with pytest.raises(ImportRejected) as info:
        import_data(source, tmp_path / "out", kind="prompts")
    (error,) = info.value.errors
    assert (error.file, error.row, error.column) == (str(source), None, None)
    assert str(error).startswith(f"file {str(source)!r}, row all, column n/a: not a readable parquet file (")
    assert not (tmp_path / "out").exists()
