"""Rendering and geometry: determinism, exact palette, clean layouts, defects realised where drawn."""

import math

import numpy as np
import pytest

from zray.data.layout import GAP, MARGIN, add_object, composition_box, gap, is_clean, layout_severities
from zray.data.render import decode_png, png_bytes, render_candidate, render_scene
from zray.data.scene import BACKGROUNDS, COLORS, DEFECT_DIMENSION, LAYOUT_DEFECTS, SIZES, Defects, Relation, \
    Scene, SceneObject
from zray.data.world import sample_scene


def _scenes(rng, n=60, min_objects=1):
    out = []
    while len(out) < n:
        scene = sample_scene(rng, 3, 0.3)
        if len(scene.objects) >= min_objects:
            out.append(scene)
    return out


def test_sample_scene_is_clean_inside_and_non_overlapping(rng):
    for scene in _scenes(rng, 300):
        assert is_clean(scene.objects)
        for o in scene.objects:
            r = SIZES[o.size]
            assert MARGIN + r - 1e-9 <= o.x <= 1 - MARGIN - r + 1e-9
            assert MARGIN + r - 1e-9 <= o.y <= 1 - MARGIN - r + 1e-9
        for i, a in enumerate(scene.objects):
            for b in scene.objects[i + 1:]:
                assert gap(a, b) >= GAP - 1e-9
        x0, y0, x1, y1 = composition_box(scene.objects)
        assert (x0 + x1) / 2 == pytest.approx(0.5) and (y0 + y1) / 2 == pytest.approx(0.5)
        assert max(layout_severities(scene.objects).values()) < 1e-9
        if scene.relation is not None:
            assert scene.relation.holds(scene.objects)


def test_sample_scene_is_deterministic_and_covers_the_vocabulary():
    a = [sample_scene(np.random.default_rng(7), 3, 0.3) for _ in range(3)]
    b = [sample_scene(np.random.default_rng(7), 3, 0.3) for _ in range(3)]
    assert a == b
    scenes = _scenes(np.random.default_rng(8), 400)
    assert {len(s.objects) for s in scenes} == {1, 2, 3}
    assert {o.shape for s in scenes for o in s.objects} == {"circle", "square", "triangle", "star"}
    assert {s.background for s in scenes} == set(BACKGROUNDS)
    assert 0.15 < sum(s.relation is not None for s in scenes) / len(scenes) < 0.45
    assert all(len(sample_scene(np.random.default_rng(k), 1, 1.0).objects) == 1 for k in range(20))


def test_clean_render_is_exactly_the_palette_and_deterministic(rng):
    for size in (32, 64, 96):
        for scene in _scenes(rng, 20):
            img = render_scene(scene, size)
            assert img.mode == "RGB" and img.size == (size, size)
            arr = np.asarray(img)
            colours = {tuple(int(v) for v in c) for c in arr.reshape(-1, 3)}
            allowed = {BACKGROUNDS[scene.background]} | {COLORS[o.color] for o in scene.objects}
            assert colours == allowed  # every object visible, nothing else drawn
            # the pixel at each centre carries the object's colour; a corner carries the background
            for o in scene.objects:
                assert tuple(arr[int(o.y * size), int(o.x * size)]) == COLORS[o.color]
            assert tuple(arr[0, 0]) == BACKGROUNDS[scene.background]
            assert np.array_equal(arr, np.asarray(render_scene(scene, size, Defects(), seed=5)))


def test_shape_stays_inside_its_bounding_circle():
    for shape in ("circle", "square", "triangle", "star"):
        obj = SceneObject(shape=shape, color="red", size="large", x=0.5, y=0.5)
        arr = np.asarray(render_scene(Scene("black", (obj,)), 128))
        ys, xs = np.nonzero((arr == COLORS["red"]).all(axis=-1))
        dist = np.hypot(xs + 0.5 - 64, ys + 0.5 - 64)
        assert dist.max() <= SIZES["large"] * 128 + 1.5
        assert len(xs) > 0.25 * math.pi * (SIZES["large"] * 128) ** 2  # a real filled shape


def test_each_defect_changes_the_image_deterministically(rng):
    scenes = _scenes(rng, 8, min_objects=2)
    for name in DEFECT_DIMENSION:
        changed = 0
        for k, scene in enumerate(scenes):
            clean = np.asarray(render_scene(scene, 64))
            defects = Defects(**{name: 0.7})
            img = np.asarray(render_scene(scene, 64, defects, seed=k))
            assert np.array_equal(img, np.asarray(render_scene(scene, 64, defects, seed=k)))
            changed += not np.array_equal(img, clean)
        assert changed >= 6, name


def test_layout_defects_are_realised_and_measured(rng):
    for name in LAYOUT_DEFECTS:
        for k, scene in enumerate(_scenes(rng, 15, min_objects=2)):
            _, drawn, realised = render_candidate(scene, 64, Defects(**{name: 0.6}), seed=k)
            measured = layout_severities(drawn.objects)
            assert getattr(realised, name) == pytest.approx(measured[name], abs=1e-3)
            if name != "off_centre":  # a wide composition may leave little room to shift
                assert getattr(realised, name) == pytest.approx(0.6, abs=1e-3), (name, scene)
            others = {n: v for n, v in realised.to_dict().items() if n != name}
            assert max(others.values()) == 0.0
            if scene.relation is not None:
                assert scene.relation.holds(drawn.objects)
            assert [(o.color, o.shape) for o in drawn.objects] == [(o.color, o.shape) for o in scene.objects]


def test_add_object_keeps_a_clean_layout(rng):
    scene = Scene("white", (SceneObject("circle", "red", "small", 0.3, 0.5),), None)
    added = add_object(rng, scene.objects, "star", "blue", "large")
    assert added is not None and len(added) == 2 and is_clean(added)
    rel = Relation(0, "left of", 1)
    pair = (SceneObject("circle", "red", "small", 0.3, 0.5), SceneObject("square", "blue", "small", 0.7, 0.5))
    out = add_object(rng, pair, "star", "green", "small", rel)
    assert out is not None and rel.holds(out)


def test_png_round_trip_and_corrupt_bytes(rng):
    img = render_scene(_scenes(rng, 1)[0], 64, Defects(noise=0.5), seed=1)
    data = png_bytes(img)
    assert data == png_bytes(img)
    assert np.array_equal(np.asarray(decode_png(data)), np.asarray(img))
    with pytest.raises(ValueError, match="PNG"):
        decode_png(data[:40])


def test_scene_and_defects_validate_and_round_trip_json(rng):
    for scene in _scenes(rng, 20):
        assert Scene.from_json(scene.to_json()) == scene
    with pytest.raises(ValueError, match="severity"):
        Defects(noise=1.5)
    with pytest.raises(ValueError, match="unknown defect"):
        Defects.from_dict({"sparkle": 0.1})
    with pytest.raises(ValueError, match="out of range"):
        Scene("white", (SceneObject("circle", "red", "small", 0.3, 0.5),), Relation(0, "above", 1))
    with pytest.raises(ValueError):
        Scene.from_json('{"background": "white"}')
