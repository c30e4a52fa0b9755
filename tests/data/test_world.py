"""Prompts, scene/prompt consistency, candidates and splits."""

import numpy as np
import pytest

from zray.data.candidates import make_candidates, tier_plan
from zray.data.prompt_grammar import PromptSpec, parse_prompt, prompt_for, prompt_text, spec_of
from zray.data.scene import Relation, Scene, SceneObject
from zray.rubric import DIMENSIONS
from zray.data.world import ALL_COMBOS, heldout_combos, sample_scene, scene_for_spec, split_prompts


def test_prompt_examples():
    scene = Scene("white", (SceneObject("circle", "red", "small", 0.2, 0.5),
                            SceneObject("square", "blue", "large", 0.5, 0.5),
                            SceneObject("circle", "red", "large", 0.8, 0.5)))
    assert prompt_for(scene) == "two red circles and a blue square on a white background"
    rel = Scene("black", (SceneObject("circle", "red", "small", 0.2, 0.5),
                          SceneObject("square", "blue", "small", 0.7, 0.5)), Relation(0, "left of", 1))
    assert prompt_for(rel) == "a red circle left of a blue square on a black background"
    three = Scene("gray", (SceneObject("star", "orange", "small", 0.2, 0.2),
                           SceneObject("triangle", "green", "small", 0.5, 0.5),
                           SceneObject("square", "green", "small", 0.8, 0.8)))
    assert prompt_for(three) == "a green square, a green triangle and an orange star on a gray background"


def test_prompt_round_trips_and_matches_its_scene(rng):
    for _ in range(300):
        scene = sample_scene(rng, 3, 0.4)
        text = prompt_for(scene)
        spec = parse_prompt(text)
        assert prompt_text(spec) == text
        assert spec.background == scene.background and spec.counts() == scene.counts()
        if scene.relation is not None:
            # unambiguous: subject and reference are the only objects of their (colour, shape)
            (sc, ss), predicate, (rc, rs) = spec.relation
            subj = [o for o in scene.objects if (o.color, o.shape) == (sc, ss)]
            ref = [o for o in scene.objects if (o.color, o.shape) == (rc, rs)]
            assert len(subj) == len(ref) == 1 and Relation(0, predicate, 1).holds((subj[0], ref[0]))
        again = scene_for_spec(spec, rng)
        assert spec_of(again) == spec


def test_parse_prompt_rejects_malformed():
    for bad in ("a red circle", "a red circle on a pink background", "two red circle on a white background",
                "a red circles on a white background", "a red blob on a white background",
                "two red circles left of a blue square on a white background",
                "a blue square and a red circle on a white background"):  # not canonical order
        with pytest.raises(ValueError):
            parse_prompt(bad)
    with pytest.raises(ValueError, match="relation"):
        PromptSpec("white", ((1, "red", "circle"), (1, "red", "square"), (1, "blue", "star")),
                   (("red", "circle"), "above", ("red", "square")))


def test_splits_are_disjoint_and_heldout_combos_stay_out():
    held = set(heldout_combos(5))
    assert len(held) == 3 and len({c for c, _ in held}) == 3 and len({s for _, s in held}) == 3
    assert heldout_combos(5) == heldout_combos(5)
    splits = split_prompts(5, 40, 12, 8, 3, 0.3)
    texts = {name: [prompt_text(p) for p in specs] for name, specs in splits.items()}
    assert [len(texts[n]) for n in ("train", "test", "heldout")] == [40, 12, 8]
    assert all(len(set(t)) == len(t) for t in texts.values())
    assert not set(texts["train"]) & set(texts["test"])
    for name in ("train", "test"):
        assert not any(spec.combos() & held for spec in splits[name])
    assert all(spec.combos() & held for spec in splits["heldout"])


def test_tier_plan_is_balanced(rng):
    plan = tier_plan(rng, 4)
    for d in DIMENSIONS:
        assert sorted(p[d] for p in plan) == ["bad", "mild", "none", "none"]


def test_candidates_spread_and_respect_combos(rng):
    held = set(heldout_combos(0))
    seen = [c for c in ALL_COMBOS if c not in held]
    specs = split_prompts(0, 20, 1, 1, 3, 0.3)["train"]
    for spec in specs:
        cands = make_candidates(spec, rng, 4, 64, seen)
        for d in DIMENSIONS:
            scores = [c.true[d] for c in cands]
            assert max(scores) == 5.0 and min(scores) < 4.0, (d, scores)
        for c in cands:
            assert not {(o.color, o.shape) for o in c.scene.objects} & held
            assert (c.tiers["alignment"] == "none") == (c.deviations == ())
            assert c.image.size == (64, 64)
    a = make_candidates(specs[0], np.random.default_rng(1), 4, 64, seen)
    b = make_candidates(specs[0], np.random.default_rng(1), 4, 64, seen)
    assert [np.asarray(x.image).tobytes() for x in a] == [np.asarray(x.image).tobytes() for x in b]
    assert [x.true for x in a] == [x.true for x in b]
