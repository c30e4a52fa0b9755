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


def _row(frechet: float, main_colour: float) -> dict[str, float]:
    return {"frechet_to_renders": frechet, "main_colour": main_colour}


def test_seed_summary_pairs_each_variant_with_turbos_run_of_the_same_seed():
    from zray.evaluation.turbo import seed_markdown, seed_summary

    rows = {"teacher 8-step": _row(0.1, 0.9), "naive 2-step": _row(0.4, 0.6),
            "turbo": _row(0.20, 0.80), "turbo_seed1": _row(0.30, 0.70), "turbo_seed2": _row(0.25, 0.75),
            "shared": _row(0.21, 0.82), "shared_seed1": _row(0.29, 0.66), "shared_seed2": _row(0.28, 0.75)}
    summary = seed_summary(rows, ("turbo", "shared"), 3)
    turbo, shared = summary["turbo"], summary["shared"]
    assert turbo["frechet_to_renders"]["mean"] == pytest.approx(0.25) and turbo["frechet_to_renders"]["n"] == 3
    assert turbo["frechet_to_renders"]["se"] == pytest.approx(0.05 / np.sqrt(3))  # sd of 0.20, 0.30, 0.25: 0.05
    assert "frechet_to_renders_minus_turbo" not in turbo
    d = shared["frechet_to_renders_minus_turbo"]
    assert d["by_seed"] == pytest.approx([0.01, -0.01, 0.03]) and d["mean"] == pytest.approx(0.01)
    assert d["worse_in"] == 2  # farther from the renders at seeds 0 and 2
    half = 4.302652729749464 * np.std([0.01, -0.01, 0.03], ddof=1) / np.sqrt(3)  # t(0.975, 2 df)
    assert (d["lo"], d["hi"]) == pytest.approx((0.01 - half, 0.01 + half))
    c = shared["main_colour_minus_turbo"]
    assert c["by_seed"] == pytest.approx([0.02, -0.04, 0.0]) and c["worse_in"] == 1  # a lower rate at seed 1 only
    lines = "\n".join(seed_markdown(summary))
    assert "| shared | 3 | 0.260 [" in lines and "| +0.010, -0.010, +0.030 | +0.010 [" in lines
    assert "| 2 of 3 |" in lines and "| +2.0%, -4.0%, +0.0% |" in lines and "| 1 of 3 |" in lines
    assert lines.count("| turbo | 3 |") == 1 and "| - | - | - | - | - | - |" in lines
    one = seed_summary({"turbo": _row(0.2, 0.8)}, ("turbo",), 1)["turbo"]["main_colour"]
    assert one["mean"] == 0.8 and np.isnan(one["se"]) and np.isnan(one["lo"])
    with pytest.raises(KeyError):
        seed_summary(rows, ("turbo", "detached"), 2)  # a run that is not there is not averaged away


def test_seed_summary_adds_the_final_latents_distance_to_the_teacher_where_every_run_has_it():
    from zray.evaluation.turbo import seed_markdown, seed_summary

    x0 = {"turbo": 0.0140, "turbo_seed1": 0.0146, "no_step1": 0.0156, "no_step1_seed1": 0.0145}
    rows = {n: {**_row(0.2, 0.8), "x0_mse_to_teacher": v} for n, v in x0.items()}
    d = seed_summary(rows, ("turbo", "no_step1"), 2)["no_step1"]["x0_mse_to_teacher_minus_turbo"]
    assert d["by_seed"] == pytest.approx([0.0016, -0.0001]) and d["worse_in"] == 1  # farther at seed 0 only
    lines = "\n".join(seed_markdown(seed_summary(rows, ("turbo", "no_step1"), 2)))
    assert "final latent MSE to the teacher minus turbo's, by seed" in lines and "| +0.00160, -0.00010 |" in lines
    del rows["no_step1_seed1"]["x0_mse_to_teacher"]  # one run without it: the metric is left out, not half-averaged
    summary = seed_summary(rows, ("turbo", "no_step1"), 2)
    assert "x0_mse_to_teacher" not in summary["turbo"] and "final latent" not in "\n".join(seed_markdown(summary))
