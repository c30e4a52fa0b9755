"""The README's first command, run exactly as written (install check, then `zray demo` with its vLLM step)."""

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def readme_first_command() -> str:
    """The first ```bash block of the README (the set-up and demo command)."""
    match = re.search(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), flags=re.S)
    assert match, "README.md has no ```bash block"
    return match.group(1).strip()


@pytest.mark.slow
def test_readme_first_command_runs_the_demo_with_vllm():
    command = readme_first_command()
    assert "zray demo" in command and "--skip-vllm" not in command
    started = time.time()
    out = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    demo = ROOT / "runs" / "tiny_cpu" / "demo"  # the tiny_cpu recipe's out_dir
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
