"""The GPU benchmarks still run: each one's CPU smoke mode (tiny shapes, float32), in a fresh process, exits 0
with its checks passing. A GPU is lent rarely and for minutes; a script that broke since its last run would waste
the loan. (bench/gpu_pretrain_vlm.py needs a Shapes data dir and is not run here.)"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKES = {
    "gpu_generate": (["--smoke", "--no-compile"], "ok     Turbo++ student at init vs teacher's 2-step sampler"),
    "gpu_score": (["--smoke"], "score distributions agree"),
    "gpu_train_step": (["--smoke"], "[zimage] Z-Image transformer"),
    "gpu_gdso_step": (["--size", "tiny", "--device", "cpu", "--seq-len", "120", "--response-len", "40"],
                      "GDSO step (ref forward + forward + loss + backward)"),
}


@pytest.mark.slow  # a fresh interpreter per bench: 7-12 s each
@pytest.mark.parametrize("bench", sorted(SMOKES))
def test_gpu_bench_smoke_mode_runs_on_the_cpu(bench):
    args, expected = SMOKES[bench]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, str(ROOT / "bench" / f"{bench}.py"), *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 0, f"bench/{bench}.py {' '.join(args)} exited {out.returncode}:\n{text[-3000:]}"
    assert expected in text, f"bench/{bench}.py printed no {expected!r}:\n{text[-3000:]}"
    assert "FAIL" not in out.stdout
