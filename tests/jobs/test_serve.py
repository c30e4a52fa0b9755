"""zray serve without a service: which checkpoint it serves, the error when there is none, the serve config keys.
(The deployment itself is tested live in tests/actors/test_reward_app.py.)"""

from __future__ import annotations

import json

import pytest

from jobs.cli import main, resolve_config
from zray.config import ConfigError, ServeConfig


def test_missing_default_student_names_the_path_and_the_fix(tmp_path, capsys):
    assert main(["serve", "--set", f"out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path}/train_student/risd/final" in err and "zray train-student" in err and "--model" in err
    assert main(["serve", "--model", str(tmp_path / "nope")]) == 2
    assert f"no student checkpoint at {tmp_path / 'nope'}" in capsys.readouterr().err


def test_model_resolution(tmp_path):
    from jobs.serve import resolve_model

    default = tmp_path / "train_student" / "risd" / "final"
    default.mkdir(parents=True)
    (default / "config.json").write_text('{"model_type": "qwen3_vl"}')
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text('{"architectures": ["Qwen2_5_VLForConditionalGeneration"]}')
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "config.json").write_text('{"model_type": "llama"}')
    cfg = resolve_config("tiny_cpu", [f"out_dir={tmp_path}"])
    assert resolve_model(cfg, None) == default.resolve()
    assert resolve_model(cfg, str(other)) == other.resolve()
    assert resolve_model(resolve_config("tiny_cpu", [f"out_dir={tmp_path}", f"serve.model={other}"]), None) == \
        other.resolve()
    with pytest.raises(ConfigError, match="model_type='llama'.*expected a Hugging Face VLM of a supported"):
        resolve_model(cfg, str(wrong))


def test_serve_config_keys(capsys):
    cfg = resolve_config("tiny_cpu", ["serve.port=8123", "serve.max_batch_size=4", "serve.auth_token_env=MY_TOKEN"])
    assert (cfg.serve.port, cfg.serve.max_batch_size, cfg.serve.auth_token_env) == (8123, 4, "MY_TOKEN")
    for bad, fragment in [("serve.port=70000", "ServeConfig.port=70000"),
                          ("serve.batch_wait_timeout_s=-1", "ServeConfig.batch_wait_timeout_s"),
                          ("serve.auth_token_env=not-a-name", "ServeConfig.auth_token_env")]:
        with pytest.raises(ConfigError, match=fragment):
            resolve_config("tiny_cpu", [bad])
    with pytest.raises(ConfigError, match="max_image_pixels"):
        ServeConfig(max_image_pixels=0)
    assert main(["config"]) == 0
    assert json.loads(capsys.readouterr().out)["serve"]["app_name"] == "reward"
