"""Weight checksums: stable, order-independent, sensitive to every name, dtype, shape and bit."""

import torch

from zray.checksum import combine_digests, weights_checksum, weights_digests


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
