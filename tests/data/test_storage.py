"""The built world on disk: determinism, manifest, round trip, split hygiene, malformed-input errors."""

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from zray.data.build import GENERATOR_VERSION, build_world, verify_world
from zray.data.captions import parse_description
from zray.data.parquet import SCHEMAS, DataError, read_table, write_table
from zray.data.prompt_grammar import parse_prompt
from zray.data.render import decode_png
from zray.data.scene import Scene
from zray.rubric import DIMENSIONS


def test_manifest_and_counts(small_world, small_cfg, small_settings):
    out, manifest = small_world
    assert manifest == json.loads((out / "manifest.json").read_text())
    assert manifest["generator_version"] == GENERATOR_VERSION and manifest["seed"] == small_cfg.seed
    assert {k: manifest["world_config"][k] for k in small_settings} == small_settings
    k = small_cfg.candidates_per_prompt
    expected = {"candidates_train": 8 * k, "candidates_test": 4 * k, "candidates_heldout": 4 * k,
                "captions_train": 20, "captions_test": 8, "generator_train": 20, "generator_test": 8}
    for name, rows in expected.items():
        assert manifest["counts"][f"{name}.parquet"] == rows
    assert {f.name for f in out.iterdir()} == set(manifest["files"]) | {"manifest.json"}
    assert verify_world(out) == manifest


def test_two_builds_are_byte_identical(small_world, small_cfg, small_settings, tmp_path):
    _, manifest = small_world
    again = build_world(small_cfg, tmp_path, progress=False)
    assert again == manifest
    other = build_world(type(small_cfg)(seed=small_cfg.seed + 1, **small_settings), tmp_path / "other", progress=False)
    name = "candidates_train.parquet"
    assert other["files"][name]["sha256"] != manifest["files"][name]["sha256"]


def test_round_trip_and_contents(small_world, small_cfg):
    out, manifest = small_world
    for name, info in manifest["files"].items():
        table = read_table(out / name, info["table"])
        assert table.schema == SCHEMAS[info["table"]] and table.num_rows == info["rows"]
    cands = read_table(out / "candidates_test.parquet", "candidates").to_pylist()
    for row in cands:
        assert decode_png(row["image"]).size == (small_cfg.image_size,) * 2
        Scene.from_json(row["scene_json"])
        parse_prompt(row["prompt"])
        for d in DIMENSIONS:
            ratings = row[f"annotators_{d}"]
            assert len(ratings) == small_cfg.num_annotators
            assert row[f"human_{d}"] == pytest.approx(sum(sorted(ratings)[1:-1]) / (len(ratings) - 2))
    train = read_table(out / "candidates_train.parquet", "candidates").to_pylist()
    assert all(len(r[f"annotators_{d}"]) == 1 and r[f"annotators_{d}"][0] == r[f"label_{d}"]
               for r in train for d in DIMENSIONS)
    for row in read_table(out / "captions_train.parquet", "captions").to_pylist()[:5]:
        assert parse_description(row["description"]).background == Scene.from_json(row["scene_json"]).background


def test_pairs_are_same_prompt_with_different_labels(small_world):
    out, _ = small_world
    for split in ("train", "test", "heldout"):
        rows = read_table(out / f"candidates_{split}.parquet", "candidates").to_pylist()
        cands = {r["candidate_id"]: r for r in rows}
        pairs = read_table(out / f"pairs_{split}.parquet", "pairs").to_pylist()
        assert {p["dimension"] for p in pairs} == set(DIMENSIONS)
        for p in pairs:
            w, l = cands[p["winner_id"]], cands[p["loser_id"]]
            assert w["prompt_id"] == l["prompt_id"] == p["prompt_id"]
            d = p["dimension"]
            assert w[f"label_{d}"] == p["winner_label"] > p["loser_label"] == l[f"label_{d}"]
            assert p["gap"] == p["winner_label"] - p["loser_label"]


def test_split_hygiene(small_world):
    out, manifest = small_world
    held = {tuple(c) for c in manifest["heldout_combos"]}

    def combos(rows):
        return {(o["color"], o["shape"]) for r in rows for o in json.loads(r["scene_json"])["objects"]}

    prompts = {}
    for split in ("train", "test", "heldout"):
        rows = read_table(out / f"candidates_{split}.parquet", "candidates").to_pylist()
        prompts[split] = {r["prompt"] for r in rows}
        if split != "heldout":
            assert not combos(rows) & held
    assert not prompts["train"] & prompts["test"]
    assert all(parse_prompt(p).combos() & held for p in prompts["heldout"])
    for name in ("captions_train", "captions_test", "generator_train", "generator_test"):
        assert not combos(read_table(out / f"{name}.parquet", name.split("_")[0]).to_pylist()) & held
    gen = {s: {r["prompt"] for r in read_table(out / f"generator_{s}.parquet", "generator").to_pylist()}
           for s in ("train", "test")}
    assert not gen["train"] & gen["test"]


# ---- malformed input: the error names the file, the row and the column ----------------------------------


def _rows(out, name, kind):
    return read_table(out / name, kind).to_pylist()


def test_not_parquet(tmp_path):
    path = tmp_path / "junk.parquet"
    path.write_bytes(b"definitely not parquet")
    with pytest.raises(DataError, match=r"junk\.parquet.*row n/a.*column n/a.*not a readable Parquet"):
        read_table(path, "captions")
    with pytest.raises(DataError, match="not a readable Parquet"):
        read_table(tmp_path / "absent.parquet", "captions")


def test_missing_column_and_wrong_type(small_world, tmp_path):
    out, _ = small_world
    table = pq.read_table(out / "pairs_test.parquet")
    path = tmp_path / "pairs_missing.parquet"
    pq.write_table(table.drop(["gap"]), path)
    with pytest.raises(DataError, match=r"pairs_missing\.parquet.*row all.*column gap.*missing column"):
        read_table(path, "pairs")
    path = tmp_path / "pairs_type.parquet"
    pq.write_table(table.set_column(table.schema.get_field_index("winner_label"), "winner_label",
                                    pa.array([str(v) for v in table.column("winner_label").to_pylist()])), path)
    with pytest.raises(DataError, match=r"pairs_type\.parquet.*row all.*column winner_label.*type string"):
        read_table(path, "pairs")


@pytest.mark.parametrize("column,value,message", [
    ("image", b"\x89PNG\r\n\x1a\n garbage", "PNG"),
    ("scene_json", '{"background": "white"', "scene JSON"),
    ("defects_json", '{"sparkle": 0.2}', "unknown defect"),
    ("description", "background: white", "lacks"),
    ("split", "validation", "split"),
])
def test_bad_value_names_row_and_column(small_world, tmp_path, column, value, message):
    out, _ = small_world
    rows = _rows(out, "captions_test.parquet", "captions")
    rows[3][column] = value
    path = tmp_path / f"bad_{column}.parquet"
    write_table(rows, "captions", path)
    with pytest.raises(DataError, match=rf"bad_{column}\.parquet.*row 3, column {column}: .*{message}"):
        read_table(path, "captions")


def test_bad_scores_and_nulls(small_world, tmp_path):
    out, _ = small_world
    rows = _rows(out, "candidates_test.parquet", "candidates")
    rows[2]["label_realism"] = 3.7
    path = tmp_path / "bad_label.parquet"
    write_table(rows, "candidates", path)
    with pytest.raises(DataError, match=r"row 2, column label_realism: label 3.7"):
        read_table(path, "candidates")
    rows[2]["label_realism"], rows[5]["true_alignment"] = 3.5, 6.0
    write_table(rows, "candidates", path)
    with pytest.raises(DataError, match=r"row 5, column true_alignment: score 6.0"):
        read_table(path, "candidates")
    table = pq.read_table(out / "generator_test.parquet")
    prompts = table.column("prompt").to_pylist()
    prompts[4] = None
    path = tmp_path / "null.parquet"
    pq.write_table(table.set_column(table.schema.get_field_index("prompt"), "prompt", pa.array(prompts)), path)
    with pytest.raises(DataError, match=r"null\.parquet.*row 4, column prompt: null"):
        read_table(path, "generator")


def test_verify_world_detects_a_changed_file(small_world, small_cfg, tmp_path):
    build_world(small_cfg, tmp_path, progress=False)
    with (tmp_path / "pairs_test.parquet").open("ab") as f:
        f.write(b"x")
    with pytest.raises(DataError, match=r"pairs_test\.parquet.*sha256"):
        verify_world(tmp_path)


def test_import_is_light():
    code = ("import sys, zray.data; heavy = [m for m in ('ray', 'torch', 'transformers', 'vllm', 'diffusers') "
            "if m in sys.modules]; assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_head_rows_names_the_setting_that_asked_for_too_many(small_world):
    from zray.config import ConfigError
    from zray.data.parquet import head_rows

    path = small_world[0] / "generator_test.parquet"
    total = read_table(path, "generator").num_rows
    rows = head_rows(path, "generator", 2, "x.num_eval_prompts")
    assert [r["image_id"] for r in rows] == read_table(path, "generator").column("image_id").to_pylist()[:2]
    with pytest.raises(ConfigError, match=rf"x.num_eval_prompts={total + 1} is not allowed: generator_test.parquet "
                                          rf"has {total} rows; expected 1 to {total}"):
        head_rows(path, "generator", total + 1, "x.num_eval_prompts")
