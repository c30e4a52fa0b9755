"""Bring your own data: a small foreign dataset (PIL drawings, JSONL ratings in another layout, two annotators,
a fifth dimension from a rubric file) imported and read back; every kind of bad row reported with its file, row,
column and why under reject and skip; CSV, folder + sidecar and Parquet with a mapping imported once each."""

import hashlib
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from zray.data import verify_world
from zray.data.distill_inputs import SCHEMA as DISTILL_SCHEMA
from zray.data.foreign import schema_for
from zray.data.importers import ImportRejected, import_data, parse_mapping, read_imported
from zray.data.pair_examples import COLUMNS as PAIR_EXAMPLE_COLUMNS
from zray.rubric import BUILTIN_RUBRIC, RUBRICS, load_rubric

MAP = ("caption=prompt,file=image,grp=prompt_id,id=image_id,align=alignment,real=realism,aes=aesthetics,"
       "plaus=plausibility,comp=composition")


def draw(color: str, shape: str, fmt: str = "PNG") -> bytes:
    img = Image.new("RGB", (32, 32), "white")
    box = (6, 6, 26, 26)
    (ImageDraw.Draw(img).ellipse if shape == "circle" else ImageDraw.Draw(img).rectangle)(box, fill=color)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def rubric_file(tmp_path):
    dims = {d: list(RUBRICS[d]) for d in BUILTIN_RUBRIC.dimensions}
    dims["composition"] = ["chaotic", "awkward", "acceptable", "good", "masterful"]
    path = tmp_path / "rubric.yaml"
    path.write_text("dimensions:\n" + "".join(f"  {d}: {json.dumps(a)}\n" for d, a in dims.items()))
    return path


# Ratings (two annotators), labels (mean, binned halves to even) and the expected pairs, checked by hand:
#   A [4, 5] -> 4.5, B [3.5, 4] -> 3.75 -> 4.0, C [4.5, 4.5] -> 4.5: alignment pairs (A > B), (C > B); A = C tie
#   composition A [2, 2.5] -> 2.25 -> 2.0, B 2.0, C [3, 3.5] -> 3.25 -> 3.0: (C > A), (C > B); A = B tie
#   g2: realism D 2.0, E [1, 1.5] -> 1.25 -> 1.0: (D > E); every other dimension ties.
ROWS = [
    dict(id="A", grp="g1", caption="a red circle", file="imgs/a.png", align=[4, 5], real=[3, 3], aes=[3, 3],
         plaus=[3, 3], comp=[2, 2.5], note="x"),
    dict(id="B", grp="g1", caption="a red circle", file="imgs/b.jpg", align=[3.5, 4.0], real=[3, 3], aes=[3, 3],
         plaus=[3, 3], comp=[2, 2]),
    dict(id="C", grp="g1", caption="a red circle", file="imgs/c.png", align=[4.5, 4.5], real=[3, 3], aes=[3, 3],
         plaus=[3, 3], comp=[3, 3.5]),
    dict(id="D", grp=2, caption="a green square", file="imgs/d.png", align=[5, 5], real=[2, 2], aes=[4, 4],
         plaus=[4, 4], comp=[4, 4]),
    dict(id="E", grp=2, caption="a green square", file="imgs/e.png", align=[5, 5], real=[1, 1.5], aes=[4, 4],
         plaus=[4, 4], comp=[4, 4]),
]
EXPECTED_PAIRS = [("g1", "alignment", "A", "B", 4.5, 4.0), ("g1", "alignment", "C", "B", 4.5, 4.0),
                  ("g1", "composition", "C", "A", 3.0, 2.0), ("g1", "composition", "C", "B", 3.0, 2.0),
                  ("2", "realism", "D", "E", 2.0, 1.0)]


def write_source(folder, rows):
    (folder / "imgs").mkdir(parents=True, exist_ok=True)
    images = {"a.png": draw("red", "circle"), "b.jpg": draw("blue", "circle", "JPEG"), "c.png": draw("red", "square"),
              "d.png": draw("green", "square"), "e.png": draw("green", "circle"), "broken.png": b"\x89PNG not really"}
    for name, data in images.items():
        (folder / "imgs" / name).write_bytes(data)
    path = folder / "ratings.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_import_with_a_custom_rubric(tmp_path, rubric_file):
    source = write_source(tmp_path / "src", ROWS)
    rubric = load_rubric(rubric_file)
    report = import_data(source, tmp_path / "out", kind="rated", rubric=rubric, mapping=parse_mapping([MAP]))
    assert report.errors == []
    rated = read_imported(tmp_path / "out", "rated_images").to_pylist()
    assert [r["image_id"] for r in rated] == ["A", "B", "C", "D", "E"]
    assert [r["prompt_id"] for r in rated] == ["g1", "g1", "g1", "2", "2"]
    assert rated[1]["image"] == (tmp_path / "src/imgs/b.jpg").read_bytes()  # JPEG stored as given
    assert rated[1]["annotators_alignment"] == [3.5, 4.0] and rated[1]["human_alignment"] == 3.75
    assert rated[1]["label_alignment"] == 4.0 and rated[2]["label_composition"] == 3.0
    pairs = read_imported(tmp_path / "out", "pairs").to_pylist()
    assert [(p["prompt_id"], p["dimension"], p["winner_id"], p["loser_id"], p["winner_label"], p["loser_label"])
            for p in pairs] == EXPECTED_PAIRS
    by_id = {r["image_id"]: r for r in rated}
    assert all(p["winner_image"] == by_id[p["winner_id"]]["image"] and p["loser_image"] == by_id[p["loser_id"]]["image"]
               and p["prompt"] == by_id[p["winner_id"]]["prompt"] for p in pairs)
    assert set(PAIR_EXAMPLE_COLUMNS) <= set(pairs[0])  # what GDSO trains on
    manifest = verify_world(tmp_path / "out")
    assert manifest["counts"] == {"rated_images.parquet": 5, "pairs.parquet": 5, "bad_rows.jsonl": 0}
    for name, info in manifest["files"].items():
        assert info["sha256"] == hashlib.sha256((tmp_path / "out" / name).read_bytes()).hexdigest()
    assert manifest["source"]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert manifest["rubric"]["dimensions"]["composition"][4] == "masterful"
    assert manifest["ignored_columns"] == ["note"] and manifest["bad_rows"] == 0 and manifest["kind"] == "rated"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["bad_rows.jsonl", "manifest.json",
                                                                   "pairs.parquet", "rated_images.parquet"]


def _bad(row, **change):
    out = {k: v for k, v in ROWS[row].items() if k not in change.get("drop", ())}
    out.update({k: v for k, v in change.items() if k != "drop"})
    return out


# (bad source row, source column, fragment of why); the bad rows are lines 6.. of the file
BAD_RATED = [
    (_bad(0, id="F", drop=["real"]), "real", "missing column"),
    (_bad(0, id="G", align=[4, 7]), "align", "annotator score 2 of 2 is 7, outside the scale 1 to 5"),
    (_bad(0, id="H", comp=3.3), "comp", "score is 3.3, not on the half-point scale 1.0, 1.5, ..., 5.0"),
    (_bad(0, id="I", file="imgs/broken.png"), "file", "image file 'imgs/broken.png': not a decodable image"),
    (_bad(0, id="J", file="imgs/nope.png"), "file", "image file 'imgs/nope.png' does not exist"),
    (_bad(0, id="K", caption="  "), "caption", "empty prompt"),
    (_bad(0, id="L", aes="4"), "aes", "wrong type: score is str '4', expected a number"),
    (_bad(0, id="A"), "id", "image_id 'A' repeats row 1"),
    (_bad(0, id="M", grp="g1", caption="another"), "grp", "prompt_id 'g1' names another prompt at row 1"),
    (_bad(0, id="N", caption=None), "caption", "missing value (null)"),
]


@pytest.mark.parametrize("on_bad_row", ["reject", "skip"])
def test_bad_rows_are_reported_with_file_row_column_and_why(tmp_path, rubric_file, on_bad_row):
    source = write_source(tmp_path / "src", ROWS + [bad for bad, _, _ in BAD_RATED])
    out = tmp_path / "out"
    kwargs = dict(kind="rated", rubric=load_rubric(rubric_file), mapping=parse_mapping([MAP]), on_bad_row=on_bad_row)
    if on_bad_row == "reject":
        with pytest.raises(ImportRejected, match=r"10 bad rows of 15") as info:
            import_data(source, out, **kwargs)
        errors = info.value.errors
        assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["rubric.yaml", "src"]
    else:
        report = import_data(source, out, **kwargs)
        errors = report.errors
        assert report.manifest["bad_rows"] == 10 and report.manifest["rows_read"] == 15
        assert len(read_imported(out, "rated_images")) == 5 and len(read_imported(out, "pairs")) == 5
        lines = [json.loads(line) for line in (out / "bad_rows.jsonl").read_text().splitlines()]
        assert lines == [e.to_dict() for e in errors]
    assert [(e.file, e.row, e.column) for e in errors] == [(str(source), 6 + k, col)
                                                          for k, (_, col, _) in enumerate(BAD_RATED)]
    assert errors[0].field == "realism" and errors[0].to_dict()["field"] == "realism"
    for error, (_, _, why) in zip(errors, BAD_RATED):
        assert why in error.why, (error, why)
        assert str(error).startswith(f"file {str(source)!r}, row {error.row}, column {error.column} (mapped to ")


def test_scoring_rows_unknown_dimension_and_wrong_types(tmp_path):
    src = tmp_path / "src"
    write_source(src, [])
    rows = [{"prompt": "a red circle", "image": "imgs/a.png", "dimension": "realism"},
            {"prompt": "a red circle", "image": "imgs/a.png", "dimension": "beauty"},
            {"prompt": 5, "image": "imgs/a.png", "dimension": "realism"},
            {"prompt": "a red circle", "image": 12, "dimension": "realism"},
            {"prompt": "a red circle", "image": "imgs/a.png"}]
    (src / "score.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n[1, 2]\n{not json\n")
    report = import_data(src / "score.jsonl", tmp_path / "out", kind="scoring", on_bad_row="skip")
    assert [(e.row, e.column) for e in report.errors] == [(2, "dimension"), (3, "prompt"), (4, "image"),
                                                          (5, "dimension"), (7, None), (8, None)]
    whys = [e.why for e in report.errors]
    assert "dimension 'beauty' is not in the rubric ('alignment'" in whys[0]
    assert whys[1] == "wrong type: int 5, expected a string" and "expected image bytes or a path" in whys[2]
    assert all(e.field is None for e in report.errors)  # no mapping: the column is the field
    assert whys[3] == "missing column" and "expected an object" in whys[4] and "not a JSON line" in whys[5]
    table = read_imported(tmp_path / "out", "scoring_inputs")
    assert table.schema.names == DISTILL_SCHEMA.names and table.to_pylist()[0]["input_id"] == "in000001"


def test_csv_import_and_a_missing_header_column(tmp_path):
    src = tmp_path / "src"
    write_source(src, [])
    dims = BUILTIN_RUBRIC.dimensions
    lines = ["prompt,image," + ",".join(dims), "a red circle,imgs/a.png,3.5;4,5,4,4",
             "a red circle,imgs/c.png,2,5,4,4.5", "a red circle,imgs/d.png,2,5,four,4", "a red circle,imgs/e.png,,5,4,4"]
    (src / "r.csv").write_text("\n".join(lines) + "\n")
    report = import_data(src / "r.csv", tmp_path / "out", kind="rated", on_bad_row="skip")
    assert [(e.row, e.column, e.why) for e in report.errors] == [
        (3, "aesthetics", "score is 'four', not a decimal number"), (4, "alignment", "empty cell")]
    rated = read_imported(tmp_path / "out", "rated_images").to_pylist()
    assert rated[0]["annotators_alignment"] == [3.5, 4.0] and rated[1]["label_plausibility"] == 4.5
    assert [(p["dimension"], p["winner_id"]) for p in read_imported(tmp_path / "out", "pairs").to_pylist()] == [
        ("alignment", "img000001"), ("plausibility", "img000002")]
    (src / "short.csv").write_text("prompt,picture\na red circle,imgs/a.png\n")
    with pytest.raises(ImportRejected) as info:  # a whole-file problem: fatal under skip too
        import_data(src / "short.csv", tmp_path / "out2", kind="rated", on_bad_row="skip")
    assert [(e.row, e.column) for e in info.value.errors] == [(None, "image")] + [(None, d) for d in dims]
    assert not (tmp_path / "out2").exists()


def test_folder_with_a_sidecar(tmp_path):
    src = tmp_path / "folder"
    write_source(src, [])
    (src / "ratings.jsonl").unlink()
    rows = [{"file_name": "imgs/a.png", "text": "a red circle", "dim": "alignment"},
            {"file_name": "imgs/b.jpg", "text": "a red circle", "dim": "realism"}]
    (src / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = import_data(src, tmp_path / "out", kind="scoring",
                         mapping=parse_mapping(["file_name=image", "text=prompt", "dim=dimension"]))
    assert report.manifest["source"]["format"] == "folder" and report.manifest["unreferenced_images"] == 4
    table = read_imported(tmp_path / "out", "scoring_inputs").to_pylist()
    assert [r["dimension"] for r in table] == ["alignment", "realism"]
    assert table[1]["image"] == (src / "imgs/b.jpg").read_bytes()


def test_parquet_pairs_with_a_column_mapping(tmp_path):
    left, right = draw("red", "circle"), draw("red", "square")
    pq.write_table(pa.table({"query": ["a red circle"] * 3, "left": [left] * 3, "right": [right] * 3,
                             "aspect": ["alignment", "realism", "alignment"], "pick": ["a", "b", "c"],
                             "sa": [4.5, None, None], "sb": [3.0, None, None]}), tmp_path / "p.parquet")
    mapping = parse_mapping(["query=prompt,left=image_a,right=image_b", "aspect=dimension", "pick=winner",
                             "sa=label_a,sb=label_b"])
    report = import_data(tmp_path / "p.parquet", tmp_path / "out", kind="pairs", mapping=mapping, on_bad_row="skip")
    assert [(e.row, e.column, e.why) for e in report.errors] == [
        (3, "pick", "winner 'c' is not allowed: expected 'a' or 'b'")]
    pairs = read_imported(tmp_path / "out", "pairs").to_pylist()
    assert (pairs[0]["winner_image"], pairs[0]["winner_label"], pairs[0]["loser_label"]) == (left, 4.5, 3.0)
    assert (pairs[1]["winner_image"], pairs[1]["loser_image"], pairs[1]["winner_label"]) == (right, left, None)
    assert pairs[0]["winner_id"] is None and pairs[1]["pair_id"] == "pair000002"


def test_prompts_and_usage_errors(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "a cat"}\n{"prompt": "a dog", "prompt_id": 7}\n{"prompt": "a cat"}\n')
    report = import_data(tmp_path / "p.jsonl", tmp_path / "out", kind="prompts", on_bad_row="skip")
    assert [(e.row, e.column) for e in report.errors] == [(3, "prompt_id")] and "repeats row 1" in report.errors[0].why
    assert read_imported(tmp_path / "out", "prompts").column("prompt_id").to_pylist()[1] == "7"
    with pytest.raises(FileExistsError, match="not an empty folder"):
        import_data(tmp_path / "p.jsonl", tmp_path / "out", kind="prompts")
    with pytest.raises(ValueError, match=r"--map onto \['picture'\] is not allowed"):
        import_data(tmp_path / "p.jsonl", tmp_path / "o2", kind="prompts", mapping={"x": "picture"})
    report = import_data(tmp_path / "p.jsonl", tmp_path / "o4", kind="prompts", mapping={"prompt_id": "prompt"},
                         on_bad_row="skip")  # row 2 has both prompt_id (mapped to prompt) and prompt
    assert [(e.row, e.column, e.why) for e in report.errors][0] == (
        2, None, "columns 'prompt_id' (mapped to 'prompt') and 'prompt' are both present: expected one source for "
                 "a field")
    with pytest.raises(ValueError, match="expected SRC=DST"):
        parse_mapping(["prompt"])
    with pytest.raises(ValueError, match="format auto does not know the suffix '.txt'"):
        (tmp_path / "p.txt").write_text("")
        import_data(tmp_path / "p.txt", tmp_path / "o3", kind="prompts")
    assert schema_for("prompts", BUILTIN_RUBRIC).names == ["prompt_id", "prompt"]
