"""Precomputed samples of the 8-step teacher generator, the real data of Turbo++ (methods.md §6), in Parquet.

One row per (prompt, noise): the noise is `noise_from_seed(noise_seed, shape)` (a CPU generator, float32), so
the student regenerates exactly the noise the teacher started from. Columns (all non-nullable but `render`):

- sample_id (string), image_id (string: the world row the prompt came from, or "prompt-<prompt_id>" for a prompt
  list: `zray.data.imported.prompt_rows`), prompt (string),
  render (binary: the world's reference render of that prompt, PNG; null for a prompt list, which has none),
  noise_seed (int64),
- latent_shape (list<int32>: C, H, W), teacher_mid (binary: float32 latent after `mid_steps` of the teacher's
  steps, C-order), teacher_x0 (binary: float32 final latent), teacher_image (binary: the decoded final latent, PNG).

`collect_teacher_samples` writes them chunk by chunk into a dir (`part-NNNNN.parquet`, each written whole or not
at all, plus `manifest.json` with the settings: collecting into a dir made with other settings is refused), so
an interrupted collection resumes where it stopped. `read_teacher_samples` checks every row.

Tensor legend: B rows, C latent channels, H x W latent grid.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from zray.data.parquet import DataError, read_parquet_file
from zray.training.runs import atomic_path, write_text_atomic

MANIFEST = "manifest.json"
SCHEMA = pa.schema([pa.field(name, dtype, nullable=name == "render") for name, dtype in (
    ("sample_id", pa.string()), ("image_id", pa.string()), ("prompt", pa.string()), ("render", pa.binary()),
    ("noise_seed", pa.int64()), ("latent_shape", pa.list_(pa.field("item", pa.int32(), nullable=False))),
    ("teacher_mid", pa.binary()), ("teacher_x0", pa.binary()), ("teacher_image", pa.binary()))])


def noise_from_seed(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The initial noise [C, H, W] of one sample: `torch.randn` from a CPU generator seeded with `seed`."""
    return torch.randn(tuple(shape), generator=torch.Generator(device="cpu").manual_seed(int(seed)),
                       dtype=torch.float32)


def noise_batch(seeds: Any, shape: tuple[int, ...]) -> torch.Tensor:
    """[B, C, H, W]: `noise_from_seed` of each seed."""
    return torch.stack([noise_from_seed(int(s), shape) for s in seeds])


def latent_bytes(latent_CHW: torch.Tensor) -> bytes:
    return latent_CHW.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()


def latents_from_bytes(column: Any, shape: tuple[int, ...]) -> torch.Tensor:
    """A column of `latent_bytes` values -> [B, C, H, W] float32."""
    arrays = [np.frombuffer(bytes(b), dtype=np.float32).reshape(shape) for b in column]
    return torch.from_numpy(np.stack(arrays).copy())


def _png(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@torch.no_grad()
def teacher_rows(pipe: Any, rows: list[dict[str, Any]], seeds: list[int], *, steps: int, shift: float,
                 mid_steps: int, latent_shape: tuple[int, int, int], id_prefix: str) -> list[dict[str, Any]]:
    """The teacher's samples of `rows` from the seeds' noise: world generator rows (image_id, prompt, image) or
    prompt-list rows (image_id, prompt; no image: render null)."""
    from zray.models.generator import encode_prompts, to_pil, transformer_fn, vae_decode
    from zray.sampling import flow_sigmas, sample

    noise = noise_batch(seeds, latent_shape)
    cond = encode_prompts(pipe.text_encoder, pipe.tokenizer, [r["prompt"] for r in rows])
    x0, trajectory = sample(transformer_fn(pipe.transformer), noise, flow_sigmas(steps, shift), cond,
                            return_trajectory=True)
    images = to_pil((vae_decode(pipe.vae, x0).float() * 0.5 + 0.5).clamp(0, 1))
    return [{"sample_id": f"{id_prefix}{seed}", "image_id": str(r["image_id"]), "prompt": str(r["prompt"]),
             "render": None if r.get("image") is None else bytes(r["image"]), "noise_seed": int(seed),
             "latent_shape": list(latent_shape),
             "teacher_mid": latent_bytes(trajectory[mid_steps][i]), "teacher_x0": latent_bytes(x0[i]),
             "teacher_image": _png(images[i])} for i, (r, seed) in enumerate(zip(rows, seeds, strict=True))]


def collect_teacher_samples(pipeline_dir: str | Path, rows: list[dict[str, Any]], *, out_dir: str | Path, seed: int,
                            steps: int = 8, shift: float = 3.0, mid_steps: int = 4, image_size: int = 64,
                            chunk_size: int = 64, progress: Callable[[int, int], None] | None = None) -> pa.Table:
    """Teacher samples of `rows` (one each, noise seeds `seed * 1_000_003 + i`), collected into `out_dir`.

    Returns every row (old chunks are read back, missing ones computed). Raises ValueError when `out_dir`
    holds samples collected with other settings (another teacher, prompts, seed or schedule).
    """
    from zray.models.generator import latent_shape, load_zimage

    if not rows:
        raise ValueError("rows is empty: expected at least one prompt row to sample")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} is not allowed: expected an integer >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"teacher": str(Path(pipeline_dir).resolve()), "num": len(rows), "seed": seed, "steps": steps,
                "shift": shift, "mid_steps": mid_steps, "image_size": image_size, "chunk_size": chunk_size,
                "first_image_id": str(rows[0]["image_id"]), "last_image_id": str(rows[-1]["image_id"])}
    manifest = out / MANIFEST
    if manifest.exists() and json.loads(manifest.read_text()) != json.loads(json.dumps(settings)):
        raise ValueError(f"{out} holds teacher samples collected with other settings ({manifest}): remove it or "
                         "choose another dir")
    write_text_atomic(manifest, json.dumps(settings, indent=2) + "\n")
    pipe = None
    parts = []
    for c, start in enumerate(range(0, len(rows), chunk_size)):
        path = out / f"part-{c:05d}.parquet"
        if not path.exists():
            if pipe is None:
                pipe = load_zimage(pipeline_dir)
                shape = latent_shape(pipe, 1, image_size, image_size)[1:]
            chunk = rows[start:start + chunk_size]
            seeds = [seed * 1_000_003 + start + i for i in range(len(chunk))]
            table = pa.Table.from_pylist(teacher_rows(pipe, chunk, seeds, steps=steps, shift=shift,
                                                      mid_steps=mid_steps, latent_shape=shape, id_prefix="teacher-"),
                                         schema=SCHEMA)
            with atomic_path(path) as tmp:  # a chunk exists whole or not at all
                pq.write_table(table, str(tmp))
        parts.append(read_parquet_file(path))
        if progress is not None:
            progress(min(start + chunk_size, len(rows)), len(rows))
    return pa.concat_tables(parts)


def read_teacher_samples(path: str | Path) -> pa.Table:
    """Every part of a teacher-sample dir (or one Parquet file), checked: schema, latent sizes, PNGs.

    Raises `DataError` naming the file, the row and the column of the first bad value.
    """
    path = Path(path)
    files = sorted(path.glob("part-*.parquet")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"no part-*.parquet under {str(path)!r}: collect teacher samples first")
    tables = []
    for f in files:
        table = read_parquet_file(f)  # one that does not read names the file (and row group, column)
        missing = [n for n in SCHEMA.names if n not in table.column_names]
        if missing:
            raise DataError(f"file {str(f)!r}, row n/a, column {missing[0]}: missing (expected {SCHEMA.names})")
        table = table.select(SCHEMA.names)
        for name in SCHEMA.names:
            if table.column(name).null_count and not SCHEMA.field(name).nullable:
                raise DataError(f"file {str(f)!r}, row n/a, column {name}: null values")
        shapes, mids, x0s = (table.column(n).to_pylist() for n in ("latent_shape", "teacher_mid", "teacher_x0"))
        for i, (shape, mid, x0) in enumerate(zip(shapes, mids, x0s, strict=True)):
            size = 4 * int(np.prod(shape)) if len(shape) == 3 and min(shape) > 0 else -1
            for column, value in (("teacher_mid", mid), ("teacher_x0", x0)):
                if len(value) != size:
                    raise DataError(f"file {str(f)!r}, row {i}, column {column}: {len(value)} bytes, expected "
                                    f"{size} (float32 of latent_shape {shape})")
        for column in ("render", "teacher_image"):
            for i, value in enumerate(table.column(column).to_pylist()):
                if value is not None and not value.startswith(b"\x89PNG\r\n\x1a\n"):
                    raise DataError(f"file {str(f)!r}, row {i}, column {column}: not a PNG")
        tables.append(table.cast(SCHEMA))
    return pa.concat_tables(tables)
