"""Learner step throughput: DeepSpeed ZeRO-2 vs plain torch DDP, same model, same batches, same Ray Train run.

    .venv/bin/python bench/train_step.py                      # 2 CPU workers, tiny Qwen2.5-VL (~3M params)
    .venv/bin/python bench/train_step.py --workers 1 --steps 30

The model is a tiny Qwen2.5-VL built from config (zray.models.tiny), trained on a captioning-like batch: a 64x64
image, a "Describe the image." prompt and a scene description as the answer (loss on the answer tokens only).
Each Ray Train worker builds both engines in turn (zray.training.engine.TrainEngine with backend "ddp" and
"deepspeed"), alternating DDP, ZeRO-2, DDP, ZeRO-2, ... so that drifting CPU contention hits both alike, and times
`--steps` optimizer steps after `--warmup` untimed ones. Printed: samples/s (all workers) of each backend (median
over rounds) and the ZeRO-2 / DDP ratio. Nothing is read from disk but the model config; HF_HUB_OFFLINE is set.

No recorded runs yet; record them in docs/experiments.md (section 5).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

CAPTION = ("background: blue. objects: 1. object 1: a large red circle at the top left. "
           "relations: none.")


def build_batch(processor, batch_size: int, seed: int):
    """A captioning batch: input_ids / attention_mask / pixel_values / image_grid_thw / labels (answer only)."""
    import numpy as np
    import torch
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)) for _ in range(batch_size)]
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    full = prompt + [{"role": "assistant", "content": [{"type": "text", "text": CAPTION}]}]
    text_prompt = processor.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    text_full = processor.apply_chat_template(full, tokenize=False)
    inputs = processor(text=[text_full] * batch_size, images=images, return_tensors="pt", padding=True)
    num_prompt = processor(text=[text_prompt], images=images[:1], return_tensors="pt")["input_ids"].shape[1]
    labels = inputs["input_ids"].clone()
    labels[:, :num_prompt] = -100
    labels[inputs["attention_mask"] == 0] = -100
    return {key: inputs[key] for key in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")} | {
        "labels": labels}, torch.Size(inputs["input_ids"].shape)


def build_model(args):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from zray.config import VLMConfig
    from zray.models.tiny import build_processor, vlm_hf_config

    cfg = VLMConfig(hidden_size=args.hidden, num_layers=args.layers, num_heads=args.hidden // 64,
                    num_kv_heads=max(1, args.hidden // 128), head_dim=64, intermediate_size=2 * args.hidden,
                    vision_hidden_size=64, vision_depth=2, vision_num_heads=1)
    processor = build_processor(cfg)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(vlm_hf_config(cfg, processor.tokenizer)).float().train()
    return model, processor


def time_backend(backend: str, args, batch) -> float:
    """samples/s of this worker's `args.steps` timed steps with `backend` (all workers run it together)."""
    import torch
    import torch.distributed as dist

    from zray.config import LearnerConfig
    from zray.training.engine import TrainEngine

    model, _ = build_model(args)
    cfg = LearnerConfig(num_workers=args.workers, backend=backend, zero_stage=2, precision="fp32", lr=1e-4,
                        micro_batch_size=args.batch, grad_accum_steps=1, max_steps=10_000)
    engine = TrainEngine(model, cfg)
    batch = engine.prepare_batch(batch)

    def step():
        with engine.accumulation_context():
            with engine.autocast():
                loss = engine.module(**batch).loss
            engine.backward_step(loss)

    for _ in range(args.warmup):
        step()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    dist.barrier()
    elapsed = time.perf_counter() - start
    return args.steps * args.batch * dist.get_world_size() / elapsed


def worker(config):
    import ray.train
    import torch

    args = argparse.Namespace(**config)
    torch.set_num_threads(args.threads)
    rank = ray.train.get_context().get_world_rank()
    model, processor = build_model(args)
    num_params = sum(p.numel() for p in model.parameters())
    del model
    batch, shape = build_batch(processor, args.batch, seed=rank)
    results: dict[str, list[float]] = {"ddp": [], "deepspeed": []}
    for _ in range(args.rounds):
        for backend in ("ddp", "deepspeed"):
            results[backend].append(time_backend(backend, args, batch))
    return {"results": results, "num_params": num_params, "seq_len": int(shape[1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--batch", type=int, default=8, help="micro batch per worker")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="DDP / ZeRO-2 alternations")
    args = parser.parse_args()

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    load = os.getloadavg()[0]
    ray.init(num_cpus=max(4, args.workers), include_dashboard=False, log_to_driver=False)
    try:
        trainer = TorchTrainer(worker, train_loop_config=vars(args),
                               scaling_config=ScalingConfig(num_workers=args.workers, resources_per_worker={"CPU": 1}),
                               run_config=RunConfig(name=f"bench_train_step_{int(time.time())}",
                                                    storage_path="/tmp/zray_bench"))
        out = trainer.fit().return_value
    finally:
        ray.shutdown()
    ddp = statistics.median(out["results"]["ddp"])
    zero2 = statistics.median(out["results"]["deepspeed"])
    print(f"model: tiny Qwen2.5-VL, {out['num_params'] / 1e6:.2f}M params, fp32; batch {args.batch} x "
          f"{out['seq_len']} tokens + one 64x64 image per sample, per worker; {args.workers} CPU worker(s), "
          f"{args.threads} torch thread(s) each; {os.cpu_count()} cores; load average before start {load:.2f}")
    for name, values in (("DDP", out["results"]["ddp"]), ("ZeRO-2", out["results"]["deepspeed"])):
        print(f"{name:7s} samples/s per round: " + ", ".join(f"{v:.1f}" for v in values))
    print(f"DDP     samples/s (median): {ddp:.1f}")
    print(f"ZeRO-2  samples/s (median): {zero2:.1f}")
    print(f"ratio ZeRO-2 / DDP: {zero2 / ddp:.3f}")


if __name__ == "__main__":
    main()
