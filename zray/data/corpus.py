"""Pre-training corpora of the Shapes world, as rows of the `captions` and `generator` tables.

- Captioning corpus (the base VLM learns to perceive and describe): a random scene (no held-out
  (colour, shape) combination), degraded per family with tier none / mild / bad at probabilities
  `CAPTION_TIER_PROBS` (same defect draws as candidates, `candidates.degradations`), rendered; the target
  text is `captions.describe(drawn scene, realised defects)`.
- Generator corpus (the base VAE + flow model learn to draw): (prompt, clean render) for random scenes;
  the test side is `num_generator_test_prompts` distinct prompts that no generator training row has, each
  with one clean reference render.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

from zray.config import WorldConfig
from zray.data.candidates import TIERS, degradations
from zray.data.captions import describe
from zray.data.prompt_grammar import Combo, prompt_for, prompt_text
from zray.data.render import png_bytes, render_candidate, render_scene
from zray.rubric import DIMENSIONS
from zray.data.world import sample_prompts, sample_scene, scene_for_spec, split_rng

CAPTION_TIER_PROBS = (0.5, 0.3, 0.2)  # none, mild, bad
STREAMS = {("captions", "train"): 40, ("captions", "test"): 41, ("generator", "train"): 50,
           ("generator", "test"): 51}

Tick = Callable[[], None]


def caption_rows(cfg: WorldConfig, split: str, num: int, combos: Collection[Combo], tick: Tick) -> list[dict[str, Any]]:
    rows = []
    for i in range(num):
        rng = split_rng(cfg.seed, STREAMS[("captions", split)], i)
        scene = sample_scene(rng, cfg.max_objects, cfg.relation_prob, combos=combos)
        tiers = {d: TIERS[int(rng.choice(len(TIERS), p=CAPTION_TIER_PROBS))] for d in DIMENSIONS}
        seed = int(rng.integers(2**31))
        image, drawn, realised = render_candidate(scene, cfg.image_size, degradations(tiers, len(scene.objects), rng),
                                                  seed)
        rows.append({"image_id": f"cap-{split}-{i:05d}", "split": split, "image": png_bytes(image),
                     "scene_json": drawn.to_json(), "defects_json": realised.to_json(),
                     "description": describe(drawn, realised)})
        tick()
    return rows


def generator_rows(cfg: WorldConfig, combos: Collection[Combo], tick: Tick) -> dict[str, list[dict[str, Any]]]:
    """{'train': [...], 'test': [...]} rows of the generator table."""
    train = []
    for i in range(cfg.num_generator_images):
        rng = split_rng(cfg.seed, STREAMS[("generator", "train")], i)
        scene = sample_scene(rng, cfg.max_objects, cfg.relation_prob, combos=combos)
        train.append(_generator_row("train", i, prompt_for(scene), scene, cfg.image_size))
        tick()
    rng = split_rng(cfg.seed, STREAMS[("generator", "test")])
    specs = sample_prompts(rng, cfg.num_generator_test_prompts, cfg.max_objects, cfg.relation_prob, combos=combos,
                           exclude={row["prompt"] for row in train})
    test = []
    for i, spec in enumerate(specs):
        test.append(_generator_row("test", i, prompt_text(spec), scene_for_spec(spec, rng), cfg.image_size))
        tick()
    return {"train": train, "test": test}


def _generator_row(split: str, i: int, prompt: str, scene, size: int) -> dict[str, Any]:
    return {"image_id": f"gen-{split}-{i:05d}", "split": split, "prompt": prompt,
            "image": png_bytes(render_scene(scene, size)), "scene_json": scene.to_json()}

