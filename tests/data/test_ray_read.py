"""Reading a split back with Ray Data (on the session's Ray instance)."""

import pytest

from zray.data.parquet import DataError, read_ray_dataset, read_table


@pytest.mark.parametrize("in_driver", [True, False], ids=["small: read here", "large: Ray Data read tasks"])
def test_read_split_with_ray_data(ray_session, small_world, tmp_path, monkeypatch, in_driver):
    from ray.data.dataset import MaterializedDataset

    import zray.data.parquet as parquet

    out, manifest = small_world
    path = out / "candidates_test.parquet"
    if not in_driver:  # as if the file were larger than the bound
        monkeypatch.setattr(parquet, "IN_DRIVER_MAX_BYTES", path.stat().st_size - 1)
    ds = read_ray_dataset(path, "candidates")
    # read here: already in the object store (materialized); else a lazy dataset that Ray Data's read tasks fill
    assert isinstance(ds, MaterializedDataset) == in_driver, type(ds)
    rows = sorted(ds.take_all(), key=lambda r: r["candidate_id"])
    expected = read_table(path, "candidates").to_pylist()
    assert len(rows) == manifest["files"]["candidates_test.parquet"]["rows"] == len(expected)
    assert [r["candidate_id"] for r in rows] == sorted(r["candidate_id"] for r in expected)
    by_id = {r["candidate_id"]: r for r in expected}
    assert all(bytes(r["image"]) == by_id[r["candidate_id"]]["image"] for r in rows)
    with pytest.raises(DataError, match="column image"):
        read_ray_dataset(path, "captions")
