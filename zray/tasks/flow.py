"""The base generator's second phase: the Z-Image transformer by flow matching (`FlowTask`).

Frozen VAE and frozen text encoder (loaded lazily in each worker), prompt embeddings as the pipeline computes
them (`encode_prompts`), latents `vae_encode` (posterior mean, scaled). Flow-matching loss
`|| u(x_sigma, t = 1 - sigma, c) - (x0 - eps) ||^2` with `sigma = shift_sigmas(U(0, 1))` (conventions:
`zray.sampling`). Saved in diffusers format (the EMA weights when `ema_decay > 0`).

Tensor legend: B batch, C latent channels, H x W latent grid, L prompt tokens, D text hidden size.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from zray.models.generator import (DEFAULT_MAX_SEQUENCE_LENGTH, decode_images, encode_prompts, load_safetensors_into,
                                   pad_embeddings, transformer_forward, unpad_embeddings, unwrap_module, vae_encode)
from zray.sampling import flow_target, model_time, noise_latents, sample_train_sigmas


class FlowModule(torch.nn.Module):
    """The `ZImageTransformer2DModel` under training, on fixed-shape batches (padded prompt embeddings).

    With `ema_decay > 0` it also holds `ema`, a frozen exponential moving average of the transformer (what
    `FlowTask.save_pretrained` exports: few-thousand-step runs sample far more steadily from it). The average
    is updated at the start of every training-mode forward from the weights as they are then (so once per
    micro batch, one optimizer step behind), with the usual warm-up `min(decay, (1 + n) / (10 + n))`. It is
    part of the module's state, so learner checkpoints and resume carry it. It needs fp32 weights.
    """

    def __init__(self, transformer: torch.nn.Module, ema_decay: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay={ema_decay} is not allowed: expected a float in [0, 1)")
        self.transformer = transformer
        self.ema_decay = ema_decay
        if ema_decay > 0:
            self.ema = copy.deepcopy(transformer).requires_grad_(False).eval()
            self.register_buffer("ema_updates", torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def update_ema(self) -> None:
        n = float(self.ema_updates)
        decay = min(self.ema_decay, (1.0 + n) / (10.0 + n))
        for avg, param in zip(self.ema.parameters(), self.transformer.parameters(), strict=True):
            if avg.dtype != torch.float32:
                raise ValueError(f"the EMA holds {avg.dtype} weights: flow_ema_decay > 0 needs fp32 training "
                                 "(LearnerConfig.precision='fp32', or 'auto' on CPU)")
            avg.lerp_(param.detach(), 1.0 - decay)
        self.ema_updates += 1

    def exported(self) -> torch.nn.Module:
        """The transformer to save: the EMA when there is one."""
        return self.ema if self.ema_decay > 0 else self.transformer

    def forward(self, x_BCHW: torch.Tensor, t_B: torch.Tensor, cap_BLD: torch.Tensor,
                cap_len_B: torch.Tensor) -> torch.Tensor:
        if self.training and self.ema_decay > 0:
            self.update_ema()
        return transformer_forward(self.transformer, x_BCHW, t_B, unpad_embeddings(cap_BLD, cap_len_B))


class FlowTask:
    """Train the transformer of the pipeline at `pipeline_dir` (its VAE and text encoder stay frozen).

    With `cache_encodings` and an `image_id` column, each worker keeps the latents and prompt embeddings of the
    rows it has encoded (the learner gives a worker the same shard every epoch, and the encodings are
    deterministic: posterior mean), so only the first epoch pays for the frozen encoders. Memory per row:
    (C h w + L D) floats, about 40 KB for the tiny 64 px world; turn it off for large corpora.
    """

    name = "flow"

    def __init__(self, pipeline_dir: str | Path, *, shift: float = 3.0,
                 max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH, cache_encodings: bool = True,
                 ema_decay: float = 0.0) -> None:
        if shift <= 0:
            raise ValueError(f"shift={shift} is not allowed: expected a float > 0")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay={ema_decay} is not allowed: expected a float in [0, 1)")
        self.ema_decay = ema_decay
        self.pipeline_dir = str(pipeline_dir)
        self.shift = shift
        self.max_sequence_length = max_sequence_length
        self.cache_encodings = cache_encodings
        self._frozen: dict[str, Any] | None = None  # per process, never pickled
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_frozen": None, "_cache": {}}

    def frozen_parts(self) -> dict[str, Any]:
        """The frozen VAE, text encoder and tokenizer, loaded once per process."""
        if self._frozen is None:
            from diffusers import AutoencoderKL
            from transformers import AutoModel, AutoTokenizer

            root = Path(self.pipeline_dir)
            vae = AutoencoderKL.from_pretrained(str(root / "vae"), dtype=torch.float32).eval()
            text_encoder = AutoModel.from_pretrained(str(root / "text_encoder"), dtype=torch.float32).eval()
            vae.requires_grad_(False)
            text_encoder.requires_grad_(False)
            self._frozen = {"vae": vae, "text_encoder": text_encoder,
                            "tokenizer": AutoTokenizer.from_pretrained(str(root / "tokenizer"))}
        return self._frozen

    def build_model(self) -> torch.nn.Module:
        from diffusers import ZImageTransformer2DModel

        transformer = ZImageTransformer2DModel.from_pretrained(str(Path(self.pipeline_dir) / "transformer"),
                                                               dtype=torch.float32)
        return FlowModule(transformer, ema_decay=self.ema_decay).train()

    @torch.no_grad()
    def encode(self, images: Any, prompts: list[str]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """PNG bytes and prompts -> (latents [B, C, h, w], prompt embeddings [L_i, D] each), on CPU."""
        parts = self.frozen_parts()
        latents = vae_encode(parts["vae"], decode_images(images))
        embeds = encode_prompts(parts["text_encoder"], parts["tokenizer"], prompts, self.max_sequence_length)
        return latents, embeds

    def collate(self, rows: dict[str, Any]) -> dict[str, torch.Tensor]:
        prompts = [str(p) for p in rows["prompt"]]
        if not (self.cache_encodings and "image_id" in rows):
            latents, embeds = self.encode(rows["image"], prompts)
        else:
            ids = [str(i) for i in rows["image_id"]]
            todo = [k for k, i in enumerate(ids) if i not in self._cache]
            if todo:
                new_latents, new_embeds = self.encode([rows["image"][k] for k in todo], [prompts[k] for k in todo])
                for j, k in enumerate(todo):
                    self._cache[ids[k]] = (new_latents[j].clone(), new_embeds[j].clone())
            latents = torch.stack([self._cache[i][0] for i in ids])
            embeds = [self._cache[i][1] for i in ids]
        cap, cap_len = pad_embeddings(embeds)
        return {"latents": latents, "cap": cap, "cap_len": cap_len}

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        x0 = batch["latents"]
        noise = torch.randn_like(x0)
        sigma_B = sample_train_sigmas(x0.shape[0], self.shift).to(x0)
        u = model(noise_latents(x0, noise, sigma_B), model_time(sigma_B), batch["cap"], batch["cap_len"])
        loss = (u - flow_target(x0, noise)).square().mean()
        return loss, {"fm": loss.item()}

    def save_pretrained(self, model: torch.nn.Module, out_dir: Path) -> None:
        """The transformer in diffusers format: the EMA weights when `ema_decay > 0`."""
        unwrap_module(model, FlowModule).exported().save_pretrained(str(out_dir))

    def load_pretrained(self, model: torch.nn.Module, ckpt_dir: Path) -> None:
        """Weights written by `save_pretrained` into the transformer (and the EMA, which they are)."""
        module = unwrap_module(model, FlowModule)
        load_safetensors_into(module.transformer, ckpt_dir)
        if module.ema_decay > 0:
            load_safetensors_into(module.ema, ckpt_dir)


