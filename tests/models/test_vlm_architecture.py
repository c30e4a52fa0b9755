"""Base VLMs may be any Hugging Face dir of a supported architecture; another one is a one-line error naming the
setting, what was found and what is supported."""

import dataclasses
import json

import pytest

from jobs.cli import main
from jobs.recipes import tiny_cpu
from zray.config import ConfigError
from zray.models.vlm import check_vlm_architecture


def _hf_dir(path, **config):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_supported_architectures_pass_by_model_type_or_class(tmp_path):
    for name, config in (("a", {"model_type": "qwen2_5_vl"}), ("b", {"model_type": "qwen3_vl"}),
                         ("c", {"architectures": ["Qwen3VLForConditionalGeneration"]})):
        path = _hf_dir(tmp_path / name, **config)
        assert check_vlm_architecture(path, "x") == path


def test_another_architecture_is_a_one_line_error(tmp_path):
    llava = _hf_dir(tmp_path / "llava", model_type="llava", architectures=["LlavaForConditionalGeneration"])
    with pytest.raises(ConfigError) as info:
        check_vlm_architecture(llava, "train_teacher.base_model")
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"train_teacher.base_model={str(llava)!r} is not allowed")
    assert "model_type='llava'" in message and "qwen2_5_vl (Qwen2_5_VLForConditionalGeneration)" in message
    assert "qwen3_vl" in message

    from jobs.train_teacher import base_model_dir

    cfg = dataclasses.replace(tiny_cpu(), out_dir=str(tmp_path / "run"))
    cfg = dataclasses.replace(cfg, train_teacher=dataclasses.replace(cfg.train_teacher, base_model=str(llava)))
    with pytest.raises(ConfigError, match=r"train_teacher.base_model=.*model_type='llava'"):
        base_model_dir(cfg)


def test_evaluate_cli_refuses_another_architecture_in_one_line(tmp_path, capsys):
    bert = _hf_dir(tmp_path / "bert", model_type="bert")
    assert main(["evaluate", "--model", str(bert), "--set", f"out_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--model=" in err[0] and "model_type='bert'" in err[0] and "qwen3_vl" in err[0]
    assert not (tmp_path / "run").exists()  # refused before any data or engine
