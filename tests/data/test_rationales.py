"""Ground-truth rationales of the instruction phase: what they say per dimension, and the corpus they make."""

import pytest

from zray.config import WorldConfig
from zray.data.prompt_grammar import PromptSpec, prompt_text
from zray.data.rationales import SCHEMA, instruct_corpus, rationale, relation_holds
from zray.data.scene import Defects, Scene, SceneObject
from zray.data.world import split_prompts

WORLD = WorldConfig(num_train_prompts=12, num_test_prompts=6, num_heldout_prompts=4, candidates_per_prompt=3,
                    image_size=32)


def _obj(color, shape, x=0.3, y=0.5):
    return SceneObject(shape=shape, color=color, size="small", x=x, y=y)


def test_alignment_names_what_is_drawn_missing_and_extra():
    spec = PromptSpec(background="white", groups=((2, "red", "circle"), (1, "blue", "square")))
    exact = Scene("white", (_obj("red", "circle", 0.2), _obj("red", "circle", 0.5), _obj("blue", "square", 0.8)))
    assert rationale(spec, exact, Defects(), "alignment") == \
        "drawn: two red circles and a blue square on white; missing: none; extra: none"
    off = Scene("black", (_obj("red", "circle", 0.2), _obj("green", "star", 0.7)))
    assert rationale(spec, off, Defects(), "alignment") == (
        "drawn: a red circle and a green star on black; missing: a red circle and a blue square; "
        "extra: a green star; background: black not white")


def test_alignment_judges_the_relation_only_when_it_can_be_judged():
    spec = PromptSpec(background="white", groups=((1, "red", "circle"), (1, "blue", "square")),
                      relation=(("red", "circle"), "left of", ("blue", "square")))
    right = Scene("white", (_obj("red", "circle", 0.2), _obj("blue", "square", 0.8)))
    wrong = Scene("white", (_obj("red", "circle", 0.8), _obj("blue", "square", 0.2)))
    missing = Scene("white", (_obj("red", "circle", 0.2),))
    assert rationale(spec, right, Defects(), "alignment").endswith("; relation: right")
    assert rationale(spec, wrong, Defects(), "alignment").endswith("; relation: wrong")
    assert relation_holds(spec, missing) is None and "relation" not in rationale(spec, missing, Defects(), "alignment")


def test_other_dimensions_list_their_visible_defects_at_caption_levels():
    spec = PromptSpec(background="white", groups=((1, "red", "circle"),))
    scene = Scene("white", (_obj("red", "circle"),))
    defects = Defects(noise=0.7, banding=0.2, blotches=0.01, blur=0.3, cut_by_frame=0.6)
    assert rationale(spec, scene, defects, "realism") == "defects: noise severe; banding mild"  # blotches invisible
    assert rationale(spec, scene, defects, "aesthetics") == "defects: blur mild"
    assert rationale(spec, scene, defects, "plausibility") == "defects: cut_by_frame severe"
    assert rationale(spec, scene, Defects(), "realism") == "defects: none"
    with pytest.raises(ValueError, match="dimension='beauty'"):
        rationale(spec, scene, defects, "beauty")


def test_corpus_is_fresh_deterministic_and_never_holds_a_score():
    table = instruct_corpus(WORLD, 4, progress=False)
    assert table.schema == SCHEMA and table.num_rows == 4 * 3 * 4
    assert table.equals(instruct_corpus(WORLD, 4, progress=False))
    labelled = split_prompts(WORLD.seed, WORLD.num_train_prompts, WORLD.num_test_prompts, WORLD.num_heldout_prompts,
                             WORLD.max_objects, WORLD.relation_prob)
    taken = {prompt_text(p) for specs in labelled.values() for p in specs}
    assert not set(table.column("prompt").to_pylist()) & taken
    rationales = table.column("rationale").to_pylist()
    assert not any("score" in r.lower() or "<s_" in r for r in rationales)
    from zray.data.distill_inputs import distill_inputs

    distill = set(distill_inputs(WORLD, 4, progress=False).column("image").to_pylist())
    assert not distill & set(table.column("image").to_pylist())  # its own stream: other images than distillation's


def test_a_labelled_candidate_s_rationale_is_its_scene_s_and_pairs_carry_both_sides(small_world):
    """`candidate_rationale` from a candidates row (prompt, scene_json, defects_json) is the rationale of the parsed
    prompt, the drawn scene and the realised defects; `pair_examples(..., rationales=True)` adds each side's."""
    from zray.data import read_table
    from zray.data.pair_examples import COLUMNS, pair_examples
    from zray.data.prompt_grammar import parse_prompt
    from zray.data.rationales import candidate_rationale

    out, _ = small_world
    cands = {r["candidate_id"]: r for r in read_table(out / "candidates_train.parquet", "candidates").to_pylist()}
    row = next(r for r in cands.values() if Defects.from_json(r["defects_json"]).present())
    for dim in ("alignment", "realism", "aesthetics", "plausibility"):
        assert candidate_rationale(row["prompt"], row["scene_json"], row["defects_json"], dim) == rationale(
            parse_prompt(row["prompt"]), Scene.from_json(row["scene_json"]), Defects.from_json(row["defects_json"]),
            dim)
    plain, full = pair_examples(out, "train"), pair_examples(out, "train", rationales=True)
    assert tuple(plain.column_names) == COLUMNS
    assert full.column_names == [*COLUMNS, "winner_rationale", "loser_rationale"] and full.num_rows == plain.num_rows
    pairs = read_table(out / "pairs_train.parquet", "pairs").to_pylist()
    for pair, got in list(zip(pairs, full.to_pylist()))[:20]:
        for side in ("winner", "loser"):
            c = cands[pair[f"{side}_id"]]
            assert got[f"{side}_rationale"] == candidate_rationale(c["prompt"], c["scene_json"], c["defects_json"],
                                                                   pair["dimension"])
    assert len({r["winner_rationale"] for r in full.to_pylist()}) > 1
