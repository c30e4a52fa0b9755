"""`import_data`: foreign data (JSONL, CSV, a folder of images with a sidecar file, Parquet) -> the stored formats
of `zray.data.foreign`, with a manifest like the Shapes world's and a report of the bad rows.

    report = import_data("ratings.jsonl", "data/mine", kind="rated", rubric=load_rubric("rubric.yaml"),
                         mapping=parse_mapping(["text=prompt,file=image"]), on_bad_row="skip")

Formats (`fmt`, "auto" picks by the suffix, a folder is "folder"):
- jsonl: one JSON object a line (blank lines are skipped; the row is the line number);
- csv: a header, then one record a row; every cell is text (a score spells a decimal number, annotator scores
  are separated by ';'); an empty cell is a missing value;
- folder: a folder of images and one sidecar file, `metadata.jsonl` or `metadata.csv` (else the only .jsonl or
  .csv file at its top); image paths are relative to the folder;
- parquet: columns of any names (mapped), images as binary (bytes) or string (paths relative to the file).

The mapping renames source columns to the fields of the kind (`zray.data.foreign.source_fields`); columns that
are neither mapped nor fields are ignored and listed in the manifest. Output (into `out_dir`, which must not exist
or be empty; written in a sibling scratch folder and renamed, so an interrupted import leaves nothing half written):
the kind's table (rated imports: rated_images.parquet and the derived pairs.parquet), bad_rows.jsonl (one
`RowError` a line) and manifest.json (kind, source and its sha256, mapping, rubric, row counts, bad-row count,
ignored columns, and per file its table, rows and sha256; `zray.data.verify_world` checks it).

`on_bad_row="reject"`: any bad row raises `ImportRejected` (with every bad row) and nothing is written;
"skip": bad rows are dropped, counted and reported. A problem of the whole file (unreadable, a column missing from
a CSV or Parquet header, no row left) raises `ImportRejected` in both modes.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from zray.data.build import MANIFEST, sha256_file, verify_world, write_manifest
from zray.data.foreign import (KINDS, TABLES, Context, RowError, RowProblem, TableRows, convert_row, derive_pairs,
                               schema_for, source_fields)
from zray.data.parquet import DataError, read_table, unreadable_place, write_table
from zray.rubric import BUILTIN_RUBRIC, Rubric, parse_rubric

IMPORT_VERSION = "zray-import-1"
FORMATS = ("auto", "jsonl", "csv", "folder", "parquet")
ON_BAD_ROW = ("reject", "skip")
BAD_ROWS = "bad_rows.jsonl"
_SUFFIX = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class ImportRejected(DataError):
    """The import wrote nothing; `errors` lists every bad row (or the file's problem)."""

    def __init__(self, errors: Sequence[RowError], reason: str) -> None:
        self.errors = list(errors)
        super().__init__(f"{reason}; first: {self.errors[0]}" if self.errors else reason)


@dataclass(frozen=True)
class ImportReport:
    out_dir: Path
    manifest: dict[str, Any]
    errors: list[RowError]


def parse_mapping(items: Sequence[str]) -> dict[str, str]:
    """'src=dst' items (each may be a comma list) -> {src: dst}; ValueError naming a malformed item, a source
    mapped twice or two sources mapped onto one field."""
    out: dict[str, str] = {}
    for item in items:
        for part in item.split(","):
            src, eq, dst = (s.strip() for s in part.partition("="))
            if not eq or not src or not dst:
                raise ValueError(f"--map {part!r} is not allowed: expected SRC=DST (a source column = a field)")
            if src in out:
                raise ValueError(f"--map {part!r}: column {src!r} is already mapped to {out[src]!r}")
            if dst in out.values():
                raise ValueError(f"--map {part!r}: field {dst!r} already has a source column")
            out[src] = dst
    return out


def detect_format(source: Path, fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r} is not allowed: expected one of {FORMATS}")
    if not source.exists():
        raise FileNotFoundError(f"source {str(source)!r} does not exist")
    if fmt == "auto":
        if source.is_dir():
            return "folder"
        if source.suffix.lower() not in _SUFFIX:
            raise ValueError(f"source {str(source)!r}: format auto does not know the suffix {source.suffix!r}: "
                             f"expected one of {tuple(_SUFFIX)} or a folder, or give --format")
        return _SUFFIX[source.suffix.lower()]
    if (fmt == "folder") != source.is_dir():
        raise ValueError(f"source {str(source)!r} with format {fmt!r} is not allowed: the folder format takes a "
                         "folder, the others a file")
    return fmt


def find_sidecar(folder: Path) -> Path:
    """metadata.jsonl or metadata.csv in `folder`, else its only .jsonl / .csv file; ValueError otherwise."""
    for name in ("metadata.jsonl", "metadata.csv"):
        if (folder / name).is_file():
            return folder / name
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in (".jsonl", ".csv"))
    if len(found) != 1:
        raise ValueError(f"folder {str(folder)!r}: {len(found)} sidecar files ({[p.name for p in found]}) are not "
                         "allowed: expected metadata.jsonl, metadata.csv, or exactly one .jsonl or .csv file")
    return found[0]


# ---- readers: (row, record or error) --------------------------------------------------------------------

Record = tuple[int, dict[str, Any] | RowProblem]


def read_jsonl(path: Path) -> Iterator[Record]:
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                yield line_no, RowProblem(None, f"not a JSON line ({err})")
                continue
            yield line_no, value if isinstance(value, dict) else RowProblem(
                None, f"wrong type: the line holds a JSON {type(value).__name__}, expected an object")


def csv_header(path: Path) -> list[str]:
    with path.open(encoding="utf-8", newline="") as f:
        return next(csv.reader(f), [])


def read_csv(path: Path) -> Iterator[Record]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        for row, record in enumerate(reader, start=1):
            if None in record:
                yield row, RowProblem(None, f"{len(reader.fieldnames) + len(record[None])} cells, the header has "
                                            f"{len(reader.fieldnames)}")
                continue
            yield row, record


def read_parquet(path: Path) -> Iterator[Record]:
    """The file's rows; data that does not decode raises `ImportRejected` naming the file and, where the footer
    reads, the first row of the row group and the column that fail (a row group is the finest place it gives)."""
    row = 0
    try:
        for batch in pq.ParquetFile(str(path)).iter_batches(batch_size=256):
            for record in batch.to_pylist():
                row += 1
                yield row, record
    except (OSError, pa.ArrowException) as err:
        place = unreadable_place(path)
        if place is None:
            error = RowError(str(path), None, None, f"not a readable parquet file after row {row} ({err})")
        else:
            group, first, last, column = place
            error = RowError(str(path), first + 1, column, f"Parquet data does not read: rows {first + 1}-{last + 1} "
                                                           f"(row group {group}) ({err})")
        raise ImportRejected([error], "the source does not read") from err


# ---- one import --------------------------------------------------------------------------------------------


def _prepare(record: dict[str, Any], mapping: dict[str, str], required: tuple[str, ...], optional: tuple[str, ...],
             text: bool) -> dict[str, Any]:
    """Source record -> target-named record: mapped, nulls and CSV empty cells of optional fields dropped, a
    required field missing / null / empty raises RowProblem."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        target = mapping.get(key, key)
        other = next((src for src, dst in mapping.items() if dst == key), None)
        if key not in mapping and other in record:
            raise RowProblem(None, f"columns {other!r} (mapped to {key!r}) and {key!r} are both present: expected "
                                   "one source for a field")
        out[target] = value
    for name in required:
        if name not in out:
            raise RowProblem(name, "missing column")
        if out[name] is None:
            raise RowProblem(name, "missing value (null)")
        if text and out[name] == "":
            raise RowProblem(name, "empty cell")
    for name in optional:
        if name in out and (out[name] is None or (text and out[name] == "")):
            del out[name]
    return out


def _row_error(file: Path, row: int | None, problem: RowProblem, mapping: dict[str, str]) -> RowError:
    """The error of a target field's problem, naming the source column (and the field when they differ)."""
    reverse = {dst: src for src, dst in mapping.items()}
    column = reverse.get(problem.column, problem.column) if problem.column is not None else None
    return RowError(str(file), row, column, problem.why, problem.column if column != problem.column else None)


def _open(source: Path, fmt: str) -> tuple[Path, Iterator[Record], list[str] | None]:
    """(the file rows come from, its records, its header or None for JSONL)."""
    file = find_sidecar(source) if fmt == "folder" else source
    kind = {".jsonl": "jsonl", ".csv": "csv"}.get(file.suffix.lower(), "jsonl") if fmt == "folder" else fmt
    try:
        if kind == "jsonl":
            return file, read_jsonl(file), None
        if kind == "csv":
            return file, read_csv(file), csv_header(file)
        return file, read_parquet(file), pq.read_schema(str(file)).names
    except (OSError, UnicodeDecodeError, pa.ArrowException) as err:
        raise ImportRejected([RowError(str(file), None, None, f"not a readable {kind} file ({err})")],
                             "the source does not read") from err


def import_data(source: str | Path, out_dir: str | Path, *, kind: str, rubric: Rubric = BUILTIN_RUBRIC,
                fmt: str = "auto", mapping: dict[str, str] | None = None, on_bad_row: str = "reject") -> ImportReport:
    """Import `source` into `out_dir` (module docstring); returns the report (manifest, bad rows)."""
    source, out_dir, mapping = Path(source), Path(out_dir), dict(mapping or {})
    if on_bad_row not in ON_BAD_ROW:
        raise ValueError(f"on_bad_row={on_bad_row!r} is not allowed: expected one of {ON_BAD_ROW}")
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not allowed: expected one of {KINDS}")
    required, optional = source_fields(kind, rubric)
    unknown = sorted(set(mapping.values()) - set(required + optional))
    if unknown:
        raise ValueError(f"--map onto {unknown} is not allowed: the fields of a {kind!r} import are "
                         f"{required + optional}")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"out_dir {str(out_dir)!r} exists and is not an empty folder: choose another or "
                              "remove it")
    fmt = detect_format(source, fmt)
    file, records, header = _open(source, fmt)
    if header is not None:
        missing = [n for n in required if n not in [mapping.get(h, h) for h in header]]
        if missing:
            errors = [_row_error(file, None, RowProblem(n, f"missing column (a {kind!r} import needs {required})"),
                                 mapping) for n in missing]
            raise ImportRejected(errors, "the source lacks required columns")
    ctx = Context(base_dir=file.parent, text=file.suffix.lower() == ".csv")
    table, errors, ignored, rows_read = TableRows(kind), [], set(), 0
    try:
        for row, record in records:
            rows_read += 1
            try:
                if isinstance(record, RowProblem):
                    raise record
                ignored |= {k for k in record if k not in mapping and k not in required + optional}
                prepared = _prepare(record, mapping, required, optional, ctx.text)
                table.add(row, convert_row(kind, prepared, row, rubric, ctx))
            except RowProblem as problem:
                errors.append(_row_error(file, row, problem, mapping))
    except (OSError, UnicodeDecodeError, csv.Error, pa.ArrowException) as err:
        raise ImportRejected([RowError(str(file), None, None, f"not a readable {fmt} file ({err})")],
                             "the source does not read") from err
    if errors and on_bad_row == "reject":
        raise ImportRejected(errors, f"{len(errors)} bad rows of {rows_read} (on_bad_row='reject': nothing written)")
    if not table.rows:
        raise ImportRejected(errors or [RowError(str(file), None, None, "no rows")], "no row to import")
    tables = {kind: table.rows}
    if kind == "rated":
        tables["pairs"] = derive_pairs(table.rows, rubric)
    extra: dict[str, Any] = {}
    if fmt == "folder":
        on_disk = {p.resolve() for p in source.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES}
        extra["unreferenced_images"] = len(on_disk - ctx.images_read)
    manifest = {
        "import_version": IMPORT_VERSION, "kind": kind, "on_bad_row": on_bad_row,
        "source": {"path": str(source.resolve()), "format": fmt, "file": str(file.resolve()),
                   "sha256": sha256_file(file), "mapping": mapping},
        "rubric": {"source": rubric.source, "dimensions": rubric.to_dict(), "order": list(rubric.dimensions)},
        "rows_read": rows_read, "rows_imported": len(table.rows), "bad_rows": len(errors),
        "ignored_columns": sorted(ignored), **extra,
    }
    _write(out_dir, tables, errors, rubric, manifest)
    return ImportReport(out_dir, manifest, errors)


def _write(out_dir: Path, tables: dict[str, list[dict[str, Any]]], errors: list[RowError], rubric: Rubric,
           manifest: dict[str, Any]) -> None:
    """Every file into a sibling scratch folder, then one rename onto `out_dir` (absent or empty)."""
    scratch = out_dir.with_name(f".{out_dir.name}.importing-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        files = {}
        for kind, rows in tables.items():
            name = f"{TABLES[kind]}.parquet"
            num = write_table(rows, schema_for(kind, rubric), scratch / name)
            files[name] = {"table": TABLES[kind], "rows": num, "sha256": sha256_file(scratch / name)}
        (scratch / BAD_ROWS).write_text("".join(json.dumps(e.to_dict()) + "\n" for e in errors))
        files[BAD_ROWS] = {"table": "bad_rows", "rows": len(errors), "sha256": sha256_file(scratch / BAD_ROWS)}
        manifest |= {"counts": {name: info["rows"] for name, info in files.items()}, "files": files}
        write_manifest(scratch, manifest)
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked before the import)
        scratch.rename(out_dir)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def read_imported(out_dir: str | Path, table: str) -> pa.Table:
    """A table of an import folder ('rated_images', 'pairs', 'scoring_inputs' or 'prompts'), after checking every
    file's sha256 against the manifest, read and validated with the schema of the manifest's kind and rubric."""
    out_dir = Path(out_dir)
    manifest = verify_world(out_dir)
    if f"{table}.parquet" not in manifest["files"]:
        raise DataError(f"file {str(out_dir / MANIFEST)!r}, row n/a, column n/a: table {table!r} is not in this "
                        f"import (it holds {sorted(manifest['files'])})")
    rubric = manifest_rubric(manifest)
    kind = {name: k for k, name in TABLES.items()}[table]
    return read_table(out_dir / f"{table}.parquet", schema_for(kind, rubric))


def manifest_rubric(manifest: dict[str, Any]) -> Rubric:
    """The rubric an import's manifest records, in its order (`rubric.order`: the manifest's keys are sorted)."""
    info = manifest["rubric"]
    dims = info["dimensions"]
    order = info.get("order") or list(dims)  # imports of the first slice: sorted order
    if sorted(order) != sorted(dims):
        raise DataError(f"file 'manifest.json', row n/a, column rubric: order {order} does not name the rubric's "
                        f"dimensions {sorted(dims)}")
    return parse_rubric({"dimensions": {d: dims[d] for d in order}}, info["source"])
