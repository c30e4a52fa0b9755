"""Building the Shapes world on disk: every table, one Parquet file per (table, split), and a manifest.

    build_world(WorldConfig(seed=0), "data/shapes")  ->  manifest dict (also written as manifest.json)

Files: candidates_{train,test,heldout}.parquet, pairs_{train,test,heldout}.parquet,
captions_{train,test}.parquet, generator_{train,test}.parquet, manifest.json. The manifest holds the
generator version, the seed, the WorldConfig as a dict, the held-out (colour, shape) combinations, and per
file its table kind, split, row count and sha256. Two builds with the same config give identical bytes.

Labels: train candidates get one calibrated rating per dimension; test and heldout candidates get
`num_annotators` ratings from annotators whose biases are fixed per split (see `labels.py`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Collection
from pathlib import Path
from typing import Any

from tqdm import tqdm

from zray.config import WorldConfig
from zray.data.candidates import make_candidates
from zray.data.corpus import caption_rows, generator_rows
from zray.data.labels import annotate, annotator_biases, drop_extremes_mean, make_pairs, snap, train_labels
from zray.data.parquet import DataError, write_table
from zray.data.prompt_grammar import Combo, PromptSpec, prompt_text
from zray.data.render import png_bytes
from zray.rubric import DIMENSIONS
from zray.data.world import ALL_COMBOS, heldout_combos, split_prompts, split_rng
from zray.training.runs import write_text_atomic

GENERATOR_VERSION = "shapes-1"
MANIFEST = "manifest.json"
_CANDIDATE_STREAM = {"train": 10, "test": 11, "heldout": 12}
_LABEL_STREAM = {"train": 20, "test": 21, "heldout": 22}


def _candidate_rows(
    cfg: WorldConfig, split: str, specs: list[PromptSpec], combos: Collection[Combo], tick,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(candidate rows, pair rows) of one split."""
    label_rng = split_rng(cfg.seed, _LABEL_STREAM[split])
    biases = annotator_biases(label_rng, cfg.num_annotators, cfg.annotator_bias)
    rows, pairs = [], []
    for i, spec in enumerate(specs):
        prompt_id = f"{split}-p{i:04d}"
        candidates = make_candidates(spec, split_rng(cfg.seed, _CANDIDATE_STREAM[split], i),
                                     cfg.candidates_per_prompt, cfg.image_size, combos)
        rng = split_rng(cfg.seed, _LABEL_STREAM[split], i + 1)
        ids, labels = [], []
        for k, cand in enumerate(candidates):
            if split == "train":
                label = train_labels(cand.true, rng, cfg.train_label_noise)
                ratings = {d: [label[d]] for d in DIMENSIONS}
                human = dict(label)
            else:
                ratings = annotate(cand.true, biases, rng, cfg.annotator_noise)
                human = {d: drop_extremes_mean(ratings[d]) for d in DIMENSIONS}
                label = {d: snap(human[d]) for d in DIMENSIONS}
            row = {"candidate_id": f"{prompt_id}-c{k}", "prompt_id": prompt_id, "split": split,
                   "candidate_index": k, "prompt": prompt_text(spec), "image": png_bytes(cand.image),
                   "scene_json": cand.scene.to_json(), "defects_json": cand.defects.to_json(),
                   "deviations": list(cand.deviations), "render_seed": cand.render_seed}
            for d in DIMENSIONS:
                row |= {f"true_{d}": cand.true[d], f"label_{d}": label[d], f"human_{d}": human[d],
                        f"annotators_{d}": ratings[d]}
            rows.append(row)
            ids.append(row["candidate_id"])
            labels.append(label)
            tick()
        for pair in make_pairs(prompt_id, ids, labels):
            pairs.append({"pair_id": f"{split}-pair{len(pairs):05d}", "split": split, "prompt_id": pair.prompt_id,
                          "dimension": pair.dimension, "winner_id": pair.winner_id, "loser_id": pair.loser_id,
                          "winner_label": pair.winner_label, "loser_label": pair.loser_label, "gap": pair.gap})
    return rows, pairs


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> Path:
    """`out_dir/manifest.json` (sorted keys, indented), written atomically (a temporary name, then a rename)."""
    return write_text_atomic(Path(out_dir) / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def build_world(cfg: WorldConfig, out_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Generate and write the whole world (module docstring); returns the manifest."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    held = heldout_combos(cfg.seed)
    seen = tuple(c for c in ALL_COMBOS if c not in held)
    prompts = split_prompts(cfg.seed, cfg.num_train_prompts, cfg.num_test_prompts, cfg.num_heldout_prompts,
                            cfg.max_objects, cfg.relation_prob)
    total = (sum(len(p) for p in prompts.values()) * cfg.candidates_per_prompt + cfg.num_caption_images
             + cfg.num_caption_test_images + cfg.num_generator_images + cfg.num_generator_test_prompts)
    tables: dict[tuple[str, str], list[dict[str, Any]]] = {}
    with tqdm(total=total, desc="shapes world", unit="img", disable=not progress) as bar:
        tick = lambda: bar.update(1)  # noqa: E731
        for split, specs in prompts.items():
            combos = ALL_COMBOS if split == "heldout" else seen
            tables[("candidates", split)], tables[("pairs", split)] = _candidate_rows(cfg, split, specs, combos, tick)
        tables[("captions", "train")] = caption_rows(cfg, "train", cfg.num_caption_images, seen, tick)
        tables[("captions", "test")] = caption_rows(cfg, "test", cfg.num_caption_test_images, seen, tick)
        for split, rows in generator_rows(cfg, seen, tick).items():
            tables[("generator", split)] = rows
    files = {}
    for (kind, split), rows in tables.items():
        path = out / f"{kind}_{split}.parquet"
        num_rows = write_table(rows, kind, path)
        files[path.name] = {"table": kind, "split": split, "rows": num_rows, "sha256": sha256_file(path)}
    manifest = {
        "generator_version": GENERATOR_VERSION,
        "seed": cfg.seed,
        "world_config": dataclasses.asdict(cfg),
        "heldout_combos": [list(c) for c in held],
        "counts": {name: info["rows"] for name, info in files.items()},
        "files": files,
    }
    write_manifest(out, manifest)
    return manifest


def verify_world(out_dir: str | Path) -> dict[str, Any]:
    """Load manifest.json and check every listed file's sha256; raises DataError naming a mismatch. Works on any
    folder whose manifest lists `files: {name: {"sha256": ...}}`: the world's, or an import's (`zray.data.foreign`)."""
    out = Path(out_dir)
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"file {str(out / MANIFEST)!r}, row n/a, column n/a: unreadable manifest ({err})") from err
    for name, info in manifest["files"].items():
        path = out / name
        digest = sha256_file(path) if path.exists() else "missing"
        if digest != info["sha256"]:
            raise DataError(f"file {str(path)!r}, row n/a, column n/a: sha256 {digest} does not match the "
                            f"manifest's {info['sha256']}")
    return manifest


def ensure_world(cfg: WorldConfig, data_dir: str | Path) -> Path:
    """`data_dir` holding the world of `cfg`: built (atomically) when missing, checked when present.

    A folder built from another WorldConfig raises ValueError (nothing is overwritten)."""
    import shutil

    data_dir = Path(data_dir)
    manifest = data_dir / MANIFEST
    if not manifest.exists():
        scratch = data_dir.with_name(f"{data_dir.name}.building-{os.getpid()}")
        print(f"[zray] building the Shapes world -> {data_dir}")
        build_world(cfg, scratch, progress=True)
        try:
            scratch.rename(data_dir)
        except OSError:  # another job finished the same world first
            shutil.rmtree(scratch, ignore_errors=True)
    built = json.loads(manifest.read_text())["world_config"]
    if built != json.loads(json.dumps(dataclasses.asdict(cfg))):
        raise ValueError(f"{data_dir} holds a world built from another WorldConfig ({built}); remove it or choose "
                         "another out_dir")
    return data_dir
