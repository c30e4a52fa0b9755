"""Pixels of the Shapes world: a scene (plus degradations) -> a deterministic RGB image.

Clean render (`defects=None` or all zero): a flat background in `BACKGROUNDS[background]`, each object a
flat fill in exactly `COLORS[color]`, drawn in scene order at the target size with PIL's (aliased)
ImageDraw. An object's bounding circle has radius `SIZES[size] * side` and centre `(x * side, y * side)`:
- circle: the bounding circle itself;
- square: axis-aligned, inscribed in the bounding circle (half side r / sqrt(2));
- triangle: equilateral, vertices on the bounding circle, pointing up;
- star: five points, outer radius r, inner radius `STAR_INNER * r`, pointing up.

Degradations (`Defects`, severities in [0, 1]); pixel effects scale with the image side (`k = side / 64`):
- layout (`layout.apply_layout_defects`, seeded): off_centre, cramped, cut_by_frame, interpenetrating;
- clashing: background tinted toward the saturated complement of the first object's colour (strength
  0.1 + 0.2 s, small enough that the background stays nearest its own palette colour) and every object
  outlined in that colour (width k (1 + s));
- floating_shadow: a dark ellipse (1.6 r x 0.45 r) under each object but detached from it by r (0.3 + 1.2 s)
  (above it when there is no room below), drawn before the objects;
- blotches: 1 + round(3 s) murky irregular smudges (radius k (3 + 4 s) px, opacity 0.35 + 0.45 s);
- banding: a brightness ramp of amplitude 20 + 40 s across the image, quantised to steps of 8 + 24 s;
- blur: Gaussian, radius k (0.5 + 1.5 s);
- noise: Gaussian per channel, sigma 8 + 32 s (0..255 scale).
Pixel effects apply in the order listed. Randomness comes from `numpy.random.default_rng([seed, ...])`.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from zray.data.layout import apply_layout_defects, radius
from zray.data.scene import BACKGROUNDS, COLORS, LAYOUT_DEFECTS, Defects, Scene, SceneObject

STAR_INNER = 0.45
_LAYOUT_STREAM = 1
_PIXEL_STREAM = 2


def shape_polygon(obj: SceneObject, side: int) -> list[tuple[float, float]] | None:
    """Pixel vertices of a polygonal shape (None for a circle)."""
    cx, cy, r = obj.x * side, obj.y * side, radius(obj) * side
    if obj.shape == "circle":
        return None
    if obj.shape == "square":
        h = r / math.sqrt(2.0)
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if obj.shape == "triangle":
        angles = [-90.0, 30.0, 150.0]
        return [(cx + r * math.cos(math.radians(a)), cy + r * math.sin(math.radians(a))) for a in angles]
    points = []
    for k in range(10):
        rk = r if k % 2 == 0 else STAR_INNER * r
        a = math.radians(-90.0 + 36.0 * k)
        points.append((cx + rk * math.cos(a), cy + rk * math.sin(a)))
    return points


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, side: int,
                 outline: tuple[int, int, int] | None, width: int) -> None:
    fill = COLORS[obj.color]
    poly = shape_polygon(obj, side)
    if poly is None:
        cx, cy, r = obj.x * side, obj.y * side, radius(obj) * side
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline, width=width)
    else:
        draw.polygon(poly, fill=fill, outline=outline, width=width)


def clash_colour(color: str) -> tuple[int, int, int]:
    """The saturated complement of a palette colour."""
    comp = [255 - c for c in COLORS[color]]
    lo, hi = min(comp), max(comp)
    return tuple(int(round((c - lo) * 255 / max(1, hi - lo))) for c in comp)  # type: ignore[return-value]


def _shadow_colour(background: str) -> tuple[int, int, int]:
    if background == "black":
        return (75, 75, 75)
    return tuple(int(c * 0.5) for c in BACKGROUNDS[background])  # type: ignore[return-value]


def _draw_shadows(draw: ImageDraw.ImageDraw, scene: Scene, side: int, sev: float) -> None:
    colour = _shadow_colour(scene.background)
    for obj in scene.objects:
        cx, cy, r = obj.x * side, obj.y * side, radius(obj) * side
        w, h = 1.6 * r, 0.45 * r
        detach = r * (0.3 + 1.2 * sev)
        sy = cy + r + detach + h / 2
        if sy + h / 2 > side:
            sy = cy - r - detach - h / 2
        draw.ellipse([cx - w / 2, sy - h / 2, cx + w / 2, sy + h / 2], fill=colour)


def _blotches(img: Image.Image, sev: float, rng: np.random.Generator) -> Image.Image:
    side = img.size[0]
    k = side / 64.0
    mask = Image.new("L", img.size, 0)
    draw = ImageDraw.Draw(mask)
    alpha = int(round(255 * (0.35 + 0.45 * sev)))
    for _ in range(1 + int(round(3 * sev))):
        cx, cy = rng.uniform(0, side, size=2)
        rad = k * (3.0 + 4.0 * sev)
        for _ in range(3):  # an irregular smudge: three overlapping discs
            ox, oy = rng.normal(0.0, rad * 0.5, size=2)
            rr = rad * rng.uniform(0.6, 1.0)
            draw.ellipse([cx + ox - rr, cy + oy - rr, cx + ox + rr, cy + oy + rr], fill=alpha)
    murky = tuple(int(v) for v in np.clip(np.array([110, 90, 60]) + rng.integers(-30, 31, size=3), 0, 255))
    return Image.composite(Image.new("RGB", img.size, murky), img, mask)


def _banding(arr: np.ndarray, sev: float, rng: np.random.Generator) -> np.ndarray:
    side = arr.shape[0]
    amp = 20.0 + 40.0 * sev
    ramp = np.linspace(-amp / 2, amp / 2, side)
    ramp = ramp[None, :, None] if rng.integers(2) == 0 else ramp[:, None, None]
    step = 8.0 + 24.0 * sev
    return np.floor((arr + ramp) / step) * step + step / 2


def render_laid_out(scene: Scene, size: int, defects: Defects | None = None, seed: int = 0) -> Image.Image:
    """Draw a scene whose geometry is final (layout defects already applied) plus the pixel defects."""
    d = defects or Defects()
    img = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    k = size / 64.0
    outline, width = None, 1
    if d.clashing > 0:
        outline = clash_colour(scene.objects[0].color)
        tint = 0.1 + 0.2 * d.clashing
        bg = np.array(BACKGROUNDS[scene.background], dtype=float)
        tinted = tuple(int(round(v)) for v in (1 - tint) * bg + tint * np.array(outline, dtype=float))
        draw.rectangle([0, 0, size, size], fill=tinted)
        width = max(1, int(round(k * (1.0 + d.clashing))))
    if d.floating_shadow > 0:
        _draw_shadows(draw, scene, size, d.floating_shadow)
    for obj in scene.objects:
        _draw_object(draw, obj, size, outline, width)
    if not (d.blotches or d.banding or d.blur or d.noise):
        return img
    rng = np.random.default_rng([seed, _PIXEL_STREAM])
    if d.blotches > 0:
        img = _blotches(img, d.blotches, rng)
    arr = np.asarray(img, dtype=np.float64)
    if d.banding > 0:
        arr = _banding(arr, d.banding, rng)
    if d.blur > 0:
        blurred = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
        arr = np.asarray(blurred.filter(ImageFilter.GaussianBlur(k * (0.5 + 1.5 * d.blur))), dtype=np.float64)
    if d.noise > 0:
        arr = arr + rng.normal(0.0, 8.0 + 32.0 * d.noise, size=arr.shape)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


def render_candidate(
    scene: Scene, size: int, defects: Defects | None = None, seed: int = 0,
) -> tuple[Image.Image, Scene, Defects]:
    """Render with all defects; returns (image, scene as drawn, realised defects).

    The scene as drawn has the layout defects applied; the realised defects equal the requested ones
    except that layout severities are as measured on the drawn geometry (see `layout.py`).
    """
    if defects is None:
        return render_laid_out(scene, size), scene, Defects()
    requested = defects.to_dict()
    laid_out, realised = scene, {}
    if any(requested[name] > 0 for name in LAYOUT_DEFECTS):
        laid_out, realised = apply_layout_defects(scene, requested, np.random.default_rng([seed, _LAYOUT_STREAM]))
    final = Defects.from_dict({**requested, **realised})
    return render_laid_out(laid_out, size, final, seed), laid_out, final


def render_scene(scene: Scene, size: int, defects: Defects | None = None, seed: int = 0) -> Image.Image:
    """The RGB image of `scene` at `size` x `size` with `defects` (deterministic in its arguments)."""
    return render_candidate(scene, size, defects, seed)[0]


def png_bytes(img: Image.Image) -> bytes:
    """Deterministic PNG encoding (no metadata, fixed compression)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def decode_png(data: bytes) -> Image.Image:
    """PNG bytes -> RGB image; raises ValueError when the bytes are not a decodable image."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as err:  # PIL raises several types for corrupt data
        raise ValueError(f"not a decodable PNG: {err}") from err
    return img.convert("RGB")
