"""Caption text: canonical format, exact round trip, strict and lenient parsing."""

import numpy as np
import pytest

from zray.data.captions import description_of, describe, format_description, parse_description
from zray.data.render import render_candidate
from zray.data.scene import Defects, Scene, SceneObject
from zray.data.world import sample_scene

EXAMPLE = Scene("white", (SceneObject("square", "blue", "small", 0.55, 0.78),
                          SceneObject("circle", "red", "large", 0.31, 0.52),
                          SceneObject("circle", "red", "small", 0.70, 0.25)))
EXAMPLE_TEXT = """background: white
objects: two red circles and a blue square
1: large red circle at (31, 52)
2: small blue square at (55, 78)
3: small red circle at (70, 25)
relations: 1 left of 2; 1 above 2; 1 left of 3; 1 below 3; 2 left of 3; 2 below 3
defects: noise mild; blur severe"""


def test_example_text():
    assert describe(EXAMPLE, Defects(noise=0.3, blur=0.8, banding=0.01)) == EXAMPLE_TEXT
    single = Scene("black", (SceneObject("star", "orange", "large", 0.5, 0.5),))
    assert describe(single) == ("background: black\nobjects: an orange star\n1: large orange star at (50, 50)\n"
                                "relations: none\ndefects: none")


def test_round_trip_on_rendered_scenes():
    rng = np.random.default_rng(11)
    for k in range(200):
        scene = sample_scene(rng, 3, 0.3)
        requested = Defects(**{name: round(float(rng.uniform()), 3) for name in rng.choice(
            ["noise", "blur", "clashing", "cut_by_frame", "floating_shadow", "cramped"], size=2, replace=False)})
        _, drawn, realised = render_candidate(scene, 64, requested, seed=k)
        text = describe(drawn, realised)
        desc = parse_description(text)
        assert desc == description_of(drawn, realised)
        assert format_description(desc) == text
        assert desc.background == drawn.background and desc.counts() == drawn.counts()
        assert sorted((o.color, o.shape, o.size) for o in desc.objects) == \
            sorted((o.color, o.shape, o.size) for o in drawn.objects)
        for o in desc.objects:  # positions to the percent
            assert min(abs(o.x - d.x) + abs(o.y - d.y) for d in drawn.objects) <= 0.0101
        assert dict(desc.defects).keys() == {n for n, v in realised.to_dict().items() if v >= 0.05}
        if drawn.relation is not None:  # the prompt's relation is among the described facts
            a, b = drawn.objects[drawn.relation.subject], drawn.objects[drawn.relation.reference]
            assert ((a.color, a.shape), drawn.relation.predicate, (b.color, b.shape)) in desc.relation_triples()


def test_strict_parse_names_the_bad_line():
    bad = EXAMPLE_TEXT.replace("2: small blue square", "2: small teal square")
    with pytest.raises(ValueError, match="line 4"):
        parse_description(bad)
    with pytest.raises(ValueError, match="disagrees"):
        parse_description(EXAMPLE_TEXT.replace("two red circles and a blue square", "three red circles"))
    with pytest.raises(ValueError, match="lacks"):
        parse_description("\n".join(EXAMPLE_TEXT.split("\n")[:-1]))
    with pytest.raises(ValueError, match="outside"):
        parse_description(EXAMPLE_TEXT.replace("2 left of 3", "2 left of 7"))


def test_lenient_parse_keeps_what_parses():
    garbled = EXAMPLE_TEXT.replace("2: small blue square", "2: small teal square").replace(
        "background: white", "background: mauve")
    desc = parse_description(garbled, strict=False)
    assert desc.background is None
    assert desc.counts() == {("red", "circle"): 2, ("blue", "square"): 1}
    assert [(o.color, o.shape) for o in desc.objects] == [("red", "circle"), ("red", "circle")]
    assert dict(desc.defects) == {"noise": "mild", "blur": "severe"}
    assert parse_description("nonsense", strict=False).groups is None
