"""`zray demo` runs end to end (vLLM is covered by tests/models; skipped here to keep one engine per session)."""

import json

from jobs.cli import main


def test_demo_writes_summary_and_grid(tmp_path, capsys):
    out = tmp_path / "demo_run"
    argv = ["demo", "--recipe", "tiny_cpu", "--skip-vllm", "--set", f"out_dir={out}",
            "--set", "world.num_train_prompts=4", "--set", "world.num_test_prompts=3",
            "--set", "world.num_heldout_prompts=2", "--set", "world.num_caption_images=4",
            "--set", "world.num_caption_test_images=4", "--set", "world.num_generator_images=4",
            "--set", "world.num_generator_test_prompts=4"]
    assert main(argv) == 0
    summary = json.loads((out / "demo" / "summary.json").read_text())
    assert (out / "demo" / "samples.png").stat().st_size > 10_000
    assert set(summary["models"]) == {"teacher", "student", "generator"}
    assert all(info["num_params"] > 0 for info in summary["models"].values())
    assert summary["judge_agreement"]["clean"]["exact"] >= 0.95
    assert summary["vllm_vs_transformers_max_abs_diff"] is None
    assert "zray demo summary" in capsys.readouterr().out
