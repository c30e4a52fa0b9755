"""Scoring prompts of another rubric's dimensions: a ScoreRequest carries the anchors, the prompt shows them."""

import pytest

from zray.rubric import BUILTIN_RUBRIC, ScoreRequest, build_messages, rubric_text

ANCHORS = ("chaotic", "awkward", "acceptable", "good", "masterful")


def test_custom_dimension_needs_and_shows_its_anchors():
    with pytest.raises(ValueError, match=r"dimension='composition' is not allowed: expected one of .*anchors"):
        ScoreRequest("a red circle", None, "composition")
    req = ScoreRequest("a red circle", None, "composition", anchors=ANCHORS)
    system = build_messages(req.prompt, req.dimension, False, req.anchors)[0]["content"][0]["text"]
    assert "Rubric for composition:\n1: chaotic" in system and "5: masterful" in system
    assert rubric_text("alignment") == rubric_text("alignment", BUILTIN_RUBRIC.anchors_of("alignment"))
    with pytest.raises(ValueError, match="anchors=.*five"):
        ScoreRequest("a red circle", None, "composition", anchors=ANCHORS[:4])
    with pytest.raises(ValueError, match="'Bad Name' is not allowed"):
        ScoreRequest("a red circle", None, "Bad Name", anchors=ANCHORS)
