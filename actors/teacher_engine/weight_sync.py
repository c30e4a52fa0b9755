"""Live weight sync into a vLLM engine: reload in place, reset caches, verify by reading the weights back.

`receive_weights` (step 1, loads nothing) then `apply_weights` (steps 2-3); `TeacherEngine.load_weights`
calls both:

1. **Transport check**: the checksum (`zray.checksum`) of the received Hugging Face state dict must equal the
   one the learner sent (full checksums only: see below), and every floating tensor must be in the engine's
   dtype; otherwise `WeightVersionError` / `ValueError` before anything is loaded (the engine keeps serving the
   old version).
2. **Reload in place** (no restart): in-process engine -> `collective_rpc("reload_weights",
   weights_iterator=...)` with the tensors themselves (no copy, no disk); multi-process engine -> the
   safetensors bytes go through `collective_rpc` with a small function that deserialises them in the worker
   (raw tensors arrive there as lists and break the engine). Then `reset_prefix_cache()`,
   `llm_engine.reset_encoder_cache()` (without it an image seen before kills the engine: "Encoder cache
   miss") and `reset_mm_cache()`.
3. **Readback**: inside the worker, every sent tensor is located in vLLM's model (HF -> vLLM names through the
   model's `hf_to_vllm_mapper`; fused `qkv_proj` / `gate_up_proj` rows through `packed_modules_mapping`,
   offsets from the sent shapes; padded vocabulary rows cut off) and read back *as served*: on CPU, vLLM
   repacks linear weights for oneDNN / sgl kernels and leaves an empty `weight`, so those are recovered by
   running the layer's own kernel (`cpu_linear`) on rows of an identity matrix (exact: each output is one
   product by 1.0), PROBE_CHUNK columns of W at a time; each sent tensor in that weight (every shard of a
   fused one) is digested from those blocks as they pass (`zray.checksum.bit_sums`), never assembled.
   Per-tensor digests come back (never tensors); their combined checksum must equal the learner's, and every
   parameter of the engine must have been written. Otherwise `WeightVersionError`, naming tensors.

The checksum says how much is checked: a full one (`weights_checksum`) every bit of every tensor; a sampled one
(`zray.checksum.sampled_checksum`, "cols{k}-seed{s}-...", `VLLMConfig.verify_columns`) every row of each
tensor on k columns drawn from s: the readback of a repacked weight then runs its kernel on k identity rows
instead of all of them, and step 1 checks only the dtypes, the readback comparing what is served with the
learner's checksum directly (a tensor changed in transit is then caught after the reload, and the engine refuses
work until a later update verifies). What each catches: `zray/checksum.py`. Where each sent tensor lives in
vLLM's model is worked out once per model and layout (names and shapes).

Cost (Dec 2026, 2-core CPU, 95 MB fp32 model; docs/experiments.md section 2): with a full checksum the identity
readback is the floor of step 3: it multiplies in_features x weight size (43 GFLOP here) at the core's matmul
rate, about 4x vLLM's own reload, more for wider layers; the digests add two passes at about 3 GB/s. A sampled
checksum runs the same kernels on k rows: one pass over the weights (the kernel reads all of W whatever it
multiplies), about 0.1x vLLM's reload at k = 4. On GPU engines vLLM keeps
the weights as they are: no identity matmul, and the digests run on the device.

Supports tensor parallel size 1 (one worker); the readback raises for more.
"""

from __future__ import annotations

import functools
import math
import time
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from zray.checksum import (bit_sums, checksum_digests, checksum_like, digest_of_sums, format_checksum,
                           parse_checksum, sample_columns, sampled_digest, tensor_digest)
from zray.types import WeightSyncReport, WeightVersionError

PROBE_CHUNK = 1024  # identity rows per readback matmul


def encode_weights(state_dict: Mapping[str, torch.Tensor]) -> bytes:
    """A state dict as safetensors bytes (the wire format for multi-process engines)."""
    from safetensors.torch import save

    return save({k: v.detach().contiguous().cpu() for k, v in state_dict.items()})


def decode_weights(weights: Mapping[str, torch.Tensor] | bytes | bytearray | memoryview) -> dict[str, torch.Tensor]:
    """A state dict from a mapping of tensors or from safetensors bytes."""
    if isinstance(weights, (bytes, bytearray, memoryview)):
        from safetensors.torch import load

        return load(bytes(weights))
    if isinstance(weights, Mapping):
        bad = [k for k, v in weights.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad:
            raise ValueError(f"weights entries {bad[:5]} are not (str, torch.Tensor)")
        return dict(weights)
    raise ValueError(f"weights of type {type(weights).__name__} are not allowed: expected a state dict "
                     "(name -> tensor) or safetensors bytes")


def _reload_from_bytes(worker: Any, data: bytes) -> None:
    """Runs in a multi-process engine's worker: deserialise safetensors bytes and reload in place."""
    from safetensors.torch import load

    worker.reload_weights(weights_iterator=iter(load(data).items()))


# ---------------------------------------------------------------------------------- readback (in the worker)
def _fused_location(model: Any, hf_name: str, vllm_name: str, shapes: Mapping[str, tuple[int, ...]],
                    shard_of: Mapping[str, tuple[str, int, list[str]]]) -> tuple[str, str, int]:
    """(module path, parameter name, row offset) in vLLM's model for one HF tensor."""
    module_path, _, param_name = vllm_name.rpartition(".")
    try:
        model.get_submodule(module_path)
        return module_path, param_name, 0
    except AttributeError:
        pass
    parent, _, leaf = module_path.rpartition(".")
    if leaf not in shard_of:
        raise WeightVersionError(f"the engine has no module {module_path!r} for the sent tensor {hf_name!r}")
    fused, index, subs = shard_of[leaf]
    offset = 0
    head, _, tail = hf_name.rpartition(f".{leaf}.")
    for sibling in subs[:index]:
        sibling_name = f"{head}.{sibling}.{tail}"
        if sibling_name not in shapes:
            raise WeightVersionError(f"{hf_name!r} is stored fused in {parent}.{fused}, but the sent weights lack "
                                     f"{sibling_name!r}, needed to locate it")
        offset += shapes[sibling_name][0]
    return f"{parent}.{fused}", param_name, offset


def _served_column_blocks(module: Any, param_name: str, identities: dict[tuple, torch.Tensor],
                          sample: tuple[int, int] | None) -> tuple[Iterator[torch.Tensor], int] | None:
    """For a linear weight W (out x in) that vLLM repacked for its CPU kernel: (the blocks W[:, a:b]^T in order, in),
    read through the layer's own kernel (`cpu_linear`) on rows of an identity matrix (exact: each output is one
    product by 1.0); with `sample` (columns, seed) one block of the sampled columns W[:, J]^T instead
    (`zray.checksum.sample_columns`). `identities` caches those rows across layers. None when the parameter is
    served as it is."""
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    param = getattr(module, param_name)
    kernel = getattr(module, "cpu_linear", None)
    if param_name != "weight" or kernel is None or not isinstance(module, (LinearBase, ParallelLMHead)):
        return None
    in_features = getattr(module, "input_size_per_partition", None) or module.embedding_dim
    dtype = getattr(module, "params_dtype", param.dtype)
    picked = sample_columns(in_features, *sample) if sample is not None else None
    if picked is not None:
        key = ("sample", in_features, dtype, param.device)
        if key not in identities:
            identities[key] = torch.zeros(len(picked), in_features, dtype=dtype, device=param.device)
            identities[key][torch.arange(len(picked)), torch.tensor(picked)] = 1
        return iter([kernel(identities[key], param, None)]), in_features

    def blocks() -> Iterator[torch.Tensor]:
        for start in range(0, in_features, PROBE_CHUNK):
            stop = min(start + PROBE_CHUNK, in_features)
            key = (start, stop, in_features, dtype, param.device)
            if key not in identities:
                identities[key] = torch.zeros(stop - start, in_features, dtype=dtype, device=param.device)
                identities[key][:, start:stop].fill_diagonal_(1)
            yield kernel(identities[key], param, None)  # (stop - start, out): columns start:stop of W, transposed

    return blocks(), in_features


def _digest_blocks(blocks: Iterator[torch.Tensor], in_features: int, parts: list[tuple[str, tuple[int, ...], int]]
                   ) -> dict[str, str]:
    """Digests of the sent tensors `parts` (name, shape, row offset) that lie in rows of a repacked weight W
    (`in_features` columns), from its column blocks W[:, a:b]^T (or the sampled columns W[:, J]^T), without
    assembling W (`zray.checksum.bit_sums` adds up block by block)."""
    row_sums: dict[str, Any] = {name: 0 for name, _, _ in parts}
    column_sums: dict[str, list[torch.Tensor]] = {name: [] for name, _, _ in parts}
    out_features = 0
    dtype = None
    for block in blocks:
        out_features, dtype = block.shape[1], block.dtype
        for name, shape, offset in parts:
            rows, columns = bit_sums(block[:, offset: offset + shape[0]].T if shape else block)
            row_sums[name] = row_sums[name] + rows
            column_sums[name].append(columns)
    for name, shape, offset in parts:
        if not shape or offset + shape[0] > out_features or math.prod(shape[1:]) != in_features:
            raise WeightVersionError(f"the engine holds {name!r} in a ({out_features}, {in_features}) weight at row "
                                     f"{offset}: sent {shape}")
    return {name: digest_of_sums(name, dtype, shape, row_sums[name], torch.cat(column_sums[name]))
            for name, shape, _ in parts}


_LAYOUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {layout: _served_layout(...)}


def _served_layout(model: Any, layout: tuple[tuple[str, tuple[int, ...]], ...]
                   ) -> tuple[list[tuple[Any, str, list[tuple[str, tuple[int, ...], int]]]], list[str]]:
    """Where the sent tensors of `layout` live in vLLM's model: [(module, parameter name, [(HF name, shape, row
    offset)])], and the engine parameters that none of them writes. Kept per model and layout (a
    learner sends the same names and shapes every update; an in-place reload keeps the modules)."""
    known = _LAYOUTS.setdefault(model, {})
    if layout in known:
        return known[layout]
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    packed = getattr(model, "packed_modules_mapping", None) or {}
    shard_of = {sub: (fused, i, list(subs)) for fused, subs in packed.items() for i, sub in enumerate(subs)}
    shapes = dict(layout)
    served: dict[tuple[str, str], list[tuple[str, tuple[int, ...], int]]] = {}
    for name, shape in layout:
        vllm_name = mapper.map_name(name) if mapper is not None else name
        if vllm_name is None:
            raise WeightVersionError(f"the engine ignores the sent tensor {name!r}: it cannot serve it")
        module_path, param_name, offset = _fused_location(model, name, vllm_name, shapes, shard_of)
        served.setdefault((module_path, param_name), []).append((name, tuple(shape), offset))
    touched = {f"{module_path}.{param_name}" for module_path, param_name in served}
    uncovered = sorted({n for n, _ in model.named_parameters()} - touched)
    known[layout] = ([(model.get_submodule(path), param_name, parts) for (path, param_name), parts in served.items()],
                     uncovered)
    return known[layout]


def served_digests(model: Any, layout: list[tuple[str, tuple[int, ...]]], sample: tuple[int, int] | None = None
                   ) -> tuple[dict[str, str], list[str]]:
    """Per-tensor digests of the weights the engine serves, under the HF names of `layout` (full, or sampled
    when `sample` is (columns, seed): `zray.checksum.sampled_digest`), and the engine parameters that no sent
    tensor wrote. Runs inside the worker (`LLM.apply_model`); returns strings only. Each served parameter is read
    once; a repacked one in column blocks that every sent tensor in it (the shards of a fused `qkv_proj`) digests
    as they pass."""
    served, uncovered = _served_layout(model, tuple((name, tuple(shape)) for name, shape in layout))
    digests: dict[str, str] = {}
    identities: dict[tuple, torch.Tensor] = {}
    with torch.inference_mode():
        for module, param_name, parts in served:
            repacked = _served_column_blocks(module, param_name, identities, sample)
            if repacked is not None:
                digests.update(_digest_blocks(*repacked, parts))
                continue
            full = getattr(module, param_name).detach()
            for name, shape, offset in parts:
                rows = full[offset: offset + shape[0]] if shape else full
                if tuple(rows.shape) != shape:
                    if rows.numel() != math.prod(shape):
                        raise WeightVersionError(f"the engine holds {name!r} with shape {tuple(rows.shape)}: "
                                                 f"sent {shape}")
                    rows = rows.reshape(shape)
                digests[name] = tensor_digest(name, rows) if sample is None else sampled_digest(name, rows, *sample)
    return digests, list(uncovered)


# ------------------------------------------------------------------------------------------------- sync
def served_dtype(llm: Any) -> torch.dtype:
    return llm.llm_engine.model_config.dtype


def reset_caches(llm: Any) -> None:
    """Drop everything derived from the old weights: prefix KV blocks, encoder outputs, processed inputs."""
    llm.reset_prefix_cache()
    llm.llm_engine.reset_encoder_cache()
    llm.reset_mm_cache()


def verify_served(llm: Any, state: Mapping[str, torch.Tensor], checksum: str) -> str:
    """Read the weights back out of the engine and compare with `state` / `checksum` (full, or sampled: then
    only the sampled columns are read back); returns the served checksum, in the form of `checksum`. Raises
    WeightVersionError naming the tensors that differ or the parameters never written."""
    sample, _ = parse_checksum(checksum)
    layout = [(name, tuple(t.shape)) for name, t in state.items()]
    results = llm.apply_model(functools.partial(served_digests, layout=layout, sample=sample))
    if len(results) != 1:
        raise NotImplementedError(f"weight readback supports one worker (tensor parallel size 1), got {len(results)}")
    digests, uncovered = results[0]
    served = format_checksum(digests, checksum)
    if served != checksum:
        sent = checksum_digests(state, checksum)
        wrong = sorted(n for n in sent if digests.get(n) != sent[n])
        if not wrong:
            raise WeightVersionError(f"the weights arrived with checksum {served}, not the {checksum} that was sent "
                                     "(the engine serves what arrived): they changed in transit")
        raise WeightVersionError(f"the engine serves weights with checksum {served}, not the {checksum} that was "
                                 f"sent: {len(wrong)} tensors differ, e.g. {wrong[:5]}")
    if uncovered:
        raise WeightVersionError(f"{len(uncovered)} engine parameters were not written by the sent weights, "
                                 f"e.g. {uncovered[:5]}: send the full state dict")
    return served


def receive_weights(llm: Any, weights: Mapping[str, torch.Tensor] | bytes, *, version: int,
                    checksum: str) -> tuple[dict[str, torch.Tensor], bytes | None]:
    """Step 1: (state dict, safetensors bytes if that is how they came). Nothing is loaded; raises
    WeightVersionError if the received weights do not have the sent full checksum (a sampled one is left to the
    readback), ValueError on a bad dtype or a malformed checksum."""
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise ValueError(f"version={version!r} is not allowed: expected an integer >= 0")
    data = bytes(weights) if isinstance(weights, (bytes, bytearray, memoryview)) else None
    state = decode_weights(weights)
    if not state:
        raise ValueError("weights is empty: expected the full state dict")
    sample, _ = parse_checksum(checksum)  # a malformed checksum is refused here, before anything is loaded
    if sample is None:  # a sampled checksum is left to the readback
        received = checksum_like(state, checksum)
        if received != checksum:
            raise WeightVersionError(f"weights for version {version} arrived with checksum {received}, but the "
                                     f"learner sent {checksum}: nothing was loaded")
    dtype = served_dtype(llm)
    wrong_dtype = sorted(n for n, t in state.items() if t.is_floating_point() and t.dtype != dtype)
    if wrong_dtype:
        raise ValueError(f"tensors {wrong_dtype[:5]} are not in the engine's dtype {dtype}: send the weights in "
                         "the served dtype (a cast would change the checksum); nothing was loaded")
    return state, data


def apply_weights(llm: Any, state: Mapping[str, torch.Tensor], data: bytes | None, *, version: int, checksum: str,
                  in_process: bool, reload: Any = None) -> WeightSyncReport:
    """Steps 2-3: reload in place, reset the caches, read back and verify. `reload(llm, state, data)` replaces
    the reload step (tests use it to load something else and see the readback catch it)."""
    start = time.perf_counter()
    if reload is not None:
        reload(llm, state, data)
    elif in_process:
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(state.items())})
    else:
        llm.collective_rpc(_reload_from_bytes, args=(data if data is not None else encode_weights(state),))
    reset_caches(llm)
    loaded = time.perf_counter()
    served = verify_served(llm, state, checksum)
    num_bytes = sum(t.numel() * t.element_size() for t in state.values())
    return WeightSyncReport(version=version, checksum=served, num_tensors=len(state), num_bytes=num_bytes,
                            load_s=loaded - start, verify_s=time.perf_counter() - loaded)
