"""Weight checksums: stable, order-independent, sensitive to every name, dtype, shape and bit; one ulp or a swap of
two elements changes a tensor's digest; a tensor read in column blocks digests as the whole."""

import torch

from zray.checksum import (_words, bit_sums, combine_digests, digest_of_sums, tensor_digest, weights_checksum,
                           weights_digests)


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
              torch.ones(4, dtype=torch.bool), torch.zeros(0, 3)):
        words = _words(t)
        expected = (words.sum(dim=1, dtype=torch.int64), words.sum(dim=0, dtype=torch.int64))
        assert all(torch.equal(a, b) for a, b in zip(bit_sums(t), expected))
        assert tensor_digest("t", t) == tensor_digest("t", t.contiguous())
