"""zray.evaluation.reward_hacking: the student-vs-judge record, the gap relative to the first evaluation, the
threshold, GSB against the first evaluation, and the plot."""

import numpy as np
import pytest

from zray.config import WorldConfig
from zray.data.corpus import generator_rows
from zray.data.render import decode_png
from zray.data.world import ALL_COMBOS
from zray.evaluation.reward_hacking import (alarm, decline, evaluation_record, gap, gsb_vs_first, judge_verdicts,
                                            save_reward_vs_judge, watched, with_declines, with_gaps, with_gsb)


def _record(step, student, judge):
    return {"step": step, "student": {"alignment": student}, "student_reward": student, "judge": {"alignment": judge}}


def test_gap_is_relative_to_the_first_evaluation_by_hand():
    records = [_record(0, 3.0, 2.0), _record(10, 3.5, 2.25), _record(20, 4.5, 2.0), _record(30, 4.9, 2.1)]
    # raw gaps 1.0, 1.25, 2.5, 2.8 -> relative 0, 0.25, 1.5, 1.8
    assert [round(r["gap"], 6) for r in with_gaps(records)] == [0.0, 0.25, 1.5, 1.8]
    assert gap(records[1], records[0]) == pytest.approx(0.25)
    assert alarm(records, 1.0, 0)[0]["step"] == 20  # the first past the threshold
    assert alarm(records, 2.0, 0) is None
    assert alarm(records[:1], 0.1, 0) is None and with_gaps([]) == []
    # the judge rising with the student is no hacking
    assert alarm([_record(0, 3.0, 2.0), _record(1, 4.0, 3.0)], 0.5, 0) is None
    with pytest.raises(ValueError, match="threshold=0 is not allowed"):
        alarm(records, 0, 0)


def _judged(step, student, judge_B, colour_B):
    return {"step": step, "student": {"alignment": student}, "student_reward": student,
            "judge": {"alignment": float(np.mean(judge_B))},
            "per_prompt": {"judge_alignment": list(judge_B), "judge_main_colour": list(colour_B)}}


def test_judge_decline_by_hand():
    start = _judged(0, 2.0, [1.0, 2.0, 1.0, 1.0], [1, 1, 1, 0])  # main colour 3 of 4
    # alignment: 1 = 1, 2 > 1 bad, 1 = 1, 2 > 1 good -> net 0; main colour 3/4 -> 1/4: decline 0.5
    later = _judged(1, 2.0, [1.0, 1.0, 1.0, 2.0], [1, 0, 0, 0])
    assert decline(later, start) == pytest.approx(0.5)
    # alignment: 3 bad of 4 -> net -0.75; main colour unchanged: decline 0.75
    worse = _judged(2, 2.0, [1.0, 1.0, 1.0, 1.0], [1, 1, 1, 0])
    worse["per_prompt"]["judge_alignment"] = [0.5, 2.0, 0.5, 0.5]
    assert decline(worse, start) == pytest.approx(0.75)
    better = _judged(3, 2.0, [2.0, 2.0, 2.0, 2.0], [1, 1, 1, 1])  # net +0.75, colour +0.25: negative decline
    assert decline(better, start) == pytest.approx(-0.25)
    assert [r["decline"] for r in with_declines([start, later])] == [0.0, pytest.approx(0.5)]
    full = watched([start, later])[1]
    assert full["decline"] == pytest.approx(0.5) and full["gap"] == 0.0 and full["gsb_vs_start"]["net"] == 0.0
    old = {**later, "per_prompt": {"judge_alignment": later["per_prompt"]["judge_alignment"]}}  # no colours kept
    assert decline(old, start) == pytest.approx(0.0)  # the GSB alone


def test_alarm_catches_a_judge_collapse_that_the_gap_misses():
    """As in the dev run of 7 Dec 2026: the student's reward hardly moves, the judge's alignment starts near its
    floor, and the main colour collapses; the gap stays under its threshold, the decline does not."""
    n = 20
    start = _judged(0, 1.80, [1.4] * n, [1] * 16 + [0] * 4)          # main colour 80%
    mid = _judged(100, 1.85, [1.5] * n, [1] * 8 + [0] * 12)          # 40%: judge alignment even rose
    end = _judged(200, 1.81, [1.1] * n, [1] * 1 + [0] * 19)          # 5%
    records = [start, mid, end]
    assert all(r["gap"] < 0.5 for r in with_gaps(records))
    hit, why = alarm(records, 0.5, 0.25)
    assert hit["step"] == 100 and hit["decline"] == pytest.approx(0.4)
    assert "fell by 0.400 of the prompts (threshold 0.25; net GSB vs step 0 +1.000, main colour 80.0% -> 40.0%)" in why
    assert alarm(records, 0.5, 0.0) is None  # the decline unwatched
    assert alarm(records[:2], 0.5, 0.5) is None  # 0.4 at step 100
    gapped = [_judged(0, 2.0, [1.4] * n, [1] * n), _judged(1, 3.0, [1.4] * n, [1] * n)]
    hit, why = alarm(gapped, 0.5, 0.25)
    assert hit["step"] == 1 and why == "the gap reached +1.000 (threshold 0.5)"
    with pytest.raises(ValueError, match="gap_threshold=0 is not allowed"):
        alarm(records, 0, 0.25)
    with pytest.raises(ValueError, match="decline_threshold=-1 is not allowed"):
        alarm(records, 0.5, -1)


def test_gsb_against_the_first_evaluation_by_hand():
    def rec(step, judge):
        return {"step": step, "per_prompt": {"judge_alignment": judge, "student_alignment": [3.0] * len(judge)}}

    start = rec(0, [2.0, 3.0, 4.0, 5.0])
    # prompt by prompt: 3 > 2 good, 3 = 3 same, 3.5 < 4 bad, 5 = 5 same -> G 1/4, S 2/4, B 1/4, net 0
    assert gsb_vs_first(rec(1, [3.0, 3.0, 3.5, 5.0]), start) == {"good": 0.25, "same": 0.5, "bad": 0.25, "net": 0.0}
    # 4 > 2, 4 > 3, 4 = 4, 1 < 5 -> G 2/4, S 1/4, B 1/4, net 0.25
    later = with_gsb([start, rec(1, [4.0, 4.0, 4.0, 1.0])])
    assert later[0]["gsb_vs_start"] == {"good": 0.0, "same": 1.0, "bad": 0.0, "net": 0.0}
    assert later[1]["gsb_vs_start"] == {"good": 0.5, "same": 0.25, "bad": 0.25, "net": 0.25}
    assert later[1]["per_prompt"] == rec(1, [4.0, 4.0, 4.0, 1.0])["per_prompt"] and with_gsb([]) == []
    with pytest.raises(ValueError, match="step 2 has 3 judged prompts and step 0 4"):
        gsb_vs_first(rec(2, [1.0, 2.0, 3.0]), start)


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
    assert rec["per_prompt"]["judge_main_colour"] == [1.0, 1.0, 1.0]
    assert judge_verdicts(rec) == [{"alignment": 5.0, "main_colour": 1.0}] * 3
    assert judge_verdicts({"per_prompt": {"judge_alignment": [5.0]}}) is None  # an older record
    with pytest.raises(ValueError, match="expected 'alignment' among them"):
        evaluation_record(5, images, prompts, mu, ("realism", "aesthetics"), (0.5, 0.5))
    with pytest.raises(ValueError, match=r"expected \(3, 2\)"):
        evaluation_record(5, images, prompts, mu[:2], ("realism", "alignment"), (0.5, 0.5))
    later = {**rec, "step": 9, "student": {"realism": 4.0, "alignment": 3.0}}
    save_reward_vs_judge(tmp_path / "r.png", [rec, later], 0.5, "test",
                         history=[{"step": 1, "reward": 2.9}, {"step": 9, "reward": 3.1}])
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_grid_labels_come_from_the_record(tmp_path, monkeypatch):
    """save_variant_grid takes an evaluation's verdicts instead of judging its images again; other columns are
    judged."""
    import zray.evaluation.generator as generator
    from zray.evaluation.turbo import save_variant_grid

    rows = generator_rows(WorldConfig(image_size=64, num_generator_images=4, num_generator_test_prompts=2),
                          ALL_COMBOS, lambda: None)["train"][:2]
    images, prompts = [decode_png(r["image"]) for r in rows], [r["prompt"] for r in rows]
    judged = []
    monkeypatch.setattr(generator, "judge_against",
                        lambda im, p: judged.append(p) or {"alignment": 1.0, "main_colour": 0.0})
    verdicts = judge_verdicts({"per_prompt": {"judge_alignment": [4.0, 5.0], "judge_main_colour": [1.0, 1.0]}})
    save_variant_grid(tmp_path / "g.png", prompts, {"given": images, "new": images}, verdicts={"given": verdicts})
    assert judged == prompts and (tmp_path / "g.png").stat().st_size > 1000  # only the "new" column judged


def test_reward_finetune_config_refuses_bad_thresholds():
    from zray.config import ConfigError, RewardFinetuneConfig

    with pytest.raises(ConfigError, match=r"RewardFinetuneConfig.decline_threshold.*1.5.*\[0, 1\]"):
        RewardFinetuneConfig(decline_threshold=1.5)
    with pytest.raises(ConfigError, match=r"RewardFinetuneConfig.gap_threshold.*0.*> 0"):
        RewardFinetuneConfig(gap_threshold=0.0)
    assert RewardFinetuneConfig(decline_threshold=0.0).decline_threshold == 0.0  # off
