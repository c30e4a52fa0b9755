"""True scores, bins, annotator aggregation and pairs, with hand-computed expectations."""

import numpy as np
import pytest

from zray.data.labels import (Pair, alignment_penalty, annotate, content_cost, drop_extremes_mean, make_pairs, snap,
                              train_labels, true_scores)
from zray.data.prompt_grammar import parse_prompt
from zray.data.scene import DEFECT_DIMENSION, Defects, Scene, SceneObject
from zray.rubric import DIMENSIONS, SCORE_BINS, label_index


def _obj(colour, shape, x=0.5, y=0.5):
    return SceneObject(shape=shape, color=colour, size="small", x=x, y=y)


TWO_RED_ONE_BLUE = parse_prompt("two red circles and a blue square on a white background")
RELATION = parse_prompt("a red circle left of a blue square on a black background")
FLAWLESS = Scene("white", (_obj("red", "circle", 0.2), _obj("blue", "square", 0.5), _obj("red", "circle", 0.8)))


def test_flawless_candidate_scores_five_everywhere():
    assert true_scores(TWO_RED_ONE_BLUE, FLAWLESS, Defects()) == {d: 5.0 for d in DIMENSIONS}


@pytest.mark.parametrize("name", list(DEFECT_DIMENSION))
def test_each_defect_lowers_only_its_dimension(name):
    mild = true_scores(TWO_RED_ONE_BLUE, FLAWLESS, Defects(**{name: 0.2}))
    bad = true_scores(TWO_RED_ONE_BLUE, FLAWLESS, Defects(**{name: 0.9}))
    dim = DEFECT_DIMENSION[name]
    assert mild[dim] == pytest.approx(5 - 3 * 0.2) and bad[dim] == pytest.approx(5 - 3 * 0.9)
    assert all(mild[d] == bad[d] == 5.0 for d in DIMENSIONS if d != dim)


def test_scores_are_clipped_to_one():
    many = Defects(noise=1.0, banding=1.0, blotches=1.0)
    assert true_scores(TWO_RED_ONE_BLUE, FLAWLESS, many)["realism"] == 1.0


def test_alignment_penalties_by_hand():
    o = FLAWLESS.objects
    cases = {
        "wrong colour": (Scene("white", (o[0], _obj("green", "square"), o[2])), 1.5),
        "wrong shape": (Scene("white", (o[0], _obj("blue", "star"), o[2])), 1.5),
        "missing": (Scene("white", (o[0], o[1])), 1.5),
        "wrong background": (Scene("gray", o), 1.0),
        "colour + background": (Scene("black", (o[0], o[1], _obj("yellow", "circle"))), 2.5),
        "both attributes wrong": (Scene("white", (o[0], _obj("green", "star"), o[2])), 3.0),
    }
    for name, (scene, penalty) in cases.items():
        assert alignment_penalty(TWO_RED_ONE_BLUE, scene) == penalty, name
        assert true_scores(TWO_RED_ONE_BLUE, scene, Defects())["alignment"] == 5.0 - penalty
    one = parse_prompt("a red circle on a white background")
    assert alignment_penalty(one, Scene("white", (o[0], o[2]))) == 1.5  # an extra red circle
    assert content_cost([("red", "circle")], [("red", "circle"), ("blue", "star")]) == 1.5


def test_relation_penalty():
    ok = Scene("black", (_obj("red", "circle", 0.2), _obj("blue", "square", 0.7)))
    violated = Scene("black", (_obj("red", "circle", 0.7), _obj("blue", "square", 0.2)))
    assert true_scores(RELATION, ok, Defects())["alignment"] == 5.0
    assert true_scores(RELATION, violated, Defects())["alignment"] == 3.0
    # an unidentifiable subject is paid for by the content cost only
    recoloured = Scene("black", (_obj("green", "circle", 0.7), _obj("blue", "square", 0.2)))
    assert true_scores(RELATION, recoloured, Defects())["alignment"] == 3.5


def test_label_snapping():
    assert SCORE_BINS == (1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0)
    # round((s - 1) / 0.5) with Python's round (ties to even); only snap clips, the bin index refuses
    assert [label_index(s) for s in (1.0, 1.2, 1.25, 1.26, 3.74, 3.75, 5.0)] == [0, 0, 0, 1, 5, 6, 8]
    for outside in (5.7, -3.0, float("nan")):
        with pytest.raises(ValueError, match="is not allowed: expected a number in"):
            label_index(outside)
    assert [snap(s) for s in (0.2, 2.24, 2.25, 2.26, 4.76, 5.7, 9.0, -3.0)] == [1.0, 2.0, 2.0, 2.5, 5.0, 5.0, 5.0, 1.0]
    assert all(snap(b) == b and SCORE_BINS[label_index(b)] == b for b in SCORE_BINS)


def test_drop_extremes_by_hand():
    assert drop_extremes_mean([3.0, 4.5, 3.5, 5.0, 4.0]) == pytest.approx(4.0)  # drop 3.0 and 5.0
    assert drop_extremes_mean([2.0, 2.5, 2.5, 3.0, 4.5]) == pytest.approx(8.0 / 3)  # -> snaps to 2.5
    assert snap(drop_extremes_mean([2.0, 2.5, 2.5, 3.0, 4.5])) == 2.5
    assert drop_extremes_mean([1.0, 5.0, 5.0]) == 5.0  # one of the equal highest is dropped, not both
    with pytest.raises(ValueError, match="at least 3"):
        drop_extremes_mean([3.0, 4.0])


def test_simulated_annotators(rng):
    true = {"alignment": 3.3, "realism": 5.0, "aesthetics": 1.0, "plausibility": 4.2}
    biases = np.zeros((5, 4))
    ratings = annotate(true, biases, rng, noise=0.0)
    assert ratings == {"alignment": [3.5] * 5, "realism": [5.0] * 5, "aesthetics": [1.0] * 5, "plausibility": [4.0] * 5}
    biases[:, 0] = [-1.0, 0.0, 0.0, 0.0, 1.0]
    assert annotate(true, biases, rng, noise=0.0)["alignment"] == [2.5, 3.5, 3.5, 3.5, 4.5]
    noisy = annotate(true, np.zeros((5, 4)), rng, noise=0.35)
    assert all(v in (1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0) for vs in noisy.values() for v in vs)
    labels = train_labels(true, rng, noise=0.0)
    assert labels == {"alignment": 3.5, "realism": 5.0, "aesthetics": 1.0, "plausibility": 4.0}


def test_pairs_by_hand():
    labels = [{"alignment": 5.0, "realism": 4.0, "aesthetics": 3.0, "plausibility": 2.0},
              {"alignment": 3.5, "realism": 4.0, "aesthetics": 3.0, "plausibility": 2.0},
              {"alignment": 5.0, "realism": 2.5, "aesthetics": 3.0, "plausibility": 2.0}]
    pairs = make_pairs("p0", ["a", "b", "c"], labels)
    assert pairs == [Pair("p0", "alignment", "a", "b", 5.0, 3.5), Pair("p0", "alignment", "c", "b", 5.0, 3.5),
                     Pair("p0", "realism", "a", "c", 4.0, 2.5), Pair("p0", "realism", "b", "c", 4.0, 2.5)]
    assert all(p.gap == 1.5 for p in pairs)
