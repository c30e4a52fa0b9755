"""The references of a Turbo++ run (the teacher sampled with 8 steps and naively with 2, judged), kept between runs.

Sampling and judging the references takes minutes at dev scale and gives the same images and figures every time
the inputs are the same, so `zray distill-generator` keeps them: `references.json` (the judged figures and the
key below) and `references.parquet` (the images as PNG, lossless, one row per held-out prompt: `prompt`,
`teacher`, `two_step`). A later run reuses them when its key is the same and both files read; otherwise it
samples and judges again and replaces them.

The key (`reference_key`) is a SHA-256 over what the references depend on: the teacher pipeline's files (relative
name, size and modification time of each, as `make` judges staleness: a retrained or replaced teacher changes
it), the held-out prompts in order, the noise seed, the teacher's steps and shift, the image size, whether the
judge scores them, and the code that samples and judges them (the source of `CODE_MODULES` and the installed
torch and diffusers versions): a changed judge or sampler never leaves old figures beside new ones.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REFERENCES_JSON = "references.json"
REFERENCES_IMAGES = "references.parquet"
KEYS = ("teacher", "two_step")
# what samples and judges the references
CODE_MODULES = ("zray.sampling", "zray.models.generator", "zray.data.judge", "zray.data.prompt_grammar",
                "zray.evaluation.generator", "zray.evaluation.turbo", "zray.metrics")


def code_fingerprint() -> dict[str, str]:
    """SHA-256 of each of `CODE_MODULES`' source file, and the torch and diffusers versions installed."""
    import importlib.metadata
    import importlib.util

    out = {name: hashlib.sha256(Path(importlib.util.find_spec(name).origin).read_bytes()).hexdigest()
           for name in CODE_MODULES}
    return {**out, **{pkg: importlib.metadata.version(pkg) for pkg in ("torch", "diffusers")}}


def reference_key(teacher_dir: str | Path, prompts: Sequence[str], *, seed: int, steps: int, shift: float,
                  image_size: int, judged: bool) -> str:
    """SHA-256 (hex) of the references' inputs (module docstring)."""
    teacher_dir = Path(teacher_dir)
    files = [[str(p.relative_to(teacher_dir)), st.st_size, st.st_mtime_ns]
             for p in sorted(teacher_dir.rglob("*")) if p.is_file() for st in [p.stat()]]
    payload = {"teacher": files, "prompts": list(prompts), "seed": seed, "steps": steps, "shift": shift,
               "image_size": image_size, "judged": judged, "code": code_fingerprint()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def save_references(root: str | Path, key: str, references: dict[str, Any], images: dict[str, Sequence[Any]],
                    prompts: Sequence[str]) -> None:
    """Write the images (`references.parquet`) and then the figures with `key` (`references.json`), each atomically:
    the JSON, which carries the key, is written last, so a cut write never leaves a key beside other images."""
    import pyarrow as pa

    from zray.data.parquet import write_table
    from zray.data.render import png_bytes
    from zray.training.runs import write_text_atomic

    root = Path(root)
    (root / REFERENCES_JSON).unlink(missing_ok=True)  # the old key goes before the images it described
    schema = pa.schema([pa.field("prompt", pa.string(), nullable=False),
                        *(pa.field(k, pa.binary(), nullable=False) for k in KEYS)],
                       metadata={"zray_table": "turbo_references"})
    pngs = {k: [png_bytes(im) for im in images[k]] for k in KEYS}
    write_table([{"prompt": p, **{k: pngs[k][i] for k in KEYS}} for i, p in enumerate(prompts)], schema,
                root / REFERENCES_IMAGES)
    write_text_atomic(root / REFERENCES_JSON, json.dumps({"key": key, **references}, indent=1))


def load_references(root: str | Path, key: str,
                    prompts: Sequence[str]) -> tuple[dict[str, Any], dict[str, list[Any]]] | None:
    """(figures, images) kept by `save_references` under `key` for exactly these prompts, or None when there are
    none, the key differs (inputs changed, or a file from before keys) or either file does not read."""
    import pyarrow.parquet as pq

    from zray.data.render import decode_png

    root = Path(root)
    try:
        record = json.loads((root / REFERENCES_JSON).read_text())
        if not isinstance(record, dict) or record.pop("key", None) != key or set(KEYS) - set(record):
            return None
        table = pq.read_table(str(root / REFERENCES_IMAGES), columns=["prompt", *KEYS])
        if table.column("prompt").to_pylist() != list(prompts):
            return None
        images = {k: [decode_png(b) for b in table.column(k).to_pylist()] for k in KEYS}
    except (OSError, ValueError, KeyError):  # missing, truncated or corrupt: sampled and judged again
        return None
    return record, images
