"""The worked example of the README ("Your own data"), end to end through the CLI: a small foreign dataset (PIL
drawings, JSONL ratings in a layout unlike ours, two annotators per image, a custom fifth dimension) imported,
a tiny teacher trained on its train split (SFT, the cheapest method), then evaluated on its test split with
`zray evaluate`: the table has a row for the custom dimension."""

import io
import json

import pytest
from PIL import Image, ImageDraw

from jobs.cli import main
from zray.data.imported import split_of
from zray.rubric import RUBRICS

COLORS = ("red", "blue", "green", "orange", "purple", "black")
COMPOSITION = ["chaotic", "awkward", "acceptable", "good", "masterful"]
TEST_FRAC = 0.25  # of grp0..grp5, grp1, grp3 and grp4 hash below it: the test split; the rest train


def png(color: str, shape: str, size: int) -> bytes:
    img = Image.new("RGB", (32, 32), "white")
    box = (16 - size, 16 - size, 16 + size, 16 + size)
    (ImageDraw.Draw(img).ellipse if shape == "circle" else ImageDraw.Draw(img).rectangle)(box, fill=color)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_foreign_dataset(folder):
    """ratings.jsonl (caption / file / grp / scores.<dim> as two annotators' lists), imgs/*.png, rubric.json."""
    (folder / "imgs").mkdir(parents=True)
    lines = []
    for g, color in enumerate(COLORS):
        for k, (shape, size) in enumerate((("circle", 10), ("square", 5))):
            name = f"imgs/g{g}_{k}.png"
            (folder / name).write_bytes(png(color, shape, size))
            good = k == 0  # the big circle is the better image in every dimension but one
            lines.append({"caption": f"a {color} circle", "file": name, "grp": f"grp{g}",
                          "al": [4.5, 5] if good else [2, 2.5], "re": [4, 4] if good else [3, 3.5],
                          "ae": [3.5, 4] if good else [2.5, 2.5], "pl": [4, 4] if good else [4, 4],
                          "co": [2, 3] if good else [4, 4.5], "rater_note": "ok"})
    (folder / "ratings.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    rubric = {d: list(RUBRICS[d]) for d in ("alignment", "realism", "aesthetics", "plausibility")}
    (folder / "rubric.json").write_text(json.dumps({"dimensions": {**rubric, "composition": COMPOSITION}}))
    return folder / "ratings.jsonl", folder / "rubric.json"


def test_import_train_and_evaluate_a_teacher_on_own_data(tmp_path, sharp_teacher_dir, ray_session, capsys):
    pytest.importorskip("deepspeed")
    assert [split_of(f"grp{g}", TEST_FRAC, 0.0) for g in range(6)] == ["train", "test", "train", "test", "test",
                                                                       "train"]
    source, rubric = write_foreign_dataset(tmp_path / "src")
    imported = tmp_path / "mine"
    assert main(["data", "import", str(source), "--out", str(imported), "--kind", "rated", "--rubric", str(rubric),
                 "--map", "caption=prompt,file=image,grp=prompt_id,al=alignment,re=realism,ae=aesthetics",
                 "--map", "pl=plausibility,co=composition"]) == 0
    run = tmp_path / "run"
    sets = [f"out_dir={run}", f"data.dir={imported}", f"data.test_frac={TEST_FRAC}", "data.heldout_frac=0",
            f"train_teacher.base_model={sharp_teacher_dir}", "evaluate.num_prompts=0"]  # 0: every test prompt
    capsys.readouterr()

    assert main(["train-teacher", "--method", "sft", *[a for s in sets for a in ("--set", s)]]) == 0
    printed = capsys.readouterr().out
    record = json.loads((run / "train_teacher" / "sft" / "metrics.json").read_text())
    assert record["config"]["dimensions"] == ["alignment", "realism", "aesthetics", "plausibility", "composition"]
    assert record["training"]["steps"] == 2 and "| composition |" in printed
    assert "oracle" not in (run / "train_teacher" / "results.md").read_text()  # no true scores in own data

    final = run / "train_teacher" / "sft" / "final"
    assert main(["evaluate", "--model", str(final), "--name", "mine", *[a for s in sets for a in ("--set", s)]]) == 0
    printed = capsys.readouterr().out
    table = (run / "evaluate" / "mine" / "table.md").read_text()
    assert "| composition |" in printed and "| composition |" in table
    metrics = json.loads((run / "evaluate" / "mine" / "metrics.json").read_text())
    assert metrics["data"] == str(imported) and metrics["num_candidates"] == 6  # 3 test prompts x 2 images
    composition = metrics["dimensions"]["composition"]
    assert composition["num_pairs"] == 3 and composition["num_candidates"] == 6  # one pair per test prompt
    assert 0.0 <= composition["hpa"] <= 1.0
    assert metrics["dimensions"]["plausibility"]["num_pairs"] == 0  # ties make no pair
