"""What train-student and the generator stages read from an import (`zray.data.imported`): distillation inputs from
a scoring import or a rated import's train split (with the rubric's custom dimensions), the prompts of a prompts
import by split, and a clear error for an import of the wrong kind."""

import dataclasses
import io
import json

import pytest
from PIL import Image

from jobs.recipes import tiny_cpu
from zray.config import ConfigError, DataConfig
from zray.data.distill_inputs import SCHEMA
from zray.data.imported import imported_distill_inputs, imported_prompts, split_of
from zray.data.importers import import_data
from zray.rubric import BUILTIN_RUBRIC, Rubric
from zray.tasks.risd import input_requests

RUBRIC = Rubric((*BUILTIN_RUBRIC.dimensions, "composition"),
                (*BUILTIN_RUBRIC.anchors, ("chaotic", "awkward", "acceptable", "good", "masterful")), source="test")
TEST_FRAC = 0.25  # of grp0..grp5, grp1, grp3 and grp4 hash below it


def _png(shade: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (shade, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def _import(tmp, kind, rows, images=()):
    src = tmp / f"src_{kind}"
    src.mkdir()
    for name, shade in images:
        (src / name).write_bytes(_png(shade))
    (src / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    import_data(src / "r.jsonl", tmp / kind, kind=kind, rubric=RUBRIC)
    return DataConfig(dir=str(tmp / kind), test_frac=TEST_FRAC, heldout_frac=0.0)


@pytest.fixture(scope="module")
def imports(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("imports")
    rated = [{"prompt": f"prompt {g}", "prompt_id": f"grp{g}", "image": f"{g}_{k}.png", "image_id": f"i{g}{k}",
              "alignment": 4 - k, "realism": 3, "aesthetics": 3, "plausibility": 3, "composition": 2 + k}
             for g in range(6) for k in range(2)]
    scoring = [{"prompt": "a cat", "image": "0_0.png", "dimension": d} for d in ("composition", "realism")]
    prompts = [{"prompt": f"prompt {g}", "prompt_id": f"grp{g}"} for g in range(6)]
    files = [(f"{g}_{k}.png", 40 * g + k) for g in range(6) for k in range(2)]
    return {"rated": _import(tmp, "rated", rated, files), "scoring": _import(tmp, "scoring", scoring, files[:1]),
            "prompts": _import(tmp, "prompts", prompts)}


def test_distill_inputs_of_a_rated_import_are_its_train_images_in_each_dimension(imports):
    table = imported_distill_inputs(imports["rated"], ("alignment", "composition"))
    assert table.schema.names == SCHEMA.names
    train = [g for g in range(6) if split_of(f"grp{g}", TEST_FRAC, 0.0) == "train"]
    assert table.column("input_id").to_pylist() == [f"i{g}{k}-{d}" for g in train for k in range(2)
                                                    for d in ("alignment", "composition")]
    requests = input_requests(table.slice(0, 2).to_pydict(), RUBRIC)  # what RISD / OPD send the engines
    assert requests[0].anchors is None and requests[1].anchors == RUBRIC.anchors_of("composition")


def test_distill_inputs_of_a_scoring_import_keep_the_chosen_dimensions(imports):
    table = imported_distill_inputs(imports["scoring"], ("composition",))
    assert table.column("dimension").to_pylist() == ["composition"] and table.column("prompt").to_pylist() == ["a cat"]
    with pytest.raises(ConfigError, match=r"train_student.dimensions=\('aesthetics',\) leaves no input"):
        imported_distill_inputs(imports["scoring"], ("aesthetics",))


def test_prompts_by_split_and_wrong_kinds(imports):
    assert [r["prompt_id"] for r in imported_prompts(imports["prompts"], "test")] == ["grp1", "grp3", "grp4"]
    assert [r["prompt"] for r in imported_prompts(imports["prompts"], "train")] == ["prompt 0", "prompt 2",
                                                                                   "prompt 5"]
    with pytest.raises(ConfigError, match=r"data.dir=.* is not allowed for the generator stages .* 'rated' import; "
                                          r"expected a `zray data import --kind prompts` folder"):
        imported_prompts(imports["rated"], "train")
    with pytest.raises(ConfigError, match=r"is not allowed for train-student's distillation inputs: it is a "
                                          r"'prompts' import"):
        imported_distill_inputs(imports["prompts"], ("alignment",))


def test_train_student_reads_the_import_before_any_actor(imports, capsys):
    from jobs.train_student import student_data

    cfg = dataclasses.replace(tiny_cpu(), data=imports["rated"])
    cfg = dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, num_prompts=0))  # every test prompt
    data = student_data(cfg, ("sft", "risd"))
    assert data.rubric.dimensions == RUBRIC.dimensions  # empty train_student.dimensions: the import's rubric
    assert data.inputs.num_rows == 3 * 2 * 5 and set(data.pairs.column("dimension").to_pylist()) == {
        "alignment", "composition"}  # ties in the other three make no pair
    assert {r["prompt_id"] for r in data.eval_rows} == {"grp1", "grp3", "grp4"}
    cfg = dataclasses.replace(cfg, data=imports["scoring"],
                              train_student=dataclasses.replace(cfg.train_student, dimensions=("composition",)))
    data = student_data(cfg, ("risd",))
    assert data.eval_rows is None and data.rubric.dimensions == ("composition",) and data.inputs.num_rows == 1
    assert "holds no rated images: no evaluation" in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"not allowed for --method sft: it is a 'scoring' import"):
        student_data(cfg, ("sft",))
    with pytest.raises(ConfigError, match=r"train_student.dimensions=\('sharpness',\) is not allowed"):
        student_data(dataclasses.replace(cfg, train_student=dataclasses.replace(
            cfg.train_student, dimensions=("sharpness",))), ("risd",))


def test_student_dimensions_are_the_worlds_unless_a_data_dir_is_set():
    from zray.config import RunConfig, TrainStudentConfig

    custom = TrainStudentConfig(dimensions=("alignment", "composition"))
    with pytest.raises(ConfigError, match=r"train_student.dimensions=\('alignment', 'composition'\) is not allowed: "
                                          r"expected a subset of .*or set data.dir"):
        RunConfig(train_student=custom)
    assert RunConfig(train_student=custom, data=DataConfig(dir="x")).train_student.dimensions[1] == "composition"
    with pytest.raises(ConfigError, match="distinct"):
        TrainStudentConfig(dimensions=("alignment", "alignment"))
