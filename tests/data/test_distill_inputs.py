"""Distillation inputs: fresh prompts disjoint from every labelled split, candidates as in the splits, no labels."""

import pytest

from zray.config import WorldConfig
from zray.data.distill_inputs import SCHEMA, distill_inputs
from zray.data.prompt_grammar import parse_prompt, prompt_text
from zray.data.render import decode_png
from zray.data.world import heldout_combos, split_prompts

WORLD = WorldConfig(num_train_prompts=12, num_test_prompts=6, num_heldout_prompts=4, candidates_per_prompt=3,
                    image_size=32)


def test_rows_are_prompts_x_candidates_x_dimensions_without_any_score():
    table = distill_inputs(WORLD, 5, ("alignment", "realism"), progress=False)
    assert table.schema == SCHEMA  # no column holds a score: the teacher gives the targets
    assert table.num_rows == 5 * 3 * 2
    rows = table.to_pylist()
    assert len({r["input_id"] for r in rows}) == table.num_rows
    assert len({r["prompt_id"] for r in rows}) == 5
    assert {r["dimension"] for r in rows} == {"alignment", "realism"}
    assert decode_png(rows[0]["image"]).size == (32, 32)
    # each candidate's image is shared by its dimensions' rows; candidates of one prompt differ
    by_prompt = {}
    for r in rows:
        by_prompt.setdefault(r["prompt_id"], set()).add(r["image"])
    assert all(len(images) == 3 for images in by_prompt.values())


def test_prompts_are_disjoint_from_every_labelled_split_and_avoid_heldout_combinations():
    labelled = split_prompts(WORLD.seed, WORLD.num_train_prompts, WORLD.num_test_prompts, WORLD.num_heldout_prompts,
                             WORLD.max_objects, WORLD.relation_prob)
    taken = {prompt_text(p) for specs in labelled.values() for p in specs}
    table = distill_inputs(WORLD, 30, ("alignment",), progress=False)
    prompts = set(table.column("prompt").to_pylist())
    assert len(prompts) == 30 and not prompts & taken
    held = set(heldout_combos(WORLD.seed))
    assert all(not (parse_prompt(p).combos() & held) for p in prompts)


def test_deterministic_and_a_prefix_of_a_larger_draw():
    a = distill_inputs(WORLD, 4, progress=False)
    assert a.equals(distill_inputs(WORLD, 4, progress=False))
    b = distill_inputs(WORLD, 6, progress=False)
    assert b.slice(0, a.num_rows).equals(a)  # more prompts extend the set, they do not reshuffle it


@pytest.mark.parametrize(("num", "dims", "match"), [
    (0, ("alignment",), "num_prompts=0"),
    (2, ("beauty",), "dimension='beauty'"),
    (2, ("realism", "realism"), "distinct"),
])
def test_bad_arguments_name_the_field(num, dims, match):
    with pytest.raises(ValueError, match=match):
        distill_inputs(WORLD, num, dims, progress=False)
