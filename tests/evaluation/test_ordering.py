"""zray.evaluation.rewards.pair_outcomes / ordering_intervals: HPA's items and the paired bootstrap of adjacent
differences, on cases with a known answer."""

import pytest

from zray.evaluation.rewards import (compute_metrics, markdown_row, ordering_intervals, ordering_markdown,
                                    pair_outcomes, seed_mean_record, seed_outcomes)


def _preds(mus, humans, prompt="p", dim="alignment"):
    return [{"candidate_id": f"{prompt}-{i}", "prompt_id": prompt, "dimension": dim, "mu": mu, "human": h}
            for i, (mu, h) in enumerate(zip(mus, humans, strict=True))]


def test_pair_outcomes_are_hpas_items():
    preds = _preds([3.0, 2.0, 2.0], [4.0, 1.0, 1.0])  # pair (1, 2) ties in human scores: not an item
    out = pair_outcomes(preds)
    assert out == {("alignment", "p", "p-0", "p-1"): 1.0, ("alignment", "p", "p-0", "p-2"): 1.0}
    tied = pair_outcomes(_preds([2.0, 2.0], [4.0, 1.0]))  # a predicted tie is wrong, as in HPA
    assert list(tied.values()) == [0.0]
    many = [p for k in range(5) for p in _preds([1.0, 2.0, 3.0], [3.0, 1.0, 2.0], prompt=f"q{k}")]
    assert sum(pair_outcomes(many).values()) / len(pair_outcomes(many)) == compute_metrics(many)["pooled"]["hpa"]


def test_an_always_right_method_beats_an_always_wrong_one_with_a_degenerate_interval():
    humans = [1.0, 2.0, 3.0, 4.0]
    right = [p for k in range(6) for p in _preds([1.0, 2.0, 3.0, 4.0], humans, prompt=f"q{k}")]
    wrong = [p for k in range(6) for p in _preds([4.0, 3.0, 2.0, 1.0], humans, prompt=f"q{k}")]
    (row,) = ordering_intervals([("wrong", wrong), ("right", right)], num_samples=200)
    assert (row["lower"], row["higher"]) == ("wrong", "right")
    assert row["diff"] == row["lo"] == row["hi"] == 1.0
    assert row["num_items"] == 36 and row["num_clusters"] == 6
    assert "holds: the interval is above 0" in ordering_markdown([row])


def test_equal_methods_are_not_resolved_and_a_reversal_is_named():
    humans = [1.0, 2.0, 3.0]
    half = [p for k in range(10) for p in _preds([1.0, 2.0, 3.0] if k % 2 else [3.0, 2.0, 1.0], humans, f"q{k}")]
    other = [p for k in range(10) for p in _preds([1.0, 2.0, 3.0] if k % 2 == 0 else [3.0, 2.0, 1.0], humans,
                                                 f"q{k}")]
    rows = ordering_intervals([("a", half), ("b", other), ("c", half)], num_samples=500)
    assert rows[0]["diff"] == 0.0 and rows[0]["lo"] < 0 < rows[0]["hi"]
    assert "not resolved" in ordering_markdown(rows[:1])
    right = [p for k in range(10) for p in _preds([1.0, 2.0, 3.0], humans, f"q{k}")]
    wrong = [p for k in range(10) for p in _preds([3.0, 2.0, 1.0], humans, f"q{k}")]
    assert "reversed: the interval is below 0" in ordering_markdown(ordering_intervals([("r", right), ("w", wrong)]))


def test_methods_on_other_candidates_are_refused():
    with pytest.raises(ValueError, match="'a' and 'b' scored no common pair"):
        ordering_intervals([("a", _preds([1.0, 2.0], [1.0, 2.0], "x")), ("b", _preds([1.0, 2.0], [1.0, 2.0], "y"))])


def test_seeds_average_their_outcomes_and_their_metrics():
    """Two seeds, one always right and one always wrong, against an always-right method: each item is right for
    half the seeds, so the seeds' mean HPA is 0.5 and the difference to the right method is exactly +0.5."""
    humans = [1.0, 2.0, 3.0]
    right = [p for k in range(6) for p in _preds([1.0, 2.0, 3.0], humans, f"q{k}")]
    wrong = [p for k in range(6) for p in _preds([3.0, 2.0, 1.0], humans, f"q{k}")]
    out = seed_outcomes([right, wrong])
    assert set(out.values()) == {0.5} and len(out) == 18
    (row,) = ordering_intervals([("seeds", [right, wrong]), ("right", right)], num_samples=200)
    assert row["diff"] == row["lo"] == row["hi"] == 0.5
    records = [{"name": "gdso", "pooled": {"hpa": h, "margin_hpa": h, "plcc": 0.1, "srcc": None},
                "dimensions": {"alignment": {"hpa": h, "margin_hpa": h, "plcc": 0.1, "srcc": 0.2}},
                "mean_output_tokens": t} for h, t in ((0.5, 4.0), (0.6, 6.0), (0.7, 8.0))]
    mean = seed_mean_record(records)
    assert mean["num_seeds"] == 3 and mean["pooled"]["hpa"] == pytest.approx(0.6)
    assert mean["pooled_se"]["hpa"] == pytest.approx(0.1 / 3 ** 0.5)  # sd 0.1 over 3 seeds
    assert mean["pooled"]["srcc"] is None and mean["dimensions"]["alignment"]["hpa"] == pytest.approx(0.6)
    assert mean["mean_output_tokens"] == 6.0 and seed_mean_record(records[:1]) is records[0]
    row = markdown_row("GDSO (3 seeds)", mean)
    assert row.startswith("| teacher | GDSO (3 seeds) | 0.6000 ± 0.0577 | 0.6000 ± 0.0577 | 0.1000 ± 0.0000 | n/a")
