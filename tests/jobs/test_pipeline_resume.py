"""`zray run` stopped mid-stage (Ctrl-C) and run again resumes that stage from its last checkpoint, and ends where an
uninterrupted run ends: the same loss at every step and the same final weights, bit for bit. Stage: the base
generator (two learner phases: a finished one is kept, a cut one continues from its checkpoint). The uninterrupted run
is the README's (the `readme_pipeline` fixture: the same tiny_cpu recipe, another out_dir)."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _losses(phase_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) of every logged step, from the phase's last checkpoint (its history spans a resume)."""
    last = sorted(phase_dir.glob("checkpoint_0*"))[-1]
    return [(int(h["step"]), h["loss"]) for h in json.loads((last / "learner.json").read_text())["history"]]


@pytest.mark.slow
def test_a_pipeline_stopped_mid_stage_resumes_to_the_uninterrupted_result(readme_pipeline, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    command = [str(ROOT / ".venv" / "bin" / "zray"), "run", "--recipe", "tiny_cpu", "--stages",
               "data,pretrain_generator", "--set", f"out_dir={out}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        # the flow phase's first checkpoint (3 steps, one every 2): the VAE phase is finished (kept on resume),
        # the flow phase is cut after its checkpoint (continued from it)
        mid = out / "pretrain_generator" / "flow" / "checkpoint_000002" / "learner.json"
        deadline = time.monotonic() + 600
        while not mid.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert mid.exists(), (tmp_path / "first.log").read_text()[-3000:]
        first.send_signal(signal.SIGINT)  # Ctrl-C
        assert first.wait(timeout=180) != 0
    record = json.loads((out / "pipeline" / "pretrain_generator.json").read_text())
    assert record["status"] == "running"  # cut mid-stage
    assert "| pretrain_generator | base generator (VAE, flow) | running | cut (resumes next time) |" \
        in (out / "report.md").read_text()

    second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "data (Shapes world (Parquet)): done before with the same config, skipped" in second.stdout
    assert "pretrain_generator (base generator (VAE, flow)): resuming from its latest checkpoint" in second.stdout
    record = json.loads((out / "pipeline" / "pretrain_generator.json").read_text())
    assert record["status"] == "done" and record["attempts"] == 2

    reference = readme_pipeline["run_dir"] / "pretrain_generator"
    for phase in ("vae", "flow"):
        assert _losses(out / "pretrain_generator" / phase) == _losses(reference / phase), phase
    files = sorted((reference / "pipeline").rglob("*.safetensors"))
    assert len(files) == 3  # text encoder, transformer, VAE
    for path in files:
        ours = load_file(str(out / "pretrain_generator" / "pipeline" / path.relative_to(reference / "pipeline")))
        theirs = load_file(str(path))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs), path.name
