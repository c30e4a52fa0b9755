"""The reward student's scoring forward on one GPU: images/s of HF eager vs the batched path, same run, same rows.

    python bench/gpu_score.py                        # the full recipe's student shape (Qwen3-VL-8B), 448x448, bf16
    python bench/gpu_score.py --smoke                # the tiny_cpu student on the CPU, float32: seconds

The model is the `full` recipe's student (`jobs.recipes.full().student`: a Qwen3-VL-8B shape) built from config
with random weights, bf16, with the few fields zray's tiny builder sizes down set back to Qwen3-VL-8B's
(`REAL_SIZE`: vocabulary, vision MLP, learned position grid, deepstack layers) and its score-token rows of
lm_head sharpened (as `zray.models.tiny.sharpen_score_head`), so that q depends clearly on the input. Processor and
tokenizer are zray's local ones (`zray.models.tiny.build_processor`: no download). A row is one (image, prompt,
rubric dimension): the scoring context of `zray.rubric.render_score_context` (student form) and a `--image-size`
square image, the dimensions in turn. The reward service scores a four-dimension request as four rows.

Variants (each from PIL images to q on the host, per batch; `--variants` picks):

- eager: the plain transformers way: `processor(text, images)` on the CPU, `model(**inputs)` (all logits),
  `torch.no_grad`, batch `--eager-batch`. The baseline.
- eager_big: the same at batch `--batch` (does eager gain from a larger batch?).
- processor_last: the processor, then `logits_to_keep=1`, `torch.inference_mode`, batch `--batch` (the reward
  service's `score_distributions_hf`, at a larger batch).
- batched: the candidate: pixels preprocessed in torch on the device (`zray.models.reward.preprocess_images`, as
  the differentiable reward does it), token ids from the processor's tokenizer with the image placeholders
  expanded, `logits_to_keep=1`, `torch.inference_mode`, batch `--batch`.

Every variant scores the same `--rows` rows after one warm-up batch; printed: images (rows) / s, ms per batch,
the ratio to eager, and the largest difference of q (nine bins) and of the expected score mu against eager on
the same rows. The check fails (exit 1) above `--atol-q` / `--atol-mu` (defaults: 0.02 / 0.05 on the 1..5 scale
in bf16, where batch shape and padding change the rounding; 1e-4 / 1e-4 in float32).

Imports torch, transformers and zray's core (`zray.models.tiny`, `zray.models.reward`, `zray.rubric`,
`zray.scores`, and the recipe from `jobs.recipes`); no Ray, vLLM or DeepSpeed. Run from the repository root.
No recorded runs yet; record them in docs/experiments.md (section 5).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.recipes import full, tiny_cpu  # noqa: E402
from zray.models.reward import PixelSpec, preprocess_images  # noqa: E402
from zray.models.tiny import build_processor, vlm_hf_config  # noqa: E402
from zray.rubric import DIMENSIONS, render_score_context  # noqa: E402
from zray.scores import expected_score, score_distribution, score_token_ids  # noqa: E402

# Qwen/Qwen3-VL-8B-Instruct's config.json values that zray's tiny builder derives otherwise.
REAL_SIZE = dict(vocab_size=151936, vision_intermediate_size=4304, num_position_embeddings=2304,
                 deepstack_visual_indexes=[8, 16, 24])
VARIANTS = {  # name: (preprocessing, all logits or the last only, batch option)
    "eager": ("processor", "all", "eager_batch"),
    "eager_big": ("processor", "all", "batch"),
    "processor_last": ("processor", "last", "batch"),
    "batched": ("torch", "last", "batch"),
}
PROMPTS = ("a red circle left of a blue square", "two green triangles on a white background",
           "a yellow star above three small purple circles", "an orange square", "a blue circle and a red star")


def build_model(size: str, image_size: int, dtype: torch.dtype, device: str):
    """(model, processor, score_ids) of the recipe's student shape, random weights, in eval mode."""
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration

    cfg = dataclasses.replace((full() if size == "8b" else tiny_cpu()).student, checkpoint="")
    processor = build_processor(cfg, image_size)
    hf_cfg = vlm_hf_config(cfg, processor.tokenizer, image_size)
    if size == "8b":
        hf_cfg.text_config.vocab_size = REAL_SIZE["vocab_size"]
        hf_cfg.vision_config.intermediate_size = REAL_SIZE["vision_intermediate_size"]
        hf_cfg.vision_config.num_position_embeddings = REAL_SIZE["num_position_embeddings"]
        hf_cfg.vision_config.deepstack_visual_indexes = REAL_SIZE["deepstack_visual_indexes"]
    model_cls = Qwen3VLForConditionalGeneration if cfg.arch == "qwen3_vl" else Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(cfg.seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: no transient float32 copy of 8 B parameters
    try:
        with torch.device(device):
            model = model_cls(hf_cfg).to(dtype).eval()
    finally:
        torch.set_default_dtype(default)
    score_ids = score_token_ids(processor)
    sharpen_score_head(model, score_ids, scale=3.0, seed=cfg.seed)
    return model, processor, score_ids


def sharpen_score_head(model, score_ids: list[int], scale: float, seed: int) -> None:
    """`zray.models.tiny.sharpen_score_head` on the head's device: the score-token rows of lm_head get random
    directions of norm `scale`, so that q depends clearly on the input."""
    head = model.get_output_embeddings().weight
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(len(score_ids), head.shape[1], generator=gen)
    rows = rows / rows.norm(dim=1, keepdim=True) * scale
    with torch.no_grad():
        head[torch.as_tensor(score_ids, device=head.device)] = rows.to(head.device, head.dtype)


def make_rows(num_rows: int, num_images: int, side: int, seed: int = 0) -> list[tuple]:
    """(PIL image, prompt, dimension) rows: `num_images` smooth random images, prompts and dimensions in turn."""
    import torch.nn.functional as F
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_images, 3, 8, 8, generator=gen)
    fine = F.interpolate(coarse, size=(side, side), mode="bicubic", align_corners=False)
    fine = (fine + 0.1 * torch.rand(fine.shape, generator=gen)).clamp(0, 1)
    images = [Image.fromarray((255 * im.permute(1, 2, 0)).round().byte().numpy()) for im in fine]
    return [(images[i % num_images], PROMPTS[i % len(PROMPTS)], DIMENSIONS[i % len(DIMENSIONS)])
            for i in range(num_rows)]


def eager_inputs(processor, rows, device):
    texts = [render_score_context(processor, prompt, dim, None) for _, prompt, dim in rows]
    inputs = processor(text=texts, images=[image for image, _, _ in rows], return_tensors="pt", padding=True,
                       padding_side="left")
    return inputs.to(device)


def batched_inputs(processor, spec: PixelSpec, rows, device, dtype):
    """What `zray.models.reward.DifferentiableReward` feeds the model: pixels preprocessed in torch on `device`,
    token ids with the image placeholders expanded, left padded."""
    import numpy as np

    pixels = torch.from_numpy(np.stack([np.asarray(image) for image, _, _ in rows]))  # B, H, W, C uint8
    pixels = pixels.to(device, non_blocking=True).permute(0, 3, 1, 2).float() / 255.0
    pixel_values, grid = preprocess_images(pixels, spec)
    height, width = spec.target_size(*pixels.shape[-2:])
    num_tokens = (height // spec.patch_size) * (width // spec.patch_size) // spec.merge_size ** 2
    image_token = processor.image_token
    texts = [render_score_context(processor, prompt, dim, None).replace(image_token, image_token * num_tokens)
             for _, prompt, dim in rows]
    text = processor(text=texts, return_tensors="pt", padding=True, padding_side="left")
    inputs = {k: text[k].to(device) for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    return dict(inputs, pixel_values=pixel_values.to(dtype), image_grid_thw=grid)


def score_batch(model, processor, spec, score_ids, rows, variant: str, device, dtype) -> torch.Tensor:
    """q_BK (float32, on the host) of `rows` by `variant`."""
    preprocess, logits, _ = VARIANTS[variant]
    grad_mode = torch.inference_mode() if logits == "last" else torch.no_grad()
    with grad_mode:
        inputs = (eager_inputs(processor, rows, device) if preprocess == "processor"
                  else batched_inputs(processor, spec, rows, device, dtype))
        kwargs = {"logits_to_keep": 1} if logits == "last" else {}
        out = model(**inputs, use_cache=False, **kwargs)
        return score_distribution(out.logits[:, -1, :], score_ids).float().cpu()


def run_variant(model, processor, spec, score_ids, rows, variant, batch, device, dtype):
    """(q_RK of every row, seconds per batch) after one uncounted warm-up batch."""
    score_batch(model, processor, spec, score_ids, rows[:batch], variant, device, dtype)
    qs, times = [], []
    for start in range(0, len(rows), batch):
        clock = time.perf_counter()
        qs.append(score_batch(model, processor, spec, score_ids, rows[start:start + batch], variant, device, dtype))
        times.append(time.perf_counter() - clock)  # .cpu() of q synchronises the device
    return torch.cat(qs), times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("8b", "tiny"), default="8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--eager-batch", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rows", type=int, default=256, help="rows scored by each variant (after a warm-up batch)")
    parser.add_argument("--images", type=int, default=32, help="distinct images among the rows")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {list(VARIANTS)}")
    parser.add_argument("--atol-q", type=float, default=None, help="max |q - q_eager| (default by dtype)")
    parser.add_argument("--atol-mu", type=float, default=None, help="max |mu - mu_eager| (default by dtype)")
    parser.add_argument("--smoke", action="store_true", help="the tiny_cpu student on the CPU, 64 px, 24 rows")
    args = parser.parse_args()
    if args.smoke:
        args.size, args.device, args.image_size, args.eager_batch, args.batch, args.rows, args.images = (
            "tiny", "cpu", 64, 4, 12, 24, 6)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        raise SystemExit(f"--variants {args.variants!r}: unknown {unknown}; expected some of {list(VARIANTS)}")
    if min(args.eager_batch, args.batch, args.rows, args.images) < 1:
        raise SystemExit("--eager-batch, --batch, --rows and --images must be positive")
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke (the tiny student on the CPU)")
    dtype = torch.bfloat16 if cuda else torch.float32
    atol_q = args.atol_q if args.atol_q is not None else (0.02 if dtype == torch.bfloat16 else 1e-4)
    atol_mu = args.atol_mu if args.atol_mu is not None else (0.05 if dtype == torch.bfloat16 else 1e-4)

    clock = time.perf_counter()
    model, processor, score_ids = build_model(args.size, args.image_size, dtype, args.device)
    spec = PixelSpec.from_image_processor(processor.image_processor)
    rows = make_rows(args.rows, args.images, args.image_size)
    num_params = sum(p.numel() for p in model.parameters())
    seq_len = eager_inputs(processor, rows[:1], "cpu")["input_ids"].shape[1]
    print(f"{args.size}: {num_params / 1e6:,.1f} M parameters ({dtype}), built in {time.perf_counter() - clock:.0f} s; "
          f"{args.rows} rows of {args.image_size}x{args.image_size} images, {seq_len} tokens each; {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if cuda else f" ({torch.get_num_threads()} threads)"))

    results = {}
    for variant in variants:
        batch = getattr(args, VARIANTS[variant][2])
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        q, times = run_variant(model, processor, spec, score_ids, rows, variant, batch, args.device, dtype)
        peak = f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if cuda else ""
        results[variant] = (q, sum(times), batch)
        print(f"  {variant:15s} batch {batch:3d}: {len(rows) / sum(times):8.1f} images/s, "
              f"median {statistics.median(times) * 1e3:8.1f} ms per batch{peak}", flush=True)

    base_name = "eager" if "eager" in results else variants[0]
    q_base, base_s, _ = results[base_name]
    mu_base = expected_score(q_base.double())
    print(f"\n{'variant':15s} {'batch':>5} {'images/s':>9} {'ratio':>7} {'max|dq|':>9} {'max|dmu|':>9}   "
          f"(against {base_name}; mu spread over the rows: std {float(mu_base.std()):.3f})")
    worst_q = worst_mu = 0.0
    for variant, (q, seconds, batch) in results.items():
        dq = float((q.double() - q_base.double()).abs().max())
        dmu = float((expected_score(q.double()) - mu_base).abs().max())
        worst_q, worst_mu = max(worst_q, dq), max(worst_mu, dmu)
        print(f"{variant:15s} {batch:5d} {len(rows) / seconds:9.1f} {base_s / seconds:6.2f}x {dq:9.2e} {dmu:9.2e}")
    ok = worst_q <= atol_q and worst_mu <= atol_mu
    print(f"score distributions {'agree' if ok else 'DIFFER'}: max |dq| {worst_q:.2e} (tolerance {atol_q:g}), "
          f"max |dmu| {worst_mu:.2e} (tolerance {atol_mu:g})")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
