"""`zray demo` end to end, with its vLLM step (the README's first command is the pipeline:
tests/jobs/test_readme_first_command.py)."""

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_demo_loads_every_model_through_every_stack_with_vllm(tmp_path):
    started = time.time()
    out = subprocess.run([str(ROOT / ".venv" / "bin" / "zray"), "demo", "--recipe", "tiny_cpu", "--set",
                          f"out_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    demo = tmp_path / "demo"
    summary_path = demo / "summary.json"
    assert summary_path.stat().st_mtime >= started  # written by this run
    summary = json.loads(summary_path.read_text())
    assert (demo / "samples.png").stat().st_size > 10_000
    assert set(summary["models"]) == {"teacher", "student", "generator"}
    assert all(info["num_params"] > 0 for info in summary["models"].values())
    assert summary["judge_agreement"]["clean"]["exact"] >= 0.95
    diff = summary["vllm_vs_transformers_max_abs_diff"]
    assert diff is not None and diff < 1e-5, diff  # vLLM ran, and serves the distribution transformers computes
    assert "zray demo summary" in out.stdout
