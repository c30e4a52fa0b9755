"""`zray data import` through the CLI: exit 0 with a summary, 1 with every bad row on stderr (nothing written),
2 for bad usage; `zray data` without a subcommand still builds the world (parsed, not run here)."""

import io
import json

from PIL import Image

from jobs.cli import build_parser, main
from zray.data.importers import read_imported


def _source(tmp_path):
    img = Image.new("RGB", (16, 16), "red")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    (tmp_path / "a.png").write_bytes(buf.getvalue())
    (tmp_path / "rubric.json").write_text(json.dumps({"dimensions": {"sharpness": list("abcde")}}))
    rows = [{"text": "a red square", "pic": "a.png", "sharp": [4, 4.5]},
            {"text": "a red square", "pic": "a.png", "sharp": 2},
            {"text": "a red square", "pic": "a.png", "sharp": 7}]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ["data", "import", str(tmp_path / "r.jsonl"), "--kind", "rated", "--rubric", str(tmp_path / "rubric.json"),
            "--map", "text=prompt,pic=image", "--map", "sharp=sharpness"]


def test_reject_then_skip(tmp_path, capsys):
    args = _source(tmp_path)
    assert main(args + ["--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"bad row: file '{tmp_path / 'r.jsonl'}', row 3, column sharp (mapped to sharpness): score is 7" in err
    assert "import rejected: 1 bad rows of 3" in err and not (tmp_path / "out").exists()
    assert main(args + ["--out", str(tmp_path / "out"), "--on-bad-row", "skip"]) == 0
    captured = capsys.readouterr()
    assert "skipped bad row: file" in captured.err and "imported 2 of 3 rows (1 bad rows skipped)" in captured.out
    pairs = read_imported(tmp_path / "out", "pairs").to_pylist()
    assert [(p["winner_id"], p["loser_id"], p["winner_label"]) for p in pairs] == [("img000001", "img000002", 4.0)]


def test_usage_errors_exit_2(tmp_path, capsys):
    args = _source(tmp_path)
    assert main(args + ["--out", str(tmp_path / "o"), "--map", "oops"]) == 2
    assert "expected SRC=DST" in capsys.readouterr().err
    assert main(args[:5] + ["--rubric", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "does not read" in capsys.readouterr().err
    parsed = build_parser().parse_args(["data", "--out", "x"])
    assert parsed.command == "data" and parsed.data_command is None and parsed.out == "x"
