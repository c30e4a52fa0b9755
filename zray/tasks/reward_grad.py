"""Reward-gradient fine-tuning of a generator with the frozen differentiable student reward (`RewardGradTask`,
methods.md §5; ReFL extended to earlier steps, DRaFT-K as a knob).

Rows are prompts (the world's generator_train table, or a prompts import's train split: `prompt`, and `image_id` /
`image` when the flow-matching regulariser is on). The reward's dimensions are its rubric's (`zray_rubric.json`,
`zray.models.vlm.read_rubric_file`; the built-in four when it records none): `reward_finetune.dimensions` (empty =
all) and `weights` are checked against it (`reward_dimensions`), custom dimensions scored with their anchors. One update, per micro batch:

1. noise eps [B, C, h, w] from the worker's (seeded, checkpointed) RNG; the gradient window (first, last) of the
   sampler: ReFL's step k ~ U{k_min .. k_max} over the whole schedule, or DRaFT-K's last K steps
   (`zray.losses.refl.grad_window`); the base generator samples N Euler steps along `flow_sigmas(N, shift)`, the
   Turbo++ student its two steps 1 -> sigma_2 -> 0;
2. the generator runs the steps before the window without gradient, the window's with it, and jumps to x0_hat
   (`zray.models.reward_generator.RewardGenerator`, one module call);
3. the frozen VAE decodes x0_hat **with gradient** (pixels in [0, 1], unclamped: the reward's preprocessing clamps
   with a straight-through gradient); the frozen student (`zray.models.reward.DifferentiableReward`, parameters
   without grad, in eval mode) scores it per dimension, mu_BD;
4. `L = -mean_b sum_d w_d mu_bd (+ fm_weight * L_fm)` (`zray.losses.refl.refl_loss`); L_fm is the flow-matching
   MSE on the world renders of the same rows, as `zray.tasks.flow.FlowTask` computes it.

Frozen parts (VAE, text encoder, tokenizer from `pipeline_dir`, the reward from `reward_dir`) are loaded lazily in
each process and never pickled; prompt embeddings (and render latents) are cached per worker. The reward and the
decoding VAE live on the device of the batch.

Tensor legend: B batch, C latent channels, h x w latent grid, L prompt tokens, D rubric dimensions.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from zray.config import ConfigError, RewardFinetuneConfig
from zray.losses.refl import check_weights, grad_window, refl_loss
from zray.models.generator import (DEFAULT_MAX_SEQUENCE_LENGTH, decode_images, encode_prompts, pad_embeddings,
                                   unwrap_module, vae_decode, vae_encode)
from zray.models.reward_generator import RewardGenerator
from zray.rubric import Rubric
from zray.sampling import sample_train_sigmas


def reward_dimensions(cfg: RewardFinetuneConfig, rubric: Rubric) -> tuple[tuple[str, ...], list[float]]:
    """(dimensions, weights) of R: `cfg.dimensions` checked against the reward's rubric (empty = all of its
    dimensions), `cfg.weights` one per dimension (empty = equal); ConfigError naming the field, the value and what
    the rubric allows."""
    unknown = [d for d in cfg.dimensions if d not in rubric.dimensions]
    if unknown:
        raise ConfigError(f"reward_finetune.dimensions={cfg.dimensions!r} is not allowed: {unknown} not in the "
                          f"reward's rubric ({rubric.source}); expected a subset of {rubric.dimensions} (empty = all)")
    dims = tuple(cfg.dimensions) or rubric.dimensions
    try:
        weights = check_weights(cfg.weights, len(dims))
    except ValueError:
        raise ConfigError(f"reward_finetune.weights={cfg.weights!r} is not allowed: expected {len(dims)} finite "
                          f"floats, one per dimension of {dims} (the reward's rubric, {rubric.source}), or none "
                          "(equal weights)") from None
    return dims, weights


class RewardGradTask:
    """Fine-tune the `kind` generator at `generator_dir` ("base": a ZImagePipeline folder; "turbo": a TwoStepStudent
    folder) on the reward of the student at `reward_dir`; VAE, text encoder and tokenizer from `pipeline_dir`."""

    name = "reward_grad"

    def __init__(self, cfg: RewardFinetuneConfig, *, kind: str, generator_dir: str | Path, pipeline_dir: str | Path,
                 reward_dir: str | Path, image_size: int = 64,
                 max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH) -> None:
        self.cfg = cfg
        self.kind = kind
        self.generator_dir, self.pipeline_dir, self.reward_dir = str(generator_dir), str(pipeline_dir), str(reward_dir)
        self.image_size = image_size
        self.max_sequence_length = max_sequence_length
        from zray.models.vlm import read_rubric_file

        self.rubric = read_rubric_file(reward_dir)  # the reward's dimensions and anchors
        self.dimensions, self.weights = reward_dimensions(cfg, self.rubric)
        self._frozen: dict[str, Any] | None = None  # per process, never pickled
        self._scorers: dict[str, Any] = {}  # device -> (VAE, reward) on that device
        self._cache: dict[str, torch.Tensor] = {}  # prompt -> embedding [L, D]; "image:<id>" -> latent [C, h, w]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_frozen": None, "_scorers": {}, "_cache": {}}

    # ------------------------------------------------------------------------------------ frozen parts

    def frozen_parts(self) -> dict[str, Any]:
        """The frozen VAE, text encoder and tokenizer (CPU, float32), loaded once per process."""
        if self._frozen is None:
            from diffusers import AutoencoderKL
            from transformers import AutoModel, AutoTokenizer

            root = Path(self.pipeline_dir)
            vae = AutoencoderKL.from_pretrained(str(root / "vae"), dtype=torch.float32).eval().requires_grad_(False)
            text_encoder = AutoModel.from_pretrained(str(root / "text_encoder"), dtype=torch.float32).eval()
            self._frozen = {"vae": vae, "text_encoder": text_encoder.requires_grad_(False),
                            "tokenizer": AutoTokenizer.from_pretrained(str(root / "tokenizer"))}
        return self._frozen

    def scorers(self, device: torch.device) -> tuple[Any, Any]:
        """(VAE, DifferentiableReward) on `device`: frozen (no parameter requires grad), gradients flow through."""
        key = str(device)
        if key not in self._scorers:
            from zray.models.reward import DifferentiableReward

            vae = self.frozen_parts()["vae"]
            vae = vae if device.type == "cpu" else copy.deepcopy(vae).to(device)
            reward = DifferentiableReward(self.reward_dir, self.dimensions, weights=self.weights, device=device,
                                          rubric=self.rubric)
            self._scorers[key] = (vae, reward)
        return self._scorers[key]

    def latent_shape(self, batch: int) -> tuple[int, int, int, int]:
        """[B, C, h, w] of the sampler's noise for `image_size` images."""
        vae = self.frozen_parts()["vae"]
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        if self.image_size % (2 * factor):
            raise ValueError(f"image_size={self.image_size} is not allowed: expected a multiple of {2 * factor} "
                             "(the VAE's downsampling x the transformer's patch size 2)")
        return batch, int(vae.config.latent_channels), self.image_size // factor, self.image_size // factor

    # ------------------------------------------------------------------------------------ the learner task

    def build_model(self) -> torch.nn.Module:
        cfg = self.cfg
        model = RewardGenerator.from_dir(self.kind, self.generator_dir, finetune=cfg.finetune,
                                         lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha or None,
                                         num_steps=cfg.base_steps, shift=cfg.shift, sigma_2=cfg.sigma_2,
                                         gradient_checkpointing=cfg.gradient_checkpointing)
        grad_window(model.num_steps, k_min=cfg.k_min, k_max=cfg.k_max, draft_k=cfg.draft_k)  # fail before training
        return model.train()

    @torch.no_grad()
    def embed(self, prompts: list[str]) -> list[torch.Tensor]:
        """Prompt embeddings [L_i, D] as the pipeline computes them, cached per prompt."""
        todo = sorted({p for p in prompts if p not in self._cache})
        if todo:
            parts = self.frozen_parts()
            for p, e in zip(todo, encode_prompts(parts["text_encoder"], parts["tokenizer"], todo,
                                                 self.max_sequence_length)):
                self._cache[p] = e.clone()
        return [self._cache[p] for p in prompts]

    @torch.no_grad()
    def render_latents(self, rows: dict[str, Any]) -> torch.Tensor:
        """Latents [B, C, h, w] of the rows' renders (posterior mean, as FlowTask encodes them), cached per image."""
        ids = [f"image:{i}" for i in rows["image_id"]] if "image_id" in rows else None
        if ids is None:
            return vae_encode(self.frozen_parts()["vae"], decode_images(rows["image"]))
        todo = [k for k, i in enumerate(ids) if i not in self._cache]
        if todo:
            latents = vae_encode(self.frozen_parts()["vae"], decode_images([rows["image"][k] for k in todo]))
            for j, k in enumerate(todo):
                self._cache[ids[k]] = latents[j].clone()
        return torch.stack([self._cache[i] for i in ids])

    def collate(self, rows: dict[str, Any]) -> dict[str, Any]:
        prompts = [str(p) for p in rows["prompt"]]
        cap, cap_len = pad_embeddings(self.embed(prompts))
        batch: dict[str, Any] = {"cap": cap, "cap_len": cap_len, "prompts": prompts}
        if self.cfg.fm_weight > 0:
            if "image" not in rows:
                raise ValueError("reward_finetune.fm_weight > 0 needs the rows' renders: expected an 'image' column")
            batch["fm_x0"] = self.render_latents(rows)
        return batch

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        cap = batch["cap"]
        num = cap.shape[0]
        device = cap.device
        first, last = grad_window(unwrap_module(model, RewardGenerator).num_steps, k_min=cfg.k_min, k_max=cfg.k_max,
                                  draft_k=cfg.draft_k)
        noise = torch.randn(self.latent_shape(num)).to(device)
        fm_args: dict[str, torch.Tensor] = {}
        if "fm_x0" in batch:
            x0 = batch["fm_x0"].float()
            fm_args = {"fm_x0_BCHW": x0, "fm_noise_BCHW": torch.randn(x0.shape).to(device),
                       "fm_sigma_B": sample_train_sigmas(num, cfg.shift).to(device)}
        x0_hat, fm = model(noise, cap, batch["cap_len"], first=first, last=last, **fm_args)
        vae, reward = self.scorers(device)
        images = vae_decode(vae, x0_hat).float() * 0.5 + 0.5  # [0, 1] up to the decoder's overshoot
        mu_BD = reward(images, batch["prompts"])
        loss, metrics = refl_loss(mu_BD, torch.tensor(self.weights, device=device), fm_loss=fm,
                                  fm_weight=cfg.fm_weight)
        metrics.update({f"mu_{d}": float(mu_BD[:, j].detach().mean()) for j, d in enumerate(self.dimensions)})
        metrics.update(grad_first=float(first), grad_last=float(last))
        return loss, metrics

    def save_pretrained(self, model: torch.nn.Module, out_dir: Path) -> None:
        """LoRA adapters in diffusers' pipeline LoRA format, or the full network (`RewardGenerator`'s layout)."""
        unwrap_module(model, RewardGenerator).save_pretrained(out_dir)

    def load_pretrained(self, model: torch.nn.Module, ckpt_dir: Path) -> None:
        unwrap_module(model, RewardGenerator).load_finetuned(ckpt_dir)

    # ------------------------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def sample(self, model: RewardGenerator, prompts: list[str], noise_BCHW: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] from the generator's full sampler (no gradient), as the pipeline decodes."""
        cap, cap_len = pad_embeddings(self.embed(prompts))
        was_training = model.training
        model.eval()
        x0, _ = model(noise_BCHW, cap, cap_len, first=model.num_steps + 1, last=model.num_steps)
        model.train(was_training)
        return (vae_decode(self.frozen_parts()["vae"], x0).float() * 0.5 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def student_scores(self, images_BCHW: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """mu_BD: the frozen student's expected score of each image in each of `self.dimensions` (1..5)."""
        return self.scorers(torch.device("cpu"))[1](images_BCHW, prompts)
