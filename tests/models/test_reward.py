"""The differentiable student reward (zray/models/reward.py): torch preprocessing equals the processor's, expected
scores equal the processor path's, gradients reach every pixel, finite differences agree, the student stays frozen.

Two tiny students: a Qwen2.5-VL that takes 64 px images as they are, and a Qwen3-VL that resizes them to 80 px
(`VLMConfig.vision_input_size`), so both the exact path and the resize path are covered.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from zray.config import VLMConfig
from zray.models.reward import DifferentiableReward, PixelSpec, preprocess_images
from zray.models.tiny import build_tiny_vlm, sharpen_score_head
from zray.models.vlm import cached_processor, load_vlm, score_distributions_hf
from zray.rubric import DIMENSIONS, ScoreRequest
from zray.scores import expected_score, score_token_ids

IMAGE_SIZE = 64
ARCHS = {"qwen2_5_vl": 0, "qwen3_vl": 80}  # arch -> vision_input_size (0: no resize of 64 px images)
EXACT_ATOL = 1e-6  # pixel_values, no resize
RESIZE_MAX, RESIZE_MEAN = 0.02, 0.006  # pixel_values with a resize (uint8 fixed point vs float), normalised units
MU_RESIZE_ATOL = 0.01  # expected scores (1..5) with a resize; measured up to 3e-3 with these students
PROMPTS = ["a red circle", "two blue squares on a white background"]


@pytest.fixture(scope="module", params=sorted(ARCHS))
def student_dir(request, tmp_path_factory):
    """A tiny student of each arch with a sharpened score head (q clearly image-dependent), saved."""
    cfg = VLMConfig(arch=request.param, vision_input_size=ARCHS[request.param], seed=4)
    out = build_tiny_vlm(cfg, tmp_path_factory.mktemp(request.param), image_size=IMAGE_SIZE)
    model, processor = load_vlm(out)
    sharpen_score_head(model, score_token_ids(processor), scale=3.0, seed=1)
    model.save_pretrained(out)
    return out


def _noise_u8(num: int, size: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (num, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _smooth(num: int, size: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """Low-frequency images in [0.2, 0.8] (a bicubic resize of them stays inside [0, 1])."""
    low = torch.rand(num, 3, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return 0.2 + 0.6 * torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


def _pil(u8_BCHW: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(u.permute(1, 2, 0).numpy()) for u in u8_BCHW]


@pytest.mark.parametrize("size", [48, 64, 100])
def test_preprocess_matches_the_processor(student_dir, size):
    processor = cached_processor(str(student_dir))
    spec = PixelSpec.from_image_processor(processor.image_processor)
    u8 = torch.cat([_noise_u8(2, size, size), (_smooth(1, size, size) * 255).round().to(torch.uint8)])
    pixel_values, grid = preprocess_images(u8.float() / 255, spec)
    resized = tuple(spec.target_size(size, size)) != (size, size)
    assert resized == (size == 100 or spec.min_pixels == 80 * 80)  # Qwen3-VL's processor resizes to 80 x 80
    for images in (_pil(u8), list(u8)):  # PIL images and uint8 CHW tensors give the processor the same pixels
        ref = processor.image_processor(images=images, return_tensors="pt")
        assert torch.equal(grid, ref["image_grid_thw"])
        err = (pixel_values - ref["pixel_values"]).abs()
        if resized:
            assert err.max() < RESIZE_MAX and err.mean() < RESIZE_MEAN, (float(err.max()), float(err.mean()))
        else:
            assert err.max() < EXACT_ATOL


def test_resize_clamps_in_value_and_passes_gradient_straight_through(student_dir, monkeypatch):
    """A black / white step overshoots [0, 1] under a bicubic resize: the clamp shows in the values (as in the
    processor's uint8) but not in the gradient, which is the unclamped resize's."""
    import zray.models.reward as reward_module

    spec = PixelSpec.from_image_processor(cached_processor(str(student_dir)).image_processor)
    step = (torch.arange(100) >= 50).float().expand(1, 3, 100, 100)  # resized to 64 (Qwen2.5-VL) or 80 (Qwen3-VL)
    num_patches = spec.target_size(100, 100)[0] ** 2 // spec.patch_size ** 2
    patch_dim = 3 * spec.temporal_patch_size * spec.patch_size ** 2
    weights = torch.randn(num_patches, patch_dim, generator=torch.Generator().manual_seed(0))

    def run():
        images = step.clone().requires_grad_(True)
        pixel_values, _ = preprocess_images(images, spec)
        (pixel_values * weights).sum().backward()
        return pixel_values.detach(), images.grad

    clamped, grad = run()
    monkeypatch.setattr(reward_module, "_straight_through_clamp", lambda x: x)
    unclamped, grad_unclamped = run()
    assert (clamped != unclamped).any()  # the clamp is active on this image
    assert torch.allclose(grad, grad_unclamped, atol=1e-6)


def test_preprocess_rejects_bad_images(student_dir):
    spec = PixelSpec.from_image_processor(cached_processor(str(student_dir)).image_processor)
    with pytest.raises(ValueError, match=r"expected \(B, 3, H, W\)"):
        preprocess_images(torch.zeros(1, 4, 64, 64), spec)
    with pytest.raises(ValueError, match="divide uint8 by 255"):
        preprocess_images(torch.zeros(1, 3, 64, 64, dtype=torch.uint8), spec)


def test_mu_matches_the_processor_path(student_dir):
    reward = DifferentiableReward(student_dir)
    u8 = torch.cat([_noise_u8(1, IMAGE_SIZE, 7), (_smooth(1, IMAGE_SIZE, 8) * 255).round().to(torch.uint8)])
    with torch.no_grad():
        q_BDK = reward.distributions(u8.float() / 255, PROMPTS)
        mu_BD = reward(u8.float() / 255, PROMPTS)
        ref_BDK = torch.stack([score_distributions_hf(reward.model, reward.processor, [
            ScoreRequest(p, im, d) for p, im in zip(PROMPTS, _pil(u8))]) for d in DIMENSIONS], dim=1)
        r_B = reward.reward(u8.float() / 255, PROMPTS)
    assert q_BDK.shape == (2, len(DIMENSIONS), 9) and mu_BD.shape == (2, len(DIMENSIONS))
    assert q_BDK.max() > 0.3  # sharpened: far from uniform, so a wrong image would show
    tol = 1e-5 if ARCHS[reward.model.config.model_type] == 0 else MU_RESIZE_ATOL
    assert (mu_BD - expected_score(ref_BDK)).abs().max() < tol
    assert (q_BDK - ref_BDK).abs().max() < tol
    assert torch.allclose(r_B, mu_BD.mean(dim=1), atol=1e-6)  # equal weights 1 / D


def test_gradients_reach_every_pixel(student_dir):
    reward = DifferentiableReward(student_dir, dimensions=("alignment", "realism"), weights=(0.7, 0.3))
    images = _smooth(2, IMAGE_SIZE, 9)
    images[1, :, :, : IMAGE_SIZE // 2] = 1.0  # a saturated white half: the resize's clamp must not stop the gradient
    images.requires_grad_(True)
    reward.reward(images, PROMPTS).sum().backward()
    grad = images.grad
    assert torch.isfinite(grad).all()
    assert (grad != 0).all(), f"{int((grad == 0).sum())} of {grad.numel()} pixel channels get no gradient"
    # each image's reward depends on its own pixels only
    images2 = images.detach().clone().requires_grad_(True)
    reward.reward(images2, PROMPTS)[0].backward()
    assert images2.grad[1].abs().max() == 0 and (images2.grad[0] != 0).all()


@pytest.fixture
def float64_throughout(monkeypatch):
    """transformers' Qwen-VL RMSNorms and vision rotary embedding compute in float32 whatever the model dtype, which
    limits a float64 finite-difference check to about 1e-3; these patches keep float64 (same maths)."""
    import transformers.models.qwen2_5_vl.modeling_qwen2_5_vl as qwen25
    import transformers.models.qwen3_vl.modeling_qwen3_vl as qwen3

    def rms_norm(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    def rotary_vision(q, k, cos, sin):
        cos, sin = cos.unsqueeze(-2).to(q.dtype), sin.unsqueeze(-2).to(q.dtype)
        return q * cos + qwen25.rotate_half(q) * sin, k * cos + qwen25.rotate_half(k) * sin

    for module, norm in ((qwen25, qwen25.Qwen2_5_VLRMSNorm), (qwen3, qwen3.Qwen3VLTextRMSNorm)):
        monkeypatch.setattr(norm, "forward", rms_norm)
        monkeypatch.setattr(module, "apply_rotary_pos_emb_vision", rotary_vision)


def test_finite_differences_float64(student_dir, float64_throughout):
    reward = DifferentiableReward(student_dir, dimensions=("alignment", "plausibility"), weights=(0.5, 0.5),
                                  dtype=torch.float64)
    images = _smooth(2, IMAGE_SIZE, 10, dtype=torch.float64).requires_grad_(True)  # clamps inactive: smooth
    reward.reward(images, PROMPTS).sum().backward()
    gen = torch.Generator().manual_seed(11)
    eps = 1e-3  # central differences along unit directions: truncation ~1e-8 relative here
    with torch.no_grad():
        for _ in range(3):
            v = torch.randn(images.shape, generator=gen, dtype=torch.float64)
            v /= v.norm()
            plus = reward.reward(images + eps * v, PROMPTS).sum()
            minus = reward.reward(images - eps * v, PROMPTS).sum()
            numeric = float((plus - minus) / (2 * eps))
            analytic = float((images.grad * v).sum())
            assert abs(analytic) > 1e-6
            assert numeric == pytest.approx(analytic, rel=1e-5)


def test_student_is_frozen(student_dir):
    reward = DifferentiableReward(student_dir, dimensions=("realism",))
    reward.train()
    assert not reward.model.training and not any(m.training for m in reward.model.modules())
    assert not any(p.requires_grad for p in reward.parameters())
    images = _smooth(1, IMAGE_SIZE, 12).requires_grad_(True)
    reward(images, PROMPTS[:1]).sum().backward()
    assert images.grad is not None
    assert all(p.grad is None for p in reward.parameters())


def test_rejects_bad_arguments(student_dir):
    with pytest.raises(ValueError, match="dimension='beauty' is not allowed"):
        DifferentiableReward(student_dir, dimensions=("beauty",))
    with pytest.raises(ValueError, match="weights=.*expected 2 finite floats"):
        DifferentiableReward(student_dir, dimensions=("alignment", "realism"), weights=(1.0,))
    with pytest.raises(ValueError, match="without repeats"):
        DifferentiableReward(student_dir, dimensions=("realism", "realism"))
    reward = DifferentiableReward(student_dir, dimensions=("realism",))
    with pytest.raises(ValueError, match="1 prompts for images of shape"):
        reward(torch.zeros(2, 3, 64, 64), PROMPTS[:1])
    with pytest.raises(ValueError, match="prompts is a string"):
        reward(torch.zeros(1, 3, 64, 64), "a red circle")
    with pytest.raises(ValueError, match="prompt='' is not allowed"):
        reward(torch.zeros(1, 3, 64, 64), [""])


def test_noise_image_scores_differ_from_smooth(student_dir):
    """The reward reads the pixels (a constant reward would pass the match tests trivially)."""
    reward = DifferentiableReward(student_dir)
    images = torch.cat([_noise_u8(1, IMAGE_SIZE, 13).float() / 255, _smooth(1, IMAGE_SIZE, 14)])
    with torch.no_grad():
        mu = reward(images, [PROMPTS[0]] * 2)
    assert (mu[0] - mu[1]).abs().max() > 5e-3
    assert np.isfinite(mu.numpy()).all()


def test_from_model_equals_the_reward_loaded_from_disk(student_dir):
    """A reward over a VLM already in memory (the GPU bench's random 8B one) is the loaded reward: same checks,
    weights, anchors, scores and image gradients."""
    loaded = DifferentiableReward(student_dir, dimensions=("alignment", "realism"), weights=(0.75, 0.25))
    model, processor = load_vlm(student_dir)
    in_memory = DifferentiableReward.from_model(model, processor, dimensions=("alignment", "realism"),
                                                weights=(0.75, 0.25))
    assert in_memory.dimensions == loaded.dimensions and in_memory.anchors == loaded.anchors
    assert torch.equal(in_memory.weights_D, loaded.weights_D)
    assert not any(p.requires_grad for p in in_memory.parameters()) and not in_memory.model.training
    images = _smooth(2, IMAGE_SIZE, 15).requires_grad_(True)
    grads = []
    for reward in (loaded, in_memory):
        r = reward.reward(images, PROMPTS)
        grads.append((r.detach(), torch.autograd.grad(r.sum(), images)[0]))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    assert DifferentiableReward.from_model(model, processor).dimensions == DIMENSIONS
    with pytest.raises(ValueError, match="dimension='beauty' is not allowed"):
        DifferentiableReward.from_model(model, processor, dimensions=("beauty",))
