"""The base generator's first phase: the `AutoencoderKL` of the Z-Image pipeline on the world's clean renders.

`VAETask` (a `zray.training.task.LearnerTask`, saved in diffusers format). Loss per pixel
`w * (|x_hat - x| + (x_hat - x)^2)` with `w = 1 + object_weight * chroma(x)` (chroma: distance from the
grey axis, 0 for the white / black / gray backgrounds, about 1 for the saturated palette colours), so the
few object pixels, whose colour is what the judge checks, are not drowned by the background; plus
`kl_weight * KL(q(z|x) || N(0, I))` (mean per latent element). The decoder trains on posterior samples.

Tensor legend: B batch, C latent channels, h x w latent grid; images [B, 3, H, W] in [-1, 1].
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from zray.models.generator import decode_images, load_safetensors_into, unwrap_module

_GREY = torch.full((3,), 1.0 / 3.0**0.5)


def chroma_B1HW(images_B3HW: torch.Tensor) -> torch.Tensor:
    """Per-pixel distance from the grey axis of images in [-1, 1], scaled so a palette colour is about 1."""
    rgb = (images_B3HW + 1.0) / 2.0
    grey = _GREY.to(rgb).view(1, 3, 1, 1)
    along = (rgb * grey).sum(dim=1, keepdim=True) * grey
    return (rgb - along).norm(dim=1, keepdim=True) / 0.6



class VAEModule(torch.nn.Module):
    """The `AutoencoderKL` under training; forward returns what the loss needs (DeepSpeed/DDP call forward)."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, images_B3HW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (reconstruction [B, 3, H, W] from a posterior sample, posterior mean, posterior logvar)."""
        dist = self.vae.encode(images_B3HW).latent_dist
        recon = self.vae.decode(dist.sample()).sample
        return recon, dist.mean, dist.logvar


def vae_loss(recon: torch.Tensor, target: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor, *,
             object_weight: float, kl_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    """The VAE objective (module docstring); images [B, 3, H, W] in [-1, 1], mean/logvar [B, C, h, w]."""
    err = recon - target
    weight = 1.0 + object_weight * chroma_B1HW(target)
    rec = (weight * (err.abs() + err.square())).mean() / weight.mean()
    kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()
    loss = rec + kl_weight * kl
    mse = err.detach().square().mean().item()
    return loss, {"rec": rec.item(), "kl": kl.item(), "l1": err.detach().abs().mean().item(), "mse": mse,
                  "psnr": float(10.0 * np.log10(4.0 / max(mse, 1e-12)))}


class VAETask:
    """Train the pipeline's `AutoencoderKL` (initial weights from `init_dir`, a diffusers VAE folder)."""

    name = "vae"

    def __init__(self, init_dir: str | Path, *, object_weight: float = 0.0, kl_weight: float = 1e-6) -> None:
        if object_weight < 0 or kl_weight < 0:
            raise ValueError(f"object_weight={object_weight}, kl_weight={kl_weight}: expected floats >= 0")
        self.init_dir = str(init_dir)
        self.object_weight = object_weight
        self.kl_weight = kl_weight

    def build_model(self) -> torch.nn.Module:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(self.init_dir, dtype=torch.float32)
        return VAEModule(vae).train()

    def collate(self, rows: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"images": decode_images(rows["image"])}

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        recon, mean, logvar = model(batch["images"])
        return vae_loss(recon, batch["images"], mean, logvar, object_weight=self.object_weight,
                        kl_weight=self.kl_weight)

    def save_pretrained(self, model: torch.nn.Module, out_dir: Path) -> None:
        unwrap_module(model, VAEModule).vae.save_pretrained(str(out_dir))

    def load_pretrained(self, model: torch.nn.Module, ckpt_dir: Path) -> None:
        load_safetensors_into(unwrap_module(model, VAEModule).vae, ckpt_dir)
