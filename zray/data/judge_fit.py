"""Shape fitting for the judge (`judge.py`): least squares of blurred shape templates against a soft mask.

Templates are drawn with the renderer's own geometry (`render.shape_polygon`: axis-aligned square,
upward triangle and star, all inscribed in a bounding circle), anti-aliased by supersampling, then blurred
with a Gaussian from `BLUR_GRID`. The target is an object's soft mask `alpha` (1 = full colour, 0 =
background) over the pixels where it is known (`valid`: inside the image, not covered by another object or
a smudge). The misfit counts the whole known mass, also outside the template's window, so a template that
is too small pays for what it misses; mass outside the image is never counted, so a half-visible object
cut by the frame fits with its centre on the edge.

Coordinates: pixel (row i, column j) has its centre at (x, y) = (j, i), as in PIL drawing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from zray.data.render import shape_polygon
from zray.data.scene import COLORS, SHAPES, SIZES, SceneObject

BLUR_GRID = (0.0, 0.6, 1.2, 1.8, 2.5, 3.3, 4.2)  # template blur levels, pixels at 64x64 (times k)
_SUPERSAMPLE = 4
_SEARCH_STEPS = (1.0, 0.5, 0.25)  # pattern-search steps for the centre, pixels at 64x64 (times k)
_MAX_MOVES = 12
_SPLIT_ERROR = 0.15  # a part of a split that fits worse than twice this is split again


def _unit_polygon(shape: str) -> np.ndarray | None:
    """The renderer's polygon for `shape`, centred at 0 with bounding radius 1 (None for a circle)."""
    probe = SceneObject(shape=shape, color=next(iter(COLORS)), size="large", x=0.0, y=0.0)
    poly = shape_polygon(probe, 1)
    return None if poly is None else np.asarray(poly, dtype=np.float64) / SIZES["large"]


def _polygon_area(poly: np.ndarray) -> float:
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


UNIT_POLYGONS = {s: _unit_polygon(s) for s in SHAPES}
UNIT_AREA = {s: (math.pi if p is None else _polygon_area(p)) for s, p in UNIT_POLYGONS.items()}
"""Area of each shape with bounding radius 1."""


@dataclass(frozen=True)
class Fit:
    shape: str
    cx: float  # centre, pixels
    cy: float
    r: float  # bounding radius, pixels
    sigma: float  # template blur, pixels
    error: float  # sum of squared alpha errors over known pixels / known soft area (0 = perfect)


def coverage(shape: str, cx: float, cy: float, r: float, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """Anti-aliased coverage [h, w] of the shape (centre cx, cy, bounding radius r) in a window at (y0, x0)."""
    n = _SUPERSAMPLE
    offs = (np.arange(n) + 0.5) / n - 0.5
    ys = (y0 + np.arange(h)[:, None] + offs[None, :]).reshape(-1)
    xs = (x0 + np.arange(w)[:, None] + offs[None, :]).reshape(-1)
    r = max(r, 1e-6)
    py, px = (ys[:, None] - cy) / r, (xs[None, :] - cx) / r
    poly = UNIT_POLYGONS[shape]
    if poly is None:
        inside = px**2 + py**2 <= 1.0
    else:
        inside = np.zeros((py.shape[0], px.shape[1]), dtype=bool)
        for (xa, ya), (xb, yb) in zip(poly, np.roll(poly, -1, axis=0)):
            crosses = (ya > py) != (yb > py)
            with np.errstate(divide="ignore", invalid="ignore"):
                x_cross = xa + (py - ya) * (xb - xa) / (yb - ya)
            inside ^= crosses & (px < x_cross)
    return inside.reshape(h, n, w, n).mean(axis=(1, 3))


class _Target:
    """A soft mask and where it is known, with the sums a misfit needs."""

    def __init__(self, alpha: np.ndarray, valid: np.ndarray, k: float):
        self.alpha = np.where(valid, alpha, 0.0)
        self.valid = valid
        self.k = k
        self.total = float(np.sum(self.alpha**2))
        self.area = max(float(self.alpha.sum()), 1e-9)

    def errors(self, shape: str, cx: float, cy: float, r: float, sigmas) -> list[float]:
        """Misfit of the template at each blur level in `sigmas` (pixels at 64x64)."""
        h, w = self.alpha.shape
        pad = int(math.ceil(3.0 * max(sigmas) * self.k)) + 2
        y0, x0 = int(math.floor(cy - r)) - pad, int(math.floor(cx - r)) - pad
        y1, x1 = int(math.ceil(cy + r)) + pad + 1, int(math.ceil(cx + r)) + pad + 1
        cover = coverage(shape, cx, cy, r, y0, x0, y1 - y0, x1 - x0)
        sy0, sx0, sy1, sx1 = max(y0, 0), max(x0, 0), min(y1, h), min(x1, w)
        if sy0 >= sy1 or sx0 >= sx1:
            return [self.total / self.area] * len(sigmas)
        a = self.alpha[sy0:sy1, sx0:sx1]
        v = self.valid[sy0:sy1, sx0:sx1]
        outside = self.total - float(np.sum(a**2))
        out = []
        for sigma in sigmas:
            t = ndimage.gaussian_filter(cover, sigma * self.k, mode="constant") if sigma > 0 else cover
            t = t[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0]
            out.append((outside + float(np.sum(((t - a) * v) ** 2))) / self.area)
        return out


def _best_sigma(target: _Target, shape: str, cx: float, cy: float, r: float) -> tuple[float, float]:
    errs = target.errors(shape, cx, cy, r, BLUR_GRID)
    i = int(np.argmin(errs))
    return BLUR_GRID[i], errs[i]


def _refine(target: _Target, fit: Fit) -> Fit:
    """Pattern search over (cx, cy, r) at the fit's blur level, then the blur level again."""
    params = [fit.cx, fit.cy, fit.r]
    best = fit.error

    def error(p) -> float:
        return target.errors(fit.shape, p[0], p[1], p[2], (fit.sigma,))[0]

    for step in _SEARCH_STEPS:
        moves = [(0, step), (0, -step), (1, step), (1, -step), (2, step / 2), (2, -step / 2)]
        for _ in range(_MAX_MOVES):
            improved = False
            for dim, delta in moves:
                trial = list(params)
                trial[dim] += delta * target.k
                if trial[2] <= 0.5:
                    continue
                err = error(trial)
                if err < best - 1e-9:
                    params, best, improved = trial, err, True
            if not improved:
                break
    sigma, err = _best_sigma(target, fit.shape, *params)
    return Fit(fit.shape, params[0], params[1], params[2], sigma, err)


def _refit(target: _Target, start: Fit) -> Fit:
    """Every shape refined from `start`'s centre (radius rescaled to keep its area) on a new target."""
    fits = []
    for shape in SHAPES:
        r = start.r * math.sqrt(UNIT_AREA[start.shape] / UNIT_AREA[shape])
        sigma, err = _best_sigma(target, shape, start.cx, start.cy, r)
        fits.append(_refine(target, Fit(shape, start.cx, start.cy, r, sigma, err)))
    return min(fits, key=lambda f: f.error)


def fit_object(alpha: np.ndarray, valid: np.ndarray, k: float, refine: bool) -> Fit:
    """Best template for a soft mask: centre at the alpha centroid, radius from the soft area per shape,
    best blur level; with `refine`, each shape's centre and radius are then searched locally (for objects
    that are cut by the frame, partly covered, or fit badly)."""
    target = _Target(alpha, valid, k)
    ys, xs = np.indices(alpha.shape)
    cx = float((target.alpha * xs).sum() / target.area)
    cy = float((target.alpha * ys).sum() / target.area)
    fits = []
    for shape in SHAPES:
        r = math.sqrt(target.area / UNIT_AREA[shape])
        sigma, err = _best_sigma(target, shape, cx, cy, r)
        fit = Fit(shape, cx, cy, r, sigma, err)
        fits.append(_refine(target, fit) if refine else fit)
    return min(fits, key=lambda f: f.error)


def union_error(alpha: np.ndarray, valid: np.ndarray, k: float, fits: list[Fit]) -> float:
    """Misfit of several same-colour templates together (their union, blurred at their mean blur)."""
    target = _Target(alpha, valid, k)
    h, w = alpha.shape
    cover = np.zeros((h, w))
    for f in fits:
        cover = np.maximum(cover, coverage(f.shape, f.cx, f.cy, f.r, 0, 0, h, w))
    sigma = float(np.mean([f.sigma for f in fits])) * k
    t = ndimage.gaussian_filter(cover, sigma, mode="constant") if sigma > 0 else cover
    return float(np.sum(((t - target.alpha) * valid) ** 2)) / target.area


def _two_means(mask: np.ndarray, alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Split a mask's pixels into two spatial clusters (weighted 2-means, started along the main axis)."""
    ys, xs = np.nonzero(mask)
    if len(ys) < 4:
        return None
    pts = np.stack([xs, ys], axis=1).astype(np.float64)
    wts = alpha[ys, xs] + 1e-6
    centre = np.average(pts, axis=0, weights=wts)
    cov = np.cov((pts - centre).T, aweights=wts)
    axis = np.linalg.eigh(cov)[1][:, -1]
    side = (pts - centre) @ axis > 0
    for _ in range(20):
        if side.all() or not side.any():
            return None
        c1 = np.average(pts[side], axis=0, weights=wts[side])
        c0 = np.average(pts[~side], axis=0, weights=wts[~side])
        new = np.sum((pts - c1) ** 2, axis=1) < np.sum((pts - c0) ** 2, axis=1)
        if (new == side).all():
            break
        side = new
    a, b = np.zeros_like(mask), np.zeros_like(mask)
    a[ys[side], xs[side]] = True
    b[ys[~side], xs[~side]] = True
    return a, b


def fit_split(alpha: np.ndarray, valid: np.ndarray, mask: np.ndarray, k: float, single: Fit,
              min_area: float, max_parts: int = 3) -> list[Fit]:
    """One template, or several when the region is same-colour objects touching or overlapping.

    The region is split into two spatial clusters (weighted 2-means); each cluster is fitted with the
    other's pixels unknown (so each template may extend under the other), then twice in turn each
    template is refitted where the other template does not reach. The split is kept when the union of
    the two templates explains the region clearly better (misfit below half of the single fit's). Parts
    that still fit badly are split again, up to `max_parts` templates.
    """
    halves = _two_means(mask, alpha)
    if halves is None or max_parts < 2:
        return [single]
    parts = []
    for part, other in (halves, halves[::-1]):
        if float(alpha[part].sum()) < min_area:
            return [single]
        part_valid = valid & ~other
        parts.append((part, part_valid, fit_object(alpha, part_valid, k, refine=True)))
    fits = [f for _, _, f in parts]
    h, w = alpha.shape
    for _ in range(2):  # alternate: each template is refitted where the other one does not reach
        for i in (0, 1):
            o = fits[1 - i]
            other_cover = coverage(o.shape, o.cx, o.cy, o.r, 0, 0, h, w) > 0.5
            part_valid = valid & ~other_cover
            fits[i] = _refit(_Target(alpha, part_valid, k), fits[i])
            parts[i] = (parts[i][0], part_valid, fits[i])
    if union_error(alpha, valid, k, fits) >= 0.5 * single.error:
        return [single]
    out: list[Fit] = []
    for i, (part, part_valid, fit) in enumerate(parts):
        budget = max_parts - len(out) - (len(parts) - 1 - i)
        if fit.error > 2 * _SPLIT_ERROR and budget >= 2:
            out.extend(fit_split(alpha, part_valid, part, k, fit, min_area, budget))
        else:
            out.append(fit)
    return out
