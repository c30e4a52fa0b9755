"""The differentiable student reward (methods.md §5): images in [0, 1] -> per-dimension expected scores, with
gradients to the pixels.

The frozen student scores in its one-token form (methods.md §1, `zray.rubric.render_score_context` with no
reasoning), in the dimensions of its rubric (`zray_rubric.json`, `zray.models.vlm.read_rubric_file`; the built-in
four when it records none), a custom dimension with its anchors in the scoring prompt: the first answer position is the score position, q_S = softmax(score-token logits) there, and
mu_d = sum_s s q_S(s | p, I, d). `DifferentiableReward.reward` aggregates R = sum_d w_d mu_d.

The text goes through the processor (token ids need no gradient). The pixels do not: a PIL round trip would
break the gradient, so `preprocess_images` reproduces the Qwen2-VL image processor (transformers'
`Qwen2VLImageProcessor`, used by the Qwen2.5-VL and Qwen3-VL processors) in torch:

1. target size: `smart_resize(H, W, patch * merge, min_pixels, max_pixels)` (transformers' own function);
2. resize (only when the size changes): bicubic (or bilinear, per `resample`) with antialias, as two separable
   passes (width, then height) each clamped to [0, 1], as torchvision resizes the processor's uint8 images on
   CPU. The clamps keep their value but pass the gradient straight through, so saturated pixels (a white
   background) still get gradients;
3. normalise: (x - image_mean) / image_std (the processor's rescale by 1/255 is the input range [0, 1]);
4. patchify: (B, C, H, W) -> (B * grid_h * grid_w, C * temporal_patch * patch * patch) in the processor's
   order (merge windows of merge x merge patches, each patch channel-major, the frame repeated
   temporal_patch times), and image_grid_thw = (1, grid_h, grid_w) per image.

Tolerance against the processor (its default torchvision backend on CPU; pixel_values in normalised units,
measured on random-noise and smooth 32-100 px images, asserted by tests/models/test_reward.py):
- no resize (e.g. the tiny zoo at its own image size): equal to 3e-7 (float rounding only; tests allow 1e-6);
- with a resize: max 0.016, mean 0.0046 (tests allow 0.02, 0.006). The processor interpolates uint8 in fixed
  point and rounds each pass to uint8; we interpolate in float: about 1.1 / 255 of a pixel apart at most (mean
  0.3 / 255), i.e. 1.1 / 255 / image_std. Expected scores of the tiny test students (sharpened score heads) then
  agree to about 3e-3 on the 1..5 scale (the test allows 0.01); without a resize, to 1e-6. A processor on the
  PIL backend (`Qwen2VLImageProcessorPil`) resizes with PIL's bicubic instead, which is not measured here.

Shape legend: B images (one prompt each), C = 3 channels, H x W pixels, N patches of all images, P patch vector
(C * temporal_patch * patch^2), D rubric dimensions, K = 9 score bins, L tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from zray.rubric import BUILTIN_RUBRIC, Rubric, check_prompt, render_score_context
from zray.scores import expected_score, score_distribution, score_token_ids

_RESAMPLE_MODES = {2: "bilinear", 3: "bicubic"}  # PIL / transformers resample codes -> F.interpolate modes


@dataclass(frozen=True, kw_only=True)
class PixelSpec:
    """What the Qwen2-VL image processor does to an image, read from a loaded `image_processor`."""

    patch_size: int
    merge_size: int
    temporal_patch_size: int
    min_pixels: int
    max_pixels: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    do_resize: bool = True
    resample: str = "bicubic"

    def __post_init__(self) -> None:
        for name in ("patch_size", "merge_size", "temporal_patch_size", "min_pixels", "max_pixels"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"PixelSpec.{name}={getattr(self, name)!r} is not allowed: expected a positive int")
        if self.resample not in _RESAMPLE_MODES.values():
            raise ValueError(f"PixelSpec.resample={self.resample!r} is not allowed: expected one of "
                             f"{tuple(_RESAMPLE_MODES.values())}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise ValueError(f"PixelSpec image_mean={self.image_mean}, image_std={self.image_std} are not allowed: "
                             "expected three means and three positive stds (RGB)")

    @classmethod
    def from_image_processor(cls, image_processor: Any) -> PixelSpec:
        """The spec of a transformers Qwen2-VL image processor; ValueError for settings this module does not
        reproduce (no rescale to [0, 1], no normalisation, another resample filter)."""
        ip = image_processor
        size = dict(ip.size) if ip.size is not None else {}  # a dict or transformers' SizeDict
        if not size.get("shortest_edge") or not size.get("longest_edge"):
            raise ValueError(f"image processor size={ip.size!r} is not allowed: expected shortest_edge (min pixels) "
                             "and longest_edge (max pixels), as Qwen2-VL's")
        if not getattr(ip, "do_rescale", True) or not math.isclose(float(ip.rescale_factor), 1 / 255, rel_tol=1e-6):
            raise ValueError(f"image processor do_rescale={getattr(ip, 'do_rescale', None)}, rescale_factor="
                             f"{getattr(ip, 'rescale_factor', None)} is not allowed: expected a rescale by 1/255 "
                             "(images in [0, 1])")
        if not getattr(ip, "do_normalize", True):
            raise ValueError("image processor do_normalize=False is not allowed: expected normalisation")
        resample = int(getattr(ip, "resample", 3))
        if resample not in _RESAMPLE_MODES:
            raise ValueError(f"image processor resample={resample} is not allowed: expected one of "
                             f"{tuple(_RESAMPLE_MODES)} (bilinear, bicubic)")
        mean, std = ip.image_mean, ip.image_std
        mean = (float(mean),) * 3 if isinstance(mean, (int, float)) else tuple(float(m) for m in mean)
        std = (float(std),) * 3 if isinstance(std, (int, float)) else tuple(float(s) for s in std)
        return cls(patch_size=int(ip.patch_size), merge_size=int(ip.merge_size),
                   temporal_patch_size=int(ip.temporal_patch_size), min_pixels=int(size["shortest_edge"]),
                   max_pixels=int(size["longest_edge"]), image_mean=mean, image_std=std,
                   do_resize=bool(getattr(ip, "do_resize", True)), resample=_RESAMPLE_MODES[resample])

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) the processor resizes an image to (transformers' `smart_resize`)."""
        if not self.do_resize:
            return height, width
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        return smart_resize(height, width, factor=self.patch_size * self.merge_size, min_pixels=self.min_pixels,
                            max_pixels=self.max_pixels)


def _straight_through_clamp(x: torch.Tensor) -> torch.Tensor:
    """clamp(x, 0, 1) in value, identity in gradient."""
    return x + (x.clamp(0.0, 1.0) - x).detach()


def preprocess_images(images_BCHW: torch.Tensor, spec: PixelSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values_NP, image_grid_thw_B3) as the processor gives them for these images, differentiable.

    `images_BCHW` are RGB floats in [0, 1] (a uint8 image u is u / 255); values outside are clamped, with the
    gradient passed straight through. pixel_values are float32 at least.
    """
    if images_BCHW.dim() != 4 or images_BCHW.shape[1] != 3:
        raise ValueError(f"images shape {tuple(images_BCHW.shape)}: expected (B, 3, H, W) RGB in [0, 1]")
    if not images_BCHW.is_floating_point():
        raise ValueError(f"images dtype {images_BCHW.dtype}: expected floats in [0, 1] (divide uint8 by 255)")
    x = images_BCHW if images_BCHW.dtype == torch.float64 else images_BCHW.float()
    x = _straight_through_clamp(x)  # read as a uint8 image holds it: saturated outside [0, 1]
    batch, channels, height, width = x.shape
    new_h, new_w = spec.target_size(height, width)
    if (new_h, new_w) != (height, width):  # as torchvision's uint8 resize on CPU: width pass, then height pass
        for size in ((height, new_w), (new_h, new_w)):
            x = F.interpolate(x, size=size, mode=spec.resample, align_corners=False, antialias=True)
            x = _straight_through_clamp(x)  # the uint8 intermediate and result are clamped to [0, 255]
    mean = torch.tensor(spec.image_mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(spec.image_std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    x = (x - mean) / std
    patch, merge, temporal = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    grid_h, grid_w = new_h // patch, new_w // patch
    patches = x.reshape(batch, channels, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
    patches = patches.permute(0, 2, 5, 3, 6, 1, 4, 7)  # B, h/m, w/m, m, m, C, p, p
    patches = patches.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, temporal, -1, -1)  # the frame, temporal times
    pixel_values_NP = patches.reshape(batch * grid_h * grid_w, channels * temporal * patch * patch)
    grid_B3 = torch.tensor([[1, grid_h, grid_w]] * batch, dtype=torch.long, device=x.device)
    return pixel_values_NP, grid_B3


class DifferentiableReward(torch.nn.Module):
    """The frozen student as a reward: `forward(images_BCHW, prompts) -> mu_BD`, gradients to the pixels.

    Parameters never require grad and the VLM stays in eval mode (also under `.train()`), but gradients flow
    through its activations to `images_BCHW`. Usage, in a reward-gradient step:

        reward = DifferentiableReward(student_dir, dtype=torch.bfloat16, device="cuda")
        images = (vae.decode(latents).sample / 2 + 0.5)              # (B, 3, H, W) in [0, 1], with grad
        loss = -reward.reward(images, prompts).mean()
        loss.backward()                                              # grads reach the generator, not the student

    `dimensions`: a subset of the student's rubric (`rubric`, default its `zray_rubric.json`, else the built-in
    four), None = all of them; a custom dimension's anchors go into its scoring prompt. `weights` (one per dimension,
    default equal weights 1 / D, so R stays on the 1..5 scale) aggregate R = sum_d w_d mu_d in `reward`. The student runs once per dimension (the vision tower too). Keep the reward out
    of the generator's module tree (hold it beside, not inside), or the generator's state_dict carries the VLM.
    """

    def __init__(self, model_dir: str | Path, dimensions: Sequence[str] | None = None,
                 weights: Sequence[float] | None = None, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", rubric: Rubric | None = None) -> None:
        super().__init__()
        from zray.models.vlm import load_vlm, read_rubric_file

        rubric = read_rubric_file(model_dir) if rubric is None else rubric
        dims, w = _dimensions_and_weights(rubric, dimensions, weights)  # checked before the load
        model, processor = load_vlm(model_dir, dtype=dtype, device=device)
        self._attach(model, processor, rubric, dims, w)

    @classmethod
    def from_model(cls, model: Any, processor: Any, dimensions: Sequence[str] | None = None,
                   weights: Sequence[float] | None = None, rubric: Rubric | None = None) -> DifferentiableReward:
        """The reward over a student VLM and processor already in memory (on their device and dtype); `rubric`
        defaults to the built-in four dimensions. The same checks and behaviour as a reward loaded from disk."""
        rubric = BUILTIN_RUBRIC if rubric is None else rubric
        dims, w = _dimensions_and_weights(rubric, dimensions, weights)
        reward = cls.__new__(cls)
        torch.nn.Module.__init__(reward)
        reward._attach(model, processor, rubric, dims, w)
        return reward

    def _attach(self, model: Any, processor: Any, rubric: Rubric, dims: tuple[str, ...], w: list[float]) -> None:
        device = model.device
        self.model = model.requires_grad_(False).eval()
        self.processor = processor
        self.dimensions = dims
        self.anchors = {d: rubric.anchors_for(d) for d in dims}  # None: a built-in dimension, built-in anchors
        self.spec = PixelSpec.from_image_processor(processor.image_processor)
        self.register_buffer("weights_D", torch.tensor(w, dtype=torch.float32, device=device), persistent=False)
        self.register_buffer("score_ids_K", torch.tensor(score_token_ids(processor), device=device),
                             persistent=False)

    def train(self, mode: bool = True) -> DifferentiableReward:
        """Keeps the frozen VLM in eval mode whatever `mode` (a generator's `.train()` may reach it)."""
        super().train(mode)
        self.model.eval()
        return self

    @property
    def device(self) -> torch.device:
        return self.score_ids_K.device

    def text_inputs(self, prompts: Sequence[str], dimension: str, num_image_tokens: int) -> dict[str, torch.Tensor]:
        """input_ids_BL, attention_mask_BL, mm_token_type_ids_BL of the student's scoring context, padded on the
        left (the last position is the score position), with `num_image_tokens` image placeholders each."""
        image_token = self.processor.image_token
        texts = []
        for prompt in prompts:
            text = render_score_context(self.processor, check_prompt(prompt), dimension, None,
                                        self.anchors[dimension])
            if text.count(image_token) != 1:
                raise ValueError(f"the scoring context has {text.count(image_token)} {image_token} placeholders: "
                                 "expected exactly one image")
            texts.append(text.replace(image_token, image_token * num_image_tokens))
        inputs = self.processor(text=texts, return_tensors="pt", padding=True, padding_side="left")
        keys = ("input_ids", "attention_mask", "mm_token_type_ids")
        return {k: inputs[k].to(self.device) for k in keys}

    def _check(self, images_BCHW: torch.Tensor, prompts: Sequence[str]) -> list[str]:
        if isinstance(prompts, str):
            raise ValueError("prompts is a string: expected a sequence of B prompts, one per image")
        prompts = list(prompts)
        if images_BCHW.dim() != 4 or len(prompts) != images_BCHW.shape[0] or not prompts:
            raise ValueError(f"{len(prompts)} prompts for images of shape {tuple(images_BCHW.shape)}: expected "
                             "(B, 3, H, W) images and B >= 1 prompts")
        return prompts

    def distributions(self, images_BCHW: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """q_BDK: the student's score distribution per image and dimension (float32 at least), with gradients."""
        prompts = self._check(images_BCHW, prompts)
        pixel_values_NP, grid_B3 = preprocess_images(images_BCHW.to(self.device), self.spec)
        pixel_values_NP = pixel_values_NP.to(self.model.dtype)
        height, width = self.spec.target_size(*images_BCHW.shape[-2:])
        num_tokens = (height // self.spec.patch_size) * (width // self.spec.patch_size) // self.spec.merge_size ** 2
        q_per_dim = []
        for dimension in self.dimensions:
            text = self.text_inputs(prompts, dimension, num_tokens)
            out = self.model(**text, pixel_values=pixel_values_NP, image_grid_thw=grid_B3, logits_to_keep=1,
                             use_cache=False)
            q_per_dim.append(score_distribution(out.logits[:, -1, :], self.score_ids_K))
        return torch.stack(q_per_dim, dim=1)

    def forward(self, images_BCHW: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """mu_BD: expected score per image and dimension (in [1, 5]), with gradients to `images_BCHW`."""
        return expected_score(self.distributions(images_BCHW, prompts))

    def reward(self, images_BCHW: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """R_B = sum_d w_d mu_d."""
        mu_BD = self.forward(images_BCHW, prompts)
        return mu_BD @ self.weights_D.to(mu_BD.dtype)


def _dimensions_and_weights(rubric: Rubric, dimensions: Sequence[str] | None,
                            weights: Sequence[float] | None) -> tuple[tuple[str, ...], list[float]]:
    """The reward's dimensions (a subset of `rubric`'s, None = all) and their weights (default 1 / D each)."""
    dims = rubric.dimensions if dimensions is None else tuple(dimensions)
    for d in dims:
        if d not in rubric.dimensions:
            raise ValueError(f"dimension={d!r} is not allowed: expected one of the reward's rubric "
                             f"{rubric.dimensions} ({rubric.source})")
    if not dims or len(set(dims)) != len(dims):
        raise ValueError(f"dimensions={dims!r} is not allowed: expected a non-empty subset of the reward's rubric "
                         f"{rubric.dimensions} without repeats")
    w = [1.0 / len(dims)] * len(dims) if weights is None else [float(v) for v in weights]
    if len(w) != len(dims) or not all(math.isfinite(v) for v in w):
        raise ValueError(f"weights={weights!r} is not allowed: expected {len(dims)} finite floats, one per "
                         f"dimension of {dims}")
    return dims, w
