"""Sampling the Shapes world: scenes, prompts per split, and the held-out (colour, shape) combinations.

Every random choice goes through a `numpy.random.Generator`; `split_rng(seed, stream, index)` derives an
independent generator per (split/table, item) from the world seed, so an item does not depend on how
many items came before it in another table.

Splits: train and test prompts are disjoint (by text); the **heldout** split's prompts each contain at
least one of `NUM_HELDOUT_COMBOS` (colour, shape) combinations picked from the seed, and those combinations
appear nowhere else (not in train or test prompts, not in their candidates' deviations, not in the
captioning or generator corpora).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np

from zray.data.layout import place_objects
from zray.data.prompt_grammar import Combo, PromptSpec, prompt_text, spec_of
from zray.data.scene import BACKGROUNDS, COLORS, RELATIONS, SHAPES, SIZES, Relation, Scene

ALL_COMBOS: tuple[Combo, ...] = tuple((c, s) for c in COLORS for s in SHAPES)
NUM_HELDOUT_COMBOS = 3  # wanted as WorldConfig.num_heldout_combos
REPEAT_PROB = 0.35  # chance that a further object repeats an earlier (colour, shape): "two red circles"
_HELDOUT_STREAM = 7
_MAX_DRAWS = 200  # rejection-sampling budget per prompt


def split_rng(seed: int, stream: int, index: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, stream, index])


def heldout_combos(seed: int, num: int = NUM_HELDOUT_COMBOS) -> tuple[Combo, ...]:
    """`num` (colour, shape) combinations with distinct colours and distinct shapes, chosen from the seed."""
    rng = split_rng(seed, _HELDOUT_STREAM)
    if num > len(SHAPES):
        raise ValueError(f"num heldout combos={num}: at most {len(SHAPES)} (distinct shapes)")
    colours = rng.choice(len(COLORS), size=num, replace=False)
    shapes = rng.choice(len(SHAPES), size=num, replace=False)
    return tuple(sorted((list(COLORS)[c], SHAPES[s]) for c, s in zip(colours, shapes)))


def _pick(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


def _sizes(rng: np.random.Generator, n: int) -> list[str]:
    return [_pick(rng, tuple(SIZES)) for _ in range(n)]


def sample_scene(
    rng: np.random.Generator, max_objects: int, relation_prob: float, *,
    combos: Collection[Combo] = ALL_COMBOS,
) -> Scene:
    """A random clean scene: 1..max_objects objects from `combos`, non-overlapping, inside the frame.

    With probability `relation_prob` (and max_objects >= 2) the scene is two objects of different
    (colour, shape) with a relation that visibly holds (see `layout.relation_clear`).
    """
    combos = tuple(combos)
    if not combos:
        raise ValueError("sample_scene: combos is empty")
    background = _pick(rng, tuple(BACKGROUNDS))
    if max_objects >= 2 and len(set(combos)) >= 2 and rng.random() < relation_prob:
        i, j = rng.choice(len(combos), size=2, replace=False)
        while combos[i] == combos[j]:  # duplicates in `combos` only; terminates since 2+ distinct
            j = int(rng.integers(len(combos)))
        chosen = [combos[i], combos[j]]
        relation = Relation(0, _pick(rng, RELATIONS), 1)
    else:
        n = int(rng.integers(1, max_objects + 1))
        chosen = [_pick(rng, combos)]
        for _ in range(n - 1):
            chosen.append(_pick(rng, chosen) if rng.random() < REPEAT_PROB else _pick(rng, combos))
        relation = None
    items = [(shape, colour, size) for (colour, shape), size in zip(chosen, _sizes(rng, len(chosen)))]
    return Scene(background=background, objects=place_objects(rng, items, relation), relation=relation)


def scene_for_spec(spec: PromptSpec, rng: np.random.Generator) -> Scene:
    """A fresh clean scene realising a prompt exactly (random sizes and layout)."""
    if spec.relation is not None:
        (sc, ss), predicate, (rc, rs) = spec.relation
        relation = Relation(0, predicate, 1)
        pairs = [(sc, ss), (rc, rs)]
    else:
        relation = None
        pairs = [(c, s) for n, c, s in spec.groups for _ in range(n)]
    order = rng.permutation(len(pairs)) if relation is None else np.arange(2)
    items = [(pairs[k][1], pairs[k][0], size) for k, size in zip(order, _sizes(rng, len(pairs)))]
    return Scene(background=spec.background, objects=place_objects(rng, items, relation), relation=relation)


def sample_prompts(
    rng: np.random.Generator, num: int, max_objects: int, relation_prob: float, *,
    combos: Collection[Combo], require_any: Collection[Combo] = (), exclude: Collection[str] = (),
) -> list[PromptSpec]:
    """`num` distinct prompts built from `combos`, each containing one of `require_any` if given, none
    of whose text is in `exclude`. Raises RuntimeError when the budget of draws runs out (a too-small
    world for the requested count)."""
    require = frozenset(require_any)
    taken = set(exclude)
    out: list[PromptSpec] = []
    for _ in range(num * _MAX_DRAWS):
        if len(out) == num:
            break
        spec = spec_of(sample_scene(rng, max_objects, relation_prob, combos=combos))
        text = prompt_text(spec)
        if text in taken or (require and not (spec.combos() & require)):
            continue
        taken.add(text)
        out.append(spec)
    if len(out) < num:
        raise RuntimeError(f"sample_prompts: found only {len(out)} of {num} distinct prompts")
    return out


def split_prompts(
    seed: int, num_train: int, num_test: int, num_heldout: int, max_objects: int, relation_prob: float,
) -> dict[str, list[PromptSpec]]:
    """Disjoint train / test / heldout prompt lists (see the module docstring)."""
    held = heldout_combos(seed)
    seen = tuple(c for c in ALL_COMBOS if c not in held)
    train = sample_prompts(split_rng(seed, 1), num_train, max_objects, relation_prob, combos=seen)
    test = sample_prompts(split_rng(seed, 2), num_test, max_objects, relation_prob, combos=seen,
                          exclude={prompt_text(p) for p in train})
    heldout = sample_prompts(split_rng(seed, 3), num_heldout, max_objects, relation_prob, combos=ALL_COMBOS,
                             require_any=held)
    return {"train": train, "test": test, "heldout": heldout}
