"""The generator's training tasks (VAE, flow) on tiny models: losses fall, checkpoints round-trip, and a
transformer trained with zray's loss samples the same images through zray's sampler and ZImagePipeline."""

import numpy as np
import pytest
import torch

from zray.config import GeneratorConfig, WorldConfig
from zray.data.corpus import generator_rows
from zray.data.prompt_grammar import parse_prompt
from zray.data.world import ALL_COMBOS
from zray.models.generator import (encode_prompts, initial_noise, load_zimage, sample_images, vae_decode,
                                   vae_encode)
from zray.evaluation.generator import frechet_to, image_features, judge_against, main_colour
from zray.models.generator import decode_images
from zray.tasks.flow import FlowTask
from zray.tasks.vae import VAETask, chroma_B1HW
from zray.models.tiny import build_tiny_zimage

SIZE = 32
GEN = GeneratorConfig(dim=32, num_layers=1, num_refiner_layers=1, num_heads=2, vae_block_channels=(8, 16, 16),
                      text_hidden_size=32, text_num_layers=2, seed=5)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def rows():
    cfg = WorldConfig(image_size=SIZE, num_generator_images=8, num_generator_test_prompts=4)
    out = generator_rows(cfg, ALL_COMBOS, lambda: None)
    return {key: np.array([r[key] for r in out["train"]], dtype=object) for key in ("image", "prompt")}


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    return build_tiny_zimage(GEN, tmp_path_factory.mktemp("gen"), image_size=SIZE)


def _train(task, model, batch, steps, lr):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss, _ = task.loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _params(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_vae_loss_decreases_and_checkpoint_round_trips(pipe_dir, rows, tmp_path):
    torch.manual_seed(0)
    task = VAETask(pipe_dir / "vae", object_weight=2.0, kl_weight=1e-6)
    model = task.build_model()
    batch = task.collate(rows)
    assert batch["images"].shape == (8, 3, SIZE, SIZE) and -1.0 <= batch["images"].min() <= batch["images"].max() <= 1.0
    with torch.no_grad():
        before = task.loss(model, batch)[1]["rec"]
    _train(task, model, batch, steps=40, lr=3e-3)
    with torch.no_grad():
        after = task.loss(model, batch)[1]["rec"]
    assert after < 0.6 * before, (before, after)
    task.save_pretrained(model, tmp_path / "vae")
    fresh = task.build_model()
    task.load_pretrained(fresh, tmp_path / "vae")
    assert all(torch.equal(a, b) for a, b in zip(_params(model).values(), _params(fresh).values()))


def test_object_weight_is_zero_on_grey_and_about_one_on_palette():
    from zray.data.scene import BACKGROUNDS, COLORS

    def image(rgb):
        return torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, 2, 2) / 127.5 - 1

    for rgb in BACKGROUNDS.values():
        assert chroma_B1HW(image(rgb)).abs().max().item() < 1e-5
    for rgb in COLORS.values():
        assert 0.6 < chroma_B1HW(image(rgb)).mean().item() < 1.5


def test_flow_loss_decreases_and_samplers_agree(pipe_dir, rows, tmp_path):
    from diffusers import ZImagePipeline

    torch.manual_seed(0)
    task = FlowTask(pipe_dir, shift=3.0)
    model = task.build_model()
    batch = task.collate(rows)
    assert batch["latents"].shape == (8, 16, SIZE // 4, SIZE // 4) and batch["cap"].ndim == 3

    def held_out_loss():  # fixed noise and sigmas, so before/after compare like for like
        torch.manual_seed(123)
        with torch.no_grad():
            return np.mean([task.loss(model, batch)[0].item() for _ in range(4)])

    cached = task.collate({**rows, "image_id": np.array([f"id{i}" for i in range(8)], dtype=object)})
    again = task.collate({**rows, "image_id": np.array([f"id{i}" for i in range(8)], dtype=object)})
    assert len(task._cache) == 8
    for key in ("latents", "cap", "cap_len"):
        assert torch.allclose(cached[key].float(), batch[key].float(), atol=1e-5)
        assert torch.equal(cached[key], again[key])
    before = held_out_loss()
    torch.manual_seed(0)
    _train(task, model, batch, steps=40, lr=2e-3)
    after = held_out_loss()
    assert after < 0.8 * before, (before, after)
    task.save_pretrained(model, tmp_path / "transformer")
    fresh = task.build_model()
    task.load_pretrained(fresh, tmp_path / "transformer")
    assert all(torch.equal(a, b) for a, b in zip(_params(model).values(), _params(fresh).values()))

    # the trained transformer in a pipeline: zray's sampler == ZImagePipeline.__call__ (same noise, prompts)
    pipe = load_zimage(pipe_dir)
    pipe.register_modules(transformer=model.transformer.eval())
    pipe.save_pretrained(tmp_path / "pipe")
    pipe = load_zimage(tmp_path / "pipe")
    assert isinstance(pipe, ZImagePipeline)
    prompts = [str(p) for p in rows["prompt"][:3]]
    noise = initial_noise(pipe, 3, seed=7, height=SIZE, width=SIZE)
    for steps in (8, 2):
        ours = sample_images(pipe, prompts, noise, steps)
        theirs = pipe(prompt=prompts, height=SIZE, width=SIZE, num_inference_steps=steps, guidance_scale=0.0,
                      latents=noise, max_sequence_length=64, output_type="pt").images
        assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
    assert not torch.allclose(sample_images(pipe, prompts, noise, 8), sample_images(pipe, prompts, noise, 2), atol=1e-3)


def test_flow_ema_is_exported_and_checkpointed(pipe_dir, rows, tmp_path):
    torch.manual_seed(0)
    task = FlowTask(pipe_dir, ema_decay=0.9)
    model = task.build_model()
    assert not any(p.requires_grad for p in model.ema.parameters())
    start = _params(model.transformer)
    _train(task, model, task.collate(rows), steps=3, lr=1e-2)
    trained, ema = _params(model.transformer), _params(model.ema)
    key = next(k for k in trained if not torch.equal(trained[k], start[k]))
    # three updates (at the start of each forward) with decays 0.1, 0.18, 0.25: the EMA trails the weights
    assert not torch.equal(ema[key], trained[key]) and not torch.equal(ema[key], start[key])
    assert "ema_updates" in model.state_dict() and model.ema_updates.item() == 3
    task.save_pretrained(model, tmp_path / "ema")
    fresh = task.build_model()
    task.load_pretrained(fresh, tmp_path / "ema")
    assert torch.equal(_params(fresh.transformer)[key], ema[key])
    with pytest.raises(ValueError, match="ema_decay=1.0"):
        FlowTask(pipe_dir, ema_decay=1.0)


def test_prompt_embeddings_match_the_pipeline(pipe_dir):
    pipe = load_zimage(pipe_dir)
    prompts = ["a red circle on a white background", "two blue squares and a green star on a gray background"]
    ours = encode_prompts(pipe.text_encoder, pipe.tokenizer, prompts, 64)
    theirs, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=64)
    assert [o.shape for o in ours] == [t.shape for t in theirs] and ours[0].shape[0] != ours[1].shape[0]
    assert all(torch.equal(o, t) for o, t in zip(ours, theirs))


def test_latent_scaling_round_trips(pipe_dir, rows):
    pipe = load_zimage(pipe_dir)
    images = decode_images(rows["image"][:2])
    with torch.no_grad():
        raw = vae_decode(pipe.vae, vae_encode(pipe.vae, images))
        pipe.vae.register_to_config(shift_factor=0.3, scaling_factor=2.5)
        latents = vae_encode(pipe.vae, images)
        assert torch.allclose(vae_decode(pipe.vae, latents), raw, atol=1e-5)
        assert torch.allclose(latents, (pipe.vae.encode(images).latent_dist.mode() - 0.3) * 2.5)


def test_eval_definitions():
    from zray.data.render import decode_png

    out = generator_rows(WorldConfig(image_size=64, num_generator_images=8, num_generator_test_prompts=2),
                         ALL_COMBOS, lambda: None)["train"]
    rows = {key: [r[key] for r in out] for key in ("image", "prompt")}
    assert main_colour(parse_prompt("a blue square above an orange star on a gray background")) == "blue"
    assert main_colour(parse_prompt("a red circle and two orange stars on a gray background")) == "orange"
    assert main_colour(parse_prompt("a green square and a blue circle on a white background")) == "green"
    image = decode_png(rows["image"][0])
    verdict = judge_against(image, str(rows["prompt"][0]))  # a clean render of its own prompt
    assert verdict["background"] == 1.0 and verdict["main_colour"] == 1.0
    images = [decode_png(b) for b in rows["image"]]
    assert image_features(images).shape == (8, 112)
    assert frechet_to(images, images) == pytest.approx(0.0, abs=1e-6)
