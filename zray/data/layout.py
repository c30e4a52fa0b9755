"""Geometry of a Shapes scene: clean placement, and the four layout defects measured on the result.

All units are fractions of the image side. An object's footprint is its bounding circle (radius
`SIZES[size]`, centre `(x, y)`); the drawn shape lies inside it.

A **clean layout** (what `place_objects` and `add_object` produce) has:
- every bounding circle inside the frame with at least `MARGIN` clear;
- any two bounding circles at least `GAP` apart, edge to edge (so clean renders never touch);
- the composition (the bounding box of all bounding circles) centred in the frame;
- for a scene with a relation: the predicate holds with the centres at least `REL_MIN` apart along its
  axis, and that axis dominates (|d_axis| >= |d_other|), so "left of" is visibly left of.

**Layout defects** are measured on the geometry (`layout_severities`), each in [0, 1], all 0 on a clean
layout:
- off_centre = |composition-box centre - (0.5, 0.5)| / OFF_CENTRE_FULL
- cramped = 1 - min_gap / GAP over all pairs (needs 2+ objects; a negative gap counts as 1)
- cut_by_frame = max over objects of (r - d_edge) / r, d_edge = distance from the centre to the nearest
  frame edge (1 = the centre on the edge, half the object outside)
- interpenetrating = max over pairs of (r_i + r_j - d_ij) / min(r_i, r_j)

`apply_layout_defects` moves objects to reach requested severities (never changing whether the scene's
relation holds, never cutting or overlapping as a side effect) and reports the severities it realised:
a request can be only partly feasible (e.g. little room to shift a wide composition).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from zray.data.scene import LAYOUT_DEFECTS, SIZES, Relation, Scene, SceneObject

MARGIN = 0.04
GAP = 0.12
REL_MIN = 0.12
OFF_CENTRE_FULL = 0.25
_CLEAR = 0.01  # clearance kept between objects a layout defect did not mean to overlap
_TRIES_PER_OBJECT = 100
_RESTARTS = 200


def radius(obj: SceneObject) -> float:
    return SIZES[obj.size]


def composition_box(objects: Sequence[SceneObject]) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) of the union of the bounding circles."""
    return (
        min(o.x - radius(o) for o in objects),
        min(o.y - radius(o) for o in objects),
        max(o.x + radius(o) for o in objects),
        max(o.y + radius(o) for o in objects),
    )


def translate(objects: Sequence[SceneObject], dx: float, dy: float) -> tuple[SceneObject, ...]:
    return tuple(replace(o, x=float(o.x + dx), y=float(o.y + dy)) for o in objects)


def recentre(objects: Sequence[SceneObject], centre: tuple[float, float] = (0.5, 0.5)) -> tuple[SceneObject, ...]:
    """Translate so that the composition box is centred on `centre`."""
    x0, y0, x1, y1 = composition_box(objects)
    return translate(objects, centre[0] - (x0 + x1) / 2, centre[1] - (y0 + y1) / 2)


def gap(a: SceneObject, b: SceneObject) -> float:
    """Edge-to-edge distance of two bounding circles (negative when they overlap)."""
    return math.hypot(a.x - b.x, a.y - b.y) - radius(a) - radius(b)


def edge_distance(obj: SceneObject) -> float:
    """Distance from the object's centre to the nearest frame edge."""
    return min(obj.x, obj.y, 1.0 - obj.x, 1.0 - obj.y)


def inside(obj: SceneObject, margin: float) -> bool:
    return edge_distance(obj) >= radius(obj) + margin - 1e-12


def relation_clear(relation: Relation, objects: Sequence[SceneObject]) -> bool:
    """The relation holds, with its axis separation >= REL_MIN and dominating the other axis."""
    a, b = objects[relation.subject], objects[relation.reference]
    horizontal = relation.predicate in ("left of", "right of")
    d_axis, d_other = (b.x - a.x, b.y - a.y) if horizontal else (b.y - a.y, b.x - a.x)
    if relation.predicate in ("right of", "below"):
        d_axis = -d_axis
    return d_axis >= REL_MIN and abs(d_axis) >= abs(d_other)


def layout_severities(objects: Sequence[SceneObject]) -> dict[str, float]:
    """The four layout defects measured on the geometry (see the module docstring)."""
    x0, y0, x1, y1 = composition_box(objects)
    off = math.hypot((x0 + x1) / 2 - 0.5, (y0 + y1) / 2 - 0.5) / OFF_CENTRE_FULL
    cut = max((radius(o) - edge_distance(o)) / radius(o) for o in objects)
    cramped = interp = 0.0
    pairs = [(a, b) for i, a in enumerate(objects) for b in objects[i + 1:]]
    if pairs:
        cramped = 1.0 - min(gap(a, b) for a, b in pairs) / GAP
        interp = max(-gap(a, b) / min(radius(a), radius(b)) for a, b in pairs)
    clip = lambda v: float(min(1.0, max(0.0, v)))  # noqa: E731
    return {"off_centre": clip(off), "cramped": clip(cramped), "cut_by_frame": clip(cut),
            "interpenetrating": clip(interp)}


def is_clean(objects: Sequence[SceneObject]) -> bool:
    """Inside the frame with MARGIN, pairwise GAP apart (the composition need not be centred)."""
    return all(inside(o, MARGIN) for o in objects) and all(
        gap(a, b) >= GAP - 1e-9 for i, a in enumerate(objects) for b in objects[i + 1:])


def _uniform_centre(rng: np.random.Generator, r: float) -> tuple[float, float]:
    lo, hi = MARGIN + r, 1.0 - MARGIN - r
    return float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))


def place_objects(
    rng: np.random.Generator,
    items: Sequence[tuple[str, str, str]],
    relation: Relation | None = None,
) -> tuple[SceneObject, ...]:
    """A clean, centred layout for `items` = (shape, colour, size) in that order (1 to 3 objects).

    Rejection sampling with a fixed budget; raises RuntimeError if no layout is found (it does not
    happen for 3 large objects with the constants above, but the loop is bounded).
    """
    for _ in range(_RESTARTS):
        placed: list[SceneObject] = []
        for shape, color, size in items:
            r = SIZES[size]
            for _ in range(_TRIES_PER_OBJECT):
                x, y = _uniform_centre(rng, r)
                obj = SceneObject(shape=shape, color=color, size=size, x=x, y=y)
                if all(gap(obj, other) >= GAP for other in placed):
                    placed.append(obj)
                    break
            else:
                break
        if len(placed) == len(items) and (relation is None or relation_clear(relation, placed)):
            return recentre(placed)
    raise RuntimeError(f"no clean layout found for {list(items)} with relation {relation} "
                       f"after {_RESTARTS} restarts")


def add_object(
    rng: np.random.Generator, objects: Sequence[SceneObject], shape: str, color: str, size: str,
    relation: Relation | None = None,
) -> tuple[SceneObject, ...] | None:
    """`objects` plus one more object in a free clean spot (recentred), or None if there is no room.

    The added object goes last, so relation indices stay valid; whether the relation holds is unchanged
    (recentring is a translation).
    """
    r = SIZES[size]
    for _ in range(_TRIES_PER_OBJECT * 5):
        x, y = _uniform_centre(rng, r)
        obj = SceneObject(shape=shape, color=color, size=size, x=x, y=y)
        if all(gap(obj, other) >= GAP for other in objects):
            out = recentre((*objects, obj))
            if relation is None or relation.holds(out) == relation.holds(tuple(objects)):
                return out
    return None


# ---- layout defects ------------------------------------------------------------------------------------


def _ok(objects: Sequence[SceneObject], relation: Relation | None, held: bool | None) -> bool:
    return relation is None or relation.holds(tuple(objects)) == held


def _shift_off_centre(objs, sev, rng, relation, held):
    target = sev * OFF_CENTRE_FULL
    best: tuple[float, float, float] = (0.0, 0.0, 0.0)  # (shift, ux, uy)
    for k in rng.permutation(8):
        ux, uy = math.cos(k * math.pi / 4), math.sin(k * math.pi / 4)
        # the largest shift along (ux, uy) that keeps every bounding circle inside the frame
        limit = math.inf
        for o in objs:
            r = radius(o)
            for pos, u in ((o.x, ux), (o.y, uy)):
                if u > 1e-9:
                    limit = min(limit, (1.0 - r - pos) / u)
                elif u < -1e-9:
                    limit = min(limit, (pos - r) / -u)
        shift = max(0.0, min(target, limit))
        if shift > best[0] + 1e-12:
            best = (shift, ux, uy)
        if shift >= target - 1e-12:
            break
    return translate(objs, best[0] * best[1], best[0] * best[2])


def _squeeze(objs, sev, rng, relation, held):
    if len(objs) < 2:
        return objs
    target_gap = (1.0 - sev) * GAP
    x0, y0, x1, y1 = composition_box(objs)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    scale = max(
        (radius(a) + radius(b) + target_gap) / math.hypot(a.x - b.x, a.y - b.y)
        for i, a in enumerate(objs) for b in objs[i + 1:])
    scale = min(1.0, scale)
    out = tuple(replace(o, x=float(cx + scale * (o.x - cx)), y=float(cy + scale * (o.y - cy))) for o in objs)
    return recentre(out, (cx, cy))


def _others_clear(objs, moved: int) -> bool:
    return all(gap(objs[moved], o) >= _CLEAR for k, o in enumerate(objs) if k != moved)


def _interpenetrate(objs, sev, rng, relation, held):
    n = len(objs)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    for p in rng.permutation(len(pairs)):
        anchor, moved = pairs[p]
        a, b = objs[anchor], objs[moved]
        dist = math.hypot(b.x - a.x, b.y - a.y)
        target = radius(a) + radius(b) - sev * min(radius(a), radius(b))
        f = target / dist
        out = list(objs)
        out[moved] = replace(b, x=float(a.x + (b.x - a.x) * f), y=float(a.y + (b.y - a.y) * f))
        others = [k for k in range(n) if k not in (anchor, moved)]
        if inside(out[moved], 0.0) and all(gap(out[moved], out[k]) >= _CLEAR for k in others) \
                and _ok(out, relation, held):
            return tuple(out)
    return objs


def _cut(objs, sev, rng, relation, held):
    for i in rng.permutation(len(objs)):
        o = objs[i]
        d = radius(o) * (1.0 - sev)
        moves = {"x": (d, 1.0 - d), "y": (d, 1.0 - d)}
        # nearest edges first: the smallest move changes the rest of the picture least
        options = sorted(((abs(getattr(o, axis) - v), axis, v) for axis, vs in moves.items() for v in vs))
        for _, axis, value in options:
            out = list(objs)
            out[i] = replace(o, **{axis: float(value)})
            if _others_clear(out, i) and _ok(out, relation, held):
                return tuple(out)
    return objs


_OPS = {"cramped": _squeeze, "off_centre": _shift_off_centre, "interpenetrating": _interpenetrate,
        "cut_by_frame": _cut}
assert tuple(sorted(_OPS)) == tuple(sorted(LAYOUT_DEFECTS))


def apply_layout_defects(
    scene: Scene, severities: dict[str, float], rng: np.random.Generator,
) -> tuple[Scene, dict[str, float]]:
    """Move objects to realise the requested layout defects; returns (scene, realised severities).

    `severities` maps layout-defect names to requested severities (others are ignored). Operations run in
    the order cramped, off_centre, interpenetrating, cut_by_frame. A requested defect's realised severity
    is measured on the final geometry and rounded to 3 decimals; a defect not requested is reported as 0
    even if another operation produced some of it incidentally (the world requests one at a time).
    """
    objs = scene.objects
    held = None if scene.relation is None else scene.relation.holds(objs)
    requested = {name: float(severities.get(name, 0.0)) for name in _OPS}
    for name, op in _OPS.items():
        if requested[name] > 0.0:
            objs = op(objs, requested[name], rng, scene.relation, held)
    measured = layout_severities(objs)
    realised = {name: (round(measured[name], 3) if requested[name] > 0.0 else 0.0) for name in _OPS}
    return replace(scene, objects=tuple(objs)), realised
