"""zray.evaluation.reward_hacking: the student-vs-judge record, the gap relative to the first evaluation, the
threshold, and the plot."""

import numpy as np
import pytest

from zray.config import WorldConfig
from zray.data.corpus import generator_rows
from zray.data.render import decode_png
from zray.data.world import ALL_COMBOS
from zray.evaluation.reward_hacking import evaluation_record, gap, save_reward_vs_judge, widened, with_gaps


def _record(step, student, judge):
    return {"step": step, "student": {"alignment": student}, "student_reward": student, "judge": {"alignment": judge}}


def test_gap_is_relative_to_the_first_evaluation_by_hand():
    records = [_record(0, 3.0, 2.0), _record(10, 3.5, 2.25), _record(20, 4.5, 2.0), _record(30, 4.9, 2.1)]
    # raw gaps 1.0, 1.25, 2.5, 2.8 -> relative 0, 0.25, 1.5, 1.8
    assert [round(r["gap"], 6) for r in with_gaps(records)] == [0.0, 0.25, 1.5, 1.8]
    assert gap(records[1], records[0]) == pytest.approx(0.25)
    assert widened(records, 1.0)["step"] == 20  # the first past the threshold
    assert widened(records, 2.0) is None
    assert widened(records[:1], 0.1) is None and with_gaps([]) == []
    # the judge rising with the student is no hacking
    assert widened([_record(0, 3.0, 2.0), _record(1, 4.0, 3.0)], 0.5) is None
    with pytest.raises(ValueError, match="threshold=0 is not allowed"):
        widened(records, 0)


def test_evaluation_record_judges_images_and_plot(tmp_path):
    rows = generator_rows(WorldConfig(image_size=64, num_generator_images=4, num_generator_test_prompts=2),
                          ALL_COMBOS, lambda: None)["train"][:3]
    images, prompts = [decode_png(r["image"]) for r in rows], [r["prompt"] for r in rows]
    mu = np.array([[4.0, 2.0], [3.0, 2.0], [5.0, 2.0]])
    rec = evaluation_record(5, images, prompts, mu, ("realism", "alignment"), (0.5, 0.5))
    assert rec["step"] == 5 and rec["student"] == {"realism": 4.0, "alignment": 2.0}
    assert rec["student_reward"] == pytest.approx(3.0)
    assert rec["judge"]["alignment"] == pytest.approx(5.0) and rec["judge"]["num"] == 3.0  # clean renders
    assert rec["per_prompt"]["student_alignment"] == [2.0, 2.0, 2.0]
    assert rec["per_prompt"]["judge_alignment"] == [5.0, 5.0, 5.0]
    with pytest.raises(ValueError, match="expected 'alignment' among them"):
        evaluation_record(5, images, prompts, mu, ("realism", "aesthetics"), (0.5, 0.5))
    with pytest.raises(ValueError, match=r"expected \(3, 2\)"):
        evaluation_record(5, images, prompts, mu[:2], ("realism", "alignment"), (0.5, 0.5))
    later = {**rec, "step": 9, "student": {"realism": 4.0, "alignment": 3.0}}
    save_reward_vs_judge(tmp_path / "r.png", [rec, later], 0.5, "test",
                         history=[{"step": 1, "reward": 2.9}, {"step": 9, "reward": 3.1}])
    assert (tmp_path / "r.png").stat().st_size > 1000
