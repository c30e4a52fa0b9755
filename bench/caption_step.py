"""Captioning step cost: what length grouping and the answer-only LM head save, in one process.

    .venv/bin/python bench/caption_step.py                       # the dev teacher, micro batch 8, 1 thread
    .venv/bin/python bench/caption_step.py --model student --steps 40

Builds the dev recipe's tiny VLM (zray.models.tiny, random weights: the cost does not depend on them) and reads
the dev world's captions_train split (built if missing, as `zray pretrain-vlm` would). The rows are drawn by the
learner's own `ShardBatches`, once with `length_window=0` (a plain permutation) and once with the recipe's window,
and each batch is collated by `CaptionTask` (canonical captions, vision loss on). Timed per optimizer step
(forward, backward, AdamW; collation excluded), after `--warmup` untimed steps, alternating the variants round
by round so drifting CPU contention hits all of them alike:

- baseline: plain batches, LM head on every position (the full logits, as before the head was restricted);
- grouped: length-grouped batches, full logits;
- grouped + answer head: length-grouped batches and `CaptionTask`'s loss (LM head from the first answer on).

Printed: mean padded tokens per row, ms per step (median over rounds) and each variant's speed-up over the
baseline. The tokenizer's single-token chat words (a shorter prompt for every variant) are not part of the
comparison: their effect is counted in tokens (`--show-prompt`).

Recorded figures: docs/experiments.md (section 1, "27 Nov 2026: cheaper steps").
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def full_logits_loss(task, model, batch):
    """The caption loss with the LM head on every position (the pre-`logits_to_keep` path), plus the vision loss."""
    import torch

    from zray.models.vision_heads import VISION_TARGET_KEYS, visual_tokens
    from zray.tasks.caption import IGNORE_INDEX, LOSS_WEIGHTS

    captured = []
    hook = model.vlm.model.visual.register_forward_hook(
        lambda _m, _i, out: captured.append(visual_tokens(out, batch["image_grid_thw"].shape[0])))
    try:
        inputs = {k: v for k, v in batch.items() if k not in ("labels", LOSS_WEIGHTS, *VISION_TARGET_KEYS)}
        logits = model.vlm(**inputs, use_cache=False).logits[:, :-1].float()
    finally:
        hook.remove()
    target = batch["labels"][:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=IGNORE_INDEX)
    vision, _ = model.heads.loss(captured[0], batch, task.map_weight, task.cover_weight)
    return ce + task.vision_aux_weight * vision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("teacher", "student"), default="teacher")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant and round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--show-prompt", action="store_true", help="print the tokens of one prompt")
    args = parser.parse_args()

    import torch

    from zray.training.shards import ShardBatches
    from jobs.recipes import RECIPES
    from zray.config import LearnerConfig
    from zray.data import ensure_world, read_table
    from zray.tasks.caption import CaptionTask
    from zray.models.tiny import build_tiny_vlm

    torch.set_num_threads(args.threads)
    cfg = RECIPES["dev"]()
    pcfg = cfg.pretrain_vlm
    data_dir = ensure_world(cfg.world, os.path.join(cfg.out_dir, "data"))
    columns = read_table(os.path.join(data_dir, "captions_train.parquet"), "captions").select(
        ["image", "description", "scene_json"]).to_pydict()

    class Shard:  # what ShardBatches reads: numpy batches of the split
        def iter_batches(self, batch_size, batch_format):
            import numpy as np

            yield {k: np.array(v, dtype=object) for k, v in columns.items()}

    tmp = tempfile.TemporaryDirectory()
    model_dir = build_tiny_vlm(getattr(cfg, args.model), os.path.join(tmp.name, args.model),
                               image_size=cfg.world.image_size)
    task = CaptionTask(model_dir=str(model_dir), style=pcfg.caption_style, vision_aux_weight=pcfg.vision_aux_weight,
                       map_weight=pcfg.map_weight, cover_weight=pcfg.cover_weight)
    if args.show_prompt:
        batch = task.collate({k: v[:1] for k, v in columns.items()})
        tok = task.processor.tokenizer
        first_answer = int((batch["labels"][0] != -100).nonzero()[0])
        prompt = batch["input_ids"][0][:first_answer]
        print(f"prompt: {len(prompt)} tokens:", [tok.decode([int(i)]) for i in prompt])
    window = pcfg.learner.length_window or 8
    micro = pcfg.learner.micro_batch_size
    sources = {"plain": ShardBatches(Shard(), LearnerConfig(micro_batch_size=micro), rank=0),
               "grouped": ShardBatches(Shard(), LearnerConfig(micro_batch_size=micro, length_window=window), rank=0,
                                       lengths_of=task.row_lengths)}
    variants = {"baseline": ("plain", full_logits_loss), "grouped": ("grouped", full_logits_loss),
                "grouped + answer head": ("grouped", lambda t, m, b: t.loss(m, b)[0])}
    n = args.warmup + args.steps
    batches = {name: [task.collate(src[i]) for i in range(n * args.rounds)] for name, src in sources.items()}
    padded = {name: statistics.mean(b["input_ids"].shape[1] for b in bs) for name, bs in batches.items()}
    torch.manual_seed(0)
    model = task.build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.rounds):
        for name, (source, loss_fn) in variants.items():
            chunk = batches[source][r * n:(r + 1) * n]
            for i, batch in enumerate(chunk):
                if i == args.warmup:
                    start = time.perf_counter()
                loss = loss_fn(task, model, batch)
                loss.backward()
                opt.step()
                opt.zero_grad()
            times[name].append((time.perf_counter() - start) / args.steps * 1000)
    print(f"dev {args.model}, micro batch {pcfg.learner.micro_batch_size}, {args.threads} thread(s), "
          f"length_window {window}; padded tokens per row: plain {padded['plain']:.1f}, grouped "
          f"{padded['grouped']:.1f}")
    base = statistics.median(times["baseline"])
    for name, ts in times.items():
        ms = statistics.median(ts)
        print(f"  {name:24s} {ms:7.1f} ms/step   speed-up x{base / ms:.2f}")


if __name__ == "__main__":
    main()
