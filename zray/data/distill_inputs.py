"""Unlabelled (prompt, image, dimension) inputs for student distillation (methods.md §3: "distillation inputs need
no labels").

    table = distill_inputs(world_cfg, num_prompts=400, dimensions=DIMENSIONS)   # pyarrow Table

Fresh prompts of the world, disjoint by text from every labelled split (train, test, heldout), built from the
(colour, shape) combinations the train split may use (never the heldout combinations), each with
`world.candidates_per_prompt` candidate images drawn exactly as the labelled splits' candidates are (the same
deviations and degradation tiers), and one row per (candidate, dimension). No score of any kind is stored: the
teacher gives the targets. Deterministic in (world config, number of prompts, `stream`).

Columns: input_id ("d-p0000-c0-alignment"), prompt_id, prompt, image (PNG bytes), dimension.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pyarrow as pa
from tqdm import tqdm

from zray.config import WorldConfig
from zray.data.candidates import Candidate, make_candidates
from zray.data.prompt_grammar import PromptSpec, prompt_text
from zray.data.render import png_bytes
from zray.data.world import ALL_COMBOS, heldout_combos, sample_prompts, split_prompts, split_rng
from zray.rubric import DIMENSIONS, check_dimensions

DISTILL_STREAM = 30  # the random stream of distillation prompts (splits use 1-3, candidates 10-12, labels 20-22)
SCHEMA = pa.schema([("input_id", pa.string()), ("prompt_id", pa.string()), ("prompt", pa.string()),
                    ("image", pa.binary()), ("dimension", pa.string())])


def fresh_candidates(world: WorldConfig, num_prompts: int, *, stream: int, id_prefix: str, progress: bool = True,
                     desc: str = "fresh candidates") -> Iterator[tuple[str, PromptSpec, int, Candidate]]:
    """(prompt_id "<id_prefix>-p0000", prompt spec, candidate index, candidate) for `num_prompts` fresh prompts of
    random stream `stream` (and `stream + 1` for their candidates): prompts disjoint by text from every labelled
    split, from the combinations the train split may use, candidates drawn as the labelled splits' are."""
    if not isinstance(num_prompts, int) or num_prompts < 1:
        raise ValueError(f"num_prompts={num_prompts!r} is not allowed: expected an integer >= 1")
    labelled = split_prompts(world.seed, world.num_train_prompts, world.num_test_prompts, world.num_heldout_prompts,
                             world.max_objects, world.relation_prob)
    taken = {prompt_text(p) for specs in labelled.values() for p in specs}
    held = set(heldout_combos(world.seed))
    seen = tuple(c for c in ALL_COMBOS if c not in held)
    specs = sample_prompts(split_rng(world.seed, stream), num_prompts, world.max_objects, world.relation_prob,
                           combos=seen, exclude=taken)
    for i, spec in enumerate(tqdm(specs, desc=desc, unit="prompt", disable=not progress)):
        candidates = make_candidates(spec, split_rng(world.seed, stream + 1, i), world.candidates_per_prompt,
                                     world.image_size, seen)
        for k, cand in enumerate(candidates):
            yield f"{id_prefix}-p{i:04d}", spec, k, cand


def distill_inputs(world: WorldConfig, num_prompts: int, dimensions: Sequence[str] = DIMENSIONS, *,
                   stream: int = DISTILL_STREAM, progress: bool = True) -> pa.Table:
    """`num_prompts` fresh prompts x `world.candidates_per_prompt` candidates x `dimensions`, as one table.

    Raises ValueError for a bad count or dimension, RuntimeError when the prompt grammar runs out of distinct
    prompts (a world too small for the count)."""
    dims = check_dimensions(dimensions)
    rows: dict[str, list] = {name: [] for name in SCHEMA.names}
    for prompt_id, spec, k, cand in fresh_candidates(world, num_prompts, stream=stream, id_prefix="d",
                                                     progress=progress, desc="distillation inputs"):
        image, text = png_bytes(cand.image), prompt_text(spec)
        for dim in dims:
            for name, value in (("input_id", f"{prompt_id}-c{k}-{dim}"), ("prompt_id", prompt_id),
                                ("prompt", text), ("image", image), ("dimension", dim)):
                rows[name].append(value)
    return pa.table(rows, schema=SCHEMA)
