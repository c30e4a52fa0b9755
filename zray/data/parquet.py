"""Parquet storage of the Shapes world: one explicit pyarrow schema per table kind, a writer, a validating
reader (pyarrow, for tests and small jobs) and a Ray Data reader (distributed jobs).

Table kinds and their columns (all non-nullable):
- candidates: candidate_id, prompt_id, split, candidate_index, prompt, image (PNG bytes), scene_json (the
  scene as drawn, `Scene.to_json`), defects_json (realised severities), deviations, render_seed, and per
  dimension d: true_d (true score), label_d (bin value), human_d (aggregated human score before snapping;
  train: the single calibrated rating), annotators_d (the raw half-point ratings; train: one).
- pairs: pair_id, split, prompt_id, dimension, winner_id, loser_id, winner_label, loser_label, gap.
- captions: image_id, split, image, scene_json, defects_json, description (`captions.describe`).
- generator: image_id, split, prompt, image (clean render), scene_json.

`read_table` raises `DataError` (a ValueError) whose message names the file, the row and the column for a
file that is not Parquet (a truncated one: the file only, its footer is gone), Parquet data that does not decode
(the rows of the row group and the column: `read_parquet_file`), a missing column, a column of the wrong type,
a null, an undecodable PNG, a scene / defects JSON that does not parse, a score outside [1, 5], a label off the
bins, or a description that does not parse.

`write_table`, `read_table` and `check_schema` also take a `pa.Schema` in place of a kind name: the imported
tables of `zray.data.foreign`, whose columns depend on the rubric. Such a schema names its table in the metadata
key `zray_table` and may list the allowed values of its `dimension` column in `zray_dimensions` (a JSON list);
its nullable fields may hold nulls (every world field is non-nullable). Writes are atomic (a temporary name,
then a rename), so an interrupted write never leaves a half-written table.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from zray.data.captions import parse_description
from zray.data.render import decode_png
from zray.data.scene import Defects, Scene
from zray.rubric import DIMENSIONS, SCORE_BINS, check_prompt
from zray.training.runs import atomic_path

if TYPE_CHECKING:
    import ray.data

SPLITS: dict[str, tuple[str, ...]] = {
    "candidates": ("train", "test", "heldout"),
    "pairs": ("train", "test", "heldout"),
    "captions": ("train", "test"),
    "generator": ("train", "test"),
}


class DataError(ValueError):
    """Malformed stored data; the message names the file, the row and the column."""


def _fields(*items: tuple[str, pa.DataType]) -> list[pa.Field]:
    return [pa.field(name, dtype, nullable=False) for name, dtype in items]


def _per_dimension() -> list[pa.Field]:
    out = []
    for d in DIMENSIONS:
        out += _fields((f"true_{d}", pa.float64()), (f"label_{d}", pa.float64()), (f"human_{d}", pa.float64()),
                       (f"annotators_{d}", pa.list_(pa.field("item", pa.float64(), nullable=False))))
    return out


SCHEMAS: dict[str, pa.Schema] = {
    "candidates": pa.schema(_fields(
        ("candidate_id", pa.string()), ("prompt_id", pa.string()), ("split", pa.string()),
        ("candidate_index", pa.int32()), ("prompt", pa.string()), ("image", pa.binary()),
        ("scene_json", pa.string()), ("defects_json", pa.string()),
        ("deviations", pa.list_(pa.field("item", pa.string(), nullable=False))), ("render_seed", pa.int64()),
    ) + _per_dimension()),
    "pairs": pa.schema(_fields(
        ("pair_id", pa.string()), ("split", pa.string()), ("prompt_id", pa.string()), ("dimension", pa.string()),
        ("winner_id", pa.string()), ("loser_id", pa.string()), ("winner_label", pa.float64()),
        ("loser_label", pa.float64()), ("gap", pa.float64()),
    )),
    "captions": pa.schema(_fields(
        ("image_id", pa.string()), ("split", pa.string()), ("image", pa.binary()), ("scene_json", pa.string()),
        ("defects_json", pa.string()), ("description", pa.string()),
    )),
    "generator": pa.schema(_fields(
        ("image_id", pa.string()), ("split", pa.string()), ("prompt", pa.string()), ("image", pa.binary()),
        ("scene_json", pa.string()),
    )),
}


def _kind(table_kind: str | pa.Schema) -> pa.Schema:
    if isinstance(table_kind, pa.Schema):
        return table_kind
    if table_kind not in SCHEMAS:
        raise ValueError(f"table_kind={table_kind!r} is not allowed: expected one of {tuple(SCHEMAS)}")
    return SCHEMAS[table_kind]


def _name(table_kind: str | pa.Schema) -> str:
    """The table's name: the kind, or a schema's `zray_table` metadata."""
    if isinstance(table_kind, str):
        return table_kind
    return (table_kind.metadata or {}).get(b"zray_table", b"unnamed").decode()


def write_table(rows: Sequence[dict[str, Any]], table_kind: str | pa.Schema, path: str | Path) -> int:
    """Write rows (dicts keyed by column) with the kind's schema, atomically; returns the row count."""
    table = pa.Table.from_pylist(list(rows), schema=_kind(table_kind))
    with atomic_path(path) as tmp:
        pq.write_table(table, str(tmp), compression="zstd", compression_level=3)
    return table.num_rows


def _error(path: str | Path, row: int | str, column: str | None, problem: str) -> DataError:
    return DataError(f"file {str(path)!r}, row {row}, column {column or 'n/a'}: {problem}")


# ---- per-value checks: raise ValueError with the problem -----------------------------------------------


def _check_image(value: bytes) -> None:
    decode_png(value)


def _check_score(value: float) -> None:
    if not 1.0 <= value <= 5.0:
        raise ValueError(f"score {value} outside [1, 5]")


def _check_bin(value: float) -> None:
    if value not in SCORE_BINS:
        raise ValueError(f"label {value} is not one of the bins {SCORE_BINS}")


def _check_bins(values: list[float]) -> None:
    if not values:
        raise ValueError("no ratings")
    for v in values:
        _check_bin(v)


def _checks(table_kind: str | pa.Schema) -> dict[str, Callable[[Any], None]]:
    checks: dict[str, Callable[[Any], None]] = {}
    schema = _kind(table_kind)
    for name in schema.names:
        if name == "image" or name.endswith("_image"):
            checks[name] = _check_image
        elif name == "prompt":
            checks[name] = check_prompt
        elif name == "scene_json":
            checks[name] = Scene.from_json
        elif name == "defects_json":
            checks[name] = Defects.from_json
        elif name == "description":
            checks[name] = parse_description
        elif name.startswith(("true_", "human_")):
            checks[name] = _check_score
        elif name.startswith("label_") or name in ("winner_label", "loser_label"):
            checks[name] = _check_bin
        elif name.startswith("annotators_"):
            checks[name] = _check_bins
    dims = (schema.metadata or {}).get(b"zray_dimensions")
    if dims is not None and "dimension" in schema.names:
        allowed_dims = tuple(json.loads(dims))

        def check_dimension(value: str) -> None:
            if value not in allowed_dims:
                raise ValueError(f"dimension {value!r} is not one of {allowed_dims}")

        checks["dimension"] = check_dimension
    if isinstance(table_kind, str) and table_kind in SPLITS:
        allowed = SPLITS[table_kind]

        def check_split(value: str) -> None:
            if value not in allowed:
                raise ValueError(f"split {value!r} is not one of {allowed}")

        checks["split"] = check_split
    return checks


def check_schema(schema: pa.Schema, table_kind: str | pa.Schema, path: str | Path) -> None:
    """Every column of the kind is present with the right type (extra columns are allowed)."""
    expected = _kind(table_kind)
    for field in expected:
        index = schema.get_field_index(field.name)
        if index < 0:
            raise _error(path, "all", field.name, f"missing column (expected type {field.type}) for a "
                                                  f"{_name(table_kind)!r} table")
        got = schema.field(index).type
        if not got.equals(field.type):
            raise _error(path, "all", field.name, f"type {got} does not match the expected {field.type}")


def unreadable_place(path: str | Path, columns: Sequence[str] | None = None) -> tuple[int, int, int, str] | None:
    """Where the data of a Parquet file that does not read fails first, read column chunk by column chunk:
    (row group, its first row, its last row, the column), 0-based rows; None when the footer itself does not
    read (a truncated file: it has no row to name) or every chunk reads alone. A row group is the finest place
    the format gives: a column chunk's pages are compressed and decoded together."""
    try:
        source = pq.ParquetFile(str(path))
        names = list(columns) if columns is not None else source.schema_arrow.names
        first = 0
        for group in range(source.num_row_groups):
            num_rows = source.metadata.row_group(group).num_rows
            for name in names:
                try:
                    source.read_row_group(group, columns=[name])
                except (OSError, pa.ArrowException):
                    return group, first, first + num_rows - 1, name
            first += num_rows
    except (OSError, pa.ArrowException):
        return None
    return None


def read_parquet_file(path: str | Path, columns: Sequence[str] | None = None) -> pa.Table:
    """A Parquet file (its `columns`, default all) as stored, any schema; one that does not read raises
    `DataError` naming the file and, where the footer reads, the rows of the row group and the column that fail
    (`unreadable_place`); a truncated file (no footer) names the file only: 'row n/a, column n/a: not a
    readable Parquet file (Parquet magic bytes not found in footer ...)'."""
    try:
        return pq.read_table(str(path), columns=None if columns is None else list(columns))
    except (OSError, pa.ArrowException) as err:
        place = unreadable_place(path, columns)
        if place is None and not _footer_reads(path):
            raise _error(path, "n/a", None, f"not a readable Parquet file ({err})") from err
        if place is None:
            raise _error(path, "n/a", None, f"Parquet data does not read ({err})") from err
        group, first, last, column = place
        raise _error(path, f"{first}-{last} (row group {group})", column,
                     f"Parquet data does not read ({err})") from err


def _footer_reads(path: str | Path) -> bool:
    try:
        pq.read_metadata(str(path))
    except (OSError, pa.ArrowException):
        return False
    return True


def _file_schema(path: str | Path) -> pa.Schema:
    try:
        return pq.read_schema(str(path))
    except (OSError, pa.ArrowException) as err:
        raise _error(path, "n/a", None, f"not a readable Parquet file ({err})") from err


def read_table(path: str | Path, table_kind: str | pa.Schema) -> pa.Table:
    """Read and validate a table file; returns the table with exactly the kind's columns."""
    expected = _kind(table_kind)
    check_schema(_file_schema(path), table_kind, path)
    table = read_parquet_file(path, expected.names)
    checks = _checks(table_kind)
    for name in expected.names:
        column = table.column(name)
        if column.null_count and not expected.field(name).nullable:
            row = next(i for i, v in enumerate(column.is_null().to_pylist()) if v)
            raise _error(path, row, name, "null value")
        check = checks.get(name)
        if check is None:
            continue
        for row, value in enumerate(column.to_pylist()):
            if value is None:  # a nullable field
                continue
            try:
                check(value)
            except ValueError as err:  # json.JSONDecodeError is a ValueError
                raise _error(path, row, name, str(err)) from err
    return table.cast(expected)


def head_rows(path: str | Path, table_kind: str, num: int, field: str) -> list[dict[str, Any]]:
    """The first `num` rows of a table (read and validated), as dicts; `field` names the setting that asked for
    `num`, so that too large a number is a `ConfigError` naming it and what the table holds."""
    from zray.config import ConfigError

    rows = read_table(path, table_kind).to_pylist()
    if not 0 < num <= len(rows):
        raise ConfigError(f"{field}={num} is not allowed: {Path(path).name} has {len(rows)} rows; expected 1 to "
                          f"{len(rows)}")
    return rows[:num]


# Up to this many bytes of Parquet, a dataset is read here and handed to Ray Data from memory: read tasks cost a few
# seconds of scheduling and start-up per dataset (measured: 3-5 s against 0.1 s for a 64-row table), more than a
# small table takes to read.
IN_DRIVER_MAX_BYTES = 256 * 2**20


def read_ray_dataset(path: str | Path, table_kind: str | None = None) -> ray.data.Dataset:
    """A Ray Data dataset over a table file (or a folder of them); with `table_kind`, the file schema is
    checked first (rows are validated by the consumer, not here: that would read everything). Up to
    `IN_DRIVER_MAX_BYTES` in all, the files are read in this process (`ray.data.from_arrow`), above that by Ray
    Data's read tasks (`ray.data.read_parquet`, streamed)."""
    import ray.data  # lazy: `import zray.data` stays free of ray

    files = sorted(Path(path).glob("*.parquet")) if Path(path).is_dir() else [Path(path)]
    if table_kind is not None:
        for file in files:
            check_schema(_file_schema(file), table_kind, file)
    if files and all(f.is_file() for f in files) and sum(f.stat().st_size for f in files) <= IN_DRIVER_MAX_BYTES:
        return ray.data.from_arrow([pq.read_table(str(f)) for f in files])
    return ray.data.read_parquet(str(path))
