"""Reading a split back with Ray Data (on the session's Ray instance)."""

import pytest

from zray.data.parquet import DataError, read_ray_dataset, read_table


def test_read_split_with_ray_data(ray_session, small_world, tmp_path):
    out, manifest = small_world
    path = out / "candidates_test.parquet"
    ds = read_ray_dataset(path, "candidates")
    rows = sorted(ds.take_all(), key=lambda r: r["candidate_id"])
    expected = read_table(path, "candidates").to_pylist()
    assert len(rows) == manifest["files"]["candidates_test.parquet"]["rows"] == len(expected)
    assert [r["candidate_id"] for r in rows] == sorted(r["candidate_id"] for r in expected)
    by_id = {r["candidate_id"]: r for r in expected}
    assert all(bytes(r["image"]) == by_id[r["candidate_id"]]["image"] for r in rows)
    with pytest.raises(DataError, match="column image"):
        read_ray_dataset(path, "captions")
