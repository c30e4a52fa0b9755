"""An independent judge: recover a Shapes scene from an arbitrary RGB image, and score it against a prompt.

Evaluation only (true scores of generated images, GSB on the generator side); never a training signal.
Classical image analysis (numpy, scipy.ndimage, PIL), so it works on any image, not only the world's
renders: blurry, noisy, off-palette generator outputs included.

Pipeline (`judge_image`):
1. Background: the robust mean colour of the border ring; named by the nearest `BACKGROUNDS` colour.
2. Noise: estimated from differences of neighbouring border pixels; a noisy image is smoothed first.
3. Foreground: pixels whose *chroma* differs from the background's by more than `CHROMA_THRESHOLD`
   (holes enclosed by foreground included). Every background is grey and every object colour saturated,
   so luminance-only changes (shadows, banding ramps, dark smudges) never become objects.
4. Colour labels: each foreground pixel is explained as the background blended toward one palette colour
   (`bg + t (colour - bg)`); the colour whose line fits best labels it, unless the fit is poor (outlines
   in a clashing colour, murky blotches, mixed seams). Its strength is the fraction of that colour's
   chroma it shows.
5. Objects: connected single-colour pieces of strong pixels (`SEED_STRENGTH`) that are thick enough
   (`SEED_DEPTH`, distance-transform depth) and large enough are seeds; a colour whose pixels enclose a
   seed of another colour is an outline and seeds nothing. Every foreground pixel of a connected
   component joins its nearest seed, so an outline joins the object it surrounds and touching objects of
   different colours split between their cores. A component with strong pixels but no seed (a small
   object inside a thick outline) is one object coloured by its deepest strong pixels; components
   smaller than `MIN_AREA` or without strong pixels are dropped.
6. Per object (`judge_fit.py`): a soft mask (chroma over the palette colour's full chroma), with pixels
   of other objects or under a smudge marked unknown; the shape, centre and bounding radius by least
   squares of blurred templates drawn with the renderer's own geometry (`render.shape_polygon`); a local
   search when the object touches the frame or another object, is partly covered, or fits badly; and a
   split into two or three templates when one template cannot explain a region (same-colour objects
   touching or overlapping). The size class follows from the radius (threshold at the geometric mean of
   `SIZES`).

Scores: `judge_scores(image, intended)` applies the world's alignment formula (`labels.true_scores`) to
the recovered scene. Only alignment is scored: the other dimensions depend on defect severities the judge
does not estimate.

Coordinates: pixel (row i, column j) has its centre at (x, y) = (j, i), as in PIL drawing; a centre in
scene units is (x / width, y / height). Sizes are relative to min(height, width).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from zray.data.judge_fit import fit_object, fit_split
from zray.data.labels import PENALTY_ATTRIBUTE, true_scores
from zray.data.prompt_grammar import PromptSpec, parse_prompt, spec_of
from zray.data.scene import BACKGROUNDS, COLORS, SIZES, Defects, Scene, SceneObject

# Thresholds are stated for a 64-pixel side; lengths and areas scale with the image (k = side / 64).
CHROMA_THRESHOLD = 45.0  # 0..255 RGB units; palette colours have chroma >= 107 against any background
LINE_FIT_MAX = 0.35  # max (residual / distance from background) for a pixel to take a palette label
MIN_AREA = 20.0  # pixels at 64x64 (a small star covers about 65); smaller components are specks
SEED_DEPTH = 2.5  # pixels at 64x64: thicker than any clashing outline (at most 3 px wide)
SEED_STRENGTH = 0.6  # seeds need >= 60% of their palette colour's chroma (murky smudges reach about 40%)
REFINE_ERROR = 0.15  # a first fit worse than this is searched locally, then maybe split
MIN_SIDE = 8
# A prompt wants at most 3 objects and every extra object costs PENALTY_ATTRIBUTE, so 6 recovered objects
# already floor alignment at 1; only that many go into the formula (its matching is factorial).
MAX_SCORED_OBJECTS = 6
if 5.0 - (MAX_SCORED_OBJECTS - 3) * PENALTY_ATTRIBUTE > 1.0:
    raise RuntimeError("MAX_SCORED_OBJECTS no longer floors alignment: raise it (see labels.py)")
_SIZE_THRESHOLD = math.sqrt(SIZES["small"] * SIZES["large"])
_COLOR_NAMES = tuple(COLORS)
_PALETTE = np.array([COLORS[c] for c in _COLOR_NAMES], dtype=np.float64)  # [C, 3]
_GREY = np.full(3, 1.0 / math.sqrt(3.0))


def _chroma(arr: np.ndarray) -> np.ndarray:
    """Component orthogonal to the grey axis (last axis of size 3)."""
    return arr - (arr @ _GREY)[..., None] * _GREY



@dataclass(frozen=True)
class JudgedObject:
    """One recovered object; `shape`, `color`, `size`, `x`, `y` mean what they mean on `SceneObject`."""

    shape: str
    color: str
    size: str
    x: float
    y: float
    radius: float  # estimated bounding radius, fraction of min(height, width)
    area: float  # soft area, fraction of the image area
    fit_error: float  # template misfit, sum of squared alpha errors / soft area (0 = perfect)

    def to_scene_object(self) -> SceneObject:
        return SceneObject(shape=self.shape, color=self.color, size=self.size, x=self.x, y=self.y)


@dataclass(frozen=True)
class JudgedScene:
    """A recovered scene: like `Scene`, but with any number of objects (0 for a background-only image).

    It has `background` and `objects` (with `.color`, `.shape`, `.x`, `.y`) like a `Scene`, which is what
    the world's alignment formula reads.
    """

    background: str
    objects: tuple[JudgedObject, ...]  # left to right, then top to bottom
    background_rgb: tuple[float, float, float]
    noise_sigma: float  # estimated per-channel noise standard deviation (0..255 units)

    def counts(self) -> dict[tuple[str, str], int]:
        out: dict[tuple[str, str], int] = {}
        for obj in self.objects:
            out[(obj.color, obj.shape)] = out.get((obj.color, obj.shape), 0) + 1
        return out

    def to_scene(self) -> Scene | None:
        """The recovered `Scene` (no relation, which an image does not state), or None when there are 0
        or more than 3 objects (a `Scene` holds 1 to 3)."""
        if not 1 <= len(self.objects) <= 3:
            return None
        return Scene(background=self.background, objects=tuple(o.to_scene_object() for o in self.objects))


def as_rgb_array(image) -> np.ndarray:
    """A PIL image (any mode, converted to RGB) or an HxWx3 uint8 array -> float64 [H, W, 3]."""
    if isinstance(image, Image.Image):
        arr = np.asarray(image.convert("RGB"))
    elif isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image array has shape {image.shape} and dtype {image.dtype}: "
                             "expected a PIL.Image.Image or an HxWx3 uint8 numpy array")
        arr = image
    else:
        raise ValueError(f"image is a {type(image).__name__}: expected a PIL.Image.Image or an HxWx3 uint8 "
                         "numpy array")
    if min(arr.shape[:2]) < MIN_SIDE:
        raise ValueError(f"image is {arr.shape[1]}x{arr.shape[0]}: expected both sides >= {MIN_SIDE}")
    return arr.astype(np.float64)


def _border(arr: np.ndarray, width: int) -> np.ndarray:
    """Pixels of the border ring, in order around the frame: [N, 3]."""
    top, bottom = arr[:width].reshape(-1, 3), arr[-width:].reshape(-1, 3)
    left, right = arr[width:-width, :width].reshape(-1, 3), arr[width:-width, -width:].reshape(-1, 3)
    return np.concatenate([top, right, bottom, left])


def _background(arr: np.ndarray, k: float) -> tuple[np.ndarray, float]:
    """Robust background colour and noise sigma, from the border ring."""
    ring = _border(arr, max(1, round(k)))
    median = np.median(ring, axis=0)
    close = ring[np.linalg.norm(ring - median, axis=1) < 60.0]
    bg = close.mean(axis=0) if len(close) >= 0.25 * len(ring) else median
    # Noise from neighbour differences along the outermost row/column (a ramp or a step barely moves it).
    diffs = np.concatenate([np.diff(arr[0], axis=0), np.diff(arr[-1], axis=0),
                            np.diff(arr[:, 0], axis=0), np.diff(arr[:, -1], axis=0)])
    mad = np.median(np.abs(diffs - np.median(diffs, axis=0)), axis=0)
    sigma = float(np.median(mad) / 0.6745 / math.sqrt(2.0))
    return bg, sigma


def _name_background(bg: np.ndarray) -> str:
    names = tuple(BACKGROUNDS)
    dist = [np.linalg.norm(bg - np.asarray(BACKGROUNDS[n], dtype=np.float64)) for n in names]
    return names[int(np.argmin(dist))]


def _colour_labels(diff: np.ndarray, bg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel [H, W]: index of the palette colour whose background line fits best (-1: none), and the
    strength: the fraction of that colour's chroma the pixel shows (1 = full colour, 0.5 = half blended
    with the background), measured in chroma so that darkening (shadows, smudges) is not colour."""
    lines = _PALETTE - bg  # [C, 3]
    t = np.clip(diff @ lines.T / np.sum(lines**2, axis=1), 0.0, 1.3)  # [H, W, C]
    resid = np.linalg.norm(diff[..., None, :] - t[..., None] * lines, axis=-1)  # [H, W, C]
    best = np.argmin(resid, axis=-1)
    best_resid = np.take_along_axis(resid, best[..., None], axis=-1)[..., 0]
    ok = (best_resid <= LINE_FIT_MAX * np.linalg.norm(diff, axis=-1)) & (np.max(t, axis=-1) >= 0.3)
    chroma_lines = _chroma(lines)[best]  # [H, W, 3]
    strength = np.sum(_chroma(diff) * chroma_lines, axis=-1) / np.sum(chroma_lines**2, axis=-1)
    return np.where(ok, best, -1), strength


def _depth(mask: np.ndarray) -> np.ndarray:
    """Distance of each pixel of `mask` to the nearest pixel outside it (or outside the array)."""
    return ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]


def _drop_outlines(seeds: np.ndarray, seed_colours: list[int], lab: np.ndarray) -> list[int]:
    """Remove (in place in `seeds`) the seeds of a colour whose pixels enclose a seed of another colour:
    that colour is an outline drawn around an object (clashing), not an object of its own."""
    outlines = set()
    for c in set(seed_colours):
        filled = ndimage.binary_fill_holes(lab == c) & (lab != c)
        inner = [s for s, sc in enumerate(seed_colours, start=1) if sc != c]
        if any(filled[seeds == s].mean() > 0.8 for s in inner):
            outlines.add(c)
    if not outlines:
        return seed_colours
    kept: list[int] = []
    relabel = np.zeros(len(seed_colours) + 1, dtype=np.int32)
    for s, c in enumerate(seed_colours, start=1):
        if c not in outlines:
            kept.append(c)
            relabel[s] = len(kept)
    seeds[...] = relabel[seeds]
    return kept


def _regions(fg: np.ndarray, labels: np.ndarray, strength: np.ndarray, k: float) -> list[tuple[np.ndarray, int]]:
    """(pixel mask, colour index) of each object: seeds and nearest-seed assignment (module docstring)."""
    comps, _ = ndimage.label(fg)
    out = []
    min_area = MIN_AREA * k * k
    for ci, sl in enumerate(ndimage.find_objects(comps), start=1):
        comp = comps[sl] == ci
        if comp.sum() < min_area:
            continue
        lab = np.where(comp, labels[sl], -1)
        solid = (lab >= 0) & (strength[sl] >= SEED_STRENGTH)
        if solid.sum() < 0.25 * min_area:  # no solid palette colour: a smudge, a shadow, a seam
            continue
        seeds = np.zeros(comp.shape, dtype=np.int32)
        seed_colours: list[int] = []
        for c in np.unique(lab[solid]):
            pieces, npieces = ndimage.label(solid & (lab == c))
            for p in range(1, npieces + 1):
                piece = pieces == p
                if piece.sum() >= 0.5 * min_area and _depth(piece).max() >= SEED_DEPTH * k:
                    seed_colours.append(int(c))
                    seeds[piece] = len(seed_colours)
        seed_colours = _drop_outlines(seeds, seed_colours, lab)
        if not seed_colours:  # e.g. a small object inside a thick outline: its deepest solid pixels decide
            depth = np.where(solid, _depth(comp), -1.0)
            deepest = solid & (depth >= depth.max() - 1.0)
            full = np.zeros(fg.shape, dtype=bool)
            full[sl] = comp
            out.append((full, int(np.bincount(lab[deepest]).argmax())))
            continue
        # Every pixel of the component joins its nearest seed.
        _, (iy, ix) = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
        owner = seeds[iy, ix]
        for s, colour in enumerate(seed_colours, start=1):
            mask = comp & (owner == s)
            if mask.sum() >= min_area:
                full = np.zeros(fg.shape, dtype=bool)
                full[sl] = mask
                out.append((full, colour))
    return out


def _judge_object(mask: np.ndarray, colour: int, others: np.ndarray, holes: np.ndarray, chroma_diff: np.ndarray,
                  chroma: np.ndarray, bg: np.ndarray, k: float) -> list[JudgedObject]:
    """Centre, shape and size of the object(s) in one region (`others`: pixels of the other regions;
    `holes`: background-like pixels enclosed by foreground)."""
    height, width = mask.shape
    side = min(height, width)
    # Full-strength chroma of the object: its palette colour against this background. (Blur mixes an
    # object with the background linearly, so chroma / full strength is the covered fraction.)
    line = _chroma(_PALETTE[colour] - bg)
    full = float(np.linalg.norm(line))
    # Soft mask: the object's pixels plus faint blur tails around them not claimed by another object.
    grown = ndimage.binary_dilation(mask, iterations=max(1, round(2 * k))) & ~others
    alpha = np.where(grown, np.clip(chroma / max(full, 1e-9), 0.0, 1.0), 0.0)
    alpha[mask & holes] = 1.0  # enclosed by the object: inside it (e.g. the grey seam under an outline)
    # Unknown pixels: another object, or a weak colour that is not this object blended with the
    # background (a smudge over it). Saturated pixels of another hue (a clashing outline) still count.
    t = np.clip(chroma_diff @ line / max(full**2, 1e-9), 0.0, 1.0)
    resid = np.linalg.norm(chroma_diff - t[..., None] * line, axis=-1)
    covered = grown & ~holes & (resid > np.maximum(25.0, 0.35 * chroma)) & (chroma < 0.6 * full)
    valid = ~others & ~covered
    fit = fit_object(alpha, valid, k, refine=False)
    near = ndimage.binary_dilation(mask, iterations=max(1, round(2 * k)))
    touches = bool(mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())
    if touches or (near & others).any() or covered.sum() > 0.03 * grown.sum() or fit.error > REFINE_ERROR:
        fit = fit_object(alpha, valid, k, refine=True)
    fits = [fit]
    if fit.error > REFINE_ERROR:  # maybe touching or overlapping objects of one colour
        fits = fit_split(alpha, valid, mask, k, fit, min_area=MIN_AREA * k * k)
    return [JudgedObject(
        shape=f.shape, color=_COLOR_NAMES[colour],
        size="small" if f.r / side < _SIZE_THRESHOLD else "large",
        x=f.cx / width, y=f.cy / height, radius=f.r / side,
        area=float(alpha[valid].sum()) / (height * width) / len(fits), fit_error=f.error) for f in fits]


def judge_image(image) -> JudgedScene:
    """Recover the scene of an RGB image (PIL image or HxWx3 uint8 array, any size); see the module doc.

    An image with no object (background only) gives a `JudgedScene` with `objects == ()`.
    """
    arr = as_rgb_array(image)
    height, width = arr.shape[:2]
    side = min(height, width)
    k = side / 64.0
    bg, sigma = _background(arr, k)
    if sigma > 4.0:  # smooth noise down to a few units of chroma before thresholding
        arr = ndimage.gaussian_filter(arr, sigma=(sigma / 20.0, sigma / 20.0, 0.0))
    diff = arr - bg
    chroma = np.linalg.norm(_chroma(diff), axis=-1)
    fg = chroma > CHROMA_THRESHOLD
    filled = ndimage.binary_fill_holes(fg)
    holes = filled & ~fg
    labels, strength = _colour_labels(diff, bg)
    objects = []
    claimed = np.zeros(fg.shape, dtype=bool)
    regions = _regions(filled, labels, strength, k)
    for mask, _ in regions:
        claimed |= mask
    chroma_diff = _chroma(diff)
    for mask, colour in regions:
        objects.extend(_judge_object(mask, colour, claimed & ~mask, holes, chroma_diff, chroma, bg, k))
    objects.sort(key=lambda o: (round(o.x, 3), o.y))
    return JudgedScene(background=_name_background(bg), objects=tuple(objects),
                       background_rgb=tuple(float(v) for v in bg), noise_sigma=sigma)


def _as_spec(intended) -> PromptSpec:
    if isinstance(intended, PromptSpec):
        return intended
    if isinstance(intended, Scene):
        return spec_of(intended)
    if isinstance(intended, str):
        return parse_prompt(intended)
    raise ValueError(f"intended is a {type(intended).__name__}: expected a PromptSpec, a Scene or prompt text")


def score_judged(judged: JudgedScene, intended) -> dict[str, float]:
    """True scores of a recovered scene against the intended one (PromptSpec, Scene or prompt text).

    Only `alignment`, by the world's formula (`labels.true_scores`, which reads `background` and the
    objects' colour, shape and centre); 0 recovered objects count as every wanted object missing, and
    more than `MAX_SCORED_OBJECTS` score the floor, 1.0.
    """
    spec = _as_spec(intended)
    if len(judged.objects) > MAX_SCORED_OBJECTS:
        judged = dataclasses.replace(judged, objects=judged.objects[:MAX_SCORED_OBJECTS])
    return {"alignment": true_scores(spec, judged, Defects())["alignment"]}  # type: ignore[arg-type]


def judge_scores(image, intended) -> dict[str, float]:
    """`score_judged(judge_image(image), intended)`."""
    return score_judged(judge_image(image), intended)
