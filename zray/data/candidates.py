"""Candidate images for a prompt: a fresh scene realising the prompt, then controlled deviations
(alignment) and degradations (realism, aesthetics, plausibility), each at a tier.

Tiers per family and candidate: `none`, `mild` or `bad`. For each prompt and each of the four families the
K candidates get the tiers none, mild, bad, none, mild, ... (K of them) in a random order, so every
prompt has flawless, mildly and badly wrong candidates in every dimension (hence same-prompt pairs with
different labels in every dimension).

- alignment: mild = one deviation, bad = two of different kinds; kinds: colour (an object recoloured),
  shape (an object reshaped), count (an object added, a copy of an existing colour and shape, or one
  removed), background (another background), relation (the composition mirrored so the prompt's relation
  is reversed; relation prompts only). Deviations never introduce a (colour, shape) outside `combos`.
- realism (noise, banding, blotches), aesthetics (blur, clashing, off_centre, cramped), plausibility
  (floating_shadow, cut_by_frame, interpenetrating): mild = one defect with severity U(0.15, 0.4); bad =
  one defect with severity U(0.6, 1.0), or (half the time) two defects with severity U(0.35, 0.8) each.
  At most one layout defect per candidate (off_centre, cramped, cut_by_frame, interpenetrating), and
  cramped / interpenetrating only with two or more objects.

The true scores are computed from what was drawn (`labels.true_scores`), never from the plan.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from zray.data.labels import true_scores
from zray.data.layout import add_object
from zray.data.prompt_grammar import Combo, PromptSpec
from zray.data.render import render_candidate
from zray.data.scene import BACKGROUNDS, COLORS, LAYOUT_DEFECTS, SHAPES, SIZES, Defects, Relation, Scene
from zray.data.world import scene_for_spec
from zray.rubric import DIMENSIONS

TIERS: tuple[str, ...] = ("none", "mild", "bad")
ALIGNMENT_KINDS: tuple[str, ...] = ("colour", "shape", "count", "background", "relation")
FAMILY_DEFECTS: dict[str, tuple[str, ...]] = {
    "realism": ("noise", "banding", "blotches"),
    "aesthetics": ("blur", "clashing", "off_centre", "cramped"),
    "plausibility": ("floating_shadow", "cut_by_frame", "interpenetrating"),
}
MILD_SEVERITY = (0.15, 0.4)
BAD_ONE_SEVERITY = (0.6, 1.0)
BAD_TWO_SEVERITY = (0.35, 0.8)
_NEEDS_TWO_OBJECTS = ("cramped", "interpenetrating")


@dataclass(frozen=True)
class Candidate:
    image: Image.Image
    scene: Scene  # as drawn (layout defects applied)
    defects: Defects  # realised severities
    deviations: tuple[str, ...]  # alignment deviations applied, e.g. ("colour", "count")
    tiers: dict[str, str]  # planned tier per dimension
    render_seed: int
    true: dict[str, float]


def tier_plan(rng: np.random.Generator, num_candidates: int) -> list[dict[str, str]]:
    """Per candidate, the tier of each dimension (balanced over the prompt's candidates)."""
    columns = {d: [TIERS[k] for k in rng.permutation([i % len(TIERS) for i in range(num_candidates)])]
               for d in DIMENSIONS}
    return [{d: columns[d][i] for d in DIMENSIONS} for i in range(num_candidates)]


# ---- alignment deviations --------------------------------------------------------------------------------


def _recolour(scene: Scene, rng: np.random.Generator, combos: Collection[Combo], attr: str) -> Scene | None:
    order = rng.permutation(len(scene.objects))
    for i in order:
        obj = scene.objects[i]
        values = COLORS if attr == "color" else SHAPES
        options = [v for v in values if v != getattr(obj, attr)
                   and ((v, obj.shape) if attr == "color" else (obj.color, v)) in combos]
        if options:
            new = replace(obj, **{attr: options[int(rng.integers(len(options)))]})
            return replace(scene, objects=tuple(new if k == i else o for k, o in enumerate(scene.objects)))
    return None


def _remove(scene: Scene, rng: np.random.Generator) -> Scene:
    i = int(rng.integers(len(scene.objects)))
    objects = tuple(o for k, o in enumerate(scene.objects) if k != i)
    rel = scene.relation
    if rel is not None:
        if i in (rel.subject, rel.reference):
            rel = None
        else:
            shift = lambda k: k - (k > i)  # noqa: E731
            rel = Relation(shift(rel.subject), rel.predicate, shift(rel.reference))
    return Scene(background=scene.background, objects=objects, relation=rel)


def _change_count(scene: Scene, rng: np.random.Generator) -> Scene | None:
    n = len(scene.objects)
    if n == 3 or (n >= 2 and rng.random() < 0.5):
        return _remove(scene, rng)
    model = scene.objects[int(rng.integers(n))]
    size = tuple(SIZES)[int(rng.integers(len(SIZES)))]
    added = add_object(rng, scene.objects, model.shape, model.color, size, scene.relation)
    if added is None:
        return _remove(scene, rng) if n >= 2 else None
    return replace(scene, objects=added)


def _mirror(scene: Scene, spec: PromptSpec) -> Scene | None:
    if spec.relation is None:
        return None
    horizontal = spec.relation[1] in ("left of", "right of")
    objects = tuple(replace(o, x=1.0 - o.x) if horizontal else replace(o, y=1.0 - o.y) for o in scene.objects)
    return replace(scene, objects=objects)


def deviate(
    scene: Scene, spec: PromptSpec, tier: str, rng: np.random.Generator, combos: Collection[Combo],
) -> tuple[Scene, tuple[str, ...]]:
    """Apply 0 (none), 1 (mild) or 2 (bad) alignment deviations of different kinds."""
    wanted = {"none": 0, "mild": 1, "bad": 2}[tier]
    done: list[str] = []
    for k in rng.permutation(len(ALIGNMENT_KINDS)):
        if len(done) == wanted:
            break
        kind = ALIGNMENT_KINDS[k]
        if kind == "colour":
            out = _recolour(scene, rng, combos, "color")
        elif kind == "shape":
            out = _recolour(scene, rng, combos, "shape")
        elif kind == "count":
            out = _change_count(scene, rng)
        elif kind == "background":
            options = [b for b in BACKGROUNDS if b != scene.background]
            out = replace(scene, background=options[int(rng.integers(len(options)))])
        else:
            out = _mirror(scene, spec)
        if out is not None:
            scene = out
            done.append(kind)
    return scene, tuple(done)


# ---- degradations ----------------------------------------------------------------------------------------


def degradations(tiers: dict[str, str], num_objects: int, rng: np.random.Generator) -> Defects:
    """Requested defect severities for the realism, aesthetics and plausibility tiers."""
    severities: dict[str, float] = {}
    layout_used = False
    for family, names in FAMILY_DEFECTS.items():
        tier = tiers[family]
        if tier == "none":
            continue
        if tier == "mild":
            count, (lo, hi) = 1, MILD_SEVERITY
        elif rng.random() < 0.5:
            count, (lo, hi) = 1, BAD_ONE_SEVERITY
        else:
            count, (lo, hi) = 2, BAD_TWO_SEVERITY
        for _ in range(count):
            options = [n for n in names if n not in severities
                       and not (layout_used and n in LAYOUT_DEFECTS)
                       and not (num_objects < 2 and n in _NEEDS_TWO_OBJECTS)]
            if not options:  # e.g. plausibility after a layout defect elsewhere: floating_shadow taken
                break
            name = options[int(rng.integers(len(options)))]
            severities[name] = round(float(rng.uniform(lo, hi)), 3)
            layout_used = layout_used or name in LAYOUT_DEFECTS
    return Defects(**severities)


def make_candidates(
    spec: PromptSpec, rng: np.random.Generator, num_candidates: int, image_size: int,
    combos: Collection[Combo],
) -> list[Candidate]:
    """`num_candidates` rendered candidates for one prompt, with their true scores."""
    combos = frozenset(combos)
    out = []
    for tiers in tier_plan(rng, num_candidates):
        base = scene_for_spec(spec, rng)
        scene, deviations = deviate(base, spec, tiers["alignment"], rng, combos)
        requested = degradations(tiers, len(scene.objects), rng)
        seed = int(rng.integers(2**31))
        image, drawn, realised = render_candidate(scene, image_size, requested, seed)
        out.append(Candidate(image=image, scene=drawn, defects=realised, deviations=deviations, tiers=tiers,
                             render_seed=seed, true=true_scores(spec, drawn, realised)))
    return out
