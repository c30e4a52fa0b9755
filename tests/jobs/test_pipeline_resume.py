"""`zray run` stopped mid-stage (Ctrl-C) and run again resumes that stage from its last checkpoint, and ends where an
uninterrupted run ends: the same losses at every step and the same final weights, bit for bit. The uninterrupted run
is the README's (the `readme_pipeline` fixture: the same tiny_cpu recipe, another out_dir). The stage cut here is
Turbo++ (`distill_generator`); its inputs (the world, the base generator) and their records are copied from the
README's run, so the pipeline finds them done with the same config and skips them."""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _losses(phase_dir: Path) -> list[dict[str, float]]:
    """Every loss term of every logged step, from the phase's last checkpoint (its history spans a resume)."""
    last = sorted(phase_dir.glob("checkpoint_0*"))[-1]
    return [{k: v for k, v in h.items() if k == "step" or k.endswith("loss")}
            for h in json.loads((last / "learner.json").read_text())["history"]]


@pytest.mark.slow
def test_a_pipeline_stopped_mid_stage_resumes_to_the_uninterrupted_result(readme_pipeline, tmp_path):
    from safetensors.torch import load_file

    source, out = readme_pipeline["run_dir"], tmp_path / "run"
    for rel in ("data", "pretrain_generator/pipeline", "pipeline/data.json", "pipeline/pretrain_generator.json"):
        copy = shutil.copytree if (source / rel).is_dir() else shutil.copy2
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        copy(source / rel, out / rel)
    command = [str(ROOT / ".venv" / "bin" / "zray"), "run", "--recipe", "tiny_cpu", "--stages", "distill_generator",
               "--set", f"out_dir={out}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        mid = out / "distill_generator" / "turbo" / "checkpoint_000001" / "learner.json"  # 2 steps, one per checkpoint
        deadline = time.monotonic() + 600
        while not mid.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert mid.exists(), (tmp_path / "first.log").read_text()[-3000:]
        first.send_signal(signal.SIGINT)  # Ctrl-C
        assert first.wait(timeout=180) != 0
    record = json.loads((out / "pipeline" / "distill_generator.json").read_text())
    assert record["status"] == "running"  # cut mid-stage
    assert "| distill_generator | Turbo++ two-step generator | running | cut (resumes next time) |" \
        in (out / "report.md").read_text()

    second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "distill_generator (Turbo++ two-step generator): resuming from its latest checkpoint" in second.stdout
    record = json.loads((out / "pipeline" / "distill_generator.json").read_text())
    assert record["status"] == "done" and record["attempts"] == 2
    resumed = json.loads((out / "distill_generator" / "turbo" / "checkpoint_000002" / "learner.json").read_text())
    assert [int(h["step"]) for h in resumed["history"]] == [1, 2]

    reference = source / "distill_generator" / "turbo"
    assert _losses(out / "distill_generator" / "turbo") == _losses(reference)
    files = sorted((reference / "final").rglob("*.safetensors"))
    assert files  # the two-step student's networks
    for path in files:
        ours = load_file(str(out / "distill_generator" / "turbo" / "final" / path.relative_to(reference / "final")))
        theirs = load_file(str(path))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs), path.name
