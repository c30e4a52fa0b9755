"""Rubric files: dimensions and five anchors each from JSON or YAML, validated with errors naming the file,
the dimension and what is allowed."""

import json

import pytest

from zray.rubric import BUILTIN_RUBRIC, DIMENSIONS, RUBRICS, Rubric, load_rubric

FIVE = ["awful", "poor", "fair", "good", "superb"]


def test_builtin_is_the_default():
    assert load_rubric(None) is BUILTIN_RUBRIC
    assert BUILTIN_RUBRIC.dimensions == DIMENSIONS and BUILTIN_RUBRIC.anchors_of("realism") == RUBRICS["realism"]
    assert BUILTIN_RUBRIC.to_dict()["alignment"] == list(RUBRICS["alignment"])


def test_yaml_and_json_files_keep_their_order(tmp_path):
    (tmp_path / "r.yaml").write_text("dimensions:\n  sharpness: [a, b, c, d, e]\n  alignment:\n"
                                     + "".join(f"    - {t}\n" for t in FIVE))
    rubric = load_rubric(tmp_path / "r.yaml")
    assert rubric.dimensions == ("sharpness", "alignment") and rubric.anchors_of("alignment") == tuple(FIVE)
    assert rubric.source == str(tmp_path / "r.yaml")
    (tmp_path / "r.json").write_text(json.dumps({"dimensions": rubric.to_dict()}))
    assert load_rubric(tmp_path / "r.json").to_dict() == rubric.to_dict()


@pytest.mark.parametrize("content, fragment", [
    ({"dimensions": {"sharpness": FIVE[:4]}}, "dimension 'sharpness' anchors=('awful', 'poor', 'fair', 'good') are "
                                              "not allowed: expected five non-empty strings"),
    ({"dimensions": {"sharpness": FIVE[:4] + [" "]}}, "expected five non-empty strings"),
    ({"dimensions": {"Sharp Ness": FIVE}}, "dimension name 'Sharp Ness' is not allowed: expected lower-case"),
    ({"dimensions": {"sharpness": "blurry to sharp"}}, "expected a list of five non-empty strings"),
    ({"dimensions": {}}, "expected one or more dimensions"),
    ({"dims": {"sharpness": FIVE}}, "top level ['dims'] is not allowed: expected one key 'dimensions'"),
    ([FIVE], "top level list is not allowed"),
])
def test_bad_rubric_files_name_the_problem(tmp_path, content, fragment):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError) as info:
        load_rubric(path)
    assert f"rubric {str(path)!r}" in str(info.value) and fragment in str(info.value)


def test_unreadable_files_and_repeats(tmp_path):
    with pytest.raises(ValueError, match=r"expected a \.json, \.yaml or \.yml file"):
        load_rubric(tmp_path / "r.toml")
    with pytest.raises(ValueError, match="does not read"):
        load_rubric(tmp_path / "absent.yaml")
    (tmp_path / "r.yaml").write_text("dimensions: [unclosed\n")
    with pytest.raises(ValueError, match="does not parse as YAML"):
        load_rubric(tmp_path / "r.yaml")
    with pytest.raises(ValueError, match=r"dimensions \['a'\] repeat"):
        Rubric(("a", "a"), (tuple(FIVE), tuple(FIVE)))
