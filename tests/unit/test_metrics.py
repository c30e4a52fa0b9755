"""zray.metrics: hand-computed expectations for HPA, Margin HPA, PLCC/SRCC, GSB and Frechet distance."""

import math
import subprocess
import sys

import numpy as np
import pytest

from zray import metrics
from zray.metrics import frechet_distance, gsb_net, hpa, hpa_table, margin_hpa, plcc, srcc

# Five pairs (a, b):
#   0: pred 3 vs 1, human 5 vs 1   -> diff +2 / +4: correct
#   1: pred 2 vs 2, human 4 vs 3   -> predicted tie: wrong
#   2: pred 1 vs 2, human 3 vs 4   -> diff -1 / -1: correct
#   3: pred 4 vs 1, human 2 vs 2   -> human tie: excluded
#   4: pred 1 vs 2, human 3.5 vs 3 -> diff -1 / +0.5: wrong, and not in the margin subset
PRED_A, PRED_B = [3, 2, 1, 4, 1], [1, 2, 2, 1, 2]
HUMAN_A, HUMAN_B = [5, 4, 3, 2, 3.5], [1, 3, 4, 2, 3.0]


def test_hpa_tie_rules():
    assert hpa(PRED_A, PRED_B, HUMAN_A, HUMAN_B) == pytest.approx(2 / 4)


def test_margin_hpa_uses_only_pairs_beyond_half_point():
    assert margin_hpa(PRED_A, PRED_B, HUMAN_A, HUMAN_B) == pytest.approx(2 / 3)
    # Margin 1.0 keeps only pair 0 (|4| > 1); pairs 1 and 2 differ by exactly 1.
    assert margin_hpa(PRED_A, PRED_B, HUMAN_A, HUMAN_B, margin=1.0) == 1.0


def test_margin_is_robust_to_float_roundoff():
    # A difference of "0.5" carrying round-off (e.g. from averaging annotators) must not count as > 0.5.
    assert math.isnan(margin_hpa([1.0], [0.0], [3.5 + 1e-12], [3.0]))
    assert margin_hpa([1.0], [0.0], [3.5 + 1e-6], [3.0]) == 1.0


def test_hpa_accepts_numpy_and_tuples():
    value = hpa(np.array(PRED_A), tuple(PRED_B), np.array(HUMAN_A, dtype=np.float32), HUMAN_B)
    assert value == pytest.approx(0.5)


def test_hpa_nan_when_no_pair_qualifies():
    assert math.isnan(hpa([1, 2], [2, 1], [3, 3], [3, 3]))  # all human ties
    assert math.isnan(hpa([], [], [], []))
    assert math.isnan(margin_hpa([1, 2], [2, 1], [3.5, 3], [3, 3.5]))  # only 0.5 gaps


def test_hpa_validation():
    with pytest.raises(ValueError, match="same length"):
        hpa([1, 2], [1], [1, 2], [1, 2])
    with pytest.raises(ValueError, match=r"pred_a\[1\]"):
        hpa([1, float("nan")], [1, 1], [1, 2], [2, 1])
    with pytest.raises(ValueError, match="1-D"):
        hpa([[1]], [[1]], [[1]], [[1]])
    with pytest.raises(ValueError, match="margin"):
        margin_hpa([1], [2], [1], [2], margin=-1)


def test_hpa_table_per_dimension_and_pooled():
    dims = ["alignment", "realism", "alignment", "realism", "realism"]
    table = hpa_table(dims, PRED_A, PRED_B, HUMAN_A, HUMAN_B)
    assert list(table) == ["alignment", "realism", "pooled"]
    # alignment: pairs 0, 2 -> both correct
    assert table["alignment"] == {"hpa": 1.0, "margin_hpa": 1.0, "num_pairs": 2, "num_margin_pairs": 2}
    # realism: pair 1 wrong (predicted tie), pair 3 human tie, pair 4 wrong and below margin
    r = table["realism"]
    assert r["hpa"] == 0.0 and r["num_pairs"] == 2
    assert r["margin_hpa"] == 0.0 and r["num_margin_pairs"] == 1
    p = table["pooled"]
    assert p["hpa"] == pytest.approx(0.5) and p["margin_hpa"] == pytest.approx(2 / 3)
    assert (p["num_pairs"], p["num_margin_pairs"]) == (4, 3)
    with pytest.raises(ValueError, match="dimensions has 1 entries"):
        hpa_table(["alignment"], PRED_A, PRED_B, HUMAN_A, HUMAN_B)


def test_hpa_table_nan_for_dimension_with_only_ties():
    table = hpa_table(["a", "b"], [1, 2], [2, 1], [3, 4], [3, 2])
    assert math.isnan(table["a"]["hpa"]) and table["a"]["num_pairs"] == 0
    assert table["b"]["hpa"] == 1.0


def test_plcc_srcc_values():
    pred, human = [1, 2, 3, 4], [1, 2, 3, 5]
    # Pearson by hand: x-mean = [-1.5,-.5,.5,1.5], y-mean = [-1.75,-.75,.25,2.25]
    # cov = 2.625+0.375+0.125+3.375 = 6.5; |x| = sqrt(5); |y| = sqrt(3.0625+0.5625+0.0625+5.0625) = sqrt(8.75)
    assert plcc(pred, human) == pytest.approx(6.5 / math.sqrt(5 * 8.75))
    assert srcc(pred, human) == pytest.approx(1.0)
    assert srcc([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_plcc_srcc_nan_cases():
    assert math.isnan(plcc([1, 2, 3], [2, 2, 2]))
    assert math.isnan(srcc([4, 4, 4], [1, 2, 3]))
    assert math.isnan(plcc([1], [2]))
    with pytest.raises(ValueError, match="same length"):
        plcc([1, 2], [1, 2, 3])


def test_gsb_net():
    assert gsb_net(["G", "G", "S", "B"]) == pytest.approx((2 - 1) / 4)
    assert gsb_net([1, 1, 0, -1, -1, -1]) == pytest.approx(-1 / 6)
    assert gsb_net(np.array([1, 0, 0, 0])) == pytest.approx(0.25)
    assert gsb_net(["G", -1, "S"]) == 0.0
    assert math.isnan(gsb_net([]))


@pytest.mark.parametrize("bad", ["g", "X", 2, True, None, 0.5])
def test_gsb_bad_labels(bad):
    with pytest.raises(ValueError, match=r"judgments\[1\]=.*expected 'G', 'S', 'B' or \+1, 0, -1"):
        gsb_net(["G", bad])


def test_frechet_1d_closed_form():
    # a: mean 0, unbiased var 2; b: mean 5, unbiased var 4 -> 25 + (sqrt2 - 2)^2 = 31 - 4 sqrt2
    a = [[-1.0], [1.0]]
    b = [[3.0], [5.0], [7.0]]
    assert frechet_distance(a, b) == pytest.approx(31 - 4 * math.sqrt(2))


def test_frechet_diagonal_closed_form():
    a = np.array([[1, 1], [1, -1], [-1, 1], [-1, -1]], dtype=float)  # mean 0, cov diag(4/3, 4/3)
    b = a * np.array([2.0, 3.0]) + np.array([1.0, 2.0])  # mean (1,2), cov diag(16/3, 12)
    expected = 5 + (4 / 3) * (1 - 2) ** 2 + (4 / 3) * (1 - 3) ** 2
    assert frechet_distance(a, b) == pytest.approx(expected)
    assert frechet_distance(b, a) == pytest.approx(expected)


def test_frechet_full_covariance_matches_symmetric_formula():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 5)) @ rng.normal(size=(5, 5))
    b = rng.normal(size=(150, 5)) @ rng.normal(size=(5, 5)) + 0.3
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(ca)
    ra = v @ np.diag(np.sqrt(np.clip(w, 0, None))) @ v.T
    tr_root = np.sqrt(np.clip(np.linalg.eigvalsh(ra @ cb @ ra), 0, None)).sum()
    expected = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(ca) + np.trace(cb) - 2 * tr_root
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)


def test_frechet_identical_sets_near_zero():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(64, 8))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # Rank-deficient covariance (N < D) exercises the eps fallback; still finite and ~0.
    small = rng.normal(size=(4, 16))
    value = frechet_distance(small, small.copy())
    assert math.isfinite(value) and value == pytest.approx(0.0, abs=1e-3)
    assert math.isfinite(frechet_distance(small, rng.normal(size=(5, 16))))


def test_frechet_validation():
    with pytest.raises(ValueError, match="2-D"):
        frechet_distance([1.0, 2.0], [[1.0], [2.0]])
    with pytest.raises(ValueError, match="feature sizes differ"):
        frechet_distance(np.zeros((3, 2)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="at least 2 samples"):
        frechet_distance(np.zeros((1, 2)), np.zeros((3, 2)))


def test_metrics_is_import_light():
    code = (
        "import sys, zray.metrics; bad = [m for m in ('torch', 'ray', 'transformers', 'vllm') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert metrics.MARGIN == 0.5


# ------------------------------------------------------------------------------------------ paired bootstrap


def test_bootstrap_of_a_certain_difference_is_a_point():
    from zray.metrics import paired_bootstrap

    out = paired_bootstrap([1] * 30, [0] * 30, [i // 3 for i in range(30)], num_samples=200)
    assert (out["diff"], out["lo"], out["hi"]) == (1.0, 1.0, 1.0)
    assert (out["num_items"], out["num_clusters"]) == (30, 10)
    same = paired_bootstrap([1, 0, 1, 1], [1, 0, 1, 1], ["a", "a", "b", "b"], num_samples=200)
    assert (same["diff"], same["lo"], same["hi"]) == (0.0, 0.0, 0.0)  # paired: identical methods never differ


def test_bootstrap_resamples_whole_clusters():
    """Two clusters of ten items: all of the difference sits in one. Drawing two clusters gives 1.0 (both the first),
    0.0 (both the second) or 0.5, with probabilities 1/4, 1/4, 1/2: the 95% interval is [0, 1]."""
    import numpy as np

    from zray.metrics import paired_bootstrap

    a, b, clusters = [1] * 20, [0] * 10 + [1] * 10, [0] * 10 + [1] * 10
    out = paired_bootstrap(a, b, clusters, num_samples=4000, seed=1)
    assert out["diff"] == 0.5 and (out["lo"], out["hi"]) == (0.0, 1.0)
    # resampling items instead (each its own cluster) would give a far narrower interval
    items = paired_bootstrap(a, b, np.arange(20), num_samples=4000, seed=1)
    assert items["hi"] - items["lo"] < 0.6


def test_bootstrap_interval_matches_the_normal_approximation_for_independent_items():
    import numpy as np

    from zray.metrics import paired_bootstrap

    rng = np.random.default_rng(0)
    n = 4000
    a, b = (rng.random(n) < 0.8).astype(float), (rng.random(n) < 0.7).astype(float)
    out = paired_bootstrap(a, b, np.arange(n), num_samples=2000, seed=2)
    half = 1.96 * np.sqrt((a.var() + b.var() - 2 * np.cov(a, b)[0, 1]) / n)
    assert out["lo"] < out["diff"] < out["hi"]
    assert (out["hi"] - out["lo"]) / 2 == pytest.approx(half, rel=0.15)
    assert out["lo"] < 0.1 < out["hi"]  # the true difference


def test_bootstrap_rejects_bad_input():
    from zray.metrics import paired_bootstrap

    with pytest.raises(ValueError, match="clusters has 1 entries but there are 2 items"):
        paired_bootstrap([1, 0], [0, 0], [0])
    with pytest.raises(ValueError, match="level=1.5"):
        paired_bootstrap([1], [0], [0], level=1.5)


def test_frechet_bootstrap_resamples_every_set_with_the_same_items():
    from zray.metrics import frechet_bootstrap, percentile_interval

    rng = np.random.default_rng(0)
    ref = rng.normal(size=(60, 3))
    shifted = ref + np.array([1.0, 0.0, 0.0])  # the same items moved by 1 along one axis: distance exactly 1
    samples = frechet_bootstrap({"same": ref, "shifted": shifted}, ref, num_samples=50, seed=1)
    assert samples["same"] == pytest.approx(np.zeros(50), abs=1e-9)  # paired: a set equal to the reference
    assert samples["shifted"] == pytest.approx(np.ones(50), abs=1e-6)
    lo, hi = percentile_interval(np.arange(101.0), level=0.9)
    assert (lo, hi) == pytest.approx((5.0, 95.0))
    with pytest.raises(ValueError, match="one row per item"):
        frechet_bootstrap({"short": ref[:10]}, ref)


def test_mean_interval_over_replicates():
    out = metrics.mean_interval([1.0, 2.0, 3.0])
    half = 4.302652729749464 / math.sqrt(3)  # t(0.975, 2 df) x sd 1 / sqrt(3)
    assert out == pytest.approx({"mean": 2.0, "se": 1 / math.sqrt(3), "lo": 2.0 - half, "hi": 2.0 + half, "n": 3})
    one = metrics.mean_interval([0.5])
    assert one["mean"] == 0.5 and one["n"] == 1 and all(math.isnan(one[k]) for k in ("se", "lo", "hi"))
    with pytest.raises(ValueError, match="level=1.5"):
        metrics.mean_interval([1.0, 2.0], level=1.5)
