"""The pipeline's check of the running reward service: the test candidates scored over HTTP, as a user would.

    check_service(cfg, url, token) -> summary dict   (writes <out_dir>/serve/check.json and summary.md)

Every candidate of the evaluation split (`evaluate.num_prompts` prompts, all rubric dimensions in one request) goes
to `POST /v1/score` from `concurrency` client threads (`zray.client.RewardClient`). From the answers: requests,
errors, requests/s, p50 / p99 latency, the served model version, the pooled HPA of the served expected scores, and
the largest difference from the student's own offline evaluation of the same candidates
(`<out_dir>/evaluate/student_risd/predictions.parquet`, written by train-student), when it exists.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from zray.config import RunConfig
from zray.training.runs import write_text_atomic

OFFLINE_NAME = "student_risd"


def check_service(cfg: RunConfig, url: str, *, token: str | None, concurrency: int = 8) -> dict[str, Any]:
    import numpy as np

    from zray.client import RewardClient, RewardServiceError
    from zray.evaluation.rewards import compute_metrics, evaluation_rows

    rows = evaluation_rows(cfg)
    out = Path(cfg.out_dir)
    latencies: list[float] = []
    errors: list[str] = []

    with RewardClient(url, token=token, timeout_s=cfg.serve.request_timeout_s) as client:
        info = client.model_info()

        def one(row: dict[str, Any]) -> Any:
            start = time.perf_counter()
            try:
                result = client.score(row["prompt"], row["image"])
            except RewardServiceError as err:
                errors.append(f"{row['candidate_id']}: {err}")
                return None
            latencies.append(time.perf_counter() - start)
            return result

        clock = time.perf_counter()
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            results = list(pool.map(one, rows))
        wall = time.perf_counter() - clock
    preds = [{"candidate_id": r["candidate_id"], "prompt_id": r["prompt_id"], "dimension": d,
              "mu": res.scores[d].expected_score, "human": float(r[f"human_{d}"])}
             for r, res in zip(rows, results, strict=True) if res is not None for d in info.dimensions]
    summary: dict[str, Any] = {
        "url": url, "model_dir": info.model_dir, "model_version": info.model_version, "requests": len(rows),
        "errors": len(errors), "concurrency": concurrency, "wall_s": wall, "requests_per_s": len(rows) / wall,
        "p50_ms": float(np.percentile(latencies, 50) * 1e3) if latencies else None,
        "p99_ms": float(np.percentile(latencies, 99) * 1e3) if latencies else None,
        "served_pooled_hpa": compute_metrics(preds)["pooled"]["hpa"] if preds else None}
    offline = out / "evaluate" / OFFLINE_NAME / "predictions.parquet"
    if offline.exists():
        from zray.data.parquet import read_parquet_file

        ref = {(p["candidate_id"], p["dimension"]): p["mu"] for p in read_parquet_file(offline).to_pylist()}
        diffs = [abs(p["mu"] - ref[(p["candidate_id"], p["dimension"])]) for p in preds
                 if (p["candidate_id"], p["dimension"]) in ref]
        offline_hpa = json.loads((out / "evaluate" / OFFLINE_NAME / "metrics.json").read_text())["pooled"]["hpa"]
        summary.update({"offline_pooled_hpa": offline_hpa, "compared": len(diffs),
                        "max_abs_diff_expected_score": max(diffs) if diffs else None})
    folder = out / "serve"
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / "check.json", json.dumps({**summary, "error_messages": errors[:20]}, indent=2))
    write_text_atomic(folder / "summary.md", summary_markdown(summary))
    print(summary_markdown(summary))
    return summary


def summary_markdown(s: dict[str, Any]) -> str:
    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    lines = [f"The reward service at {s['url']} served `{s['model_dir']}` (version {s['model_version']}). Each test "
             f"candidate was one `POST /v1/score` request (every rubric dimension), {s['concurrency']} at a time; the "
             "service was stopped after the check (`zray serve` serves the same checkpoint).", "",
             "| requests | errors | requests/s | p50 latency | p99 latency | pooled HPA served | pooled HPA offline "
             "| largest difference in expected score |", "|---|---|---|---|---|---|---|---|",
             f"| {s['requests']} | {s['errors']} | {s['requests_per_s']:.1f} | {fmt(s['p50_ms'], '.0f')} ms "
             f"| {fmt(s['p99_ms'], '.0f')} ms | {fmt(s['served_pooled_hpa'], '.3f')} "
             f"| {fmt(s.get('offline_pooled_hpa'), '.3f')} | {fmt(s.get('max_abs_diff_expected_score'), '.2e')} |"]
    return "\n".join(lines) + "\n"
