"""Every stage on your own data: an import folder (`zray data import`) in place of the Shapes world, split into
train / heldout / test by prompt (docs/data-formats.md, "Training and evaluating on your own data").

    rubric = data_rubric(cfg.data)                            # the import's dimensions and anchors (or built-in)
    table = imported_pairs(cfg.data, "train", dims)           # pair_examples columns: what the teacher trains on
    rows = imported_rows(cfg.data, "test")                    # rated images as evaluation candidates
    inputs = imported_distill_inputs(cfg.data, dims)          # distill_inputs columns: the student's RISD / OPD
    prompts = imported_prompts(cfg.data, "train")             # a prompts import: the generator stages' prompts
    rows = prompt_rows(cfg.data, "test", 16, "x.num_eval_prompts")  # the same as rows with a stable image_id

The split (`split_of`): u = the first 8 bytes of sha256(prompt_id) as an integer / 2**64; test if
u < test_frac, heldout if u < test_frac + heldout_frac, else train. Every image and pair of a prompt lands in the
prompt's split (pairs are same-prompt pairs, so no pair straddles splits); the split depends only on the id, so it
is the same on every machine and run, and adding prompts later moves none of the old ones.

Evaluation candidates carry the world's column names: `candidate_id` (the image id), `prompt_id`, `prompt`,
`image`, and per dimension `human_<d>` (the annotators' aggregate, the score HPA / PLCC / SRCC compare with) and
`annotators_<d>` (every rating). Imports have no true scores, so no oracle row.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from zray.config import ConfigError, DataConfig
from zray.data.build import verify_world
from zray.data.importers import manifest_rubric, read_imported
from zray.data.pair_examples import COLUMNS as PAIR_COLUMNS
from zray.data.parquet import DataError
from zray.rubric import BUILTIN_RUBRIC, Rubric

SPLITS = ("train", "heldout", "test")


def split_of(prompt_id: str, test_frac: float, heldout_frac: float) -> str:
    """'train', 'heldout' or 'test' for a prompt id (module docstring)."""
    u = int.from_bytes(hashlib.sha256(prompt_id.encode("utf-8")).digest()[:8], "big") / 2.0**64
    return "test" if u < test_frac else "heldout" if u < test_frac + heldout_frac else "train"


def _import_dir(data: DataConfig) -> Path:
    path = Path(data.dir)
    if not (path / "manifest.json").is_file():
        what = "does not exist" if not path.exists() else "has no manifest.json"
        raise ConfigError(f"data.dir={data.dir!r} is not allowed: it {what}; expected a folder written by "
                          "`zray data import` (or empty for the Shapes world)")
    return path


def import_kind(data: DataConfig) -> str:
    """The kind of the import in `data.dir` (rated, pairs, scoring, prompts; its manifest)."""
    return str(verify_world(_import_dir(data))["kind"])


def require_kind(data: DataConfig, kinds: Sequence[str], stage: str) -> str:
    """The import's kind if it is one of `kinds`; else a ConfigError naming data.dir, its kind and what `stage`
    reads."""
    kind = import_kind(data)
    if kind not in kinds:
        raise ConfigError(f"data.dir={data.dir!r} is not allowed for {stage}: it is a {kind!r} import; expected a "
                          f"`zray data import --kind {'|'.join(kinds)}` folder")
    return kind


def data_rubric(data: DataConfig) -> Rubric:
    """The rubric the reward stages score with: the import's (its manifest), or the built-in one (no data.dir)."""
    if not data.dir:
        return BUILTIN_RUBRIC
    return manifest_rubric(verify_world(_import_dir(data)))


def select_dimensions(dimensions: Sequence[str], rubric: Rubric, setting: str) -> tuple[str, ...]:
    """`dimensions` checked against the rubric (empty = all of the rubric's), in the given order."""
    unknown = [d for d in dimensions if d not in rubric.dimensions]
    if unknown:
        raise ConfigError(f"{setting}={tuple(dimensions)!r} is not allowed: {unknown} not in the rubric "
                          f"({rubric.source}); expected a subset of {rubric.dimensions} (empty = all)")
    return tuple(dimensions) or rubric.dimensions


def _in_split(data: DataConfig, prompt_ids: list[str], split: str, what: str) -> list[bool]:
    if split not in SPLITS:
        raise ConfigError(f"split={split!r} is not allowed: expected one of {SPLITS}")
    keep = [split_of(p, data.test_frac, data.heldout_frac) == split for p in prompt_ids]
    if not any(keep):
        frac = {"test": "data.test_frac", "heldout": "data.heldout_frac", "train": "data.test_frac"}[split]
        raise ConfigError(f"{frac}={getattr(data, frac.split('.')[1])} leaves the {split} split of "
                          f"data.dir={data.dir!r} without {what} (its {len(set(prompt_ids))} prompts hash to other "
                          "splits): change data.test_frac / data.heldout_frac, or import more prompts")
    return keep


def imported_pairs(data: DataConfig, split: str, dimensions: Sequence[str]) -> pa.Table:
    """The import's pairs of `split` in `dimensions`, with the columns of `zray.data.pair_examples` (what every
    teacher method trains on). Pairs without labels (a `pairs` import giving only winners) raise ConfigError."""
    pairs = read_imported(_import_dir(data), "pairs")
    dims = set(dimensions)
    keep = [d in dims for d in pairs.column("dimension").to_pylist()]
    pairs = pairs.filter(pa.array(keep, pa.bool_()))
    pairs = pairs.filter(pa.array(_in_split(data, pairs.column("prompt_id").to_pylist(), split,
                                            f"pairs in {sorted(dims)}"), pa.bool_()))
    if pairs.column("winner_label").null_count or pairs.column("loser_label").null_count:
        raise ConfigError(f"data.dir={data.dir!r} is not allowed for train-teacher: its pairs have no labels (a "
                          "pairs import with a winner only); expected a rated import, or pairs with label_a/label_b")
    return pairs.select(list(PAIR_COLUMNS))


def imported_rows(data: DataConfig, split: str) -> list[dict[str, Any]]:
    """The import's rated images of `split` as evaluation candidates (module docstring), in source order."""
    path = _import_dir(data)
    try:
        table = read_imported(path, "rated_images")
    except DataError as err:
        if "is not in this import" not in str(err):
            raise
        raise ConfigError(f"data.dir={data.dir!r} is not allowed for evaluation: it holds no rated_images.parquet; "
                          "expected a `zray data import --kind rated` folder") from None
    rows = table.to_pylist()
    keep = _in_split(data, [r["prompt_id"] for r in rows], split, "rated images")
    return [{"candidate_id": r.pop("image_id"), **r} for r, k in zip(rows, keep, strict=True) if k]


DISTILL_COLUMNS = ("input_id", "prompt_id", "prompt", "image", "dimension")  # zray.data.distill_inputs.SCHEMA


def imported_distill_inputs(data: DataConfig, dimensions: Sequence[str]) -> pa.Table:
    """Unlabelled student-distillation inputs (the columns of `zray.data.distill_inputs`) from the import:

    - a `scoring` import: its scoring_inputs.parquet rows in `dimensions`, every prompt (they carry no labels, so
      no split is held out of them);
    - a `rated` import: its train-split images x `dimensions` (image-major, input_id "<image_id>-<dimension>"),
      the labels dropped (the test split stays unseen for the evaluation)."""
    kind = require_kind(data, ("scoring", "rated"), "train-student's distillation inputs")
    dims = list(dimensions)
    if kind == "scoring":
        table = read_imported(_import_dir(data), "scoring_inputs")
        table = table.filter(pa.array([d in dims for d in table.column("dimension").to_pylist()], pa.bool_()))
        if not table.num_rows:
            raise ConfigError(f"train_student.dimensions={tuple(dims)!r} leaves no input of data.dir={data.dir!r} "
                              "(its scoring inputs are in other dimensions)")
        return table.select(list(DISTILL_COLUMNS))
    images = read_imported(_import_dir(data), "rated_images").select(["image_id", "prompt_id", "prompt", "image"])
    keep = _in_split(data, images.column("prompt_id").to_pylist(), "train", "rated images")
    rows: dict[str, list] = {name: [] for name in DISTILL_COLUMNS}
    for r in images.filter(pa.array(keep, pa.bool_())).to_pylist():
        for d in dims:
            for name, value in (("input_id", f"{r['image_id']}-{d}"), ("prompt_id", r["prompt_id"]),
                                ("prompt", r["prompt"]), ("image", r["image"]), ("dimension", d)):
                rows[name].append(value)
    return pa.table(rows, schema=pa.schema([(n, pa.binary() if n == "image" else pa.string())
                                           for n in DISTILL_COLUMNS]))


def imported_prompts(data: DataConfig, split: str) -> list[dict[str, str]]:
    """The prompts of `split` of a `prompts` import ({prompt_id, prompt}, in source order): what the generator
    stages train on (train) and sample for their held-out evaluation (test)."""
    require_kind(data, ("prompts",), "the generator stages (distill-generator, reward-finetune)")
    rows = read_imported(_import_dir(data), "prompts").to_pylist()
    keep = _in_split(data, [r["prompt_id"] for r in rows], split, "prompts")
    return [r for r, k in zip(rows, keep, strict=True) if k]


def prompt_rows(data: DataConfig, split: str, num: int, setting: str) -> list[dict[str, Any]]:
    """The first `num` (0 = all) prompts of `split` of a prompts import as generator rows: {image_id, prompt_id,
    prompt}, image_id = "prompt-<prompt_id>" (a stable id for caches and teacher-sample manifests; no `image`: a
    prompt list has no renders). More than the split holds is a ConfigError naming `setting`."""
    rows = imported_prompts(data, split)
    if num < 0 or num > len(rows):
        raise ConfigError(f"{setting}={num} is not allowed: the {split} split of data.dir={data.dir!r} has "
                          f"{len(rows)} prompts; expected 1 to {len(rows)} (or import more prompts, or change "
                          "data.test_frac / data.heldout_frac)")
    return [{"image_id": f"prompt-{r['prompt_id']}", **r} for r in rows[:num or len(rows)]]
