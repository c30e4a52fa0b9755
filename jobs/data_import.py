"""`zray data import`: bring your own data (docs/data-formats.md) into the stored formats, with a manifest and a
report of the bad rows. The work is `zray.data.importers.import_data`; this driver parses the flags' values and
prints the outcome.

Exit status (returned to the CLI): 0 imported; 1 rejected (bad rows under --on-bad-row reject, or a problem of the
whole file: nothing written, every bad row printed on stderr); 2 bad usage (flag values, rubric file, out dir).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from zray.data.importers import ImportRejected, import_data, parse_mapping
from zray.rubric import load_rubric

MAX_PRINTED = 20  # bad rows printed under --on-bad-row skip (all are in bad_rows.jsonl)


def run_data_import(source: str, out: str, *, kind: str, fmt: str = "auto", maps: Sequence[str] = (),
                    rubric: str | None = None, on_bad_row: str = "reject") -> int:
    try:
        report = import_data(source, out, kind=kind, rubric=load_rubric(rubric), fmt=fmt,
                             mapping=parse_mapping(maps), on_bad_row=on_bad_row)
    except ImportRejected as err:
        for error in err.errors:
            print(f"bad row: {error}", file=sys.stderr)
        print(f"zray: import rejected: {err}", file=sys.stderr)
        return 1
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        print(f"zray: error: {err}", file=sys.stderr)
        return 2
    manifest = report.manifest
    for error in report.errors[:MAX_PRINTED]:
        print(f"skipped bad row: {error}", file=sys.stderr)
    if len(report.errors) > MAX_PRINTED:
        print(f"... and {len(report.errors) - MAX_PRINTED} more skipped rows (all in {out}/bad_rows.jsonl)",
              file=sys.stderr)
    bad = f"{manifest['bad_rows']} bad rows skipped" if manifest["bad_rows"] else "no bad rows"
    print(f"imported {manifest['rows_imported']} of {manifest['rows_read']} rows ({bad}) from {source} "
          f"({manifest['source']['format']}) as {kind!r} into {out}")
    for name, rows in sorted(manifest["counts"].items()):
        print(f"  {name:28s} {rows:7d} rows")
    if manifest["ignored_columns"]:
        print(f"  ignored columns: {', '.join(manifest['ignored_columns'])}")
    if manifest.get("unreferenced_images"):
        print(f"  images in the folder no row names: {manifest['unreferenced_images']}")
    return 0
