"""Z-Image at 1024x1024 on one GPU: 8-step vs 2-step sampling (eager and torch.compile), one Turbo++ step and one
reward-gradient step, with time and peak memory.

    python bench/gpu_generate.py                          # the full recipe's shapes, 1024 px, bf16, on CUDA
    python bench/gpu_generate.py --no-compile             # eager only (compiling takes about a minute)
    python bench/gpu_generate.py --decoupling copies      # the Turbo++ student as two full copies: ~110 GiB, an H200
    python bench/gpu_generate.py --smoke                  # tiny_cpu shapes on the CPU, float32, 64 px: seconds

The networks are built from config with random weights (no download): the `full` recipe's generator
(`jobs.recipes.full().generator`: ZImageTransformer2DModel dim 3840, 30 + 2 + 2 layers, 6.15B parameters, the
diffusers default config), a Flux-style AutoencoderKL (block channels 128-256-512-512, `REAL_VAE`) and a
Qwen3-4B-shaped text encoder (`REAL_TEXT`), assembled as `zray.models.tiny.build_tiny_zimage` does it; the reward's
VLM is the `full` recipe's student (a Qwen3-VL-8B shape) as bench/gpu_score.py builds it. bf16 on CUDA.

Measured (batch `--batch`, Shapes-world prompts; every phase timed with a device synchronisation):

1. Sampling, 8 vs 2 steps from the same noise (bench/generate.py's `generate_phases`: text encoding, zray's Euler
   sampler, VAE decode), eager, then with the transformer under `torch.compile` (unless `--no-compile`): one warm-up
   (the compile) and `--rounds` rounds in alternating order, median. Compared with the reference: transformer steps
   + VAE decode (the text encoding is printed apart).
2. One Turbo++ step (methods.md §6): the teacher's 8 no-grad steps (targets x0_T and x_T4), a discriminator step
   (student samples without grad; `LADDDiscriminator` on the frozen teacher, real and fake; hinge loss; AdamW on the
   heads), a generator step (`TwoStepStudent`, end to end; D on x0_2 with gradient through the frozen transformer;
   `generator_loss` with the step-1 regression; AdamW). Decoupling "lora" (default: one trunk copy with two
   adapters) or "copies". Gradient checkpointing on every transformer.
3. One reward-gradient step (methods.md §5): no-grad sampling to step `--reward-k` of 8, one transformer call with
   gradient (checkpointing, every parameter trainable), jump to x0_hat, VAE decode with gradient,
   `DifferentiableReward` (torch preprocessing, the frozen VLM once per rubric dimension of `--dimensions`, default
   all four; R = mean of mu_d), backward of -R (no optimizer step). The reference's 0.955 s is the part with gradient
   (how many dimensions it scored is not recorded).

Both steps: one warm-up step, then `--train-steps` timed, median; peak = `torch.cuda.max_memory_allocated` over the
timed steps (weights included).

Checks (exit 1 on failure, after the table): at the tiny size on the CPU in float32, zray's sampler equals
`ZImagePipeline.__call__` on the same noise (8 and 2 steps), `two_step_sample` with one network equals two Euler
steps, and the in-memory reward equals a `DifferentiableReward` loaded from disk (scores and image gradients); at the
run's size, the Turbo++ student at initialisation reproduces the teacher's 2-step sampler on the same noise, and its
generator step gives both steps a finite, non-zero gradient. The compiled sampler's difference from eager is printed.

Imports torch, transformers, diffusers, peft (for "lora") and zray's core; no Ray, vLLM or DeepSpeed. Run from the
repository root. No recorded GPU run yet; record one in docs/experiments.md (section 3).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.generate import generate_phases, median_round, run_rounds, shapes_prompts  # noqa: E402
from bench.gpu_score import build_model as build_reward_vlm  # noqa: E402
from jobs.recipes import full, tiny_cpu  # noqa: E402
from zray.config import GeneratorConfig  # noqa: E402
from zray.losses.turbo import discriminator_hinge_loss, generator_loss  # noqa: E402
from zray.models.generator import encode_prompts, transformer_fn, transformer_forward, vae_decode  # noqa: E402
from zray.models.reward import DifferentiableReward  # noqa: E402
from zray.models.tiny import (MAX_POSITION_EMBEDDINGS, QWEN3_TEXT_CHAT_TEMPLATE, TEXT_ENCODER_HEAD_DIM,  # noqa: E402
                              TEXT_ENCODER_MLP_RATIO, build_tokenizer)
from zray.rubric import DIMENSIONS  # noqa: E402
from zray.sampling import flow_sigmas, model_time, sample, two_step_sample, x0_from_velocity  # noqa: E402

# Z-Image-Turbo's parts where the recipe's GeneratorConfig keeps tiny-builder values: its Flux VAE and Qwen3-4B encoder.
REAL_VAE = dict(layers_per_block=2, norm_num_groups=32, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False)
REAL_TEXT = dict(intermediate_size=9728, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                 vocab_size=151936, rope_theta=1e6, tie_word_embeddings=True)
# issue 17, one H200, bf16, batch 1, 1024 px: seconds of transformer steps + VAE decode; the reward step's grad part.
REFERENCE = {("eager", 8): 1.265, ("eager", 2): 0.377, ("compiled", 8): 0.840, ("compiled", 2): 0.242,
             "reward_s": 0.955, "reward_gib": 42.6}


def build_pipeline(cfg: GeneratorConfig, real: bool, image_size: int, dtype: torch.dtype, device: str) -> Any:
    """A `ZImagePipeline` in memory, random weights: `build_tiny_zimage`'s parts, at Z-Image's real VAE and text
    encoder shapes when `real`."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = build_tokenizer()
    tokenizer.chat_template = QWEN3_TEXT_CHAT_TEMPLATE
    head_dim = cfg.dim // cfg.num_heads
    axes_t = head_dim // 4 // 2 * 2  # as build_tiny_zimage: [32, 48, 48] at head_dim 128 (Z-Image's)
    axes_h = (head_dim - axes_t) // 2 // 2 * 2
    n = len(cfg.vae_block_channels)
    vae_kwargs = dict(layers_per_block=cfg.vae_layers_per_block, norm_num_groups=cfg.vae_norm_groups,
                      scaling_factor=1.0, shift_factor=0.0) | (REAL_VAE if real else {})
    heads = max(1, cfg.text_hidden_size // TEXT_ENCODER_HEAD_DIM)
    text_kwargs = dict(vocab_size=len(tokenizer), intermediate_size=TEXT_ENCODER_MLP_RATIO * cfg.text_hidden_size,
                       num_attention_heads=heads, num_key_value_heads=heads, head_dim=TEXT_ENCODER_HEAD_DIM,
                       tie_word_embeddings=False) | (REAL_TEXT if real else {})
    torch.manual_seed(cfg.seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: no transient float32 copy of 6 B parameters
    try:
        with torch.device(device):
            transformer = ZImageTransformer2DModel(
                all_patch_size=(2,), all_f_patch_size=(1,), in_channels=cfg.vae_latent_channels, dim=cfg.dim,
                n_layers=cfg.num_layers, n_refiner_layers=cfg.num_refiner_layers, n_heads=cfg.num_heads,
                n_kv_heads=cfg.num_heads, cap_feat_dim=cfg.text_hidden_size,
                axes_dims=[axes_t, axes_h, head_dim - axes_t - axes_h], axes_lens=[1024, 512, 512])
            vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                                up_block_types=("UpDecoderBlock2D",) * n,
                                block_out_channels=tuple(cfg.vae_block_channels),
                                latent_channels=cfg.vae_latent_channels, sample_size=image_size, **vae_kwargs)
            text_encoder = Qwen3Model(Qwen3Config(
                hidden_size=cfg.text_hidden_size, num_hidden_layers=cfg.text_num_layers,
                max_position_embeddings=MAX_POSITION_EMBEDDINGS, pad_token_id=tokenizer.pad_token_id, **text_kwargs))
    finally:
        torch.set_default_dtype(default)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    pipe = ZImagePipeline(scheduler=scheduler, vae=vae.to(dtype).eval(), text_encoder=text_encoder.to(dtype).eval(),
                          tokenizer=tokenizer, transformer=transformer.to(dtype).eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Clock:
    """Phase times with a device synchronisation before each reading."""

    def __init__(self, device: str) -> None:
        self.sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        self.times: dict[str, float] = {}
        self.sync()
        self.last = time.perf_counter()

    def tick(self, name: str) -> None:
        self.sync()
        now = time.perf_counter()
        self.times[name] = now - self.last
        self.last = now


def gib(peak: float) -> str:
    return "no peak (CPU)" if math.isnan(peak) else f"{peak:.1f} GiB"


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def reference_checks(seed: int) -> list[tuple[str, float, float]]:
    """(name, value, tolerance) of the tiny float32 CPU checks against references (see the module docstring)."""
    from bench.generate import pipeline_call

    cfg = tiny_cpu()
    pipe = build_pipeline(cfg.generator, False, 64, torch.float32, "cpu")
    prompts = shapes_prompts(2, seed)
    noise = torch.randn(2, 16, 32, 32, generator=torch.Generator().manual_seed(seed))
    out = []
    with torch.inference_mode():
        for steps in (8, 2):
            ours, _ = generate_phases(pipe, prompts, noise, steps)
            out.append((f"{steps}-step sampler vs ZImagePipeline.__call__ (max |d image|)",
                        float((ours - pipeline_call(pipe, prompts, noise, steps)).abs().max()), 1e-4))
        cond = encode_prompts(pipe.text_encoder, pipe.tokenizer, prompts)
        fn = transformer_fn(pipe.transformer)
        _, _, x0_2 = two_step_sample(fn, fn, noise, cond)
        out.append(("two_step_sample vs 2 Euler steps (rel. max |d latent|)",
                    rel_diff(x0_2, sample(fn, noise, flow_sigmas(2), cond)), 1e-5))
    from zray.models.tiny import build_processor

    model, processor, _ = build_reward_vlm("tiny", 64, torch.float32, "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        build_processor(cfg.student, 64).save_pretrained(tmp)
        loaded = DifferentiableReward(tmp)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed), requires_grad=True)
    reward_prompts = shapes_prompts(2, seed + 1)
    grads = []
    for reward in (DifferentiableReward.from_model(model, processor), loaded):
        r = reward.reward(images, reward_prompts)
        grads.append((r.detach(), torch.autograd.grad(r.sum(), images)[0]))
    out.append(("in-memory reward vs DifferentiableReward from disk (max |d R|)",
                float((grads[0][0] - grads[1][0]).abs().max()), 1e-5))
    out.append(("... their image gradients (rel. max |d grad|)", rel_diff(grads[0][1], grads[1][1]), 1e-4))
    return out


def turbo_step(teacher: Any, cond: list, noise: torch.Tensor, args, clock_device: str, rel_tol: float):
    """(median phase times, peak GiB, checks) of the Turbo++ step (see the module docstring)."""
    from zray.models.discriminator import LADDDiscriminator
    from zray.models.turbo import TwoStepStudent

    teacher.requires_grad_(False).eval().enable_gradient_checkpointing()
    student = TwoStepStudent(teacher, decoupling=args.decoupling, lora_rank=args.lora_rank).train()
    disc = LADDDiscriminator(teacher).to(noise.device)  # after the student: its copy carries no hooks
    g_opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-5)
    d_opt = torch.optim.AdamW(disc.heads.parameters(), lr=1e-4)
    teacher_fn = transformer_fn(teacher)
    checks = []
    with torch.no_grad():
        _, _, x0_init = student(noise, cond)
        checks.append(("Turbo++ student at init vs teacher's 2-step sampler (rel.)",
                       rel_diff(x0_init, sample(teacher_fn, noise, flow_sigmas(2), cond)), rel_tol))

    def one() -> dict[str, float]:
        clock = Clock(clock_device)
        with torch.no_grad():
            x0_T, trajectory = sample(teacher_fn, noise, flow_sigmas(8), cond, return_trajectory=True)
        clock.tick("teacher 8 steps")
        d_opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            _, _, fake = student(noise, cond)
        real_logits = disc(x0_T, cond, per_block=True).flatten()
        d_loss, _ = discriminator_hinge_loss(real_logits, disc(fake, cond, per_block=True).flatten())
        d_loss.backward()
        d_opt.step()
        clock.tick("D step")
        g_opt.zero_grad(set_to_none=True)
        _, x_s2, x0_2 = student(noise, cond)
        g_loss, _ = generator_loss(disc(x0_2, cond, per_block=True).flatten(), step1="regression",
                                   x_s2_BCHW=x_s2, teacher_mid_BCHW=trajectory[4])
        g_loss.backward()
        if not checks[1:]:
            for k in (1, 2):
                params = student.adapter_parameters(k) if args.decoupling == "lora" else \
                    list(student.transformer(k).parameters())
                norm = float(torch.stack([p.grad.float().norm() for p in params if p.grad is not None]).norm())
                checks.append((f"step {k} gradient norm is finite and > 0", norm, float("inf")))
        g_opt.step()
        d_opt.zero_grad(set_to_none=True)  # the generator's backward reached the heads too
        clock.tick("G step")
        return clock.times

    one()  # warm-up (also creates the optimizer states)
    if clock_device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = [one() for _ in range(args.train_steps)]
    peak = torch.cuda.max_memory_allocated() / 2**30 if clock_device.startswith("cuda") else float("nan")
    return median_round(times), peak, checks


def reward_step(pipe: Any, cond: list, prompts: list, noise: torch.Tensor, args, dtype, device: str):
    """(median phase times, peak GiB) of the reward-gradient step (see the module docstring)."""
    transformer, vae = pipe.transformer, pipe.vae.requires_grad_(False)
    transformer.requires_grad_(True).train().enable_gradient_checkpointing()
    model, processor, _ = build_reward_vlm("8b" if args.real else "tiny", args.vlm_image_size, dtype, device)
    reward = DifferentiableReward.from_model(model, processor, args.dimensions.split(","))
    sigmas = flow_sigmas(8)
    k = args.reward_k

    def one() -> dict[str, float]:
        clock = Clock(device)
        with torch.no_grad():
            x_k = sample(transformer_fn(transformer), noise, sigmas[: k + 1], cond) if k else noise.float()
        clock.tick("no-grad sampling to k")
        sigma = float(sigmas[k])
        u = transformer_forward(transformer, x_k, model_time(sigma).to(device).expand(x_k.shape[0]), cond)
        images = (vae_decode(vae, x0_from_velocity(x_k, u, sigma)).float() * 0.5 + 0.5)
        loss = -reward.reward(images, prompts).mean()
        loss.backward()
        clock.tick("grad part")
        transformer.zero_grad(set_to_none=True)
        return clock.times

    one()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = [one() for _ in range(args.train_steps)]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    return median_round(times), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="image side in px")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=2, help="timed Turbo++ / reward steps (after a warm-up)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (smoke: eager)")
    parser.add_argument("--decoupling", choices=("lora", "copies"), default="lora")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--reward-k", type=int, default=4, help="no-grad steps of 8 before the step with gradient")
    parser.add_argument("--dimensions", default=",".join(DIMENSIONS), help="rubric dimensions the reward scores "
                        "(one VLM forward each)")
    parser.add_argument("--vlm-image-size", type=int, default=448, help="the reward VLM's input side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny_cpu shapes on the CPU in float32, 64 px")
    args = parser.parse_args()
    args.real = not args.smoke
    if args.smoke:
        args.size, args.device, args.rounds, args.train_steps, args.vlm_image_size = 64, "cpu", 2, 1, 64
        if args.compile_backend == "inductor":
            args.compile_backend = "eager"  # dynamo's tracing without code generation: seconds on a CPU
    if not 0 <= args.reward_k <= 7 or min(args.batch, args.rounds, args.train_steps) < 1:
        raise SystemExit("--reward-k must be in 0..7; --batch, --rounds and --train-steps positive")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()  # the empty "modules that should be kept in float32: []" notes
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    if args.smoke:
        torch.set_num_threads(1)  # the tiny models gain nothing from more; a busy 2-core machine loses a lot
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke (tiny shapes on the CPU)")
    dtype = torch.bfloat16 if cuda else torch.float32
    rel_tol = 2e-2 if dtype == torch.bfloat16 else 1e-4

    checks = reference_checks(args.seed)
    clock = time.perf_counter()
    cfg = full().generator if args.real else tiny_cpu().generator
    pipe = build_pipeline(cfg, args.real, args.size, dtype, args.device)
    params = {n: sum(p.numel() for p in getattr(pipe, n).parameters()) for n in ("transformer", "vae", "text_encoder")}
    factor = pipe.vae_scale_factor
    noise = torch.randn(args.batch, cfg.vae_latent_channels, args.size // factor, args.size // factor,
                        generator=torch.Generator().manual_seed(args.seed)).to(args.device)
    prompts = shapes_prompts(args.batch, args.seed)
    print(f"{'full' if args.real else 'tiny_cpu'} shapes: "
          + ", ".join(f"{k} {v / 1e9:.3f} B" for k, v in params.items())
          + f" ({dtype}), built in {time.perf_counter() - clock:.0f} s; batch {args.batch} x {args.size} px "
          f"({(args.size // factor // 2) ** 2} image tokens); {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if cuda else f" ({torch.get_num_threads()} threads)"), flush=True)

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sampling, images = {}, {}
    modes = ["eager"] + ([] if args.no_compile else ["compiled"])
    with torch.inference_mode():
        for mode in modes:
            net = pipe.transformer if mode == "eager" else torch.compile(pipe.transformer, backend=args.compile_backend)
            start = time.perf_counter()
            for steps in (8, 2):  # warm-up (and, compiled, the compile)
                images[mode, steps], _ = generate_phases(pipe, prompts, noise, steps, transformer=net, sync=sync)
            warm = time.perf_counter() - start
            rounds = run_rounds((8, 2), args.rounds, lambda s: generate_phases(pipe, prompts, noise, s, transformer=net,
                                                                             sync=sync)[1])
            for steps, times in rounds.items():
                sampling[mode, steps] = median_round(times)
            print(f"  sampling {mode}: warm-up {warm:.1f} s; 8-step {sampling[mode, 8]['total']:.3f} s, 2-step "
                  f"{sampling[mode, 2]['total']:.3f} s per batch", flush=True)
        cond = [c.clone() for c in encode_prompts(pipe.text_encoder, pipe.tokenizer, prompts)]
    for steps in (8, 2):
        if "compiled" in modes:
            print(f"  compiled vs eager {steps}-step images: max |diff| "
                  f"{float((images['compiled', steps] - images['eager', steps]).abs().max()):.3g} (not checked)")
    pipe.text_encoder.to("meta")  # free its memory: the training steps take cached prompt embeddings
    gc.collect()
    torch._dynamo.reset()
    if cuda:
        torch.cuda.empty_cache()

    if args.decoupling == "lora" and importlib.util.find_spec("peft") is None:
        turbo = None  # the reward step still runs
        print("  Turbo++ step skipped: decoupling 'lora' needs peft (or --decoupling copies, ~110 GiB)", flush=True)
    else:
        turbo, turbo_peak, turbo_checks = turbo_step(pipe.transformer, cond, noise, args, args.device, rel_tol)
        checks += turbo_checks
        print(f"  Turbo++ step ({args.decoupling}) done: {turbo['total']:.3f} s", flush=True)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    reward, reward_peak = reward_step(pipe, cond, prompts, noise, args, dtype, args.device)

    ref = (lambda key, fmt: fmt.format(REFERENCE[key])) if args.real else (lambda key, fmt: "-")
    print(f"\n{'what (batch ' + str(args.batch) + ')':54s} {'ours':>22s}   {'H200 reference (issue 17)':>25s}")
    for mode in modes:
        s8, s2 = (sampling[mode, s]["transformer"] + sampling[mode, s]["decode"] for s in (8, 2))
        enc = statistics.mean(sampling[mode, s]["encode"] for s in (8, 2))
        print(f"{f'8-step, {mode}: transformer steps + VAE decode':54s} {s8:20.3f} s   "
              f"{ref((mode, 8), '{:.3f} s'):>25s}")
        print(f"{f'2-step, {mode}':54s} {s2:20.3f} s   {ref((mode, 2), '{:.3f} s'):>25s}")
        ref_ratio = f"{REFERENCE[mode, 8] / REFERENCE[mode, 2]:.2f}x" if args.real else "-"
        print(f"{f'  ratio (limit 4x); text encoding {enc:.3f} s apart':54s} "
              f"{f'{s8 / s2:.2f}x = {100 * s8 / s2 / 4:.0f}% of 4x':>22s}   {ref_ratio:>25s}")
    if turbo is None:
        print(f"{'Turbo++ step (lora)':54s} {'skipped (no peft)':>22s}   {'-':>25s}")
    else:
        print(f"{f'Turbo++ step ({args.decoupling}): ' + ' / '.join(k for k in turbo if k != 'total'):54s} "
              f"{' / '.join(f'{v:.3f}' for k, v in turbo.items() if k != 'total') + ' s':>22s}   {'-':>25s}")
        turbo_total = f"{turbo['total']:.3f} s, {gib(turbo_peak)}"
        print(f"{'  total, peak memory':54s} {turbo_total:>22s}   {'-':>25s}")
    print(f"{f'reward step: no-grad sampling to k={args.reward_k}':54s} "
          f"{reward['no-grad sampling to k']:20.3f} s   {'-':>25s}")
    reward_grad = f"{reward['grad part']:.3f} s, {gib(reward_peak)}"
    reward_ref = ref("reward_s", "{:.3f} s") + ", " + ref("reward_gib", "{:.1f} GiB") if args.real else "-"
    print(f"{'  grad part (transformer, VAE, VLM, backward), peak':54s} {reward_grad:>22s}   {reward_ref:>25s}")

    print("\nchecks:")
    failed = 0
    for name, value, tol in checks:
        ok = (0 < value < tol) if tol == float("inf") else value <= tol
        failed += not ok
        bound = "" if tol == float("inf") else f" (<= {tol:g})"
        print(f"  {'ok    ' if ok else 'FAILED'} {name}: {value:.3g}{bound}")
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
