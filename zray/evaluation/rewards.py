"""Evaluating a reward model on the Shapes test pairs (methods.md §4): HPA, Margin HPA, PLCC and SRCC.

`evaluate_reward_model(cfg, model_dir, scorer)` scores every candidate of `evaluate.split` (the first
`num_prompts` prompts; 0 = all) in every dimension of the rubric with `scorer`. The candidates and the rubric are
the Shapes world's, or with `data.dir` set an import's: its rated images of the split (`zray.data.imported`) and
its rubric's dimensions, each scored with its own anchors. `scorer` is anything with the engine verbs
`generate_texts` and `score` (a `TeacherEngine`, or an `EnginePool` of engine actors; started and stopped by the
caller). It writes, under `<out_dir>/evaluate/<name>/`, `metrics.json`, `table.md`, `distributions.png` (q per
dimension for `num_plot_images` candidates, human score marked) and `predictions.parquet` (one row per query,
so any table can be recomputed).

Forms: `reasoning` (teacher: greedy reasoning of at most `evaluate.max_reasoning_tokens`, then the fixed
score prefix, q at the score position) and `direct` (student: q at the first answer position). `auto` reads
`<model>/zray_scoring.json` (`{"form": ..., "method": ...}`, written by the training tasks) and falls back to
`reasoning` without it.

For every (candidate, dimension), mu = expected score of q. HPA / Margin HPA over all same-prompt candidate
pairs (i < j, human ties excluded, `zray.metrics.hpa_table`); PLCC / SRCC of mu against the aggregated human
score, per dimension and pooled (all dimensions' candidates together). Output tokens per query: reasoning
tokens (the greedy text re-tokenised) + 1.
"""


from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np

from zray.config import ConfigError, RunConfig, to_dict
from zray.data import ensure_world, read_table
from zray.data.imported import data_rubric, imported_rows
from zray.data.rationales import candidate_rationale
from zray.data.render import decode_png
from zray.metrics import hpa_table, plcc, srcc
from zray.models.vlm import SCORING_FILE
from zray.rubric import BUILTIN_RUBRIC, DIMENSIONS, Rubric, ScoreRequest
from zray.scores import SCORE_BINS
from zray.training.runs import atomic_path, write_text_atomic

FORMS = ("reasoning", "direct")
CHUNK_SIZE = 64  # queries per engine call (one progress-bar step)
RESULTS_HEADER = ("| model | method | HPA | Margin HPA | PLCC | SRCC | output tokens |\n"
                  "|---|---|---|---|---|---|---|")


def check_model_dir(model_dir: str | Path, setting: str = "--model") -> Path:
    """A Hugging Face model dir of a supported architecture (`zray.models.vlm.check_vlm_architecture`)."""
    from zray.models.vlm import check_vlm_architecture

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        what = "does not exist" if not path.exists() else "has no config.json"
        raise FileNotFoundError(f"{setting} {str(path)!r} {what}: expected a Hugging Face format Qwen-VL dir")
    return check_vlm_architecture(path, setting)


def resolve_form(model_dir: str | Path, form: str = "auto") -> tuple[str, str | None]:
    """(form, method): `form` itself, or for "auto" the one in `<model_dir>/zray_scoring.json` ("reasoning"
    without that file). A bad value raises ConfigError naming the field, the value and the allowed values."""
    if form not in ("auto", *FORMS):
        raise ConfigError(f"form={form!r} is not allowed: expected one of 'auto', 'reasoning', 'direct'")
    path = Path(model_dir) / SCORING_FILE
    try:
        record = json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON ({err}): expected {{\"form\": ..., \"method\": ...}}") from None
    if not isinstance(record, dict):
        raise ConfigError(f"{path} holds {type(record).__name__}: expected an object with 'form' and 'method'")
    method = record.get("method")
    if form != "auto":
        return form, method
    found = record.get("form", "reasoning")
    if found not in FORMS:
        raise ConfigError(f"{path}: form={found!r} is not allowed: expected 'reasoning' or 'direct'")
    return found, method


def default_name(model_dir: str | Path, form: str, method: str | None = None) -> str:
    parts = [method or "", *Path(model_dir).resolve().parts[-2:], form]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", "-".join(p for p in parts if p)).strip("-")


def evaluate_reward_model(cfg: RunConfig, model_dir: str | Path, scorer: Any, *, form: str = "auto",
                          name: str | None = None, engine_start_s: float | None = None,
                          rows: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Score the split with `scorer` (the weights of `model_dir`, served by a `TeacherEngine` or an `EnginePool`),
    write the outputs and return the metrics record. `engine_start_s`: the scorer's start-up time, if the caller
    wants it recorded; `rows`: the candidates to score, if the caller has read them (`evaluation_rows(cfg)`)."""
    clock = time.perf_counter()
    model_dir = check_model_dir(model_dir)
    form, method = resolve_form(model_dir, form)
    ecfg = cfg.evaluate
    if ecfg.reasoning == "truth" and (form != "reasoning" or cfg.data.dir):
        raise ConfigError(f"evaluate.reasoning='truth' is not allowed with form={form!r}, data.dir={cfg.data.dir!r}: "
                          "the true rationale replaces reasoning (the reasoning form) and needs the Shapes world's "
                          "candidates (their scenes and defects); use evaluate.reasoning='model'")
    name = name or default_name(model_dir, form, method) + ("-truth" if ecfg.reasoning == "truth" else "")
    out = Path(cfg.out_dir).resolve()
    rows = evaluation_rows(cfg) if rows is None else rows
    rubric = data_rubric(cfg.data)
    keep = {r["prompt_id"] for r in rows}
    run_dir = out / "evaluate" / name
    run_dir.mkdir(parents=True, exist_ok=True)
    scoring = time.perf_counter()
    preds = score_candidates(scorer, rows, form, ecfg.max_reasoning_tokens, model_dir, rubric,
                             truth=ecfg.reasoning == "truth")
    score_s = time.perf_counter() - scoring
    record = {"name": name, "model_dir": str(model_dir), "form": form, "method": method, "split": ecfg.split,
              "reasoning": ecfg.reasoning if form == "reasoning" else None,
              "data": cfg.data.dir or "shapes world", "dimensions": list(rubric.dimensions),
              "num_prompts": len(keep), "num_candidates": len(rows), "num_queries": len(preds),
              "mean_output_tokens": float(np.mean([p["num_output_tokens"] for p in preds])),
              **compute_metrics(preds), "engine_start_s": engine_start_s, "score_s": score_s,
              "queries_per_s": len(preds) / max(score_s, 1e-9), "config": to_dict(ecfg)}
    save_predictions(run_dir / "predictions.parquet", preds)
    save_distributions(run_dir / "distributions.png", rows[:ecfg.num_plot_images], preds, form,
                       title=f"{name}: {form} form, {ecfg.split} split")
    record["wall_s"] = time.perf_counter() - clock
    record = _json_ready(record)
    write_text_atomic(run_dir / "metrics.json", json.dumps(record, indent=2))
    table = markdown_table(record)
    write_text_atomic(run_dir / "table.md", table)
    print(table + f"\n[evaluate] -> {run_dir}")
    return record


def evaluation_rows(cfg: RunConfig) -> list[dict[str, Any]]:
    """The candidates of `evaluate.split` that are scored: those of its first `evaluate.num_prompts` prompts (of the
    Shapes world, or of the import in `data.dir`)."""
    ecfg = cfg.evaluate
    if cfg.data.dir:
        rows = imported_rows(cfg.data, ecfg.split)
    else:
        rows = read_table(ensure_world(cfg.world, Path(cfg.out_dir).resolve() / "data")
                          / f"candidates_{ecfg.split}.parquet", "candidates").to_pylist()
    prompt_ids = list(dict.fromkeys(r["prompt_id"] for r in rows))
    if ecfg.num_prompts > len(prompt_ids):
        raise ConfigError(f"evaluate.num_prompts={ecfg.num_prompts} is not allowed: the {ecfg.split} split has "
                          f"{len(prompt_ids)} prompts (0 = all)")
    keep = set(prompt_ids[:ecfg.num_prompts or None])
    rows = [r for r in rows if r["prompt_id"] in keep]
    if ecfg.num_plot_images > len(rows):
        raise ConfigError(f"evaluate.num_plot_images={ecfg.num_plot_images} is not allowed: {len(rows)} "
                          "candidates are evaluated")
    return rows


def score_candidates(scorer: Any, rows: list[dict[str, Any]], form: str, max_reasoning_tokens: int,
                     model_dir: Path, rubric: Rubric = BUILTIN_RUBRIC, *, truth: bool = False) -> list[dict[str, Any]]:
    """One prediction per (candidate, rubric dimension), in that order: ids, mu, q, human, reasoning, output
    tokens. Each query carries its dimension's anchors from `rubric` (the scoring prompt of that rubric). With
    `truth` (reasoning form), the reasoning is each candidate's ground-truth rationale instead of the model's."""
    import torch
    from tqdm import tqdm

    from zray.scores import expected_score

    tokenizer = getattr(scorer, "tokenizer", None)
    if form == "reasoning" and tokenizer is None:  # an engine pool: count with the checkpoint's tokenizer
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    images = {r["candidate_id"]: decode_png(r["image"]) for r in rows}
    queries = [(r, d) for r in rows for d in rubric.dimensions]
    preds = []
    for start in tqdm(range(0, len(queries), CHUNK_SIZE), desc=f"evaluate ({form})", unit="chunk"):
        chunk = queries[start:start + CHUNK_SIZE]
        reqs = [ScoreRequest(r["prompt"], images[r["candidate_id"]], d, anchors=rubric.anchors_for(d))
                for r, d in chunk]
        reasonings: list[str | None] = [None] * len(reqs)
        if form == "reasoning":
            if truth:
                reasonings = [candidate_rationale(r["prompt"], r["scene_json"], r["defects_json"], d)
                              for r, d in chunk]
            else:
                texts = scorer.generate_texts(reqs, max_tokens=max_reasoning_tokens, temperature=0.0, n=1)
                reasonings = [t[0] for t in texts]
            reqs = [dataclasses.replace(q, reasoning=t) for q, t in zip(reqs, reasonings, strict=True)]
        q_BK = torch.as_tensor(scorer.score(reqs), dtype=torch.float32)
        mu_B = expected_score(q_BK)
        for k, ((row, dim), reasoning) in enumerate(zip(chunk, reasonings, strict=True)):
            tokens = 1 if reasoning is None else len(tokenizer.encode(reasoning, add_special_tokens=False)) + 1
            preds.append({"candidate_id": row["candidate_id"], "prompt_id": row["prompt_id"], "dimension": dim,
                          "mu": float(mu_B[k]), "q": q_BK[k].tolist(), "human": float(row[f"human_{dim}"]),
                          "reasoning": reasoning, "num_output_tokens": tokens})
    return preds


def oracle_predictions(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The oracle's predictions: every candidate's true score (the world's ground truth) as mu, per dimension.
    Against the annotators' aggregated scores this is the ceiling a learned reward model can approach."""
    return [{"candidate_id": r["candidate_id"], "prompt_id": r["prompt_id"], "dimension": d,
             "mu": float(r[f"true_{d}"]), "human": float(r[f"human_{d}"]), "num_output_tokens": 0}
            for r in rows for d in DIMENSIONS]


def judge_predictions(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The independent judge's predictions (`zray.data.judge`: scene recovery from pixels, the world's alignment
    formula): alignment only (the judge does not estimate defect severities). A non-learned reference row."""
    from zray.data.judge import judge_scores

    return [{"candidate_id": r["candidate_id"], "prompt_id": r["prompt_id"], "dimension": "alignment",
             "mu": float(judge_scores(decode_png(r["image"]), r["prompt"])["alignment"]),
             "human": float(r["human_alignment"]), "num_output_tokens": 0} for r in rows]


def reference_record(name: str, preds: list[dict[str, Any]], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Metrics of non-learned predictions (`oracle_predictions`, `judge_predictions`) shaped as an evaluation
    record, for `results_table`."""
    return _json_ready({"name": name, "method": name, "num_candidates": len(rows), "mean_output_tokens": math.nan,
                        **compute_metrics(preds)})


def compute_metrics(preds: list[dict[str, Any]]) -> dict[str, Any]:
    """{"dimensions": {d: {hpa, margin_hpa, num_pairs, num_margin_pairs, plcc, srcc, num_candidates}},
    "pooled": {...}} from predictions (candidate_id, prompt_id, dimension, mu, human); nan where undefined."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for p in preds:
        groups.setdefault((p["dimension"], p["prompt_id"]), []).append(p)
    pair_dims, pred_a, pred_b, human_a, human_b = [], [], [], [], []
    for (dim, _), members in groups.items():
        for a, b in itertools.combinations(members, 2):  # i < j: each unordered pair once
            pair_dims.append(dim)
            pred_a.append(a["mu"])
            pred_b.append(b["mu"])
            human_a.append(a["human"])
            human_b.append(b["human"])
    pairs = hpa_table(pair_dims, pred_a, pred_b, human_a, human_b)
    dims = list(dict.fromkeys(p["dimension"] for p in preds))  # the rubric's order (predictions come in it)

    def correlations(subset: list[dict[str, Any]]) -> dict[str, Any]:
        mu, human = [p["mu"] for p in subset], [p["human"] for p in subset]
        return {"plcc": plcc(mu, human), "srcc": srcc(mu, human), "num_candidates": len(subset)}

    empty = {"hpa": math.nan, "margin_hpa": math.nan, "num_pairs": 0, "num_margin_pairs": 0}
    return {"dimensions": {d: {**pairs.get(d, empty), **correlations([p for p in preds if p["dimension"] == d])}
                           for d in dims},
            "pooled": {**pairs["pooled"], **correlations(preds)}}


def pair_outcomes(preds: list[dict[str, Any]]) -> dict[tuple[str, str, str, str], float]:
    """HPA's items, one per same-prompt pair of candidates in a dimension whose human scores differ:
    {(dimension, prompt_id, candidate_a, candidate_b): 1.0 when the predictions order the pair as the humans do
    (a predicted tie is wrong, as in `zray.metrics.hpa`), else 0.0}."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for p in preds:
        groups.setdefault((p["dimension"], p["prompt_id"]), []).append(p)
    out = {}
    for (dim, prompt), members in groups.items():
        for a, b in itertools.combinations(sorted(members, key=lambda p: p["candidate_id"]), 2):
            human = a["human"] - b["human"]
            if abs(human) > 1e-9:
                out[(dim, prompt, a["candidate_id"], b["candidate_id"])] = float((a["mu"] - b["mu"]) * human > 0)
    return out


def seed_outcomes(pred_sets: list[list[dict[str, Any]]]) -> dict[tuple[str, str, str, str], float]:
    """`pair_outcomes` averaged over runs (seeds) of one method, on the pairs every run scored: each item is the
    fraction of seeds that order it right, so its mean is the seeds' mean pooled HPA."""
    sets = [pair_outcomes(preds) for preds in pred_sets]
    return {k: sum(s[k] for s in sets) / len(sets) for k in sets[0] if all(k in s for s in sets[1:])}


def ordering_intervals(named_preds: list[tuple[str, list[Any]]], *, num_samples: int = 2000,
                       level: float = 0.95, seed: int = 0) -> list[dict[str, Any]]:
    """For each adjacent pair in `named_preds` (listed from the expected worst to the expected best), the paired
    cluster bootstrap (`zray.metrics.paired_bootstrap`; the clusters are prompts) of pooled HPA(next) - HPA(this)
    on the HPA pairs both scored: [{"lower", "higher", "diff", "lo", "hi", "num_items", "num_clusters"}]. A
    method's predictions are one list of prediction records, or a list of such lists (its seeds: `seed_outcomes`,
    so the difference is of the seeds' mean HPA, resampled over prompts)."""
    from zray.metrics import paired_bootstrap

    outcomes = [(name, seed_outcomes(preds) if preds and isinstance(preds[0], list) else pair_outcomes(preds))
                for name, preds in named_preds]
    rows = []
    for (low_name, low), (high_name, high) in itertools.pairwise(outcomes):
        keys = [k for k in high if k in low]
        if not keys:
            raise ValueError(f"{low_name!r} and {high_name!r} scored no common pair: not the same candidates")
        boot = paired_bootstrap([high[k] for k in keys], [low[k] for k in keys], [k[1] for k in keys],
                                num_samples=num_samples, level=level, seed=seed)
        rows.append({"lower": low_name, "higher": high_name, **boot})
    return rows


def ordering_markdown(rows: list[dict[str, Any]], level: float = 0.95) -> str:
    """One line per adjacent difference, e.g. 'GDSO - GRPO: +0.051 [+0.022, +0.080] (holds: the interval is above
    0; 2825 pairs, 50 prompts)'."""
    def verdict(r: dict[str, Any]) -> str:
        return ("holds: the interval is above 0" if r["lo"] > 0 else "reversed: the interval is below 0"
                if r["hi"] < 0 else "not resolved: the interval contains 0")

    return "\n".join(f"- {r['higher']} - {r['lower']}: {r['diff']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}] "
                     f"({verdict(r)}; {r['num_items']} pairs, {r['num_clusters']} prompts)" for r in rows)


def _json_ready(value: Any) -> Any:
    """NaN -> None (strict JSON), recursively."""
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _num(value: Any, digits: int = 4) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def markdown_table(record: dict[str, Any]) -> str:
    """The per-dimension table of one evaluation, with its pooled row and a header line."""
    lines = [f"# Reward-model evaluation: {record['name']}", "",
             f"Model `{record['model_dir']}`, form `{record['form']}`"
             + (f" (method `{record['method']}`)" if record.get("method") else "")
             + f", split `{record['split']}`: {record['num_prompts']} prompts, {record['num_candidates']} candidates,"
             f" {record['num_queries']} queries, {record['mean_output_tokens']:.1f} output tokens per query,"
             f" wall {record.get('wall_s') or 0.0:.1f} s.", "",
             "| dimension | HPA | Margin HPA | PLCC | SRCC | pairs (margin) |", "|---|---|---|---|---|---|"]
    for dim, m in [*record["dimensions"].items(), ("**pooled**", record["pooled"])]:
        lines.append(f"| {dim} | {_num(m['hpa'])} | {_num(m['margin_hpa'])} | {_num(m['plcc'])} | {_num(m['srcc'])} "
                     f"| {m['num_pairs']} ({m['num_margin_pairs']}) |")
    return "\n".join(lines) + "\n"


def markdown_row(method_name: str, metrics: dict[str, Any], *, model: str = "teacher") -> str:
    """`| teacher | <method> | HPA | Margin HPA | PLCC | SRCC | output tokens |` from the pooled metrics; a record of
    several seeds (`seed_mean_record`) gives each value as mean ± standard error."""
    p, se = metrics["pooled"], metrics.get("pooled_se") or {}

    def cell(key: str) -> str:
        return _num(p[key]) + (f" ± {_num(se[key])}" if se.get(key) is not None else "")

    return (f"| {model} | {method_name} | {cell('hpa')} | {cell('margin_hpa')} | {cell('plcc')} "
            f"| {cell('srcc')} | {_num(metrics['mean_output_tokens'], 1)} |")


def seed_mean_record(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One method's evaluation records over seeds -> the mean of each pooled and per-dimension metric, with
    `pooled_se` (standard error of the mean, sample sd / sqrt(n)) and `num_seeds`; one record is returned as it is."""
    if len(records) == 1:
        return records[0]

    def mean_se(values: list[Any]) -> tuple[float, float]:
        arr = np.array([math.nan if v is None else float(v) for v in values])
        return float(arr.mean()), float(arr.std(ddof=1) / math.sqrt(len(arr)))

    keys = ("hpa", "margin_hpa", "plcc", "srcc")
    pooled = {k: mean_se([r["pooled"][k] for r in records]) for k in keys}
    dims = {d: {k: mean_se([r["dimensions"][d][k] for r in records])[0] for k in keys}
            for d in records[0].get("dimensions", {})}
    return _json_ready({**records[0], "name": f"{records[0]['name']} (mean of {len(records)} seeds)",
                        "num_seeds": len(records), "pooled": {k: m for k, (m, _) in pooled.items()},
                        "pooled_se": {k: se for k, (_, se) in pooled.items()}, "dimensions": dims,
                        "mean_output_tokens": float(np.mean([r["mean_output_tokens"] for r in records]))})


def results_table(rows: list[tuple[str, dict[str, Any]]], *, model: str = "teacher") -> str:
    """The methods table: header, then one `markdown_row` per (method name, metrics record)."""
    return "\n".join([RESULTS_HEADER, *(markdown_row(m, metrics, model=model) for m, metrics in rows)]) + "\n"


def save_predictions(path: Path, preds: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("candidate_id", pa.string()), ("prompt_id", pa.string()), ("dimension", pa.string()),
                        ("mu", pa.float64()), ("q", pa.list_(pa.float64())), ("human", pa.float64()),
                        ("reasoning", pa.string()), ("num_output_tokens", pa.int32())])
    table = pa.Table.from_pylist(preds, schema=schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, str(tmp))


def save_distributions(path: Path, rows: list[dict[str, Any]], preds: list[dict[str, Any]], form: str,
                       title: str) -> None:
    """One row per candidate: the image, then q over the nine bins per dimension (human score red, mu dashed);
    in reasoning form the greedy reasoning is each chart's caption."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_key = {(p["candidate_id"], p["dimension"]): p for p in preds}
    dims = list(dict.fromkeys(p["dimension"] for p in preds))
    reasoning = form == "reasoning"
    fig, axes = plt.subplots(len(rows), 1 + len(dims), squeeze=False,
                             figsize=(2.3 * (1 + len(dims)), (2.9 if reasoning else 2.0) * len(rows)))
    for i, row in enumerate(rows):
        axes[i, 0].imshow(decode_png(row["image"]))
        axes[i, 0].set_axis_off()
        axes[i, 0].set_title(textwrap.shorten(row["prompt"], 60), fontsize=6, wrap=True)
        for j, dim in enumerate(dims, start=1):
            ax, p = axes[i, j], by_key[(row["candidate_id"], dim)]
            ax.bar(SCORE_BINS, p["q"], width=0.4, color="C0")
            ax.axvline(p["human"], color="red", lw=1.2, label="human")
            ax.axvline(p["mu"], color="black", lw=1.0, ls="--", label="mu")
            ax.set_ylim(0, 1)
            ax.set_xticks([1, 2, 3, 4, 5])
            ax.tick_params(labelsize=6)
            ax.set_title(f"{dim}: mu {p['mu']:.2f}, human {p['human']:.2f}", fontsize=6.5)
            if reasoning and p["reasoning"] is not None:
                caption = textwrap.fill(textwrap.shorten(p["reasoning"] or "(empty)", 120), 38)
                ax.set_xlabel(caption, fontsize=5, family="monospace")
        if i == 0:
            axes[0, -1].legend(fontsize=5.5, loc="upper left")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
