"""`zray evaluate` on the command line: bad input is one line on stderr, refused before any work."""

import json
import subprocess
import sys

from jobs.cli import main
from zray.models.vlm import SCORING_FILE


def test_cli_bad_form_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "evaluate", "--model", str(tmp_path), "--form",
                          "sideways"], capture_output=True, text=True)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and "Traceback" not in out.stderr
    assert "--form: invalid choice: 'sideways'" in lines[0] and "'direct'" in lines[0]


def test_cli_bad_model_or_scoring_file_is_one_line(tmp_path, capsys):
    assert main(["evaluate", "--model", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))  # a supported architecture
    (tmp_path / SCORING_FILE).write_text(json.dumps({"form": "sideways"}))
    assert main(["evaluate", "--model", str(tmp_path), "--set", f"out_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "form='sideways' is not allowed" in err[0]
    assert not (tmp_path / "run").exists()  # refused before building data or starting an engine


def test_cli_needs_a_model_or_a_curve_and_names_a_bad_run_folder(tmp_path, capsys):
    assert main(["evaluate"]) == 2
    assert "evaluate needs --model DIR (a model) or --curve RUN" in capsys.readouterr().err
    assert main(["evaluate", "--curve", str(tmp_path / "nothing"), "--set", f"out_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a folder" in err[0] and "train_teacher/gdso" in err[0]
    (tmp_path / "empty").mkdir()
    assert main(["evaluate", "--curve", str(tmp_path / "empty"), "--set", f"out_dir={tmp_path / 'run'}"]) == 2
    assert "keep_checkpoints" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before building data or starting an engine
