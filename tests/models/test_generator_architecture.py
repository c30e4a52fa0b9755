"""Generators may be any diffusers Z-Image dir (a pipeline or a transformer), the tiny zoo's or a real one; another
is a one-line ConfigError naming the setting, and distill-generator / reward-finetune check theirs before any work."""

import dataclasses
import json

import pytest

from jobs.recipes import tiny_cpu
from zray.config import ConfigError
from zray.models.generator import check_generator_architecture


def _dir(path, name, **content):
    (path / name).parent.mkdir(parents=True, exist_ok=True)
    (path / name).write_text(json.dumps(content))
    return path


def test_pipelines_and_transformers_of_z_image_pass(tmp_path):
    for name, file, cls in (("p", "model_index.json", "ZImagePipeline"),
                            ("t", "config.json", "ZImageTransformer2DModel"),
                            ("u", "transformer/config.json", "ZImageTransformer2DModel")):
        path = _dir(tmp_path / name, file, _class_name=cls)
        assert check_generator_architecture(path, "x") == path


def test_another_architecture_is_a_one_line_error_naming_the_setting(tmp_path):
    sdxl = _dir(tmp_path / "sdxl", "model_index.json", _class_name="StableDiffusionXLPipeline")
    with pytest.raises(ConfigError) as info:
        check_generator_architecture(sdxl, "distill_generator.teacher_dir")
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"distill_generator.teacher_dir={str(sdxl)!r} is not allowed")
    assert "_class_name='StableDiffusionXLPipeline'" in message and "ZImagePipeline" in message
    with pytest.raises(ConfigError, match="no model_index.json or config.json there"):
        check_generator_architecture(tmp_path, "reward_finetune.pipeline_dir")

    from jobs.distill_generator import teacher_pipeline_dir

    cfg = dataclasses.replace(tiny_cpu(), out_dir=str(tmp_path / "run"))
    cfg = dataclasses.replace(cfg, distill_generator=dataclasses.replace(cfg.distill_generator,
                                                                         teacher_dir=str(sdxl)))
    with pytest.raises(ConfigError, match=r"distill_generator.teacher_dir=.*StableDiffusionXLPipeline"):
        teacher_pipeline_dir(cfg)
