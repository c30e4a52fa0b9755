"""zray.models.reward_generator: LoRA fine-tuning results load in diffusers alone. For the base generator and for a
Turbo++ student (two copies), adapters perturbed as training would leave them are saved; a fresh Python process that
imports only torch and diffusers applies them with `load_lora_weights` and samples from given latents; its images
must equal zray's own sampler on the fine-tuned module (float32 on CPU; they differ by rounding only)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from zray.models.generator import encode_prompts, load_zimage, pad_embeddings, vae_decode
from zray.models.reward_generator import RewardGenerator
from zray.models.turbo import TwoStepStudent

SIZE = 32
MAX_LEN = 64
PROMPTS = ["a red circle left of a blue square", "two green stars on a gray background"]
ATOL = 1e-4  # [0, 1] pixel units; 8 Euler steps of rounding apart (2 steps: about 1e-6)

SCRIPT = """
import sys
import numpy as np
import torch
from diffusers import ZImagePipeline, ZImageTransformer2DModel

base, lora, student, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
if student == "-":  # the base generator: its pipeline plus the LoRA file
    pipe = ZImagePipeline.from_pretrained(base)
    pipe.load_lora_weights(lora)
    callback = None
else:  # the Turbo++ student's two copies, each with its step's LoRA file, switched after step 1
    step1 = ZImageTransformer2DModel.from_pretrained(student, subfolder="transformer_step1")
    step2 = ZImageTransformer2DModel.from_pretrained(student, subfolder="transformer_step2")
    pipe = ZImagePipeline.from_pretrained(base, transformer=step1)
    pipe.load_lora_weights(lora, weight_name="lora_step1.safetensors")
    step2.load_lora_adapter(lora, weight_name="lora_step2.safetensors", prefix="transformer")

    def callback(pipe, i, t, kwargs):
        pipe.transformer = step2 if i == 0 else step1
        return {}
latents = torch.from_numpy(np.load("latents.npy"))
out = pipe(PROMPTS, latents=latents, height=SIZE, width=SIZE, num_inference_steps=steps, guidance_scale=0.0,
           output_type="np", max_sequence_length=MAX_LEN, callback_on_step_end=callback).images
np.save("images.npy", out)
assert "zray" not in sys.modules
"""


@pytest.fixture(scope="module")
def base(tiny_zoo_config, tmp_path_factory):
    from zray.models.tiny import build_tiny_zimage

    path = build_tiny_zimage(tiny_zoo_config.generator, tmp_path_factory.mktemp("zimage_lora"), image_size=SIZE)
    return path, load_zimage(path)


def _perturb_adapters(model, scale=0.05):
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_B" in name:
                p.add_(scale * torch.randn_like(p))


def _images(model, pipe, noise):
    """zray's sampler on `model` (all steps, no gradient), decoded as the pipeline does: [B, H, W, 3] in [0, 1]."""
    with torch.no_grad():
        cap, cap_len = pad_embeddings(encode_prompts(pipe.text_encoder, pipe.tokenizer, PROMPTS, MAX_LEN))
        x0, _ = model.eval()(noise, cap, cap_len, first=model.num_steps + 1, last=model.num_steps)
        return (vae_decode(pipe.vae, x0).float() * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)


@pytest.mark.parametrize("kind", ["base", "turbo"])
def test_lora_result_samples_in_diffusers_alone(base, kind, tmp_path):
    base_dir, pipe = base
    student_dir = "-"
    if kind == "turbo":
        torch.manual_seed(1)
        student = TwoStepStudent(pipe.transformer, decoupling="copies")
        with torch.no_grad():  # two different step networks, so a missed switch would show
            for p in student.step2.parameters():
                p.add_(0.02 * torch.randn_like(p))
        student_dir = str(student.save_pretrained(tmp_path / "student"))
    source = base_dir if kind == "base" else student_dir
    model = RewardGenerator.from_dir(kind, source, finetune="lora", lora_rank=2, lora_alpha=4.0)
    _perturb_adapters(model)
    lora_dir = model.save_pretrained(tmp_path / "lora")
    noise = torch.randn(len(PROMPTS), 16, SIZE // pipe.vae_scale_factor, SIZE // pipe.vae_scale_factor,
                        generator=torch.Generator().manual_seed(7))
    expected = _images(model, pipe, noise)
    untuned = _images(RewardGenerator.from_dir(kind, source, finetune="lora", lora_rank=2), pipe, noise)
    assert (expected - untuned).abs().max() > 100 * ATOL  # the adapters change the images

    np.save(tmp_path / "latents.npy", noise.numpy())
    (tmp_path / "sample.py").write_text(f"PROMPTS = {PROMPTS!r}\nSIZE = {SIZE}\nMAX_LEN = {MAX_LEN}\n" + SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "sample.py", str(base_dir), str(lora_dir), student_dir,
                           str(model.num_steps)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = torch.from_numpy(np.load(tmp_path / "images.npy"))
    assert got.shape == expected.shape == (len(PROMPTS), SIZE, SIZE, 3)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
