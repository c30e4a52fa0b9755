"""The scorer's side of a checkpoint's rubric (actors/reward_app/scorer.py), without a model or Serve: an item's
default dimensions are the rubric's, an unknown one names the served ones, and a checkpoint of another rubric is
refused for a running app."""

from __future__ import annotations

import pytest
from PIL import Image

from actors.reward_app.scorer import LoadedModel, ScoreItem, check_same_rubric
from zray.rubric import BUILTIN_RUBRIC, DIMENSIONS, RUBRICS, Rubric

CUSTOM = Rubric(("alignment", "composition"), (RUBRICS["alignment"], tuple("abcde")), source="mine")


def loaded(rubric: Rubric) -> LoadedModel:
    return LoadedModel(model=None, processor=None, version="v1", model_dir="/ckpt", rubric=rubric)


def test_item_dimensions_against_the_checkpoint_rubric():
    image = Image.new("RGB", (32, 32))
    assert loaded(CUSTOM).dimensions_of(ScoreItem("a cat", image)) == ("alignment", "composition")
    assert loaded(BUILTIN_RUBRIC).dimensions_of(ScoreItem("a cat", image)) == DIMENSIONS
    assert loaded(CUSTOM).dimensions_of(ScoreItem("a cat", image, ("composition",))) == ("composition",)
    with pytest.raises(ValueError, match=r"\['realism'\] are not allowed: the served model .* scores "
                                         r"\['alignment', 'composition'\]"):
        loaded(CUSTOM).dimensions_of(ScoreItem("a cat", image, ("realism",)))
    with pytest.raises(ValueError, match="expected distinct dimension names"):
        ScoreItem("a cat", image, ("realism", "realism"))


def test_a_checkpoint_of_another_rubric_is_refused():
    check_same_rubric(CUSTOM, Rubric(CUSTOM.dimensions, CUSTOM.anchors, source="elsewhere"), "/b")  # same content
    with pytest.raises(ValueError, match="model='/b' records another rubric .* deploy a new app"):
        check_same_rubric(BUILTIN_RUBRIC, CUSTOM, "/b")
