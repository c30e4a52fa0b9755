"""Scoring rationales from the world's ground truth: what an instruction-tuned judge would say before its score.

The base VLM's instruction phase (`zray.tasks.instruct`) learns the scoring conversation from these: given the
rubric prompt, the image and a dimension, a short rationale about what in the image bears on that dimension,
then the fixed score prefix. The score token itself is never part of a rationale (zero-shot stays an honest
baseline: the base learns to look and to talk, not to score). Rationales use the captioning corpus's words
(`zray.data.captions`), so the base VLM already knows every token of them.

    alignment:     drawn: two red circles on white; missing: a blue square; extra: none; relation: wrong
    realism:       defects: noise severe; banding mild          (or "defects: none")
    aesthetics:    defects: blur mild; off_centre severe
    plausibility:  defects: cut_by_frame mild

`candidate_rationale` gives a labelled candidate's rationale from its row (prompt, scene_json, defects_json): a
diagnostic input (SFT with the true rationale in context, `train_teacher.sft_rationales`; scoring after it,
`evaluate.reasoning = "truth"`), never used by the instruction phase.

Alignment compares what is drawn with what the prompt asks: the drawn objects and background, the (colour,
shape) objects the prompt asks for and the image lacks (`missing`), those drawn beyond it (`extra`), a wrong
background, and for a relation prompt whether the relation holds. The other dimensions list that dimension's
visible degradations (severity >= `VISIBLE_MIN`) at the caption's two levels (mild < 0.5 <= severe).

    table = instruct_corpus(world_cfg, num_prompts=400)   # pyarrow Table: one row per (candidate, dimension)

The corpus's prompts are fresh (disjoint by text from every labelled split, as `zray.data.distill_inputs`), on
its own random stream, so the instruction phase never sees a labelled image.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import pyarrow as pa

from zray.config import WorldConfig
from zray.data.captions import VISIBLE_MIN, severity_level
from zray.data.distill_inputs import fresh_candidates
from zray.data.prompt_grammar import PromptSpec, canonical_groups, content_phrase, parse_prompt, prompt_text
from zray.data.render import png_bytes
from zray.data.scene import DEFECT_DIMENSION, Defects, Relation, Scene
from zray.rubric import DIMENSIONS, check_dimension, check_dimensions

INSTRUCT_STREAM = 32  # the random stream of instruction prompts (distillation uses 30, 31)
SCHEMA = pa.schema([("example_id", pa.string()), ("prompt_id", pa.string()), ("prompt", pa.string()),
                    ("image", pa.binary()), ("dimension", pa.string()), ("rationale", pa.string())])


def _phrase(counts: Counter) -> str:
    return content_phrase(canonical_groups(dict(counts))) if counts else "none"


def relation_holds(spec: PromptSpec, scene: Scene) -> bool | None:
    """Whether the prompt's relation holds in the drawn scene; None without a relation or when its two objects are
    not drawn exactly once each (then it cannot be judged)."""
    if spec.relation is None:
        return None
    subject, predicate, reference = spec.relation
    subj = [o for o in scene.objects if (o.color, o.shape) == subject]
    ref = [o for o in scene.objects if (o.color, o.shape) == reference]
    if len(subj) != 1 or len(ref) != 1:
        return None
    return Relation(0, predicate, 1).holds((subj[0], ref[0]))


def alignment_rationale(spec: PromptSpec, scene: Scene) -> str:
    drawn = Counter((o.color, o.shape) for o in scene.objects)
    wanted = Counter({(c, s): n for n, c, s in spec.groups})
    parts = [f"drawn: {_phrase(drawn)} on {scene.background}", f"missing: {_phrase(wanted - drawn)}",
             f"extra: {_phrase(drawn - wanted)}"]
    if scene.background != spec.background:
        parts.append(f"background: {scene.background} not {spec.background}")
    holds = relation_holds(spec, scene)
    if holds is not None:
        parts.append(f"relation: {'right' if holds else 'wrong'}")
    return "; ".join(parts)


def defects_rationale(defects: Defects, dimension: str) -> str:
    visible = [f"{name} {severity_level(value)}" for name, value in defects.to_dict().items()
               if DEFECT_DIMENSION[name] == dimension and value >= VISIBLE_MIN]
    return "defects: " + ("; ".join(visible) or "none")


def rationale(spec: PromptSpec, scene: Scene, defects: Defects, dimension: str) -> str:
    """The rationale for one (prompt, drawn scene, realised defects, dimension); see the module docstring."""
    if check_dimension(dimension) == "alignment":
        return alignment_rationale(spec, scene)
    return defects_rationale(defects, dimension)


def candidate_rationale(prompt: str, scene_json: str, defects_json: str, dimension: str) -> str:
    """The rationale of a labelled candidate (a `candidates_<split>.parquet` row's prompt, scene_json and
    defects_json) in `dimension`: the world's ground truth about that image, as the instruction phase words it."""
    return rationale(parse_prompt(prompt), Scene.from_json(scene_json), Defects.from_json(defects_json), dimension)


def instruct_corpus(world: WorldConfig, num_prompts: int, dimensions: Sequence[str] = DIMENSIONS, *,
                    stream: int = INSTRUCT_STREAM, progress: bool = True) -> pa.Table:
    """`num_prompts` fresh prompts x `world.candidates_per_prompt` candidates x `dimensions`, each with its
    ground-truth rationale (columns of SCHEMA). Deterministic in (world, count, stream)."""
    dims = check_dimensions(dimensions)
    rows: dict[str, list] = {name: [] for name in SCHEMA.names}
    for prompt_id, spec, k, cand in fresh_candidates(world, num_prompts, stream=stream, id_prefix=f"s{stream}",
                                                     progress=progress, desc="instruction corpus"):
        image, text = png_bytes(cand.image), prompt_text(spec)
        for dim in dims:
            values = {"example_id": f"{prompt_id}-c{k}-{dim}", "prompt_id": prompt_id, "prompt": text,
                      "image": image, "dimension": dim, "rationale": rationale(spec, cand.scene, cand.defects, dim)}
            for name, value in values.items():
                rows[name].append(value)
    return pa.table(rows, schema=SCHEMA)
