"""The reference rows of the reward tables: the oracle (the world's true scores as predictions) and the independent
judge (alignment recovered from pixels), computed from the candidates table alone, no model."""

import dataclasses

import pytest

from jobs.recipes import tiny_cpu
from zray.evaluation.rewards import (compute_metrics, evaluation_rows, judge_predictions, markdown_row,
                                     oracle_predictions, reference_record)
from zray.rubric import DIMENSIONS


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    cfg = dataclasses.replace(tiny_cpu(), out_dir=str(tmp_path_factory.mktemp("run")))
    return evaluation_rows(cfg)  # builds the tiny world; the first 2 test prompts' candidates


def test_oracle_predicts_each_candidates_true_score_in_every_dimension(rows):
    preds = oracle_predictions(rows)
    assert len(preds) == len(rows) * len(DIMENSIONS)
    by_key = {(p["candidate_id"], p["dimension"]): p for p in preds}
    for r in rows:
        for d in DIMENSIONS:
            assert by_key[(r["candidate_id"], d)]["mu"] == r[f"true_{d}"]
            assert by_key[(r["candidate_id"], d)]["human"] == r[f"human_{d}"]
    # HPA by hand: same-prompt pairs with different human scores, ordered as the true scores order them
    right = total = 0
    for d in DIMENSIONS:
        for i, a in enumerate(rows):
            for b in rows[i + 1:]:
                if a["prompt_id"] != b["prompt_id"] or a[f"human_{d}"] == b[f"human_{d}"]:
                    continue
                total += 1
                right += (a[f"true_{d}"] - b[f"true_{d}"]) * (a[f"human_{d}"] - b[f"human_{d}"]) > 0
    record = reference_record("oracle", preds, rows)
    assert record["pooled"]["num_pairs"] == total and record["pooled"]["hpa"] == pytest.approx(right / total)
    assert "| - | oracle | " in markdown_row("oracle", record, model="-") and "| n/a |" in markdown_row("o", record)


def test_judge_scores_alignment_only_and_recovers_clean_renders(rows):
    preds = judge_predictions(rows)
    assert len(preds) == len(rows) and {p["dimension"] for p in preds} == {"alignment"}
    close = sum(abs(p["mu"] - r["true_alignment"]) < 0.26 for p, r in zip(preds, rows, strict=True))
    assert close >= 0.75 * len(rows)  # the judge reads the world's own renders (judge_agreement measures it)
    metrics = compute_metrics(preds)
    assert list(metrics["dimensions"]) == ["alignment"]
