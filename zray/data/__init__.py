"""The Shapes world: a synthetic text-to-image benchmark with known ground truth.

Spec: ../shared/spec/shapes-world.md. Modules: `scene` (vocabulary and data model), `layout` (geometry and
layout defects), `render` (pixels), `prompt_grammar` (prompt grammar), `world` (sampling, splits), `candidates`
(deviations and degradations), `labels` (true scores, annotators, pairs), `captions` (description text),
`corpus` (pre-training corpora), `parquet` (schemas and readers), `build` (`build_world`, manifest); imported data
(docs/data-formats.md): `foreign` (formats, row checks, derived pairs), `importers` (`import_data`, `read_imported`).

Import-light: numpy, PIL, pyarrow and tqdm (and the pure `zray.rubric`); Ray is imported inside `read_ray_dataset`.
"""

from zray.data.build import GENERATOR_VERSION, build_world, ensure_world, verify_world
from zray.data.captions import Description, describe, parse_description
from zray.data.labels import snap, true_scores
from zray.data.parquet import SCHEMAS, DataError, head_rows, read_ray_dataset, read_table, write_table
from zray.data.prompt_grammar import PromptSpec, parse_prompt, prompt_for
from zray.data.render import render_scene
from zray.data.scene import Defects, Relation, Scene, SceneObject
from zray.data.world import heldout_combos, sample_scene

__all__ = [
    "GENERATOR_VERSION", "SCHEMAS", "DataError", "Defects", "Description", "PromptSpec", "Relation", "Scene",
    "SceneObject", "build_world", "describe", "ensure_world", "head_rows", "heldout_combos", "parse_description",
    "parse_prompt", "prompt_for", "read_ray_dataset", "read_table", "render_scene", "sample_scene", "snap",
    "true_scores", "verify_world", "write_table",
]
