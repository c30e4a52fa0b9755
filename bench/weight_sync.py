"""Weight sync: the learner's weights into a live vLLM engine vs a plain in-memory copy of the same tensors.

    .venv/bin/python bench/weight_sync.py                       # a ~21M-parameter Qwen2.5-VL, fp32 (~85 MB)
    .venv/bin/python bench/weight_sync.py --hidden 128 --layers 2 --rounds 3   # the tiny_cpu teacher

The model is a Qwen2.5-VL built locally from config (zray.models.tiny) with `--hidden`, `--layers` (head_dim 64,
MLP 4x hidden); the "learner" is its transformers state dict, perturbed each round so that every sync changes
the weights.

- baseline: `dst.copy_(src)` for every tensor into preallocated tensors of the same shapes (a plain in-memory
  copy: the floor of any in-process sync).
- candidate: `TeacherEngine.load_weights(state, version, checksum)` on an in-process engine (`--multiprocess`:
  engine core in its own process, weights sent as safetensors bytes): checksum of the
  received tensors, `reload_weights` in place, prefix / encoder / multimodal cache resets, readback of every
  served tensor (through the CPU kernels for repacked linear layers) and its checksum. The learner-side
  checksum (`zray.checksum.weights_checksum`) and the safetensors-bytes route (`encode_weights`, the wire format
  for multi-process engines) are timed separately.
- what verification adds, against vLLM's own reload: vLLM alone (`reload_weights` in place + the cache resets,
  unverified) is timed each round, and so is the transport check alone (`receive_weights`: checksum of the
  received tensors, loads nothing); verification = transport check + readback/verify (the report's `verify_s`),
  printed as a ratio to vLLM alone (issue 15's target: at most 0.25).
- both checksum forms, in the same rounds: full (`weights_checksum`: every bit) and sampled
  (`sampled_checksum` over `--verify-columns` columns, by default `VLLMConfig.verify_columns`: every row on k
  columns drawn from the version; the readback runs each repacked layer's kernel on k identity rows).

Rounds interleave all of them (after one warm-up round) so that drifting CPU load hits each alike. Printed:
median seconds and GB/s over `--rounds` of each, and the ratio candidate / baseline. The machine is
shared: absolute figures move with the load, so compare within one run.

Recorded runs: docs/experiments.md, section 2 ("6 Dec 2026: weight-sync verification cost").
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    from zray.config import VLLMConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--verify-columns", type=int, default=VLLMConfig().verify_columns,
                        help="columns of the sampled checksum (default: VLLMConfig.verify_columns)")
    parser.add_argument("--multiprocess", action="store_true",
                        help="engine core in its own process (weights travel as safetensors bytes)")
    args = parser.parse_args()

    import torch

    from actors.teacher_engine import TeacherEngine
    from actors.teacher_engine.weight_sync import _reload_from_bytes, encode_weights, receive_weights, reset_caches
    from zray.checksum import sampled_checksum, weights_checksum
    from zray.config import VLMConfig
    from zray.models.tiny import build_tiny_vlm, scaled_vlm_config
    from zray.models.vlm import load_vlm

    cfg = scaled_vlm_config(VLMConfig(vision_hidden_size=64, vision_depth=2, vision_num_heads=2, seed=0),
                            args.hidden, args.layers)
    tmp = tempfile.TemporaryDirectory()
    model_dir = build_tiny_vlm(cfg, os.path.join(tmp.name, "teacher"))
    model, _ = load_vlm(model_dir)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    del model
    num_bytes = sum(t.numel() * t.element_size() for t in base.values())
    gb = num_bytes / 1e9
    print(f"model: {sum(t.numel() for t in base.values()) / 1e6:.1f}M parameters, {len(base)} tensors, "
          f"{num_bytes / 1e6:.1f} MB ({next(iter(base.values())).dtype}); {args.rounds} rounds; "
          f"cores {os.cpu_count()}")

    gen = torch.Generator().manual_seed(0)
    states = [{k: v + 1e-3 * torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in range(2)]

    dst = {k: torch.empty_like(v) for k, v in base.items()}
    blobs = [encode_weights(st) for st in states]
    engine = TeacherEngine(model_dir, VLLMConfig(max_model_len=1024, in_process=not args.multiprocess))

    def timed(fn):
        start = time.perf_counter()
        result = fn()
        return time.perf_counter() - start, result

    def vllm_alone(st, blob):
        """vLLM's own reload in place and the cache resets, nothing checked (what the sync is measured against)."""
        if args.multiprocess:
            engine.llm.collective_rpc(_reload_from_bytes, args=(blob,))
        else:
            engine.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(st.items())})
        reset_caches(engine.llm)

    # Rounds interleave every method, so that drifting CPU load (a shared machine) hits them alike.
    # Round 0 is a warm-up (page faults of the copy target, first reload) and is not counted.
    columns = args.verify_columns
    rows: dict[str, list[float]] = {key: [] for key in (
        "copy", "checksum", "encode", "sync", "sync_bytes", "load", "verify", "vllm", "transport",
        "s_checksum", "s_transport", "s_sync", "s_load", "s_verify")}
    for r in range(args.rounds + 1):
        st, blob = states[r % len(states)], blobs[r % len(states)]
        copy_s, _ = timed(lambda: [dst[k].copy_(v) for k, v in st.items()])
        checksum_s, checksum = timed(lambda: weights_checksum(st))
        encode_s, _ = timed(lambda: encode_weights(st))
        vllm_s, _ = timed(lambda: vllm_alone(states[(r + 1) % len(states)], blobs[(r + 1) % len(states)]))
        transport_s, _ = timed(lambda: receive_weights(engine.llm, st, version=3 * r + 1, checksum=checksum))
        sync_s, report = timed(lambda: engine.load_weights(st, version=3 * r + 1, checksum=checksum))
        bytes_s, _ = timed(lambda: engine.load_weights(blob, version=3 * r + 2, checksum=checksum))
        st = states[(r + 1) % len(states)]  # the sampled sync changes the weights too
        s_checksum_s, sampled = timed(lambda: sampled_checksum(st, columns=columns, seed=3 * r + 3))
        s_transport_s, _ = timed(lambda: receive_weights(engine.llm, st, version=3 * r + 3, checksum=sampled))
        s_sync_s, s_report = timed(lambda: engine.load_weights(st, version=3 * r + 3, checksum=sampled))
        if r:
            for key, value in (("copy", copy_s), ("checksum", checksum_s), ("encode", encode_s), ("sync", sync_s),
                               ("sync_bytes", bytes_s), ("load", report.load_s), ("verify", report.verify_s),
                               ("vllm", vllm_s), ("transport", transport_s), ("s_checksum", s_checksum_s),
                               ("s_transport", s_transport_s), ("s_sync", s_sync_s), ("s_load", s_report.load_s),
                               ("s_verify", s_report.verify_s)):
                rows[key].append(value)
    engine.shutdown()
    med = {k: statistics.median(v) for k, v in rows.items()}
    copy_s, sync_s, checksum_s, encode_s, bytes_s = (med[k] for k in ("copy", "sync", "checksum", "encode",
                                                                       "sync_bytes"))
    load_s, verify_s, vllm_s, transport_s = med["load"], med["verify"], med["vllm"], med["transport"]

    print(f"engine: {'multi-process' if args.multiprocess else 'in-process'}")
    print(f"baseline  plain in-memory copy:           {copy_s * 1e3:8.1f} ms  {gb / copy_s:6.2f} GB/s")
    print(f"candidate engine.load_weights (verified): {sync_s * 1e3:8.1f} ms  {gb / sync_s:6.2f} GB/s"
          f"  = reload + cache resets {load_s * 1e3:.1f} ms + readback/verify {verify_s * 1e3:.1f} ms")
    print(f"          learner-side checksum:          {checksum_s * 1e3:8.1f} ms  {gb / checksum_s:6.2f} GB/s")
    print(f"          safetensors route: encode {encode_s * 1e3:.1f} ms + load_weights(bytes) "
          f"{bytes_s * 1e3:.1f} ms")
    print(f"          vLLM alone (reload_weights + cache resets, unchecked): {vllm_s * 1e3:.1f} ms; verification ="
          f" transport check {transport_s * 1e3:.1f} ms + readback/verify {verify_s * 1e3:.1f} ms")
    print(f"ratio engine sync / plain copy: {sync_s / copy_s:.1f}x the time")
    print(f"ratio verification / vLLM alone: {(transport_s + verify_s) / vllm_s:.2f} (readback/verify alone "
          f"{verify_s / vllm_s:.2f}; issue 15's target: at most 0.25)")
    s_sync_s, s_transport_s, s_verify_s = med["s_sync"], med["s_transport"], med["s_verify"]
    print(f"sampled checksum, {columns} columns (VLLMConfig.verify_columns):")
    print(f"candidate engine.load_weights (sampled):  {s_sync_s * 1e3:8.1f} ms  {gb / s_sync_s:6.2f} GB/s"
          f"  = reload + cache resets {med['s_load'] * 1e3:.1f} ms + readback/verify {s_verify_s * 1e3:.1f} ms")
    print(f"          learner-side checksum:          {med['s_checksum'] * 1e3:8.1f} ms; verification = transport "
          f"check {s_transport_s * 1e3:.1f} ms + readback/verify {s_verify_s * 1e3:.1f} ms")
    print(f"ratio sampled sync / plain copy: {s_sync_s / copy_s:.1f}x the time; / full sync: {s_sync_s / sync_s:.2f}")
    print(f"ratio sampled verification / vLLM alone: {(s_transport_s + s_verify_s) / vllm_s:.2f} (issue 15's "
          "target: at most 0.25)")


if __name__ == "__main__":
    main()
