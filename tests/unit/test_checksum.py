"""Weight checksums: stable, order-independent, sensitive to every name, dtype, shape and bit; one ulp or a swap of
two elements changes a tensor's digest; a tensor read in column blocks digests as the whole. Sampled checksums:
every row on k columns drawn from the seed and the width, each form parsed and recomputed as it was written."""

import torch

import pytest

from zray.checksum import (_words, bit_sums, checksum_like, combine_digests, digest_of_sums, parse_checksum,
                           sample_columns, sampled_checksum, sampled_digest, sync_checksum, tensor_digest,
                           weights_checksum, weights_digests)


def _state():
    gen = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(4, 3, generator=gen), "b.bias": torch.randn(5, generator=gen),
            "c.weight": torch.randn(2, 2, generator=gen).to(torch.bfloat16)}


def test_checksum_is_stable_and_order_independent():
    s = _state()
    assert weights_checksum(s) == weights_checksum(dict(reversed(list(s.items()))))
    assert weights_checksum(s) == weights_checksum(list(s.items()))
    assert weights_checksum(s) == combine_digests(weights_digests(s))
    # a non-contiguous view hashes as its values
    t = torch.randn(3, 4)
    assert weights_checksum({"x": t.T}) == weights_checksum({"x": t.T.contiguous()})


def test_checksum_detects_any_change():
    s = _state()
    base = weights_checksum(s)
    flipped = dict(s, **{"a.weight": s["a.weight"].clone()})
    flipped["a.weight"].view(torch.int32)[1, 2] ^= 1  # one bit
    assert weights_checksum(flipped) != base
    assert weights_checksum(dict(s, **{"a.weight": s["a.weight"].double()})) != base  # dtype
    assert weights_checksum(dict(s, **{"a.weight": s["a.weight"].reshape(3, 4)})) != base  # shape
    renamed = {("z.weight" if k == "a.weight" else k): v for k, v in s.items()}
    assert weights_checksum(renamed) != base  # name
    assert weights_checksum({k: v for k, v in s.items() if k != "b.bias"}) != base  # a tensor less


def _one_ulp_up(t, index):
    u = t.clone()
    u[index] = torch.nextafter(u[index], torch.tensor(float("inf"), dtype=t.dtype))
    return u


def test_digest_sees_one_ulp_and_a_swap():
    gen = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        t = torch.randn(6, 9, generator=gen).to(dtype)
        base = tensor_digest("w", t)
        for index in ((0, 0), (3, 4), (5, 8)):
            assert tensor_digest("w", _one_ulp_up(t, index)) != base, (dtype, index)
        same_row, other_row = t.clone(), t.clone()
        same_row[2, 1], same_row[2, 7] = t[2, 7], t[2, 1]  # a swap within a row: column sums change
        other_row[1, 3], other_row[4, 3] = t[4, 3], t[1, 3]  # across rows, same column: row sums change
        assert len({base, tensor_digest("w", same_row), tensor_digest("w", other_row)}) == 3, dtype
    v = torch.randn(7, generator=gen)
    assert tensor_digest("b", _one_ulp_up(v, (3,))) != tensor_digest("b", v)
    assert tensor_digest("b", v.flip(0)) != tensor_digest("b", v)
    zero = torch.zeros(2, 2)
    negative_zero = zero.clone()
    negative_zero[1, 0] = -0.0  # equal as a value, not as bits
    assert tensor_digest("z", negative_zero) != tensor_digest("z", zero)


def test_digest_from_column_blocks_and_on_any_device():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(10, 12, generator=gen)
    rows, columns = 0, []
    for start in range(0, 12, 5):  # W[:, a:b]^T, as the engine's readback of a repacked layer sees it
        block = w[:, start:start + 5].T.contiguous()
        r, c = bit_sums(block[:, 3:8].T)  # rows 3..7 of W, e.g. one shard of a fused weight
        rows, columns = rows + r, columns + [c]
    assert digest_of_sums("w", w.dtype, (5, 12), rows, torch.cat(columns)) == tensor_digest("w", w[3:8])
    # the CPU path (numpy) and the device path (torch's reductions) compute the same exact sums
    for t in (w, w.T, w.to(torch.bfloat16), torch.randn(3, 4, 5, dtype=torch.float64), torch.tensor(2.5),
              torch.ones(4, dtype=torch.bool), torch.zeros(0, 3), torch.randn(40, 3, dtype=torch.float64)):
        words = _words(t)
        expected = (words.sum(dim=1, dtype=torch.int64), words.sum(dim=0, dtype=torch.int64))
        assert all(torch.equal(a, b) for a, b in zip(bit_sums(t), expected))
        assert tensor_digest("t", t) == tensor_digest("t", t.contiguous())


def test_sampled_columns_depend_on_the_seed_and_the_width_only():
    a, b = sample_columns(100, 8, seed=3), sample_columns(100, 8, seed=3)
    assert a.tolist() == b.tolist() and len(set(a.tolist())) == 8 and list(a) == sorted(a) and a.max() < 100
    assert sample_columns(100, 8, seed=4).tolist() != a.tolist()
    assert sample_columns(101, 8, seed=3).tolist() != a.tolist()
    assert sample_columns(8, 8, seed=3) is None and sample_columns(5, 8, seed=3) is None  # every column


def test_sampled_digest_sees_every_row_on_its_columns_and_nothing_else():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(6, 40, generator=gen)
    picked = sample_columns(40, 4, seed=9).tolist()
    other = next(c for c in range(40) if c not in picked)
    base = sampled_digest("w", w, 4, 9)
    for row in range(6):
        assert sampled_digest("w", _one_ulp_up(w, (row, picked[row % 4])), 4, 9) != base, row
    assert sampled_digest("w", _one_ulp_up(w, (2, other)), 4, 9) == base  # the weaker guarantee, as documented
    assert sampled_digest("w", w + 1e-3, 4, 9) != base  # a stale tensor
    assert sampled_digest("w", w.roll(1, dims=1), 4, 9) != base  # shifted columns
    assert sampled_digest("w", w.flip(0), 4, 9) != base  # swapped rows
    assert sampled_digest("v", w, 4, 9) != base and sampled_digest("w", w.double(), 4, 9) != base
    v = torch.randn(7, generator=gen)  # width 1: whole, the same digest as the full one
    assert sampled_digest("b", v, 4, 9) == tensor_digest("b", v)
    # the engine's readback of a repacked layer: the sampled columns W[:, J]^T as one block, a shard at row 2
    block = w[:, torch.tensor(picked)].T.contiguous()
    rows, columns = bit_sums(block[:, 2:5].T)
    assert digest_of_sums("w", w.dtype, (3, 40), rows, columns) == sampled_digest("w", w[2:5], 4, 9)
    conv = torch.randn(4, 3, 2, 2, generator=gen)  # more than 2 dims: columns of the (rows, rest) layout
    assert sampled_digest("c", conv, 4, 9) == sampled_digest("c", conv.contiguous(), 4, 9)


def test_checksum_forms_parse_and_recompute_as_written():
    s = _state()
    full, sampled = weights_checksum(s), sampled_checksum(s, columns=2, seed=11)
    assert parse_checksum(full) == (None, full)
    assert sampled.startswith("cols2-seed11-") and parse_checksum(sampled) == ((2, 11), sampled[-32:])
    assert checksum_like(s, full) == full and checksum_like(s, sampled) == sampled
    assert sync_checksum(s, columns=0, version=11) == full and sync_checksum(s, columns=2, version=11) == sampled
    assert sampled_checksum(s, columns=2, seed=12) != sampled  # each version checks other columns
    assert sampled_checksum(dict(s, **{"a.weight": s["a.weight"] + 1}), columns=2, seed=11) != sampled
    for bad in ("xyz", "0" * 31, "cols0-seed1-" + "0" * 32, "cols2-seedx-" + "0" * 32, None):
        with pytest.raises(ValueError, match="checksum=.*32 hex digits"):
            parse_checksum(bad)
    with pytest.raises(ValueError, match="columns=0"):
        sampled_checksum(s, columns=0, seed=1)
