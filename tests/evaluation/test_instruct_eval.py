"""Scoring-conversation metrics of an instruction-tuned base (`zray.evaluation.instruct`): format failures and
rationale accuracy, on answers with known outcomes."""

import pytest

import zray.evaluation.instruct as instruct
from zray.evaluation.instruct import evaluate_instruct, rationale_of, rationale_scores

TRUTH_A = "drawn: two red circles on white; missing: none; extra: a red circle"
TRUTH_R = "defects: noise severe; banding mild"


def test_rationale_is_the_text_before_the_score_prefix():
    assert rationale_of("defects: none Score: ") == "defects: none"
    assert rationale_of("defects: none Score:") == "defects: none"
    assert rationale_of("defects: none and then it rambles on") is None  # never wrote the prefix: a format failure


@pytest.mark.parametrize(("predicted", "dimension", "expected"), [
    (TRUTH_A, "alignment", {"exact": 1.0, "drawn": 1.0, "verdict": 1.0}),
    ("drawn: two red circles on white; missing: none; extra: none", "alignment",
     {"exact": 0.0, "drawn": 1.0, "verdict": 0.0}),  # sees right, judges wrong
    ("drawn: a red circle on white; missing: none; extra: a red circle", "alignment",
     {"exact": 0.0, "drawn": 0.0, "verdict": 1.0}),
    (None, "alignment", {"exact": 0.0, "drawn": 0.0, "verdict": 0.0}),
    (TRUTH_R, "realism", {"exact": 1.0, "defects": 1.0}),
    ("defects: banding severe; noise mild", "realism", {"exact": 0.0, "defects": 1.0}),  # levels ignored
    ("defects: noise severe", "realism", {"exact": 0.0, "defects": 0.0}),
    ("defects: none", "realism", {"exact": 0.0, "defects": 0.0}),
    ("no defects line", "realism", {"exact": 0.0, "defects": 0.0}),
])
def test_rationale_scores(predicted, dimension, expected):
    truth = TRUTH_A if dimension == "alignment" else TRUTH_R
    assert rationale_scores(predicted, truth, dimension) == expected


def test_format_failures_are_counted_over_sampled_answers(monkeypatch):
    rows = [{"example_id": f"e{i}", "prompt": "a red circle on a white background", "image": b"",
             "dimension": "alignment" if i % 2 == 0 else "realism",
             "rationale": TRUTH_A if i % 2 == 0 else TRUTH_R} for i in range(4)]
    greedy = [TRUTH_A + " Score: ", TRUTH_R + " Score: ", "rambling", TRUTH_R + " Score: "]
    sampled = ["x Score: ", "no prefix", "no prefix either", "y Score: "]

    def fake(model, processor, rows, *, max_new_tokens, sample, seed=0, batch_size=32):
        return list(sampled if sample else greedy)

    monkeypatch.setattr(instruct, "generate_answers", fake)
    metrics, records = evaluate_instruct(None, None, rows, max_new_tokens=8)
    assert metrics["format_fail_sampled"] == 0.5 and metrics["format_fail_greedy"] == 0.25
    assert metrics["dimensions"]["alignment"] == {"exact": 0.5, "drawn": 0.5, "verdict": 0.5}
    assert metrics["dimensions"]["realism"] == {"exact": 1.0, "defects": 1.0}
    assert metrics["exact"] == 0.75 and [r["sampled"] for r in records] == sampled
    with pytest.raises(ValueError, match="rows is empty"):
        evaluate_instruct(None, None, [], max_new_tokens=8)
