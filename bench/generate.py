"""Images/s of 8-step vs 2-step sampling with one generator, in the same run, from the same noise (CPU).

    .venv/bin/python bench/generate.py                    # the dev recipe's generator shape, random weights, 64 px
    .venv/bin/python bench/generate.py --pipeline runs/dev/pretrain_generator/pipeline   # a trained pipeline
    .venv/bin/python bench/generate.py --pipeline-call    # also time ZImagePipeline.__call__ (cross-check)
    .venv/bin/python bench/generate.py --recipe tiny_cpu --images 8 --rounds 2          # seconds

The generator is the `--recipe`'s (default dev: transformer dim 128, 4 layers; VAE 64 px -> 16x16x16 latents)
built from config with random weights by `zray.models.tiny.build_tiny_zimage` into a temporary dir, or a saved
pipeline (`--pipeline DIR`). `--images` Shapes-world prompts (`zray.data` grammar, seeded) are generated in batches
of `--batch`, each the full pipeline: text encoding (`encode_prompts`), the transformer's Euler steps
(`zray.sampling.sample` over `flow_sigmas(steps)`), VAE decode (`vae_decode`), under `torch.inference_mode`. The
8-step and 2-step runs start from the same noise (`initial_noise`). One warm-up batch of each first, then
`--rounds` rounds, the order alternating (8 then 2, 2 then 8, ...); the median round is printed per phase.

Printed: per step count the seconds per round of each phase (encode / transformer / decode), images/s, then the
ratio 2-step / 8-step images/s against the limit of 4 (8 / 2 transformer calls) and how close it comes.

Why the ratio is below 4: only the transformer's work scales with the number of steps. Text encoding and VAE decode
run once per image whatever the step count, so with E + D their time and T one transformer step,
ratio = (E + D + 8 T) / (E + D + 2 T) < 4. The script prints that prediction from the measured phases and the
transformer-only ratio (which should be close to 4). The fixed costs weigh more here than at 1024 px on a GPU
(bench/gpu_generate.py), where the 6B transformer dominates.

Correctness (exit 1 on failure): the images of zray's sampler equal `ZImagePipeline.__call__`'s on the same noise and
prompts, 8 and 2 steps, for the first batch (max |diff| <= `--atol`, float32). With `--pipeline-call` the pipeline's
own call is timed as well (in the same rounds, interleaved), as a cross-check of the figures.

`--threads` (default 1) sets torch's intra-op threads: this machine's 2 cores are often shared with a training run.
Imports torch, diffusers, transformers and zray's core; no Ray. Recorded runs: docs/experiments.md (section 3).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.recipes import RECIPES  # noqa: E402
from zray.data import prompt_for, sample_scene  # noqa: E402
from zray.models.generator import (  # noqa: E402
    DEFAULT_MAX_SEQUENCE_LENGTH, encode_prompts, initial_noise, load_zimage, transformer_fn, vae_decode)
from zray.sampling import flow_sigmas, sample  # noqa: E402

PHASES = ("encode", "transformer", "decode")
STEP_LIMIT = 4.0  # 8 / 2 transformer calls: the ratio if nothing but the transformer cost anything


def shapes_prompts(num: int, seed: int, max_objects: int = 3, relation_prob: float = 0.3) -> list[str]:
    """`num` Shapes-world prompts from the world's grammar (seeded; repeats possible)."""
    rng = np.random.default_rng(seed)
    return [prompt_for(sample_scene(rng, max_objects, relation_prob)) for _ in range(num)]


def generate_phases(pipe: Any, prompts: Sequence[str], noise_BCHW: torch.Tensor, steps: int, *,
                    transformer: Any = None, sync: Callable[[], None] = lambda: None,
                    shift: float = 3.0) -> tuple[torch.Tensor, dict[str, float]]:
    """(images [B, 3, H, W] in [0, 1], seconds per phase): encode, `steps` Euler steps, decode, timed apart.

    `transformer` replaces the pipeline's (e.g. a `torch.compile`d one); `sync` waits for the device before each
    clock reading (`torch.cuda.synchronize` on a GPU). Runs in the caller's grad mode.
    """
    net = pipe.transformer if transformer is None else transformer
    clock = [time.perf_counter()]

    def tick() -> None:
        sync()
        clock.append(time.perf_counter())

    cond = encode_prompts(pipe.text_encoder, pipe.tokenizer, prompts, DEFAULT_MAX_SEQUENCE_LENGTH)
    tick()
    latents = sample(transformer_fn(net), noise_BCHW.to(pipe.transformer.device), flow_sigmas(steps, shift), cond)
    tick()
    images = (vae_decode(pipe.vae, latents).float() * 0.5 + 0.5).clamp(0, 1)
    tick()
    return images, {name: clock[i + 1] - clock[i] for i, name in enumerate(PHASES)}


def pipeline_call(pipe: Any, prompts: Sequence[str], noise_BCHW: torch.Tensor, steps: int) -> torch.Tensor:
    """The same images through `ZImagePipeline.__call__` (guidance 0, the same noise as `latents`)."""
    size = noise_BCHW.shape[-1] * pipe.vae_scale_factor
    return pipe(prompt=list(prompts), height=size, width=size, num_inference_steps=steps, guidance_scale=0.0,
                latents=noise_BCHW, max_sequence_length=DEFAULT_MAX_SEQUENCE_LENGTH, output_type="pt").images


def run_rounds(keys: Sequence[Any], rounds: int, one: Callable[[Any], dict[str, float]]
               ) -> dict[Any, list[dict[str, float]]]:
    """`one(key)` for every key (a step count, or (variant, steps)), `rounds` times, the order reversed every other
    round, so that a slow spell of a shared machine falls on every key alike."""
    out: dict[Any, list[dict[str, float]]] = {k: [] for k in keys}
    for r in range(rounds):
        for key in (keys if r % 2 == 0 else list(reversed(keys))):
            out[key].append(one(key))
    return out


def median_round(times: list[dict[str, float]]) -> dict[str, float]:
    """The median of each phase over the rounds, and `total` the median of the rounds' totals."""
    med = {k: statistics.median(t[k] for t in times) for k in times[0]}
    med["total"] = statistics.median(sum(t.values()) for t in times)
    return med


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", choices=tuple(RECIPES), default="dev",
                        help="whose generator shape and image size to build (not 'full': see bench/gpu_generate.py)")
    parser.add_argument("--pipeline", default="", help="a saved ZImagePipeline dir instead of a random one")
    parser.add_argument("--images", type=int, default=32, help="images per round and step count")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--size", type=int, default=0, help="image side in px (default: the recipe's world)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--atol", type=float, default=1e-4, help="max |zray sampler - pipeline call| on images")
    parser.add_argument("--pipeline-call", action="store_true", help="also time ZImagePipeline.__call__")
    args = parser.parse_args()
    if args.recipe == "full" and not args.pipeline:
        raise SystemExit("--recipe full is a 6B transformer: use bench/gpu_generate.py on a GPU")
    if min(args.images, args.batch, args.rounds, args.threads) < 1:
        raise SystemExit("--images, --batch, --rounds and --threads must be positive")
    torch.set_num_threads(args.threads)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    cfg = RECIPES[args.recipe]()
    size = args.size or cfg.world.image_size

    clock = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.pipeline:
            source = args.pipeline
        else:
            from zray.models.tiny import build_tiny_zimage

            source = build_tiny_zimage(cfg.generator, Path(tmp) / "pipeline", image_size=size)
        pipe = load_zimage(source)
    num_params = {name: sum(p.numel() for p in getattr(pipe, name).parameters())
                  for name in ("text_encoder", "transformer", "vae")}
    prompts = shapes_prompts(args.images, args.seed, cfg.world.max_objects, cfg.world.relation_prob)
    noise = initial_noise(pipe, args.images, args.seed, size, size)
    batches = [(prompts[i:i + args.batch], noise[i:i + args.batch]) for i in range(0, args.images, args.batch)]
    print(f"generator: {args.pipeline or args.recipe + ' recipe shape, random weights'}; parameters: "
          + ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in num_params.items())
          + f"; {size}x{size} px -> latents {tuple(noise.shape[1:])}; built in {time.perf_counter() - clock:.1f} s")
    print(f"{args.images} images per round in batches of {args.batch}, {args.rounds} rounds, "
          f"{args.threads} thread(s); load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")

    ok = True
    with torch.inference_mode():
        for steps in (8, 2):  # correctness and warm-up: zray's sampler against the pipeline's own call
            ours, _ = generate_phases(pipe, *batches[0], steps)
            theirs = pipeline_call(pipe, *batches[0], steps)
            diff = float((ours - theirs.float()).abs().max())
            ok &= diff <= args.atol
            print(f"  check {steps}-step: zray sampler vs ZImagePipeline.__call__, max |diff| {diff:.2e} "
                  f"(tolerance {args.atol:g}) {'ok' if diff <= args.atol else 'FAILED'}")

        def one_round(key: tuple[str, int]) -> dict[str, float]:
            variant, steps = key
            if variant == "call":
                start = time.perf_counter()
                for batch_prompts, batch_noise in batches:
                    pipeline_call(pipe, batch_prompts, batch_noise, steps)
                return {"call": time.perf_counter() - start}
            totals = dict.fromkeys(PHASES, 0.0)
            for batch_prompts, batch_noise in batches:
                for k, v in generate_phases(pipe, batch_prompts, batch_noise, steps)[1].items():
                    totals[k] += v
            return totals

        keys = [("zray", 8), ("zray", 2)] + ([("call", 8), ("call", 2)] if args.pipeline_call else [])
        rounds = {key: median_round(t) for key, t in run_rounds(keys, args.rounds, one_round).items()}
        results = {steps: rounds["zray", steps] for steps in (8, 2)}
        calls = {steps: rounds["call", steps] for steps in (8, 2)} if args.pipeline_call else {}

    print(f"\n{'steps':>5} {'encode s':>9} {'transf. s':>9} {'decode s':>9} {'total s':>9} {'images/s':>9}"
          f"   (median round of {args.images} images)")
    for steps, med in results.items():
        print(f"{steps:5d} " + " ".join(f"{med[k]:9.4f}" for k in PHASES)
              + f" {med['total']:9.4f} {args.images / med['total']:9.1f}")
    m8, m2 = results[8], results[2]
    ratio = m8["total"] / m2["total"]
    fixed = m8["encode"] + m8["decode"]
    per_step = m8["transformer"] / 8
    predicted = (fixed + 8 * per_step) / (fixed + 2 * per_step)
    print(f"\n2-step / 8-step images/s: {ratio:.2f}x, {100 * ratio / STEP_LIMIT:.0f}% of the {STEP_LIMIT:.0f}x limit "
          f"(8 / 2 transformer calls)")
    print(f"  transformer only: {m8['transformer'] / m2['transformer']:.2f}x; fixed costs (encode + decode) "
          f"{fixed:.4f} s = {100 * fixed / m8['total']:.0f}% of an 8-step round, "
          f"{100 * fixed / m2['total']:.0f}% of a 2-step round; predicted from the phases "
          f"(E + D + 8T) / (E + D + 2T) = {predicted:.2f}x")
    if calls:
        c8, c2 = calls[8]["call"], calls[2]["call"]
        print(f"  ZImagePipeline.__call__: 8-step {args.images / c8:.1f} images/s, 2-step {args.images / c2:.1f} "
              f"images/s, ratio {c8 / c2:.2f}x (its images/s over zray's sampler's: 8-step {m8['total'] / c8:.2f}x, "
              f"2-step {m2['total'] / c2:.2f}x)")
    if not ok:
        print("FAILED: zray's sampler and ZImagePipeline.__call__ disagree")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
