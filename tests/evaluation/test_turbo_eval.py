"""The Frechet intervals of distill-generator's results (paired bootstrap over the prompts), on hand-made images."""

import numpy as np
import pytest

from zray.evaluation.turbo import frechet_intervals, interval_notes


def _images(seed: int, n: int = 24, shift: float = 0.0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.clip(rng.integers(0, 200, size=(16, 16, 3)) + shift, 0, 255).astype(np.uint8) for _ in range(n)]


def test_a_student_equal_to_the_teacher_closes_the_whole_gap_in_every_sample():
    renders, teacher, naive = _images(0), _images(1), _images(2, shift=50.0)
    images = {"teacher": teacher, "two_step": naive, "turbo": teacher, "copy": teacher}
    ci = frechet_intervals(images, renders, baseline="turbo", num_samples=8)
    assert (ci["turbo"]["gap_closed_lo"], ci["turbo"]["gap_closed_hi"]) == pytest.approx((1.0, 1.0))
    assert ci["copy"]["minus_baseline"] == 0.0 and ci["copy"]["minus_baseline_hi"] == 0.0
    assert "minus_baseline" not in ci["turbo"] and set(ci) == {"turbo", "copy"}
    lines = interval_notes(ci, baseline="turbo", num_prompts=24, num_samples=8)
    assert "turbo [100%, 100%]" in lines[0] and "copy +0.000 [+0.000, +0.000]" in lines[1]
    assert interval_notes({}, baseline=None, num_prompts=1, num_samples=1) == []
