"""`zray data`: build the Shapes world for a recipe as Parquet files plus a manifest."""

from __future__ import annotations

import time
from pathlib import Path

from zray.config import RunConfig
from zray.data import build_world


def run_build_data(cfg: RunConfig, out: str | None = None) -> dict:
    out_dir = Path(out) if out else Path(cfg.out_dir) / "data"
    start = time.perf_counter()
    manifest = build_world(cfg.world, out_dir, progress=True)
    elapsed = time.perf_counter() - start
    print(f"Shapes world ({cfg.name}, seed {cfg.world.seed}) written to {out_dir} in {elapsed:.1f} s")
    for name, entry in sorted(manifest["files"].items()):
        print(f"  {name:32s} {entry['rows']:6d} rows")
    return manifest
