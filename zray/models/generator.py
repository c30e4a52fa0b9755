"""The generator: a Z-Image pipeline through diffusers (a tiny one from `zray.models.tiny` or a real checkpoint).

Two ways to sample, which give the same images (tests/unit/test_sampling.py checks it):
- `generate`: through `ZImagePipeline.__call__` (runs under `torch.no_grad()`; the smoke path and reference);
- `sample_images`: zray's own sampler (`zray.sampling.sample`) on the pipeline's parts, with explicit noise
  and sigmas (8-step teacher, 2-step baseline, gradients when the caller wants them).

The pieces the sampler and the training tasks share are here too: `encode_prompts` (exactly the pipeline's
prompt encoding: chat template, `max_length` padding, the text encoder's `hidden_states[-2]`, padding
dropped), `transformer_fn` (calls `ZImageTransformer2DModel` on a [B, C, H, W] batch), `vae_encode` /
`vae_decode` (pixels in [-1, 1] <-> the transformer's latent space, with the VAE's `scaling_factor` and
`shift_factor` as the pipeline applies them).

Tensor legend: B batch, C latent channels, H x W latent grid; images are [B, 3, H_px, W_px] in [-1, 1].
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from zray.sampling import flow_sigmas, sample

DEFAULT_MAX_SEQUENCE_LENGTH = 64  # Shapes-world prompts are about 30 tokens after the chat template


PIPELINE_CLASS = "ZImagePipeline"  # diffusers' model_index.json `_class_name` of the generators zray trains
TRANSFORMER_CLASS = "ZImageTransformer2DModel"


def check_generator_architecture(model_dir: str | Path, setting: str) -> Path:
    """`model_dir` if it is a Z-Image pipeline (model_index.json `_class_name` ZImagePipeline) or a Z-Image
    transformer (its config.json, or transformer/config.json, `_class_name` ZImageTransformer2DModel): any size, the
    tiny zoo's or a real checkpoint. Else a one-line ConfigError naming `setting`, the dir and what it found."""
    import json

    from zray.config import ConfigError

    path = Path(model_dir)
    for name, expected in (("model_index.json", PIPELINE_CLASS), ("config.json", TRANSFORMER_CLASS),
                           ("transformer/config.json", TRANSFORMER_CLASS)):
        if not (path / name).is_file():
            continue
        try:
            found = json.loads((path / name).read_text()).get("_class_name")
        except (OSError, json.JSONDecodeError, AttributeError) as err:
            raise ConfigError(f"{setting}={str(path)!r} is not allowed: {name} does not read ({err})") from None
        if found == expected:
            return path
        raise ConfigError(f"{setting}={str(path)!r} is not allowed: its {name} names _class_name={found!r}; expected "
                          f"a diffusers Z-Image dir ({PIPELINE_CLASS} pipeline or {TRANSFORMER_CLASS})")
    raise ConfigError(f"{setting}={str(path)!r} is not allowed: no model_index.json or config.json there; expected a "
                      f"diffusers Z-Image dir ({PIPELINE_CLASS} pipeline or {TRANSFORMER_CLASS})")


def load_zimage(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Any:
    """A `diffusers.ZImagePipeline` from a dir written by `save_pretrained` (or a hub id)."""
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(str(path), dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _check_size(pipe: Any, height: int, width: int) -> None:
    factor = pipe.vae_scale_factor * 2
    for name, value in (("height", height), ("width", width)):
        if value <= 0 or value % factor:
            raise ValueError(f"{name}={value} is not allowed: expected a positive multiple of {factor}")


def generate(pipe: Any, prompts: Sequence[str], *, steps: int, seed: int, height: int = 64, width: int = 64,
             guidance_scale: float = 0.0, max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
             latents: torch.Tensor | None = None) -> list[Any]:
    """PIL images, one per prompt, from `steps` Euler steps; deterministic for a given seed (or `latents`).

    `height` and `width` must be multiples of 2 x the VAE's downsampling factor (the pipeline patchifies
    latents with patch size 2).
    """
    _check_size(pipe, height, width)
    if steps < 1:
        raise ValueError(f"steps={steps} is not allowed: expected an integer >= 1")
    if not prompts:
        raise ValueError("prompts is empty: expected at least one prompt")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    out = pipe(prompt=list(prompts), height=height, width=width, num_inference_steps=steps,
               guidance_scale=guidance_scale, generator=generator, max_sequence_length=max_sequence_length,
               output_type="pil", latents=latents)
    return list(out.images)


# ------------------------------------------------------------------------------------ pipeline parts


def encode_prompts(text_encoder: Any, tokenizer: Any, prompts: Sequence[str],
                   max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH) -> list[torch.Tensor]:
    """Prompt embeddings exactly as `ZImagePipeline._encode_prompt` computes them: one [L_i, D] per prompt."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True, enable_thinking=True) for p in prompts]
    inputs = tokenizer(texts, padding="max_length", max_length=max_sequence_length, truncation=True,
                       return_tensors="pt")
    device = next(text_encoder.parameters()).device
    ids, mask = inputs.input_ids.to(device), inputs.attention_mask.to(device).bool()
    hidden = text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
    return [hidden[i][mask[i]] for i in range(len(texts))]


def pad_embeddings(embeds: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A list of [L_i, D] -> ([B, L_max, D] zero-padded, [B] lengths): a fixed-shape batch for collate."""
    lengths = torch.tensor([e.shape[0] for e in embeds], dtype=torch.long)
    out = embeds[0].new_zeros(len(embeds), int(lengths.max()), embeds[0].shape[1])
    for i, e in enumerate(embeds):
        out[i, : e.shape[0]] = e
    return out, lengths


def unpad_embeddings(padded_BLD: torch.Tensor, lengths_B: torch.Tensor) -> list[torch.Tensor]:
    return [padded_BLD[i, : int(n)] for i, n in enumerate(lengths_B)]


def transformer_forward(transformer: Any, x_BCHW: torch.Tensor, t_B: torch.Tensor,
                        cap_feats: Sequence[torch.Tensor]) -> torch.Tensor:
    """`ZImageTransformer2DModel` on a batch: u [B, C, H, W] (the pipeline's model output before it negates it)."""
    dtype = next(transformer.parameters()).dtype
    x_list = list(x_BCHW.to(dtype).unsqueeze(2).unbind(dim=0))  # [C, F=1, H, W] each
    out = transformer(x_list, t_B.to(dtype), list(cap_feats), return_dict=False)[0]
    return torch.stack([o.float() for o in out], dim=0).squeeze(2)


def transformer_fn(transformer: Any):
    """A `zray.sampling.ModelFn` over a transformer; `cond` is the list of prompt embeddings."""
    return lambda x, t, cond: transformer_forward(transformer, x, t, cond)


def vae_encode(vae: Any, images_B3HW: torch.Tensor, sample_posterior: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Pixels in [-1, 1] -> transformer latents `(z - shift_factor) * scaling_factor` (z the posterior mean)."""
    dist = vae.encode(images_B3HW).latent_dist
    z = dist.sample(generator) if sample_posterior else dist.mode()
    return (z - vae.config.shift_factor) * vae.config.scaling_factor


def vae_decode(vae: Any, latents_BCHW: torch.Tensor) -> torch.Tensor:
    """Transformer latents -> pixels (about [-1, 1]), as the pipeline decodes them."""
    z = latents_BCHW.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
    return vae.decode(z, return_dict=False)[0]


def latent_shape(pipe: Any, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
    """[B, C, H, W] of the initial noise, as `ZImagePipeline.prepare_latents` makes it."""
    _check_size(pipe, height, width)
    factor = pipe.vae_scale_factor
    return batch, pipe.transformer.config.in_channels, height // factor, width // factor


def initial_noise(pipe: Any, batch: int, seed: int, height: int = 64, width: int = 64) -> torch.Tensor:
    """The pipeline's initial noise for `seed` (a CPU generator, float32): pass it to both samplers."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(latent_shape(pipe, batch, height, width), generator=generator, dtype=torch.float32)


def sample_latents(pipe: Any, prompts: Sequence[str], noise_BCHW: torch.Tensor, steps: int, shift: float = 3.0,
                   max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH) -> torch.Tensor:
    """Clean latents from zray's sampler (guidance 0), `steps` Euler steps from `noise_BCHW`."""
    if len(prompts) != noise_BCHW.shape[0]:
        raise ValueError(f"{len(prompts)} prompts but noise has batch {noise_BCHW.shape[0]}: expected equal")
    cond = encode_prompts(pipe.text_encoder, pipe.tokenizer, prompts, max_sequence_length)
    return sample(transformer_fn(pipe.transformer), noise_BCHW, flow_sigmas(steps, shift), cond)


@torch.no_grad()
def sample_images(pipe: Any, prompts: Sequence[str], noise_BCHW: torch.Tensor, steps: int, shift: float = 3.0,
                  max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH) -> torch.Tensor:
    """Images [B, 3, H, W] in [0, 1] from zray's sampler, as the pipeline post-processes them (no rounding)."""
    latents = sample_latents(pipe, prompts, noise_BCHW, steps, shift, max_sequence_length)
    return (vae_decode(pipe.vae, latents).float() * 0.5 + 0.5).clamp(0, 1)


def to_pil(images_B3HW: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [0, 1] -> PIL images (rounded like diffusers' `numpy_to_pil`)."""
    arr = (images_B3HW.detach().cpu().permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def pil_to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images -> [B, 3, H, W] float32 in [-1, 1] (the VAE's input range)."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


# ------------------------------------------------------------------ what the training tasks share


def decode_images(column: Any) -> torch.Tensor:
    """A column of PNG bytes (numpy object array or list) -> [B, 3, H, W] float32 in [-1, 1] (`pil_to_tensor`)."""
    return pil_to_tensor([Image.open(io.BytesIO(bytes(b))) for b in column])


def load_safetensors_into(module: torch.nn.Module, ckpt_dir: Path) -> None:
    """Load every *.safetensors file of `ckpt_dir` into `module` (all keys must fit)."""
    from safetensors.torch import load_file

    files = sorted(Path(ckpt_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors under {str(ckpt_dir)!r}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {str(ckpt_dir)!r} does not fit: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")


def unwrap_module(model: torch.nn.Module, cls: type) -> Any:
    """The task's module inside a DeepSpeed / DDP wrapper (`.module`), or the module itself."""
    while not isinstance(model, cls) and hasattr(model, "module"):
        model = model.module
    if not isinstance(model, cls):
        raise TypeError(f"expected a {cls.__name__} (possibly wrapped), got {type(model).__name__}")
    return model
