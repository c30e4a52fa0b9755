"""The generator: a Z-Image pipeline through diffusers (a tiny one from `zray.models.tiny` or a real checkpoint).

`generate` is a smoke path through `ZImagePipeline.__call__` (which runs under `torch.no_grad()`); training
with reward gradients uses zray's own sampler (`zray.sampling`) on the pipeline's parts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def load_zimage(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Any:
    """A `diffusers.ZImagePipeline` from a dir written by `save_pretrained` (or a hub id)."""
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(str(path), dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def generate(pipe: Any, prompts: Sequence[str], *, steps: int, seed: int, height: int = 64, width: int = 64,
             guidance_scale: float = 0.0, max_sequence_length: int = 64) -> list[Any]:
    """PIL images, one per prompt, from `steps` Euler steps; deterministic for a given seed.

    `height` and `width` must be multiples of 2 x the VAE's downsampling factor (the pipeline patchifies
    latents with patch size 2).
    """
    factor = pipe.vae_scale_factor * 2
    for name, value in (("height", height), ("width", width)):
        if value <= 0 or value % factor:
            raise ValueError(f"{name}={value} is not allowed: expected a positive multiple of {factor}")
    if steps < 1:
        raise ValueError(f"steps={steps} is not allowed: expected an integer >= 1")
    if not prompts:
        raise ValueError("prompts is empty: expected at least one prompt")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    out = pipe(prompt=list(prompts), height=height, width=width, num_inference_steps=steps,
               guidance_scale=guidance_scale, generator=generator, max_sequence_length=max_sequence_length,
               output_type="pil")
    return list(out.images)
