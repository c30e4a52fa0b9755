"""Reward-model evaluation (`zray.evaluation.rewards`) on the tiny_cpu world with the session's vLLM engine:
both forms, artefacts, HPA by hand, tables."""

import dataclasses
import itertools
import json
import math
import os
import shutil

import pyarrow.parquet as pq
import pytest

from zray.evaluation.rewards import evaluate_reward_model, markdown_row, resolve_form, results_table
from jobs.recipes import tiny_cpu
from zray.config import ConfigError, EvaluateConfig
from zray.data import read_table
from zray.models.vlm import SCORING_FILE
from zray.rubric import DIMENSIONS
from zray.scores import SCORE_BINS

os.environ.setdefault("HF_HUB_OFFLINE", "1")

NUM_PROMPTS, MAX_REASONING = 3, 6


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return dataclasses.replace(tiny_cpu(), out_dir=str(tmp_path_factory.mktemp("run")),
                               evaluate=EvaluateConfig(num_prompts=NUM_PROMPTS, max_reasoning_tokens=MAX_REASONING,
                                                       num_plot_images=2))


@pytest.fixture(scope="module")
def reasoning(cfg, sharp_teacher_dir, teacher_engine):
    return evaluate_reward_model(cfg, sharp_teacher_dir, teacher_engine, form="reasoning", name="reasoning")


@pytest.fixture(scope="module")
def direct(cfg, sharp_teacher_dir, teacher_engine, tmp_path_factory):
    """form="auto" on a copy of the model whose zray_scoring.json says "direct" (the engine serves the same)."""
    model = tmp_path_factory.mktemp("student") / "hf"
    shutil.copytree(sharp_teacher_dir, model)
    (model / SCORING_FILE).write_text(json.dumps({"form": "direct", "method": "risd"}))
    return evaluate_reward_model(cfg, model, teacher_engine)


def _in_range(value, low, high):
    return value is None or low <= value <= high  # None: undefined (e.g. a constant prediction)


@pytest.mark.slow
def test_metrics_structure_ranges_and_files(cfg, reasoning, direct):
    num_candidates = NUM_PROMPTS * cfg.world.candidates_per_prompt
    assert direct["form"] == "direct" and direct["method"] == "risd" and direct["name"].startswith("risd-")
    assert reasoning["form"] == "reasoning" and reasoning["method"] is None
    for record in (reasoning, direct):
        assert record["num_candidates"] == num_candidates
        assert record["num_queries"] == num_candidates * len(DIMENSIONS)
        assert list(record["dimensions"]) == list(DIMENSIONS)
        pairs_per_dim = NUM_PROMPTS * math.comb(cfg.world.candidates_per_prompt, 2)
        for m in [*record["dimensions"].values(), record["pooled"]]:
            assert _in_range(m["hpa"], 0, 1) and _in_range(m["margin_hpa"], 0, 1)
            assert _in_range(m["plcc"], -1, 1) and _in_range(m["srcc"], -1, 1)
            assert 0 <= m["num_margin_pairs"] <= m["num_pairs"]
        for d in DIMENSIONS:
            assert record["dimensions"][d]["num_pairs"] <= pairs_per_dim
            assert record["dimensions"][d]["num_candidates"] == num_candidates
        assert record["pooled"]["num_pairs"] == sum(m["num_pairs"] for m in record["dimensions"].values()) > 0
        assert record["pooled"]["num_candidates"] == record["num_queries"]
        run_dir = cfg.out_dir + f"/evaluate/{record['name']}"
        for name in ("metrics.json", "table.md", "predictions.parquet", "distributions.png"):
            assert os.path.getsize(f"{run_dir}/{name}") > 0, name
        with open(f"{run_dir}/distributions.png", "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert json.load(open(f"{run_dir}/metrics.json")) == record
        table = open(f"{run_dir}/table.md").read()
        assert all(f"| {d} |" in table for d in DIMENSIONS) and "| **pooled** |" in table
        assert f"form `{record['form']}`" in table
    assert direct["mean_output_tokens"] == 1.0
    # the sharpened tiny teacher never writes "Score:": every reasoning runs to the budget (re-tokenised)
    assert 1.0 < reasoning["mean_output_tokens"] <= MAX_REASONING + 2


@pytest.mark.slow
def test_predictions_recompute_the_metrics(cfg, reasoning, direct):
    """HPA / Margin HPA by hand from predictions.parquet equal the job's; humans match the data."""
    data = read_table(cfg.out_dir + "/data/candidates_test.parquet", "candidates").to_pylist()
    human = {(r["candidate_id"], d): r[f"human_{d}"] for r in data for d in DIMENSIONS}
    for record in (reasoning, direct):
        preds = pq.read_table(cfg.out_dir + f"/evaluate/{record['name']}/predictions.parquet").to_pylist()
        assert len(preds) == record["num_queries"]
        groups = {}
        for p in preds:
            assert p["human"] == human[(p["candidate_id"], p["dimension"])]
            assert abs(sum(p["q"]) - 1) < 1e-5 and abs(sum(q * s for q, s in zip(p["q"], SCORE_BINS)) - p["mu"]) < 1e-5
            assert (p["reasoning"] is None) == (record["form"] == "direct")
            groups.setdefault((p["dimension"], p["prompt_id"]), []).append(p)
        counts = {"all": [0, 0, 0, 0]}  # correct, pairs, margin correct, margin pairs
        for (dim, _), members in groups.items():
            c = counts.setdefault(dim, [0, 0, 0, 0])
            for a, b in itertools.combinations(members, 2):
                dh = a["human"] - b["human"]
                if abs(dh) < 1e-9:
                    continue
                right = (a["mu"] - b["mu"]) * dh > 0
                for tally in (c, counts["all"]):
                    tally[0] += right
                    tally[1] += 1
                    if abs(dh) > 0.5 + 1e-9:
                        tally[2] += right
                        tally[3] += 1
        for key, m in [*record["dimensions"].items(), ("all", record["pooled"])]:
            correct, num, mcorrect, mnum = counts[key]
            assert m["num_pairs"] == num and m["num_margin_pairs"] == mnum
            assert m["hpa"] == pytest.approx(correct / num)
            assert (m["margin_hpa"] is None) if mnum == 0 else m["margin_hpa"] == pytest.approx(mcorrect / mnum)


def test_results_table_rows():
    metrics = {"pooled": {"hpa": 0.89561, "margin_hpa": 0.9, "plcc": float("nan"), "srcc": None},
               "mean_output_tokens": 48.25}
    assert markdown_row("GDSO", metrics) == "| teacher | GDSO | 0.8956 | 0.9000 | n/a | n/a | 48.2 |"
    table = results_table([("GDSO", metrics), ("SFT", metrics)]).splitlines()
    assert table[0].startswith("| model | method | HPA | Margin HPA |") and len(table) == 4
    assert table[3].startswith("| teacher | SFT |")


def test_form_resolution(tmp_path):
    assert resolve_form(tmp_path, "auto") == ("reasoning", None)
    assert resolve_form(tmp_path, "direct") == ("direct", None)
    (tmp_path / SCORING_FILE).write_text(json.dumps({"form": "sideways", "method": "gdso"}))
    with pytest.raises(ConfigError, match="form='sideways' is not allowed: expected 'reasoning' or 'direct'"):
        resolve_form(tmp_path, "auto")
    assert resolve_form(tmp_path, "reasoning") == ("reasoning", "gdso")  # an explicit form wins over the file
    with pytest.raises(ConfigError, match="form='both' is not allowed"):
        resolve_form(tmp_path, "both")


@pytest.mark.slow
def test_truth_reasoning_scores_after_each_candidate_s_true_rationale(cfg, sharp_teacher_dir, teacher_engine):
    from zray.data.rationales import candidate_rationale

    truth = dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, reasoning="truth"))
    record = evaluate_reward_model(truth, sharp_teacher_dir, teacher_engine, form="reasoning")
    assert record["name"].endswith("-truth") and record["reasoning"] == "truth"
    preds = pq.read_table(f"{cfg.out_dir}/evaluate/{record['name']}/predictions.parquet").to_pylist()
    rows = {r["candidate_id"]: r for r in read_table(cfg.out_dir + "/data/candidates_test.parquet",
                                                     "candidates").to_pylist()}
    assert len(preds) == NUM_PROMPTS * cfg.world.candidates_per_prompt * len(DIMENSIONS)
    for p in preds:
        r = rows[p["candidate_id"]]
        assert p["reasoning"] == candidate_rationale(r["prompt"], r["scene_json"], r["defects_json"], p["dimension"])
    with pytest.raises(ConfigError, match="evaluate.reasoning='truth' is not allowed with form='direct'"):
        evaluate_reward_model(truth, sharp_teacher_dir, teacher_engine, form="direct")
    with pytest.raises(ConfigError, match=r"EvaluateConfig.reasoning='sideways' is not allowed"):
        EvaluateConfig(reasoning="sideways")
