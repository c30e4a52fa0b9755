"""Bring-your-own data: the stored formats of imported tables, the checks of every source row, and the
same-prompt preference pairs derived from rated images (docs/data-formats.md; the readers of JSONL, CSV,
image folders and Parquet, and `import_data`, are in `importers.py`).

Four kinds of import, one stored table each (all columns non-nullable unless marked "nullable"):

- rated -> rated_images.parquet: image_id, prompt_id, prompt, image (PNG/JPEG bytes) and per rubric dimension d:
  label_d (float64, the bin of the aggregated rating), human_d (float64, the aggregated rating) and annotators_d
  (list<float64>, every rating, each on the nine half-point bins 1.0, 1.5, ..., 5.0). Aggregation as the Shapes
  world's test labels: the mean of the ratings after dropping one highest and one lowest when there are at least
  three, the plain mean otherwise; the label is that mean's bin (`zray.rubric.label_index`, halves to even).
  A rated import also writes pairs.parquet, derived from the ratings (`derive_pairs`).
- pairs -> pairs.parquet: pair_id, prompt_id, prompt, dimension, winner_id, loser_id (nullable strings: the
  image ids of derived pairs), winner_image, loser_image (bytes), winner_label, loser_label (nullable float64
  bins: null when the source gives only the winner). The rows `zray.data.pair_examples` gives GDSO, plus ids.
- scoring -> scoring_inputs.parquet: input_id, prompt_id, prompt, image, dimension (the columns of
  `zray.data.distill_inputs`: unlabelled RISD inputs).
- prompts -> prompts.parquet: prompt_id, prompt (generator distillation, reward-gradient tuning).

Source fields (after the column mapping): `SOURCE_FIELDS`. Each schema names its table in its metadata
(`zray_table`) and lists the rubric's dimensions (`zray_dimensions`), so `zray.data.parquet.read_table` checks
the values on read: images decode, scores are on the bins, dimensions are the rubric's, prompts are not empty.

A bad source value raises `RowProblem(column, why)`; the importer adds the file and the row to make a `RowError`.
Nothing is coerced: a score of 7 or 3.3 is an error, not a clip or a snap; a CSV cell (text) must spell a decimal
number, a JSON score must be a JSON number. Ids may be strings or integers (stored as text).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
from PIL import Image

from zray.data.labels import drop_extremes_mean, make_pairs
from zray.rubric import SCORE_BINS, SCORE_MAX, SCORE_MIN, Rubric, label_index

KINDS: tuple[str, ...] = ("rated", "pairs", "scoring", "prompts")
TABLES: dict[str, str] = {"rated": "rated_images", "pairs": "pairs", "scoring": "scoring_inputs",
                          "prompts": "prompts"}
IMAGE_FORMATS = ("PNG", "JPEG")
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")  # a decimal number as text (CSV cells)


def source_fields(kind: str, rubric: Rubric) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(required, optional) source field names of an import kind, after the column mapping."""
    if kind == "rated":
        reserved = {"prompt", "image", "prompt_id", "image_id"} & set(rubric.dimensions)
        if reserved:
            raise ValueError(f"rubric {rubric.source!r}: dimension names {sorted(reserved)} are not allowed in a "
                             "rated import: they are the names of other columns")
        return ("prompt", "image", *rubric.dimensions), ("prompt_id", "image_id")
    if kind == "pairs":
        return ("prompt", "image_a", "image_b", "dimension", "winner"), ("prompt_id", "pair_id", "label_a", "label_b")
    if kind == "scoring":
        return ("prompt", "image", "dimension"), ("prompt_id", "input_id")
    if kind == "prompts":
        return ("prompt",), ("prompt_id",)
    raise ValueError(f"kind={kind!r} is not allowed: expected one of {KINDS}")


def _schema(table: str, rubric: Rubric, fields: list[pa.Field]) -> pa.Schema:
    return pa.schema(fields, metadata={"zray_table": table, "zray_dimensions": json.dumps(list(rubric.dimensions))})


def _f(name: str, dtype: pa.DataType, nullable: bool = False) -> pa.Field:
    return pa.field(name, dtype, nullable=nullable)


def schema_for(kind: str, rubric: Rubric) -> pa.Schema:
    """The stored schema of an import kind's table (columns in the module docstring)."""
    source_fields(kind, rubric)  # checks the kind (and a rated rubric's names)
    if kind == "rated":
        per_dim = []
        for d in rubric.dimensions:
            per_dim += [_f(f"label_{d}", pa.float64()), _f(f"human_{d}", pa.float64()),
                        _f(f"annotators_{d}", pa.list_(pa.field("item", pa.float64(), nullable=False)))]
        return _schema("rated_images", rubric, [_f("image_id", pa.string()), _f("prompt_id", pa.string()),
                                                _f("prompt", pa.string()), _f("image", pa.binary()), *per_dim])
    if kind == "pairs":
        return _schema("pairs", rubric, [
            _f("pair_id", pa.string()), _f("prompt_id", pa.string()), _f("prompt", pa.string()),
            _f("dimension", pa.string()), _f("winner_id", pa.string(), True), _f("loser_id", pa.string(), True),
            _f("winner_image", pa.binary()), _f("loser_image", pa.binary()),
            _f("winner_label", pa.float64(), True), _f("loser_label", pa.float64(), True)])
    if kind == "scoring":
        return _schema("scoring_inputs", rubric, [_f("input_id", pa.string()), _f("prompt_id", pa.string()),
                                                  _f("prompt", pa.string()), _f("image", pa.binary()),
                                                  _f("dimension", pa.string())])
    return _schema("prompts", rubric, [_f("prompt_id", pa.string()), _f("prompt", pa.string())])


# ---- errors ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowError:
    """One bad source row: the file, the row (1-based record number: a JSONL line number, a CSV or sidecar record
    after the header, a Parquet row index + 1; None: the whole file), the source column (None: the whole row),
    why, and the field the column is mapped to (None: not mapped, the column is the field)."""

    file: str
    row: int | None
    column: str | None
    why: str
    field: str | None = None

    def __str__(self) -> str:
        row = "all" if self.row is None else self.row
        column = f"{self.column} (mapped to {self.field})" if self.field else self.column or "n/a"
        return f"file {self.file!r}, row {row}, column {column}: {self.why}"

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "row": self.row, "column": self.column, "field": self.field, "why": self.why}


class RowProblem(ValueError):
    """A bad value in a row; `column` is the target field (the importer names the source column)."""

    def __init__(self, column: str | None, why: str) -> None:
        super().__init__(why)
        self.column, self.why = column, why


# ---- values ----------------------------------------------------------------------------------------------


def _show(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def parse_score(value: Any, column: str, text: bool, what: str = "score") -> float:
    """One rating on the nine half-point bins; `text`: the source holds text (CSV), so a decimal spelling."""
    if text and isinstance(value, str):
        if not _NUMBER.match(value.strip()):
            raise RowProblem(column, f"{what} is {value!r}, not a decimal number")
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RowProblem(column, f"wrong type: {what} is {_show(value)}, expected a number")
    score = float(value)
    if not math.isfinite(score) or not SCORE_MIN <= score <= SCORE_MAX:
        raise RowProblem(column, f"{what} is {value}, outside the scale {SCORE_MIN:g} to {SCORE_MAX:g}")
    if score not in SCORE_BINS:
        raise RowProblem(column, f"{what} is {value}, not on the half-point scale {SCORE_MIN}, "
                                 f"{SCORE_MIN + 0.5}, ..., {SCORE_MAX}")
    return score


def parse_ratings(value: Any, column: str, text: bool) -> list[float]:
    """One score, or a list of annotator scores (CSV: '3.5;4'), each on the bins; at least one."""
    if text and isinstance(value, str) and ";" in value:
        value = value.split(";")
    if not isinstance(value, list):
        return [parse_score(value, column, text)]
    if not value:
        raise RowProblem(column, "empty list of annotator scores")
    return [parse_score(v, column, text, what=f"annotator score {k + 1} of {len(value)}")
            for k, v in enumerate(value)]


def aggregate(ratings: Sequence[float]) -> tuple[float, float]:
    """(human score, label): the mean after dropping one highest and one lowest of >= 3 ratings (the plain mean
    of fewer), and that mean's bin."""
    human = drop_extremes_mean(ratings) if len(ratings) >= 3 else sum(ratings) / len(ratings)
    return human, SCORE_BINS[label_index(human)]


def parse_text(value: Any, column: str) -> str:
    if not isinstance(value, str):
        raise RowProblem(column, f"wrong type: {_show(value)}, expected a string")
    if not value.strip():
        raise RowProblem(column, f"empty {column}")
    return value


def parse_id(value: Any, column: str) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return parse_text(value, column)


def image_format(data: bytes) -> str:
    """'PNG' or 'JPEG' for bytes PIL decodes completely; ValueError otherwise."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
            img.load()
    except Exception as err:  # PIL raises several types for corrupt data
        detail = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(err))  # PIL names the buffer
        raise ValueError(f"not a decodable image ({type(err).__name__}: {detail})") from err
    if fmt not in IMAGE_FORMATS:
        raise ValueError(f"image format {fmt} is not allowed: expected one of {IMAGE_FORMATS}")
    return fmt


@dataclass
class Context:
    """Where a row's relative paths point (`base_dir`), whether its values are text (CSV), and the image files
    read so far (for the folder importer's count of unreferenced images)."""

    base_dir: Path
    text: bool
    images_read: set[Path] = field(default_factory=set)


def parse_image(value: Any, column: str, ctx: Context) -> bytes:
    """PNG/JPEG bytes as given, or the bytes of the file at a path relative to the source file; a Hugging Face
    image struct {"bytes", "path"} (datasets' Parquet export) gives its bytes, or its path when bytes are null."""
    if isinstance(value, dict) and set(value) == {"bytes", "path"}:
        value = value["bytes"] if value["bytes"] is not None else value["path"]
    if isinstance(value, str):
        if not value.strip():
            raise RowProblem(column, "empty image path")
        path = (ctx.base_dir / value).resolve()
        if not path.is_file():
            raise RowProblem(column, f"image file {value!r} does not exist (looked at {str(path)!r})")
        data = path.read_bytes()
        ctx.images_read.add(path)
        where = f"image file {value!r}: "
    elif isinstance(value, (bytes, bytearray)):
        data, where = bytes(value), ""
    else:
        raise RowProblem(column, f"wrong type: {_show(value)}, expected image bytes or a path")
    try:
        image_format(data)
    except ValueError as err:
        raise RowProblem(column, f"{where}{err}") from err
    return data


def _dimension(value: Any, column: str, rubric: Rubric) -> str:
    dim = parse_text(value, column)
    if dim not in rubric.dimensions:
        raise RowProblem(column, f"dimension {dim!r} is not in the rubric {rubric.dimensions}")
    return dim


def prompt_id_of(prompt: str) -> str:
    """The id of a prompt without one: 'p-' + the first 12 hex digits of its text's sha256."""
    return "p-" + hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:12]


# ---- rows ------------------------------------------------------------------------------------------------


def convert_row(kind: str, record: dict[str, Any], row: int, rubric: Rubric, ctx: Context) -> dict[str, Any]:
    """One source record (keys are target fields; optional fields absent or None when not given) -> one stored
    row; raises RowProblem. Default ids: image_id 'img000012', pair_id 'pair000012', input_id 'in000012' (the
    source row), prompt_id `prompt_id_of(prompt)`."""
    prompt = parse_text(record["prompt"], "prompt")
    given = record.get("prompt_id")
    out: dict[str, Any] = {"prompt_id": prompt_id_of(prompt) if given is None else parse_id(given, "prompt_id"),
                           "prompt": prompt}
    if kind == "prompts":
        return out
    if kind == "rated":
        image_id = record.get("image_id")
        out = {"image_id": f"img{row:06d}" if image_id is None else parse_id(image_id, "image_id"), **out,
               "image": parse_image(record["image"], "image", ctx)}
        for d in rubric.dimensions:
            ratings = parse_ratings(record[d], d, ctx.text)
            human, label = aggregate(ratings)
            out |= {f"label_{d}": label, f"human_{d}": human, f"annotators_{d}": ratings}
        return out
    if kind == "scoring":
        input_id = record.get("input_id")
        return {"input_id": f"in{row:06d}" if input_id is None else parse_id(input_id, "input_id"), **out,
                "image": parse_image(record["image"], "image", ctx),
                "dimension": _dimension(record["dimension"], "dimension", rubric)}
    return _pair_row(record, row, rubric, ctx, out)


def _pair_row(record: dict[str, Any], row: int, rubric: Rubric, ctx: Context, out: dict[str, Any]) -> dict[str, Any]:
    pair_id = record.get("pair_id")
    dim = _dimension(record["dimension"], "dimension", rubric)
    images = {s: parse_image(record[f"image_{s}"], f"image_{s}", ctx) for s in "ab"}
    if images["a"] == images["b"]:
        raise RowProblem("image_b", "image_a and image_b are the same image")
    winner = record["winner"]
    if winner not in ("a", "b"):
        raise RowProblem("winner", f"winner {winner!r} is not allowed: expected 'a' or 'b'")
    loser = "b" if winner == "a" else "a"
    given = {s: record.get(f"label_{s}") for s in "ab"}
    if (given["a"] is None) != (given["b"] is None):
        missing = "label_a" if given["a"] is None else "label_b"
        raise RowProblem(missing, "one label given without the other: expected both label_a and label_b, or neither")
    labels = {s: None if v is None else parse_score(v, f"label_{s}", ctx.text) for s, v in given.items()}
    if labels["a"] is not None and labels[winner] <= labels[loser]:
        raise RowProblem("winner", f"winner {winner!r} has label {labels[winner]}, not above the other's "
                                   f"{labels[loser]}")
    return {"pair_id": f"pair{row:06d}" if pair_id is None else parse_id(pair_id, "pair_id"), **out,
            "dimension": dim, "winner_id": None, "loser_id": None, "winner_image": images[winner],
            "loser_image": images[loser], "winner_label": labels[winner], "loser_label": labels[loser]}


_ID_FIELD = {"rated": "image_id", "pairs": "pair_id", "scoring": "input_id", "prompts": "prompt_id"}


class TableRows:
    """The stored rows of one import, with the checks across rows: ids are unique, and one prompt_id names one
    prompt text (the first row that used it wins; a later row that disagrees is the bad one)."""

    def __init__(self, kind: str) -> None:
        self.kind, self.rows = kind, []
        self._ids: dict[str, int] = {}
        self._prompts: dict[str, tuple[str, int]] = {}

    def add(self, row: int, stored: dict[str, Any]) -> None:
        """Keep `stored` (source row `row`), or raise RowProblem naming the earlier row it clashes with."""
        id_field = _ID_FIELD[self.kind]
        ident = stored[id_field]
        if ident in self._ids:
            why = (f"prompt {stored['prompt']!r} repeats row {self._ids[ident]} (same {id_field} {ident!r})"
                   if self.kind == "prompts" else f"{id_field} {ident!r} repeats row {self._ids[ident]}")
            raise RowProblem(id_field, why)
        known = self._prompts.get(stored["prompt_id"])
        if known is not None and known[0] != stored["prompt"]:
            raise RowProblem("prompt_id", f"prompt_id {stored['prompt_id']!r} names another prompt at row "
                                          f"{known[1]} ({known[0]!r})")
        self._ids[ident] = row
        self._prompts.setdefault(stored["prompt_id"], (stored["prompt"], row))
        self.rows.append(stored)


def derive_pairs(rated_rows: Sequence[dict[str, Any]], rubric: Rubric) -> list[dict[str, Any]]:
    """Same-prompt preference pairs from rated rows, the rule the Shapes world's pairs follow
    (`zray.data.labels.make_pairs`): within each prompt_id (groups in order of first appearance), per rubric
    dimension (rubric order), every two images i < j (source order) whose labels differ make one pair, the higher
    label winning; images with equal labels make no pair. pair_id 'pair000000', ... in that order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rated_rows:
        groups.setdefault(row["prompt_id"], []).append(row)
    out = []
    for prompt_id, rows in groups.items():
        by_id = {r["image_id"]: r for r in rows}
        labels = [{d: r[f"label_{d}"] for d in rubric.dimensions} for r in rows]
        for pair in make_pairs(prompt_id, [r["image_id"] for r in rows], labels, rubric.dimensions):
            win, lose = by_id[pair.winner_id], by_id[pair.loser_id]
            out.append({"pair_id": f"pair{len(out):06d}", "prompt_id": prompt_id, "prompt": win["prompt"],
                        "dimension": pair.dimension, "winner_id": pair.winner_id, "loser_id": pair.loser_id,
                        "winner_image": win["image"], "loser_image": lose["image"],
                        "winner_label": pair.winner_label, "loser_label": pair.loser_label})
    return out
