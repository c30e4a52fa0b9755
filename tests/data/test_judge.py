"""zray.data.judge: scene recovery from pixels (renders and hand-made images) and alignment scoring."""

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from zray.data.judge import JudgedScene, judge_image, judge_scores, score_judged
from zray.data.judge_eval import judge_agreement
from zray.data.labels import true_scores
from zray.data.prompt_grammar import parse_prompt, spec_of
from zray.data.render import render_scene
from zray.data.scene import COLORS, Defects, Relation, Scene, SceneObject


def test_clean_64_exact_recovery():
    result = judge_agreement(200, 64, seed=0, degraded=False)
    assert result["exact"] >= 0.95, result
    for key in ("background", "count", "colour", "shape", "size"):
        assert result[key] >= 0.95, (key, result)


def test_clean_128_exact_recovery():
    result = judge_agreement(60, 128, seed=1, degraded=False)
    assert result["exact"] >= 0.95, result


def test_degraded_sanity_floor():
    result = judge_agreement(60, 64, seed=2, degraded=True)
    assert result["exact"] >= 0.7, result
    assert result["background"] >= 0.9, result
    assert result["by_defect"], "degraded renders should carry defects"


def test_hand_made_red_square():
    img = Image.new("RGB", (64, 64), (245, 245, 245))
    ImageDraw.Draw(img).rectangle([14, 30, 27, 43], fill=(220, 30, 30))  # centre (20.5, 36.5), half side 6.5
    judged = judge_image(img)
    assert judged.background == "white"
    assert len(judged.objects) == 1
    obj = judged.objects[0]
    assert (obj.color, obj.shape) == ("red", "square")
    assert obj.x == pytest.approx(20.5 / 64, abs=0.01) and obj.y == pytest.approx(36.5 / 64, abs=0.01)
    assert obj.size == "large"  # bounding radius 6.5 * sqrt(2) = 9.2 px = 0.144 of the side
    assert judged.to_scene() == Scene(background="white", objects=(obj.to_scene_object(),))


def test_array_input_non_square_and_positions():
    img = Image.new("RGB", (100, 60), (20, 20, 20))
    ImageDraw.Draw(img).ellipse([62, 22, 78, 38], fill=(30, 70, 230))  # centre (70, 30), radius 8
    judged = judge_image(np.asarray(img))
    (obj,) = judged.objects
    assert (judged.background, obj.color, obj.shape) == ("black", "blue", "circle")
    assert obj.x == pytest.approx(0.70, abs=0.01) and obj.y == pytest.approx(0.50, abs=0.01)


@pytest.mark.parametrize("colour", list(COLORS))
def test_off_palette_blurred_colours(colour):
    """Generated images are blurry and off-palette: shifted, desaturated colours are still classified."""
    rgb = np.array(COLORS[colour], dtype=float)
    shifted = tuple(int(v) for v in np.clip(0.85 * rgb + 0.15 * 200 + np.array([12, -10, 8]), 0, 255))
    img = Image.new("RGB", (64, 64), (120, 124, 130))  # an off-palette grey
    draw = ImageDraw.Draw(img)
    draw.polygon([(20, 12), (30, 30), (10, 30)], fill=shifted)  # a triangle (not the renderer's)
    draw.ellipse([34, 34, 54, 54], fill=shifted)
    img = img.filter(ImageFilter.GaussianBlur(1.5))
    judged = judge_image(img)
    assert judged.background == "gray"
    assert [o.color for o in judged.objects] == [colour, colour]
    assert sorted(o.shape for o in judged.objects) == ["circle", "triangle"]


def test_empty_image_gives_no_objects():
    judged = judge_image(Image.new("RGB", (64, 64), (128, 128, 128)))
    assert isinstance(judged, JudgedScene)
    assert judged.objects == () and judged.background == "gray" and judged.counts() == {}
    assert judged.to_scene() is None
    # No object at all shows none of the requested content: alignment 1, whatever the background.
    assert score_judged(judged, "a red circle on a gray background") == {"alignment": 1.0}
    noisy = np.clip(np.random.default_rng(0).normal(245, 20, size=(64, 64, 3)), 0, 255).astype(np.uint8)
    assert judge_image(noisy).objects == ()


@pytest.mark.parametrize("bad", [
    [[1, 2, 3]],
    np.zeros((64, 64), dtype=np.uint8),
    np.zeros((64, 64, 4), dtype=np.uint8),
    np.zeros((64, 64, 3), dtype=np.float32),
    np.zeros((4, 64, 3), dtype=np.uint8),
    "image.png",
])
def test_bad_input_raises(bad):
    with pytest.raises(ValueError, match=r"expected|both sides"):
        judge_image(bad)


def test_other_pil_modes_are_converted():
    img = Image.new("RGBA", (64, 64), (245, 245, 245, 255))
    ImageDraw.Draw(img).ellipse([20, 20, 40, 40], fill=(30, 170, 50, 255))
    (obj,) = judge_image(img).objects
    assert (obj.color, obj.shape) == ("green", "circle")
    assert judge_image(Image.new("L", (32, 32), 128)).objects == ()


def _relation_scene() -> Scene:
    objects = (SceneObject("star", "orange", "large", 0.3, 0.5), SceneObject("square", "purple", "small", 0.72, 0.45))
    return Scene(background="black", objects=objects, relation=Relation(0, "left of", 1))


def test_scores_use_the_world_alignment_formula():
    scene = _relation_scene()
    img = render_scene(scene, 64)
    spec = spec_of(scene)
    assert judge_scores(img, spec) == {"alignment": 5.0}
    assert judge_scores(img, scene) == {"alignment": 5.0}
    wrong = parse_prompt("an orange star left of a blue square on a black background")
    expected = true_scores(wrong, scene, Defects())["alignment"]
    assert judge_scores(img, wrong) == {"alignment": expected} == {"alignment": 3.5}
    # Mirror the composition: the relation is violated (-2.0).
    mirrored = Scene(background="black", objects=tuple(
        SceneObject(o.shape, o.color, o.size, 1.0 - o.x, o.y) for o in scene.objects), relation=scene.relation)
    assert judge_scores(render_scene(mirrored, 64), spec) == {"alignment": 3.0}
    with pytest.raises(ValueError, match="expected a PromptSpec"):
        judge_scores(img, 42)


def test_same_colour_overlapping_objects_are_split():
    img = Image.new("RGB", (64, 64), (245, 245, 245))
    draw = ImageDraw.Draw(img)
    draw.ellipse([12, 20, 34, 42], fill=(220, 30, 30))  # centre (23, 31), radius 11
    draw.ellipse([30, 26, 42, 38], fill=(220, 30, 30))  # centre (36, 32), radius 6 (6.5 px drawn), overlapping
    judged = judge_image(img)
    assert [(o.color, o.shape) for o in judged.objects] == [("red", "circle"), ("red", "circle")]
    assert [o.x * 64 for o in judged.objects] == pytest.approx([23, 36], abs=1.5)
    assert [o.size for o in judged.objects] == ["large", "small"]  # radius 11 and 6 px: 0.17 and 0.1


def test_clashing_outline_is_not_an_object():
    scene = Scene(background="white", objects=(SceneObject("triangle", "orange", "large", 0.5, 0.5),))
    judged = judge_image(render_scene(scene, 64, Defects(clashing=1.0)))
    assert [(o.color, o.shape, o.size) for o in judged.objects] == [("orange", "triangle", "large")]


def test_many_objects_score_the_floor_quickly():
    img = Image.new("RGB", (128, 128), (245, 245, 245))
    draw = ImageDraw.Draw(img)
    for i in range(4):
        for j in range(3):
            draw.ellipse([8 + 30 * i, 8 + 40 * j, 24 + 30 * i, 24 + 40 * j], fill=(30, 170, 50))
    judged = judge_image(img)
    assert judged.counts() == {("green", "circle"): 12} and judged.to_scene() is None
    assert score_judged(judged, "a green circle on a white background") == {"alignment": 1.0}


def test_arbitrary_images_do_not_crash():
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8),  # colour noise
        np.full((40, 90, 3), (200, 40, 40), dtype=np.uint8),  # a red "background"
        np.asarray(Image.new("RGB", (64, 64), (245, 245, 245)).resize((16, 16))),
    ]
    blobs = Image.new("RGB", (96, 96), (128, 128, 128))
    draw = ImageDraw.Draw(blobs)
    for _ in range(15):
        x, y, r = rng.integers(0, 96), rng.integers(0, 96), rng.integers(2, 14)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rng.integers(0, 256, size=3)))
    images.append(blobs.filter(ImageFilter.GaussianBlur(2)))
    for image in images:
        judged = judge_image(image)
        assert judged.background in ("white", "black", "gray")
        assert 1.0 <= score_judged(judged, "two red squares on a gray background")["alignment"] <= 5.0
