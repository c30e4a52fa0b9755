"""Training examples for the reward teacher: each same-prompt pair joined with its two candidates' images.

    table = pair_examples(data_dir, "train")   # pyarrow Table, one row per pair (methods.md §2 training item)

Columns: pair_id, prompt_id, prompt, dimension, winner_image, loser_image (PNG bytes), winner_label,
loser_label (s_w > s_l, on the nine bins). Every teacher method (GDSO, GRPO, SFT) trains on exactly these rows.
With `rationales=True` (the Shapes world's splits only) two more: winner_rationale, loser_rationale, each
candidate's ground-truth rationale in the pair's dimension (`zray.data.rationales.candidate_rationale`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa

from zray.data.parquet import DataError, read_table

COLUMNS = ("pair_id", "prompt_id", "prompt", "dimension", "winner_image", "loser_image", "winner_label",
           "loser_label")


def pair_examples(data_dir: str | Path, split: str, dimensions: Sequence[str] | None = None, *,
                  rationales: bool = False) -> pa.Table:
    """The pairs of `split` (restricted to `dimensions` if given) with prompt text and both images, in pair order.

    Raises DataError when a pair names a candidate missing from `candidates_<split>.parquet`."""
    data_dir = Path(data_dir)
    pairs = read_table(data_dir / f"pairs_{split}.parquet", "pairs")
    if dimensions is not None:
        keep = set(dimensions)
        pairs = pairs.filter(pa.array([d in keep for d in pairs.column("dimension").to_pylist()]))
    cands = read_table(data_dir / f"candidates_{split}.parquet", "candidates").select(
        ["candidate_id", "prompt", "image", *(("scene_json", "defects_json") if rationales else ())])
    index = {cid: i for i, cid in enumerate(cands.column("candidate_id").to_pylist())}
    rows: dict[str, list] = {"w": [], "l": []}
    for side, column in (("w", "winner_id"), ("l", "loser_id")):
        for r, cid in enumerate(pairs.column(column).to_pylist()):
            if cid not in index:
                raise DataError(f"{data_dir / f'pairs_{split}.parquet'}: row {r}, column {column!r}: candidate "
                                f"{cid!r} is not in candidates_{split}.parquet")
            rows[side].append(index[cid])
    winners, losers = cands.take(pa.array(rows["w"], pa.int64())), cands.take(pa.array(rows["l"], pa.int64()))
    table = pa.table({
        "pair_id": pairs.column("pair_id"), "prompt_id": pairs.column("prompt_id"), "prompt": winners.column("prompt"),
        "dimension": pairs.column("dimension"), "winner_image": winners.column("image"),
        "loser_image": losers.column("image"), "winner_label": pairs.column("winner_label"),
        "loser_label": pairs.column("loser_label"),
    })
    if not rationales:
        return table
    from zray.data.rationales import candidate_rationale

    dims, prompts = pairs.column("dimension").to_pylist(), winners.column("prompt").to_pylist()
    for side, cand in (("winner", winners), ("loser", losers)):
        texts = [candidate_rationale(p, s, d, dim) for p, s, d, dim in zip(
            prompts, cand.column("scene_json").to_pylist(), cand.column("defects_json").to_pylist(), dims)]
        table = table.append_column(f"{side}_rationale", pa.array(texts, pa.string()))
    return table
