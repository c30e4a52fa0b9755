"""Checksums of model weights: how a learner and a rollout engine agree on which weights are served.

The learner computes `weights_checksum(state_dict)` over the Hugging Face (transformers) state dict it sends;
the engine recomputes the same checksum from the weights it reads back out of its own model after a reload
(`actors/teacher_engine/weight_sync.py`), so a match means the engine serves exactly the tensors the learner sent.

Definition (stable across processes, machines and devices):

    bits(t)         = t's bit patterns as integers, one word per element (int8 / int16 / int32 for 1-, 2- and
                      4-byte elements; an 8- or 16-byte element is 2 or 4 int32 words, each word position its
                      own plane), laid out 2-D as rows = t.shape[0], columns = all other dimensions (C order);
                      a 0-d tensor is one row of one column
    sums(t)         = exact int64 sums of bits(t) along every row, then along every column (per plane)
    digest(name, t) = blake2b-128( "name|dtype|shape\\n" + sums(t) as little-endian int64 )
    checksum        = blake2b-128( "name:digest\\n" for each name in sorted order )

Guarantee: a changed name, dtype or shape changes the digest, and so does any change confined to one row or
to one column of the 2-D layout (one changed element, by one ulp or one bit or a -0.0 for a 0.0), and any swap
of two different elements (in one row their column sums change, in different rows their row sums). The sums
are exact integers (no overflow: |word| < 2^31 and fewer than 2^32 words per row or column), so the digest
does not depend on the reduction order, the thread count or the device. It is a linear checksum, not a
cryptographic hash: changes spread over two or more rows *and* columns can cancel (+1 and -1 at the corners
of a rectangle of bit patterns), so it guards against mistakes (a stale, missing, shifted, swapped, truncated
or wrongly fused tensor), not against an adversary.

Cost: two integer reductions over the tensor where it lies, no copy (from a GPU only the sums, rows + columns
values, move to the host). On the CPU they run in numpy, on one thread: about 4x faster than blake2b over the
bytes (30 vs 118 ms for 95 MB on this 2-core machine), and unlike torch's reductions they do not stall when
another process holds a core (torch's two OpenMP threads then wait on each other at every reduction: 0.81 s
instead of 29 ms for the same 98 MB in that state, Dec 2026). On a GPU, torch reduces at memory bandwidth.
`bit_sums` and `digest_of_sums` let a reader that sees a tensor in column blocks (the engine's readback of
repacked layers) digest it without assembling it. Pure: torch, numpy and the standard library.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch

_SUB_WORD = {1: torch.int8, 2: torch.int16}  # elements of 1 or 2 bytes are one word each; wider ones int32 words


def _words(tensor: torch.Tensor) -> torch.Tensor:
    """The bit patterns of `tensor` as a (rows, columns, words per element) integer view (a copy only when an
    element wider than 4 bytes lies in a non-contiguous last dimension)."""
    t = tensor.detach()
    if t.dim() == 0:
        t = t.reshape(1)
    size = t.element_size()
    if size in _SUB_WORD:
        words, per_element = t.view(_SUB_WORD[size]), 1
    elif size % 4 == 0:
        per_element = size // 4
        if per_element > 1 and t.stride(-1) != 1:
            t = t.contiguous()
        words = t.view(torch.int32)
    else:
        raise ValueError(f"dtype {t.dtype} has {size}-byte elements: expected 1, 2 or a multiple of 4 bytes")
    rows, columns = t.shape[0], math.prod(t.shape[1:])
    if max(rows, columns) >= 2**32:
        raise ValueError(f"a tensor of shape {tuple(tensor.shape)} has 2^32 or more rows or columns: its exact "
                         "int64 sums could overflow")
    return words.reshape(rows, columns, per_element)


def bit_sums(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row sums (rows, words), column sums (columns, words)) of the tensor's bit patterns (see the module
    docstring): int64, exact, on the tensor's device. A tensor seen in column blocks W[:, a:b] gives the row
    sums of W as the sum of the blocks' row sums and its column sums as the blocks' column sums in order."""
    words = _words(tensor)
    if words.device.type == "cpu":  # numpy: one thread, vectorised (see the module docstring)
        array = words.numpy()
        return torch.from_numpy(array.sum(axis=1, dtype=np.int64)), torch.from_numpy(array.sum(axis=0, dtype=np.int64))
    return words.sum(dim=1, dtype=torch.int64), words.sum(dim=0, dtype=torch.int64)


def digest_of_sums(name: str, dtype: torch.dtype, shape: Sequence[int], row_sums: torch.Tensor,
                   column_sums: torch.Tensor) -> str:
    """Hex digest of one named tensor from its `bit_sums` (for a tensor of this dtype and shape)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{name}|{str(dtype).removeprefix('torch.')}|{tuple(shape)}\n".encode())
    for sums in (row_sums, column_sums):
        if sums.device.type != "cpu" or sums.dtype != torch.int64:
            sums = sums.to(device="cpu", dtype=torch.int64)
        h.update(np.ascontiguousarray(sums.numpy(), dtype="<i8"))
    return h.hexdigest()


def tensor_digest(name: str, tensor: torch.Tensor) -> str:
    """Hex digest of one named tensor: its name, dtype, shape and the exact row and column sums of its bits."""
    return digest_of_sums(name, tensor.dtype, tensor.shape, *bit_sums(tensor))


def combine_digests(digests: Mapping[str, str]) -> str:
    """The checksum of a set of named tensors from their per-tensor digests (order-independent)."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(digests):
        h.update(f"{name}:{digests[name]}\n".encode())
    return h.hexdigest()


def weights_digests(named_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]
                    ) -> dict[str, str]:
    """{name: tensor_digest} for a state dict or an iterable of (name, tensor)."""
    items = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
    out: dict[str, str] = {}
    for name, tensor in items:
        if name in out:
            raise ValueError(f"tensor name {name!r} appears twice")
        out[name] = tensor_digest(name, tensor)
    return out


def weights_checksum(named_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> str:
    """The checksum of a whole state dict (what a learner sends with a weight update)."""
    return combine_digests(weights_digests(named_tensors))
