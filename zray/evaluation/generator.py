"""Evaluating a Shapes-world generator with the independent judge (`zray.data.judge`); numpy only.

Definitions (the figures `jobs/pretrain_generator.py` reports):

- **Main colour** of a prompt: the colour with the most requested objects; ties go to the colour mentioned
  first (for a relation prompt, the subject's colour). "A blue square above an orange star" -> blue;
  "two red circles and a blue square" -> red.
- **Background match**: the judge's background name equals the prompt's.
- **Main-colour match**: the judge finds at least one object of the main colour.
- **Colours exact**: the set of the judge's object colours equals the set of requested colours (stricter:
  a wrong extra colour fails it).
- **Alignment**: the world's true alignment score of the judged scene against the prompt (1..5).
- For VAE reconstructions the same checks run against the prompt of the original render, so
  "colour kept" is the main-colour match of the reconstruction.
- **Frechet distance** (`frechet_to`): `zray.metrics.frechet_distance` on a fixed feature map of each RGB
  image in [0, 1]: the 4x4 grid of block-mean RGB values (48 numbers: layout and colour placement) followed
  by the joint RGB histogram with 4 bins per channel (64 numbers, fractions of pixels: the palette), 112
  features in all. No learned network: it is the same on every machine and cannot be gamed by training.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from zray.data.judge import as_rgb_array, judge_image, score_judged
from zray.data.prompt_grammar import PromptSpec, parse_prompt
from zray.metrics import frechet_distance

GRID = 4
HIST_BINS = 4
NUM_FEATURES = GRID * GRID * 3 + HIST_BINS**3


def main_colour(spec: PromptSpec) -> str:
    """The colour with the most requested objects; ties to the first mentioned (relation: the subject)."""
    order = [spec.relation[0][0]] if spec.relation is not None else []
    order += [c for _, c, _ in spec.groups if c not in order]
    totals = {c: sum(n for n, gc, _ in spec.groups if gc == c) for c in order}
    return max(order, key=lambda c: (totals[c], -order.index(c)))


def judge_against(image: Any, prompt: str | PromptSpec) -> dict[str, float]:
    """{background, main_colour, colours_exact} as 0/1 and alignment (1..5) of one image against a prompt."""
    spec = prompt if isinstance(prompt, PromptSpec) else parse_prompt(prompt)
    judged = judge_image(image)
    found = {o.color for o in judged.objects}
    wanted = {c for _, c, _ in spec.groups}
    return {"background": float(judged.background == spec.background),
            "main_colour": float(main_colour(spec) in found),
            "colours_exact": float(found == wanted),
            "alignment": score_judged(judged, spec)["alignment"]}


def judge_many(images: Sequence[Any], prompts: Sequence[str]) -> list[dict[str, float]]:
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts: expected equal")
    return [judge_against(im, p) for im, p in zip(images, prompts)]


def summarise(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean of every key over the rows (rates for 0/1 keys), plus `num`."""
    if not rows:
        raise ValueError("rows is empty: expected at least one judged image")
    return {"num": float(len(rows)), **{k: float(np.mean([r[k] for r in rows])) for k in rows[0]}}


def image_features(images: Sequence[Any]) -> np.ndarray:
    """[N, 112] features (module docstring) of PIL images or HxWx3 uint8 arrays (sides divisible by 4)."""
    feats = []
    for image in images:
        rgb = as_rgb_array(image) / 255.0  # [H, W, 3]
        h, w = rgb.shape[:2]
        if h % GRID or w % GRID:
            raise ValueError(f"image is {w}x{h}: expected sides divisible by {GRID}")
        grid = rgb.reshape(GRID, h // GRID, GRID, w // GRID, 3).mean(axis=(1, 3)).reshape(-1)
        idx = np.minimum((rgb * HIST_BINS).astype(np.int64), HIST_BINS - 1)
        flat = (idx[..., 0] * HIST_BINS + idx[..., 1]) * HIST_BINS + idx[..., 2]
        hist = np.bincount(flat.reshape(-1), minlength=HIST_BINS**3) / float(h * w)
        feats.append(np.concatenate([grid, hist]))
    return np.stack(feats)


def frechet_to(images: Sequence[Any], reference: Sequence[Any]) -> float:
    """Frechet distance between the feature sets of two image collections."""
    return frechet_distance(image_features(images), image_features(reference))
