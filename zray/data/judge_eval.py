"""How well the judge (`judge.py`) recovers the ground truth on the world's own renders.

`judge_agreement` samples scenes (`world.sample_scene`), renders them clean or with random degradations
(the candidate generator's tiers: each of realism / aesthetics / plausibility is none, mild or bad with
equal probability, `candidates.degradations`), judges each image and compares with the scene as drawn
(layout defects move objects, so the reference is the drawn scene, not the sampled one).

Matching: true and recovered objects are paired one-to-one by centre distance (Hungarian); a pair counts
only when its centres are within `POSITION_TOL` (fraction of the side). An image is recovered **exactly**
when the background is right, the numbers of objects are equal, and every true object is paired with a
recovered object of the same colour and shape. Per-attribute accuracies: background and count per image;
colour, shape and size per true object (an unpaired true object counts as wrong for all three).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from zray.data.candidates import TIERS, degradations
from zray.data.judge import judge_image
from zray.data.render import render_candidate
from zray.data.scene import Scene
from zray.data.world import sample_scene

POSITION_TOL = 0.04
_FAMILIES = ("realism", "aesthetics", "plausibility")


def match_objects(truth: Scene, judged, tol: float = POSITION_TOL) -> list[tuple[int, int]]:
    """(true index, judged index) pairs of a minimum-distance matching, keeping pairs within `tol`."""
    if not truth.objects or not judged.objects:
        return []
    true_xy = np.array([(o.x, o.y) for o in truth.objects])
    got_xy = np.array([(o.x, o.y) for o in judged.objects])
    dist = np.linalg.norm(true_xy[:, None, :] - got_xy[None, :, :], axis=-1)
    rows, cols = linear_sum_assignment(dist)
    return [(int(i), int(j)) for i, j in zip(rows, cols) if dist[i, j] <= tol]


def compare(truth: Scene, judged, tol: float = POSITION_TOL) -> dict[str, float]:
    """Per-image agreement: exact (0/1), background, count, and per-object colour/shape/size hits."""
    pairs = match_objects(truth, judged, tol)
    colour = sum(truth.objects[i].color == judged.objects[j].color for i, j in pairs)
    shape = sum(truth.objects[i].shape == judged.objects[j].shape for i, j in pairs)
    size = sum(truth.objects[i].size == judged.objects[j].size for i, j in pairs)
    both = sum(truth.objects[i].color == judged.objects[j].color
               and truth.objects[i].shape == judged.objects[j].shape for i, j in pairs)
    n = len(truth.objects)
    background = truth.background == judged.background
    count = n == len(judged.objects)
    return {"exact": float(background and count and both == n), "background": float(background),
            "count": float(count), "colour_hits": colour, "shape_hits": shape, "size_hits": size,
            "num_objects": n}


def judge_agreement(num_images: int, size: int, seed: int, degraded: bool) -> dict:
    """Agreement of the judge with the ground truth on `num_images` rendered scenes of `size` x `size`.

    Returns `{"num_images", "image_size", "degraded", "exact", "background", "count", "colour", "shape", "size",
    "by_defect"}` where the rates are fractions in [0, 1] and `by_defect` maps each defect name to
    `{"num_images", "exact"}` over the images in which it is present (empty when clean).
    """
    if not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images={num_images!r} is not allowed: expected an integer >= 1")
    rng = np.random.default_rng([seed, 11])
    totals = {"exact": 0.0, "background": 0.0, "count": 0.0, "colour_hits": 0, "shape_hits": 0,
              "size_hits": 0, "num_objects": 0}
    by_defect: dict[str, list[float]] = {}
    for _ in range(num_images):
        scene = sample_scene(rng, 3, 0.3)
        defects = None
        if degraded:
            tiers = {family: TIERS[int(rng.integers(len(TIERS)))] for family in _FAMILIES}
            defects = degradations(tiers, len(scene.objects), rng)
        image, drawn, realised = render_candidate(scene, size, defects, seed=int(rng.integers(2**31)))
        result = compare(drawn, judge_image(image))
        for key in totals:
            totals[key] += result[key]
        for name in realised.present():
            by_defect.setdefault(name, []).append(result["exact"])
    objects = max(totals["num_objects"], 1)
    return {
        "num_images": num_images, "image_size": size, "degraded": degraded,
        "exact": totals["exact"] / num_images,
        "background": totals["background"] / num_images,
        "count": totals["count"] / num_images,
        "colour": totals["colour_hits"] / objects,
        "shape": totals["shape_hits"] / objects,
        "size": totals["size_hits"] / objects,
        "by_defect": {name: {"num_images": len(v), "exact": float(np.mean(v))}
                      for name, v in sorted(by_defect.items())},
    }
