"""The learner step at realistic sizes on one GPU: time/step, peak memory and MFU against the measured peak.

    python bench/gpu_train_step.py                     # both models, on the GPU
    python bench/gpu_train_step.py --which zimage --zimage-mode lora
    python bench/gpu_train_step.py --smoke             # toy sizes on CPU: checks that the script runs

Two training steps, random weights built from config (no download):

- vlm: a Qwen3-VL-8B-shaped model (zray's teacher and student family; LM 4096 x 36 layers, GQA 32/8 heads, head
  dim 128, vocabulary 151936; ViT 1152 x 27 blocks, full attention, DeepStack mergers at blocks 8/16/24) or, with
  --vlm-arch qwen2_5_vl, a Qwen2.5-VL-7B-shaped one (LM 3584 x 28, ViT 1280 x 32 with windowed attention), in bf16
  with LoRA (rank --lora-rank) on every LM linear layer, frozen base and vision tower; a captioning batch:
  --vlm-batch images of --vlm-image px (196 merged image tokens at 448 px for Qwen3-VL's 16-px patches, 256 for
  Qwen2.5-VL's 14-px ones) plus --vlm-text answer tokens, loss on the answer tokens.
- zimage: the Z-Image transformer (ZImageTransformer2DModel at its default, real config: dim 3840, 30 layers +
  2 + 2 refiners, ~6.15B params) on 1024 px latents (16 x 128 x 128 -> 4096 image tokens) and --cap-len caption
  tokens; flow-matching MSE. --zimage-mode full trains every parameter with pure-bf16 AdamW (bf16 weights,
  grads and moments: ~50 GB, so that it fits an 80 GB card; no fp32 master copy) or lora (rank --lora-rank on
  the attention and feed-forward linears).

Both use gradient checkpointing (non-reentrant) unless --no-checkpointing. MFU = model FLOPs per step / time /
peak, where the peak is the best bf16 matmul throughput measured here (square matmuls up to 8192) and model FLOPs
count the matmuls and attention of the forward pass and of the backward pass that the step needs (full: 2x the
forward for input and weight grads; LoRA / frozen: 1x, input grads only; frozen vision tower: forward only),
without recomputation (so MFU does not credit the recomputed forward of checkpointing). This script imports
torch, transformers, diffusers and (optionally) peft only; without peft a minimal LoRA wrapper stands in.

Printed: the device and its measured matmul peak; per model its description, parameters (trainable), ms/step and
samples/s (median of --steps timed steps after --warmup untimed ones), peak memory, model TFLOP/step, achieved
TFLOP/s and MFU, and the loss on the repeated batch from the first step to the last: every step repeats one
batch, so it should fall (a sanity check that the step trains; a non-finite loss stops the script). `--out` also
writes the results as JSON.

Recorded runs: docs/experiments.md (section 4).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import re
import statistics
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F


# ------------------------------------------------------------------------------------------ timing and peak


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, sizes: tuple[int, ...], iters: int) -> float:
    """Best observed TFLOP/s of an n x n x n matmul over `sizes`."""
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(3):
            a @ b
        _sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            a @ b
        _sync(device)
        best = max(best, 2 * n**3 * iters / (time.perf_counter() - start) / 1e12)
        del a, b
    return best


def time_steps(step: Callable[[], torch.Tensor], device: torch.device, warmup: int, steps: int
               ) -> tuple[list[float], list[float]]:
    """(seconds of each timed step, loss of every step): the steps repeat one batch, so the loss should fall."""
    losses = [step() for _ in range(warmup)]
    _sync(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        losses.append(step())
        _sync(device)
        times.append(time.perf_counter() - start)
    return times, [float(loss) for loss in losses]


# ------------------------------------------------------------------------------------------ LoRA


class _LoRALinear(torch.nn.Module):
    """y = base(x) + (x A^T B^T) * alpha / r, base frozen; the fallback when peft is not installed."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base, self.scale = base, alpha / rank
        self.lora_a = torch.nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device,
                                                     dtype=base.weight.dtype))
        self.lora_b = torch.nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device,
                                                     dtype=base.weight.dtype))
        torch.nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scale


def apply_lora(model: torch.nn.Module, pattern: str, rank: int) -> tuple[torch.nn.Module, str]:
    """Freeze `model` and add LoRA to every nn.Linear whose qualified name fully matches `pattern`."""
    model.requires_grad_(False)
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        targets = [name for name, mod in model.named_modules()
                   if isinstance(mod, torch.nn.Linear) and re.fullmatch(pattern, name)]
        for name in targets:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, _LoRALinear(getattr(parent, child), rank, 2.0 * rank))
        return model, "built-in LoRA (peft not installed)"
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=pattern)
    return get_peft_model(model, config), "peft LoRA"


def build_on(ctor: Callable[[], torch.nn.Module], device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Construct a model with random (seeded) weights directly on `device` in `dtype` (no fp32 copy first)."""
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = ctor()
    finally:
        torch.set_default_dtype(default_dtype)
    return model.to(device=device, dtype=dtype)


def linear_params(module: torch.nn.Module, skip: tuple[str, ...] = ()) -> int:
    """Weights of the nn.Linear layers of `module` (per-token matmul parameters), skipping names with `skip`."""
    return sum(m.weight.numel() for name, m in module.named_modules()
               if isinstance(m, torch.nn.Linear) and not any(s in name for s in skip))


# ------------------------------------------------------------------------------------------ VLM


def vlm_config(smoke: bool, arch: str) -> Any:
    """Qwen3-VL-8B-Instruct's shapes (`arch` qwen3_vl, zray's teacher and student family) or Qwen2.5-VL-7B's; toy
    sizes with `smoke`."""
    ids = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
               vision_end_token_id=151653)
    special = dict(bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)
    if smoke:
        ids = dict(image_token_id=990, video_token_id=991, vision_start_token_id=992, vision_end_token_id=993)
        special = dict(bos_token_id=0, eos_token_id=1, pad_token_id=0)
    if arch == "qwen3_vl":
        from transformers import Qwen3VLConfig

        if smoke:
            text = dict(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=64)
            vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, deepstack_visual_indexes=[0],
                          num_position_embeddings=256)
        else:
            text = dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=128)
            vision = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                          deepstack_visual_indexes=[8, 16, 24], num_position_embeddings=2304)
        mrope = [8, 12, 12] if smoke else [24, 20, 20]
        text.update(max_position_embeddings=32768, rms_norm_eps=1e-6, **special,
                    rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": mrope,
                                     "mrope_interleaved": True})
        vision.update(patch_size=16, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                      out_hidden_size=text["hidden_size"])
        return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
    if arch != "qwen2_5_vl":
        raise ValueError(f"--vlm-arch={arch!r} is not allowed: expected 'qwen3_vl' or 'qwen2_5_vl'")
    from transformers import Qwen2_5_VLConfig

    if smoke:
        text = dict(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, mrope_section=[8, 12, 12])
        vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, fullatt_block_indexes=[1])
    else:  # Qwen2.5-VL-7B-Instruct's shapes
        text = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                    num_attention_heads=28, num_key_value_heads=4, mrope_section=[16, 24, 24])
        vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                      fullatt_block_indexes=[7, 15, 23, 31])
    mrope = text.pop("mrope_section")
    text.update(max_position_embeddings=32768, rms_norm_eps=1e-6, **special,
                rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": mrope})
    vision.update(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  out_hidden_size=text["hidden_size"], in_channels=3)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)


def vlm_batch(cfg: Any, batch: int, image_px: int, text_len: int, device: torch.device, dtype: torch.dtype
              ) -> dict[str, torch.Tensor]:
    """Synthetic captioning inputs in Qwen2.5-VL's layout: <vision_start> image pads <vision_end> answer."""
    vis = cfg.vision_config
    grid = image_px // vis.patch_size
    num_patches = grid * grid
    merged = num_patches // vis.spatial_merge_size**2
    patch_dim = vis.in_channels * vis.temporal_patch_size * vis.patch_size**2
    text = torch.randint(0, min(cfg.image_token_id, cfg.text_config.vocab_size) - 16, (batch, text_len))
    prefix = torch.tensor([cfg.vision_start_token_id] + [cfg.image_token_id] * merged + [cfg.vision_end_token_id])
    input_ids = torch.cat([prefix.expand(batch, -1), text], dim=1)
    labels = input_ids.clone()
    labels[:, :prefix.numel()] = -100
    extra = {}
    if cfg.model_type == "qwen3_vl":  # Qwen3-VL's multimodal rotary positions need the token types (1 = image)
        extra["mm_token_type_ids"] = (input_ids == cfg.image_token_id).int().to(device)
    return {**extra, "input_ids": input_ids.to(device), "attention_mask": torch.ones_like(input_ids).to(device),
            "labels": labels.to(device),
            "pixel_values": torch.randn(batch * num_patches, patch_dim, device=device, dtype=dtype),
            "image_grid_thw": torch.tensor([[1, grid, grid]] * batch, device=device)}


def vlm_flops(model: torch.nn.Module, cfg: Any, batch: int, image_px: int, text_len: int) -> float:
    """Model FLOPs of one LoRA step: LM forward + input-grad backward (2x fwd), frozen vision forward (1x)."""
    vis, txt = cfg.vision_config, cfg.text_config
    grid = image_px // vis.patch_size
    patches = grid * grid
    seq = patches // vis.spatial_merge_size**2 + 2 + text_len
    lm = model.get_submodule(_find(model, "language_model"))
    visual = model.get_submodule(_find(model, "visual"))
    lm_linear = linear_params(lm, skip=("lora_",)) + txt.vocab_size * txt.hidden_size  # + lm_head
    attn_dim = txt.num_attention_heads * (getattr(txt, "head_dim", None) or txt.hidden_size // txt.num_attention_heads)
    lm_fwd = batch * (2 * lm_linear * seq + 2 * txt.num_hidden_layers * seq**2 * attn_dim)  # causal: half of 4
    merged = patches // vis.spatial_merge_size**2
    if hasattr(vis, "fullatt_block_indexes"):  # Qwen2.5-VL: windowed attention but in a few blocks
        window = (vis.window_size // vis.patch_size) ** 2
        full_blocks = len(vis.fullatt_block_indexes)
        vis_attn = 4 * vis.hidden_size * patches * (full_blocks * patches + (vis.depth - full_blocks) * window)
    else:  # Qwen3-VL: full attention in every block
        vis_attn = 4 * vis.hidden_size * patches * vis.depth * patches
    mergers = linear_params(visual, skip=("lora_", "blocks"))  # patch merger(s): one token per merged group
    per_patch = linear_params(visual, skip=("lora_", "merger"))
    vis_fwd = batch * (2 * per_patch * patches + 2 * mergers * merged + vis_attn)
    return 2 * lm_fwd + vis_fwd


def _find(model: torch.nn.Module, suffix: str) -> str:
    names = [name for name, _ in model.named_modules() if name.endswith(suffix)]
    if not names:
        raise LookupError(f"no submodule named *{suffix} in {type(model).__name__}")
    return min(names, key=len)


def bench_vlm(args, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    from transformers import AutoModelForImageTextToText

    cfg = vlm_config(args.smoke, args.vlm_arch)
    model = build_on(lambda: AutoModelForImageTextToText.from_config(cfg), device, dtype)
    num_params = sum(p.numel() for p in model.parameters())
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    pattern = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    model, lora_kind = apply_lora(model, pattern, args.lora_rank)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=device.type == "cuda")
    inputs = vlm_batch(cfg, args.vlm_batch, args.vlm_image, args.vlm_text, device, dtype)

    def step() -> torch.Tensor:
        loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    times, losses = time_steps(step, device, args.warmup, args.steps)
    flops = vlm_flops(model, cfg, args.vlm_batch, args.vlm_image, args.vlm_text)
    name = {"qwen3_vl": "Qwen3-VL-8B", "qwen2_5_vl": "Qwen2.5-VL-7B"}[args.vlm_arch]
    shape = f"toy {name.split('-')[0]}-VL" if args.smoke else f"{name}-shaped"
    tokens = (args.vlm_image // cfg.vision_config.patch_size) ** 2 // cfg.vision_config.spatial_merge_size**2
    desc = (f"{shape}, {str(dtype).replace('torch.', '')} base + {lora_kind} r={args.lora_rank} on LM linears; batch "
            f"{args.vlm_batch} x ({args.vlm_image}px image = {tokens} tokens + {args.vlm_text} answer tokens)")
    return _summary("vlm", desc, num_params, sum(p.numel() for p in trainable), times, losses, flops,
                    args.vlm_batch)


# ------------------------------------------------------------------------------------------ Z-Image


def bench_zimage(args, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    from diffusers import ZImageTransformer2DModel

    if args.smoke:
        kwargs = dict(dim=64, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
                      axes_dims=[8, 12, 12], axes_lens=[256, 64, 64])
    else:
        kwargs = {}  # diffusers' defaults are the released Z-Image transformer's config
    model = build_on(lambda: ZImageTransformer2DModel(**kwargs), device, dtype)
    cfg = model.config
    num_params = sum(p.numel() for p in model.parameters())
    if args.checkpointing:
        model.enable_gradient_checkpointing()
    if args.zimage_mode == "lora":
        pattern = r".*(attention\.(to_q|to_k|to_v|to_out\.0)|feed_forward\.(w1|w2|w3))"
        model, lora_kind = apply_lora(model, pattern, args.lora_rank)
    else:
        lora_kind = "full parameters, pure-bf16 AdamW" if dtype == torch.bfloat16 else "full parameters, AdamW"
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=device.type == "cuda")

    latent_px = args.zimage_res // 8
    batch, channels = args.zimage_batch, cfg.in_channels
    x = [torch.randn(channels, 1, latent_px, latent_px, device=device, dtype=dtype) for _ in range(batch)]
    cap = [torch.randn(args.cap_len, cfg.cap_feat_dim, device=device, dtype=dtype) for _ in range(batch)]
    t = torch.rand(batch, device=device, dtype=dtype)
    target = torch.randn(batch, channels, 1, latent_px, latent_px, device=device, dtype=dtype)

    def step() -> torch.Tensor:
        out = torch.stack(model(x, t, cap, return_dict=False)[0])
        loss = F.mse_loss(out.float(), target.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    times, losses = time_steps(step, device, args.warmup, args.steps)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    patch = cfg.all_patch_size[0]
    img_tokens = (latent_px // patch) ** 2
    seq = img_tokens + args.cap_len
    skip = ("adaLN", "lora_")

    def blocks_fwd(blocks, tokens: int) -> float:
        per_token = sum(linear_params(b, skip=skip) for b in blocks)
        return 2 * per_token * tokens + 4 * len(blocks) * tokens**2 * cfg.dim

    fwd = batch * (blocks_fwd(base.layers, seq) + blocks_fwd(base.noise_refiner, img_tokens)
                   + blocks_fwd(base.context_refiner, args.cap_len))
    flops = fwd * (3 if args.zimage_mode == "full" else 2)
    desc = (f"Z-Image transformer ({num_params / 1e9:.2f}B), {lora_kind}; batch {batch} x {args.zimage_res}px "
            f"({img_tokens} image + {args.cap_len} caption tokens)")
    return _summary("zimage", desc, num_params, sum(p.numel() for p in trainable), times, losses, flops, batch)


# ------------------------------------------------------------------------------------------ main


def _summary(name: str, desc: str, num_params: int, num_trainable: int, times: list[float], losses: list[float],
             flops: float, samples: int) -> dict[str, Any]:
    step_s = statistics.median(times)
    if not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"[{name}] a non-finite loss: {losses}")
    return {"model": name, "description": desc, "params": num_params, "trainable": num_trainable, "losses": losses,
            "time_per_step_s": step_s, "samples_per_s": samples / step_s, "model_tflop_per_step": flops / 1e12,
            "achieved_tflops": flops / step_s / 1e12}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--which", default="vlm,zimage", help="comma-separated: vlm, zimage")
    parser.add_argument("--smoke", action="store_true", help="toy sizes on CPU, fp32 (checks that it runs)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--vlm-arch", choices=("qwen3_vl", "qwen2_5_vl"), default="qwen3_vl")
    parser.add_argument("--vlm-batch", type=int, default=16)
    parser.add_argument("--vlm-image", type=int, default=448)
    parser.add_argument("--vlm-text", type=int, default=160)
    parser.add_argument("--zimage-batch", type=int, default=1)
    parser.add_argument("--zimage-res", type=int, default=1024)
    parser.add_argument("--cap-len", type=int, default=128)
    parser.add_argument("--zimage-mode", choices=("full", "lora"), default="full")
    parser.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    parser.add_argument("--out", default="", help="also write the results as JSON here")
    args = parser.parse_args()
    which = [w.strip() for w in args.which.split(",") if w.strip()]
    unknown = sorted(set(which) - {"vlm", "zimage"})
    if unknown:
        parser.error(f"--which has unknown entries {unknown}; allowed: vlm, zimage")

    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
        args.vlm_batch, args.vlm_image, args.vlm_text = 2, 64, 16
        args.zimage_batch, args.zimage_res, args.cap_len = 1, 128, 16
        args.lora_rank = min(args.lora_rank, 4)
        peak = measure_matmul_peak(device, dtype, sizes=(256, 512), iters=5)
        card = "CPU (smoke)"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --smoke for the CPU check")
        device, dtype = torch.device("cuda", torch.cuda.current_device()), torch.bfloat16
        torch.backends.cuda.matmul.allow_tf32 = True
        peak = measure_matmul_peak(device, dtype, sizes=(4096, 8192), iters=50)
        card = torch.cuda.get_device_name(device)
    print(f"device: {card}; measured {str(dtype).replace('torch.', '')} matmul peak {peak:.4g} TFLOP/s")

    results = []
    for name in which:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        result = (bench_vlm if name == "vlm" else bench_zimage)(args, device, dtype)
        result["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        result["peak_tflops"] = peak
        result["mfu"] = result["achieved_tflops"] / peak
        results.append(result)
        mem = f"{result['peak_mem_gib']:.1f} GiB" if result["peak_mem_gib"] is not None else "n/a (CPU)"
        print(f"[{name}] {result['description']}\n"
              f"  params {result['params'] / 1e9:.3f}B (trainable {result['trainable'] / 1e6:.2f}M); "
              f"{result['time_per_step_s'] * 1e3:.1f} ms/step, {result['samples_per_s']:.2f} samples/s, peak memory "
              f"{mem}; {result['model_tflop_per_step']:.4g} TFLOP/step -> {result['achieved_tflops']:.4g} TFLOP/s, "
              f"MFU {100 * result['mfu']:.1f}%\n  loss on the repeated batch, step 1 -> {len(result['losses'])}: "
              f"{result['losses'][0]:.4f} -> {result['losses'][-1]:.4f}"
              + ("" if result["losses"][-1] < result["losses"][0] else " (did NOT fall)"))
        gc.collect()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": card, "dtype": str(dtype), "peak_tflops": peak, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
