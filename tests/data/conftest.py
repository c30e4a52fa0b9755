"""Shared fixtures for the Shapes world tests: a small world built once per session."""

import numpy as np
import pytest

from zray.config import WorldConfig
from zray.data.build import build_world

SMALL = dict(num_train_prompts=8, num_test_prompts=4, num_heldout_prompts=4, candidates_per_prompt=4,
             num_caption_images=20, num_caption_test_images=8, num_generator_images=20,
             num_generator_test_prompts=8)


@pytest.fixture(scope="session")
def small_settings() -> dict:
    """The WorldConfig fields (other than the seed) of the small world."""
    return dict(SMALL)


@pytest.fixture(scope="session")
def small_cfg() -> WorldConfig:
    return WorldConfig(seed=3, **SMALL)


@pytest.fixture(scope="session")
def small_world(small_cfg, tmp_path_factory):
    """(out_dir, manifest) of a small world."""
    out = tmp_path_factory.mktemp("world")
    return out, build_world(small_cfg, out, progress=False)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
