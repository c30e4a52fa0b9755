"""The tiny Z-Image pipeline loads through ZImagePipeline.from_pretrained and generates 64x64 images."""

import numpy as np
import pytest

from zray.models.generator import generate, load_zimage
from zray.models.tiny import build_tiny_zimage


@pytest.fixture(scope="module")
def pipe(tiny_zoo_config, tmp_path_factory):
    # built alone (not through the zoo fixture): the generator needs no torchvision, the VLM processors do
    path = build_tiny_zimage(tiny_zoo_config.generator, tmp_path_factory.mktemp("zimage"), image_size=64)
    return load_zimage(path)


def test_loads_as_zimage_pipeline(pipe):
    from diffusers import ZImagePipeline

    assert isinstance(pipe, ZImagePipeline)
    assert pipe.vae.config.latent_channels == 16
    assert pipe.scheduler.config.shift == 3.0 and not pipe.scheduler.config.use_dynamic_shifting


def test_two_step_generation_is_deterministic(pipe):
    images = generate(pipe, ["a red circle", "two blue squares on a gray background"], steps=2, seed=0)
    again = generate(pipe, ["a red circle", "two blue squares on a gray background"], steps=2, seed=0)
    assert [im.size for im in images] == [(64, 64), (64, 64)]
    assert np.array_equal(np.asarray(images[0]), np.asarray(again[0]))


def test_generate_rejects_bad_size(pipe):
    with pytest.raises(ValueError, match="height=62"):
        generate(pipe, ["a red circle"], steps=2, seed=0, height=62)
