"""Imported data as the reward stages read it (`zray.data.imported`): the prompt-hash split, the pairs and rated
images of a split, the rubric from the manifest in its order, and clear errors for bad settings."""

import dataclasses
import io
import json

import pytest
from PIL import Image

from zray.config import ConfigError, DataConfig, RunConfig, TrainTeacherConfig
from zray.data.imported import data_rubric, imported_pairs, imported_rows, select_dimensions, split_of
from zray.data.importers import import_data
from zray.data.pair_examples import COLUMNS
from zray.rubric import BUILTIN_RUBRIC, RUBRICS, Rubric

RUBRIC = Rubric((*BUILTIN_RUBRIC.dimensions, "composition"),
                (*BUILTIN_RUBRIC.anchors, ("chaotic", "awkward", "acceptable", "good", "masterful")), source="test")


def _png(shade: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (shade, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """8 prompts x 2 images; image 0 better in alignment and composition, a tie elsewhere."""
    src = tmp_path_factory.mktemp("src")
    rows = []
    for g in range(8):
        for k in range(2):
            (src / f"{g}_{k}.png").write_bytes(_png(40 * g + k))
            rows.append({"prompt": f"prompt {g}", "prompt_id": f"grp{g}", "image": f"{g}_{k}.png",
                         "alignment": [4, 5] if k == 0 else [2, 2], "realism": 3, "aesthetics": 3,
                         "plausibility": 3, "composition": [5, 4.5] if k == 0 else [1, 1.5]})
    (src / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path_factory.mktemp("imp") / "mine"
    import_data(src / "r.jsonl", out, kind="rated", rubric=RUBRIC)
    return out


def test_split_is_a_deterministic_hash_of_the_prompt_id():
    ids = [f"p{i}" for i in range(4000)]
    splits = [split_of(p, 0.2, 0.1) for p in ids]
    assert splits == [split_of(p, 0.2, 0.1) for p in ids]  # nothing but the id decides
    for name, frac in (("test", 0.2), ("heldout", 0.1), ("train", 0.7)):
        assert abs(splits.count(name) / len(ids) - frac) < 0.03
    # growing the test fraction only moves prompts from heldout / train into test
    wider = [split_of(p, 0.3, 0.1) for p in ids]
    assert all(w == "test" for s, w in zip(splits, wider) if s == "test")


def test_pairs_and_rows_of_a_split(imported):
    data = DataConfig(dir=str(imported), test_frac=0.25, heldout_frac=0.0)
    assert data_rubric(data).dimensions == RUBRIC.dimensions  # the manifest keeps the rubric's order
    assert data_rubric(DataConfig()) is BUILTIN_RUBRIC
    test_ids = {f"grp{g}" for g in range(8) if split_of(f"grp{g}", 0.25, 0.0) == "test"}
    assert 0 < len(test_ids) < 8
    pairs = imported_pairs(data, "train", ("alignment", "composition"))
    assert pairs.column_names == list(COLUMNS)
    assert not set(pairs.column("prompt_id").to_pylist()) & test_ids
    assert pairs.num_rows == 2 * (8 - len(test_ids))  # one pair per prompt in each of the two dimensions
    assert set(pairs.column("dimension").to_pylist()) == {"alignment", "composition"}
    rows = imported_rows(data, "test")
    assert {r["prompt_id"] for r in rows} == test_ids and len(rows) == 2 * len(test_ids)
    assert rows[0]["annotators_composition"] == [5.0, 4.5] and rows[0]["human_composition"] == 4.75
    assert rows[0]["candidate_id"] and isinstance(rows[0]["image"], bytes)


def test_bad_settings_are_clear_errors(imported, tmp_path):
    data = DataConfig(dir=str(imported), test_frac=0.01, heldout_frac=0.0)
    with pytest.raises(ConfigError, match=r"data.test_frac=0.01 leaves the test split .* without rated images"):
        imported_rows(data, "test")
    with pytest.raises(ConfigError, match=r"data.dir=.* is not allowed: it does not exist"):
        data_rubric(DataConfig(dir=str(tmp_path / "nope")))
    with pytest.raises(ConfigError, match=r"train_teacher.dimensions=\('colour',\) is not allowed: \['colour'\] not "
                                          r"in the rubric .*'composition'\)"):
        select_dimensions(("colour",), RUBRIC, "train_teacher.dimensions")
    assert select_dimensions((), RUBRIC, "x") == RUBRIC.dimensions
    for kwargs, field in ((dict(test_frac=0.0), "test_frac"), (dict(test_frac=0.6, heldout_frac=0.4), "heldout_frac"),
                          (dict(heldout_frac=-0.1), "heldout_frac")):
        with pytest.raises(ConfigError, match=f"DataConfig.{field}="):
            DataConfig(**kwargs)


def test_teacher_dimensions_are_the_worlds_unless_a_data_dir_is_set():
    custom = TrainTeacherConfig(dimensions=("alignment", "composition"))
    with pytest.raises(ConfigError, match=r"train_teacher.dimensions=\('alignment', 'composition'\) is not allowed: "
                                          r"expected a subset of \('alignment', .*or set data.dir"):
        RunConfig(train_teacher=custom)
    cfg = RunConfig(train_teacher=custom, data=DataConfig(dir="data/mine"))  # checked against its rubric when read
    assert dataclasses.replace(cfg, data=DataConfig(dir="x")).train_teacher.dimensions == ("alignment", "composition")
    with pytest.raises(ConfigError, match="distinct"):
        TrainTeacherConfig(dimensions=("alignment", "alignment"))
    assert RUBRICS["alignment"] == RUBRIC.anchors_of("alignment") and RUBRIC.anchors_for("alignment") is None
