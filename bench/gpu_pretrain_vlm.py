"""The dev teacher's pre-training on one GPU, at the CPU recipe's size and with more compute: is shape compute-bound?

    .venv/bin/zray data --recipe dev                                                   # the dev world, if missing
    python bench/gpu_pretrain_vlm.py --data runs/dev/data --out gpu_pretrain.json      # every variant, at once
    python bench/gpu_pretrain_vlm.py --data runs/dev/data --variants recipe --smoke    # a few steps on the CPU

Runs the two phases of `zray pretrain-vlm --recipe dev --model teacher` with the same tasks, model init, optimiser,
schedule shape and data (zray's `VisionWarmupTask` and `CaptionTask`, `build_optimizer`, the captions Parquet
split), in plain torch on one device instead of Ray Train + DeepSpeed, so that larger batches, more steps and a
larger vision tower can be tried in minutes:

- recipe: the 26 Nov CPU recipe's batches and step counts (warm-up 3,302 steps of 32, captioning 6,800 of 16):
  the control, which must land near the CPU figures for the other variants to mean anything.
- batch4x: the same steps with 4x the batch (4x the images seen).
- vision128_batch4x: batch4x with a vision tower 128 wide and 4 deep (against 64 and 2).

Each variant runs in its own process (they share the GPU; a tiny model leaves it mostly idle), within
`--warmup-s` and `--caption-s` seconds: if its measured step rate cannot reach its step count, the count (and the
cosine schedule with it) is cut to what the budget allows, and the JSON says so. The images are encoded once per
process (the model's own processor, in a pool of CPU workers) and kept on the device. Scoring is zray's
(`describe_images`, greedy, then `caption_metrics` and `caption_slices`) on the first `--eval-images` held-out
images. Imports torch, transformers, pyarrow and zray's core only (no Ray, vLLM or DeepSpeed).

Printed: the device and budgets; per variant its parameters, warm-up and captioning steps taken / asked (batch,
images seen, seconds), evaluation time, background / colour / shape / count / relation / exact accuracy on the
held-out images, and shape accuracy per slice. `--out` also writes every variant's results as JSON.

Recorded runs and what they showed: docs/experiments.md (section 1, "the dev teacher's pre-training on one GPU").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.recipes import dev  # noqa: E402
from zray.config import LearnerConfig  # noqa: E402
from zray.data import Defects, Scene, read_table  # noqa: E402
from zray.data.render import decode_png  # noqa: E402
from zray.evaluation.captions import caption_metrics, caption_slices, describe_images  # noqa: E402
from zray.models.tiny import build_tiny_vlm, count_parameters  # noqa: E402
from zray.models.vision_heads import VISION_TARGET_KEYS  # noqa: E402
from zray.models.vlm import cached_processor, load_vlm  # noqa: E402
from zray.tasks.caption import IGNORE_INDEX, CaptionTask  # noqa: E402
from zray.tasks.vision_warmup import VisionWarmupTask  # noqa: E402
from zray.training.engine import build_optimizer  # noqa: E402

VARIANTS: dict[str, dict[str, Any]] = {
    "recipe": dict(warm_batch=32, warm_steps=3302, cap_batch=16, cap_steps=6800, vlm={}),
    "batch4x": dict(warm_batch=128, warm_steps=3302, cap_batch=64, cap_steps=6800, vlm={}),
    "vision128_batch4x": dict(warm_batch=128, warm_steps=3302, cap_batch=64, cap_steps=6800,
                              vlm=dict(vision_hidden_size=128, vision_depth=4, vision_num_heads=4)),
}
PAD_VALUES = {"input_ids": None, "attention_mask": 0, "mm_token_type_ids": 0, "labels": IGNORE_INDEX}
STYLE = dev().pretrain_vlm.caption_style


# ------------------------------------------------------------------------------------------ data on the device


def _encode_chunk(job: tuple[str, dict[str, list[Any]]]) -> dict[str, torch.Tensor]:
    model_dir, rows = job
    torch.set_num_threads(1)
    task = CaptionTask(model_dir=model_dir, style=STYLE, vision_aux_weight=1.0)
    return task.collate(rows)


def encode_all(model_dir: str, rows: dict[str, list[Any]], workers: int, chunk: int = 250) -> dict[str, torch.Tensor]:
    """Every row as CaptionTask.collate makes it, per image: sequences right-padded to one length, pixel patches
    as (images, patches, dim)."""
    n = len(rows["image"])
    jobs = [(model_dir, {k: v[i:i + chunk] for k, v in rows.items()}) for i in range(0, n, chunk)]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        parts = pool.map(_encode_chunk, jobs)
    pad_id = cached_processor(model_dir).tokenizer.pad_token_id
    length = max(p["input_ids"].shape[1] for p in parts)
    out: dict[str, torch.Tensor] = {}
    for key in parts[0]:
        tensors = []
        for p in parts:
            t = p[key]
            if key in PAD_VALUES:
                fill = pad_id if key == "input_ids" else PAD_VALUES[key]
                t = torch.nn.functional.pad(t, (0, length - t.shape[1]), value=fill)
            elif key == "pixel_values":
                t = t.view(p["image_grid_thw"].shape[0], -1, t.shape[-1])
            tensors.append(t)
        out[key] = torch.cat(tensors)
    return out


def batch_of(data: dict[str, torch.Tensor], idx: torch.Tensor, caption: bool) -> dict[str, torch.Tensor]:
    """Model inputs for images `idx`: sequences cut to the longest in the batch; patches flattened."""
    targets = [k for k in VISION_TARGET_KEYS if k in data]  # object_cover only with a cover head
    keys = list(data) if caption else ["pixel_values", "image_grid_thw", *targets]
    batch = {k: data[k][idx] for k in keys}
    batch["pixel_values"] = batch["pixel_values"].flatten(0, 1)
    if caption:
        length = int(batch["attention_mask"].sum(1).max())
        for key in PAD_VALUES:
            if key in batch:
                batch[key] = batch[key][:, :length]
    return batch


def train_rows(data_dir: str, limit: int) -> dict[str, list[Any]]:
    """The training split's image, description and scene_json columns (the first `limit` rows; 0 = all)."""
    table = read_table(Path(data_dir) / "captions_train.parquet", "captions")
    if limit:
        table = table.slice(0, limit)
    return {k: table.column(k).to_pylist() for k in ("image", "description", "scene_json")}


def encode_once(args: argparse.Namespace) -> float:
    """Encode the training images once for every variant (their processors agree: same patch and merge sizes)
    with the recipe teacher's processor; returns the seconds taken."""
    clock = time.perf_counter()
    recipe = dev()
    init_dir = build_tiny_vlm(recipe.teacher, Path(args.work) / "encoder_init", image_size=recipe.world.image_size)
    encoded = encode_all(str(init_dir), train_rows(args.data, args.train_images), args.cpu_workers)
    torch.save(encoded, Path(args.work) / "encoded.pt")
    return time.perf_counter() - clock


def load_encoded(path: Path, model_dir: str, data_dir: str, device: torch.device
                 ) -> dict[str, torch.Tensor]:
    """The shared encoding, checked against this variant's own `CaptionTask.collate` on the first 8 rows."""
    data = torch.load(path)
    rows = train_rows(data_dir, 8)
    own = CaptionTask(model_dir=model_dir, style=STYLE, vision_aux_weight=1.0).collate(rows)
    shared = batch_of(data, torch.arange(8), caption=True)
    for key, value in own.items():
        if not torch.equal(value, shared[key]):
            raise RuntimeError(f"the shared encoding differs from {model_dir}'s own in {key!r}")
    return {k: v.to(device) for k, v in data.items()}


# ------------------------------------------------------------------------------------------ one phase


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_phase(task: Any, model: torch.nn.Module, data: dict[str, torch.Tensor], lcfg: LearnerConfig,
                budget_s: float, caption: bool, device: torch.device, log: Any) -> dict[str, Any]:
    """AdamW + the learner's schedule and clipping, random batches without replacement per epoch; the step count
    is cut (before the schedule is built) if 50 timed steps say the budget cannot reach it."""
    n = data["image_grid_thw"].shape[0]
    gen = torch.Generator().manual_seed(lcfg.seed)

    def batches():
        while True:
            perm = torch.randperm(n, generator=gen)
            for i in range(0, n - lcfg.micro_batch_size + 1, lcfg.micro_batch_size):
                yield perm[i:i + lcfg.micro_batch_size].to(device)

    stream = batches()

    def step(optimizer: Any, schedule: Any) -> dict[str, float]:
        loss, info = task.loss(model, batch_of(data, next(stream), caption))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), lcfg.grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        return info

    # probe the step rate with a throw-away optimiser: 50 steps, then start again from the same weights
    start_state = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer, schedule = build_optimizer(model, lcfg)
    for _ in range(5):
        step(optimizer, schedule)
    _sync(device)
    clock = time.perf_counter()
    for _ in range(45):
        step(optimizer, schedule)
    _sync(device)
    rate = 45 / (time.perf_counter() - clock)
    model.load_state_dict(start_state)
    asked = lcfg.max_steps
    steps = min(asked, max(1, int(rate * budget_s)))
    lcfg = dataclasses.replace(lcfg, max_steps=steps)
    optimizer, schedule = build_optimizer(model, lcfg)
    clock = time.perf_counter()
    history = []
    for i in range(1, steps + 1):
        info = step(optimizer, schedule)
        if time.perf_counter() - clock > 1.5 * budget_s:  # the probe misjudged (the GPU's other users changed)
            log(f"{task.name}: stopped at step {i} of {steps}, 1.5x over its {budget_s:.0f} s budget")
            steps = i
        if i % max(1, steps // 20) == 0 or i == steps:
            history.append({"step": i, "s": time.perf_counter() - clock, **info})
            log(f"{task.name} {i}/{steps} " + " ".join(f"{k} {v:.3f}" for k, v in info.items()))
        if i == steps:
            break
    return {"steps": steps, "asked_steps": asked, "probe_steps_per_s": rate,
            "seconds": time.perf_counter() - clock, "batch": lcfg.micro_batch_size,
            "images_seen": steps * lcfg.micro_batch_size, "history": history}


# ------------------------------------------------------------------------------------------ one variant


def run_variant(name: str, args: argparse.Namespace) -> dict[str, Any]:
    spec = VARIANTS[name]
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32, as the CPU recipe
    work = Path(args.work) / name
    recipe = dev()
    pcfg = recipe.pretrain_vlm
    vlm_cfg = dataclasses.replace(recipe.teacher, **spec["vlm"])
    init_dir = build_tiny_vlm(vlm_cfg, work / "init", image_size=recipe.world.image_size)
    log_file = open(work / "log.txt", "a")

    def log(msg: str) -> None:
        print(f"[{name}] {msg}", file=log_file, flush=True)

    data = load_encoded(Path(args.work) / "encoded.pt", str(init_dir), args.data, device)
    warm_cfg = dataclasses.replace(pcfg.vision, micro_batch_size=spec["warm_batch"], max_steps=spec["warm_steps"])
    cap_cfg = dataclasses.replace(pcfg.learner, micro_batch_size=spec["cap_batch"], max_steps=spec["cap_steps"])
    if args.smoke:  # 3 steps of 4 images per phase
        warm_cfg = dataclasses.replace(warm_cfg, micro_batch_size=4, max_steps=3)
        cap_cfg = dataclasses.replace(cap_cfg, micro_batch_size=4, max_steps=3, warmup_steps=1)

    warm_task = VisionWarmupTask(model_dir=str(init_dir), map_weight=pcfg.map_weight, cover_weight=pcfg.cover_weight)
    probe = warm_task.build_model().to(device)
    warm = train_phase(warm_task, probe, data, warm_cfg, args.warmup_s, False, device, log)
    warm_dir = work / "warm"
    probe.cpu().save(str(init_dir), warm_dir)

    cap_task = CaptionTask(model_dir=str(warm_dir), name="caption", style=pcfg.caption_style,
                           vision_aux_weight=pcfg.vision_aux_weight, map_weight=pcfg.map_weight,
                           cover_weight=pcfg.cover_weight, position_weight=pcfg.position_weight)
    model = cap_task.build_model().to(device)
    cap = train_phase(cap_task, model, data, cap_cfg, args.caption_s, True, device, log)
    final_dir = work / "final"
    cap_task.save_pretrained(model.cpu(), final_dir)
    del data, model, probe

    test = read_table(Path(args.data) / "captions_test.parquet", "captions").slice(0, args.eval_images).to_pylist()
    scenes = [Scene.from_json(r["scene_json"]) for r in test]
    defects = [Defects.from_json(r["defects_json"]) for r in test]
    vlm, processor = load_vlm(final_dir, device=device)
    clock = time.perf_counter()
    predictions = describe_images(vlm, processor, [decode_png(r["image"]) for r in test],
                                  pcfg.max_new_tokens, batch_size=args.eval_batch)
    eval_s = time.perf_counter() - clock
    metrics = caption_metrics(predictions, scenes, defects)
    log("final " + " ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    return {"variant": name, "params": count_parameters(final_dir), "vlm": dataclasses.asdict(vlm_cfg),
            "warmup": warm, "caption": cap, "eval_s": eval_s, "final": metrics,
            "slices": caption_slices(predictions, scenes, defects),
            "samples": [{"prediction": p, "truth": r["description"]} for p, r in zip(predictions[:8], test)]}


# ------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="a world's data dir (captions_train/test.parquet)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated: {', '.join(VARIANTS)}")
    parser.add_argument("--work", default="/tmp/gpu_pretrain_vlm", help="model dirs and logs")
    parser.add_argument("--out", default="", help="write every variant's results as JSON here")
    parser.add_argument("--warmup-s", type=float, default=60.0, help="time budget of the vision warm-up")
    parser.add_argument("--caption-s", type=float, default=180.0, help="time budget of the captioning phase")
    parser.add_argument("--eval-images", type=int, default=500)
    parser.add_argument("--eval-batch", type=int, default=128)
    parser.add_argument("--train-images", type=int, default=0, help="use only the first N (0 = all)")
    parser.add_argument("--cpu-workers", type=int, default=12, help="encoding processes")
    parser.add_argument("--smoke", action="store_true", help="a few steps on the CPU, few images")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown or not names:
        parser.error(f"--variants={args.variants!r}: unknown {unknown}; allowed: {', '.join(VARIANTS)}")
    if not (Path(args.data) / "captions_train.parquet").is_file():
        parser.error(f"--data={args.data!r}: no captions_train.parquet there (build a world: zray data)")
    if args.smoke:
        args.train_images, args.eval_images, args.eval_batch = args.train_images or 64, min(args.eval_images, 8), 8

    if args.child:  # one variant in this process
        (Path(args.work) / args.child).mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        result = run_variant(args.child, args)
        (Path(args.work) / args.child / "result.json").write_text(json.dumps(result, indent=1))
        return

    card = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.smoke else "CPU"
    print(f"device: {card}; variants {names}; budgets: warm-up {args.warmup_s:.0f} s, captioning "
          f"{args.caption_s:.0f} s each, concurrently", flush=True)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    print(f"encoded the training images once in {encode_once(args):.0f} s", flush=True)
    procs = {}
    for name in names:
        cmd = [sys.executable, __file__, "--child", name, *sys.argv[1:]]
        procs[name] = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "2"})
    results = []
    for name, proc in procs.items():
        rc = proc.wait()
        path = Path(args.work) / name / "result.json"
        if rc or not path.is_file():
            log = (Path(args.work) / name / "log.txt")
            print(f"[{name}] FAILED (exit {rc}); log tail:\n" + (log.read_text()[-2000:] if log.is_file() else ""))
            continue
        r = json.loads(path.read_text())
        results.append(r)
        f, w, c = r["final"], r["warmup"], r["caption"]
        print(f"[{name}] {r['params']:,} params; warm-up {w['steps']}/{w['asked_steps']} steps of {w['batch']} in "
              f"{w['seconds']:.0f} s; captioning {c['steps']}/{c['asked_steps']} steps of {c['batch']} "
              f"({c['images_seen']:,} images) in {c['seconds']:.0f} s; eval {r['eval_s']:.0f} s\n  "
              + " / ".join(f"{k} {100 * f[k]:.1f}" for k in ("background", "colour", "shape", "count", "relation",
                                                              "exact"))
              + f" on {int(f['num_images'])} held-out images\n  slices (shape): "
              + ", ".join(f"{s['slice']} {100 * s['shape']:.0f}% ({int(s['images'])})" for s in r["slices"]),
              flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"device": card, "args": vars(args), "results": results}, indent=1))
    if len(results) < len(names):
        raise SystemExit(f"{len(names) - len(results)} variant(s) failed")


if __name__ == "__main__":
    main()
