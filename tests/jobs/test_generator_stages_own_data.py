"""The generator stages on your own data (issue 19): settings a prompts import cannot serve are refused with the
setting named, the reward's dimensions come from its rubric (zray_rubric.json, custom anchors in the scoring
prompt), and the judge-free evaluation pieces (student-only records, summary, table, grid). No job run here: one
reward-finetune run on a prompts import takes over a minute on a loaded CPU, past the suite's budget."""

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from jobs.recipes import tiny_cpu
from zray.config import ConfigError, DataConfig
from zray.data.importers import import_data
from zray.rubric import BUILTIN_RUBRIC, Rubric

RUBRIC = Rubric(("alignment", "composition"), (BUILTIN_RUBRIC.anchors[0], ("chaotic", "awkward", "acceptable", "good",
                                                                          "masterful")), source="test")


@pytest.fixture(scope="module")
def prompts_import(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("own_prompts")
    rows = [{"prompt": f"a {c} kite over a lake", "prompt_id": f"k{i}"} for i, c in enumerate(
        ("red", "blue", "green", "white", "black", "amber", "violet", "grey", "pink", "teal"))]
    (tmp / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    import_data(tmp / "p.jsonl", tmp / "imp", kind="prompts")
    return str(tmp / "imp")


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    """A tiny student reward recording a custom rubric (alignment + composition)."""
    from zray.models.tiny import build_tiny_vlm
    from zray.models.vlm import write_rubric_file

    cfg = tiny_cpu()
    path = build_tiny_vlm(cfg.student, tmp_path_factory.mktemp("own_reward") / "student",
                          image_size=cfg.world.image_size)
    write_rubric_file(path, RUBRIC)
    return str(path)


def _cfg(out_dir, data_dir="", **changes):
    cfg = dataclasses.replace(tiny_cpu(), out_dir=str(out_dir), data=DataConfig(dir=data_dir, test_frac=0.3))
    return dataclasses.replace(cfg, reward_finetune=dataclasses.replace(cfg.reward_finetune, **changes))


def test_settings_an_import_cannot_serve_are_refused(tmp_path, prompts_import):
    from jobs.distill_generator import check_import_variants
    from jobs.reward_finetune import run_reward_finetune
    from zray.evaluation.reward_hacking import judge_watch

    with pytest.raises(ConfigError, match=r"reward_finetune.on_gap='stop' is not allowed with data.dir=.*expected "
                                          r"on_gap='warn'"):
        run_reward_finetune(_cfg(tmp_path, prompts_import))  # before any input dir is looked for
    with pytest.raises(ConfigError, match=r"reward_finetune.fm_weight=0.5 is not allowed with data.dir"):
        run_reward_finetune(_cfg(tmp_path, prompts_import, on_gap="warn", fm_weight=0.5))
    assert judge_watch(prompts_import, "warn", ("composition",)) is False
    assert judge_watch("", "stop", ("alignment", "realism")) is True
    with pytest.raises(ConfigError, match=r"reward_finetune.dimensions=\('realism',\) is not allowed on the Shapes "
                                          r"world: expected 'alignment' among them"):
        judge_watch("", "stop", ("realism",))
    cfg = _cfg(tmp_path, prompts_import)
    check_import_variants(cfg, ("turbo", "shared", "detached", "no_step1"))
    with pytest.raises(ConfigError, match=r"distill_generator.variants=\('turbo', 'renders'\) is not allowed with "
                                          r"data.dir=.*a prompts import has none"):
        check_import_variants(cfg, ("turbo", "renders"))
    renders = dataclasses.replace(cfg, distill_generator=dataclasses.replace(
        cfg.distill_generator, turbo=dataclasses.replace(cfg.distill_generator.turbo, real_data="renders")))
    with pytest.raises(ConfigError, match=r"distill_generator.turbo.real_data='renders' is not allowed"):
        check_import_variants(renders, ("turbo",))
    check_import_variants(_cfg(tmp_path), ("renders",))  # the Shapes world has renders


def test_reward_dimensions_come_from_its_rubric(reward_dir):
    from zray.models.reward import DifferentiableReward
    from zray.tasks.reward_grad import reward_dimensions

    rcfg = tiny_cpu().reward_finetune
    assert reward_dimensions(dataclasses.replace(rcfg, dimensions=()), RUBRIC) == (RUBRIC.dimensions, [0.5, 0.5])
    assert reward_dimensions(dataclasses.replace(rcfg, dimensions=("composition",), weights=(2.0,)), RUBRIC) == \
        (("composition",), [2.0])
    with pytest.raises(ConfigError, match=r"reward_finetune.dimensions=\('alignment', 'realism', 'aesthetics', "
                                          r"'plausibility'\) is not allowed: \['realism', 'aesthetics', "
                                          r"'plausibility'\] not in the reward's rubric \(.*\); expected a subset of "
                                          r"\('alignment', 'composition'\)"):
        reward_dimensions(rcfg, RUBRIC)  # the recipe's built-in four
    with pytest.raises(ConfigError, match=r"reward_finetune.weights=\(1.0, 2.0, 3.0\) is not allowed: expected 2 "
                                          r"finite floats, one per dimension of \('alignment', 'composition'\)"):
        reward_dimensions(dataclasses.replace(rcfg, dimensions=(), weights=(1.0, 2.0, 3.0)), RUBRIC)
    reward = DifferentiableReward(reward_dir)  # its zray_rubric.json: both dimensions, composition with its anchors
    assert reward.dimensions == RUBRIC.dimensions and reward.anchors == {"alignment": None,
                                                                         "composition": RUBRIC.anchors[1]}
    ids = reward.text_inputs(["a red kite"], "composition", 4)["input_ids"][0]
    assert "masterful" in reward.processor.tokenizer.decode(ids)
    with pytest.raises(ValueError, match=r"dimension='realism' is not allowed: expected one of the reward's rubric"):
        DifferentiableReward(reward_dir, ("realism",))


def test_judge_free_records_table_grid_and_summary(tmp_path):
    from jobs.reward_finetune import summary_markdown
    from zray.evaluation.reward_hacking import save_reward_vs_judge, student_record
    from zray.evaluation.turbo import gap_closed_to_teacher, results_markdown, save_variant_grid, unjudged_metrics

    mu = np.array([[3.0, 4.0], [2.0, 5.0]])
    records = [student_record(0, mu, ("alignment", "composition"), (0.5, 0.5)),
               student_record(2, mu + 0.5, ("alignment", "composition"), (0.5, 0.5))]
    assert records[0]["student_reward"] == pytest.approx(3.5) and records[0]["per_prompt"]["student_reward"] == \
        [3.5, 3.5] and "judge" not in records[0]
    save_reward_vs_judge(tmp_path / "r.png", records, 0.5, "t", [{"step": 1, "reward": 3.6}])
    assert (tmp_path / "r.png").stat().st_size > 0
    record = {"generator": "base", "generator_dir": "g", "reward_dir": "r", "final_dir": "f", "steps": 2,
              "train_s": 6.0, "judge_watch": False, "data_dir": "imp", "evaluations": records, "hacking": None,
              "grid_columns": ["base 8-step", "base + reward grad"],
              "config": {"reward_finetune": {"finetune": "lora", "on_gap": "warn"}}}
    summary = summary_markdown(record, 0.5)
    assert "| 2 | 4.000 | 3.000 | 5.000 |" in summary and "no reward-hacking watch" in summary

    rng = np.random.default_rng(0)
    images = {name: [Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(3)]
              for name in ("teacher 8-step", "naive 2-step", "turbo")}
    refs = {k: {"metrics": {**unjudged_metrics(images[n], images["teacher 8-step"]), "steps": s}}
            for k, n, s in (("teacher", "teacher 8-step", 8), ("two_step", "naive 2-step", 2))}
    turbo = unjudged_metrics(images["turbo"], images["teacher 8-step"])
    assert refs["teacher"]["metrics"]["frechet_to_teacher"] == pytest.approx(0.0, abs=1e-6)
    rows = {"teacher 8-step": refs["teacher"]["metrics"], "naive 2-step": refs["two_step"]["metrics"],
            "turbo": {**turbo, "steps": 2, **gap_closed_to_teacher(turbo, refs), "train_s": 60.0}}
    table = results_markdown(rows, num_prompts=3, judged=False)
    assert "| generator | steps | Frechet to teacher | gap closed (Frechet to teacher) | train min |" in table
    assert "main colour, alignment, GSB and the gap closed against renders are not measured" in table
    assert "| turbo | 2 |" in table and "| 1.0 |" in table
    save_variant_grid(tmp_path / "g.png", ["a red kite"] * 3, images, 3, judged=False)  # no judge call
    assert (tmp_path / "g.png").stat().st_size > 0

