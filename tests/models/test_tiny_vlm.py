"""Tiny teacher (Qwen2.5-VL) and student (Qwen3-VL) load through transformers and score with an image."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from zray.config import VLMConfig
from zray.models import tiny
from zray.models.vlm import load_vlm, score_distribution_hf, score_distributions_hf, score_inputs
from zray.rubric import ScoreRequest


def _image(seed: int, size: int = 64) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.fixture(scope="module", params=["teacher", "student"])
def loaded(request, tiny_zoo):
    return request.param, *load_vlm(tiny_zoo[request.param]["path"])


def test_zoo_built_and_idempotent(tiny_zoo, tiny_zoo_config, tmp_path):
    for role in ("teacher", "student", "generator"):
        assert tiny_zoo[role]["num_params"] > 0
    assert tiny_zoo["student"]["num_params"] < tiny_zoo["teacher"]["num_params"]
    again = tiny.build_zoo(tiny_zoo_config, tmp_path)
    assert all(v["built"] for v in again.values())
    second = tiny.build_zoo(tiny_zoo_config, tmp_path)
    assert not any(v["built"] for v in second.values())
    assert [v["num_params"] for v in second.values()] == [v["num_params"] for v in again.values()]
    changed = dataclasses.replace(tiny_zoo_config, student=dataclasses.replace(tiny_zoo_config.student, seed=9))
    third = tiny.build_zoo(changed, tmp_path)
    assert [role for role, v in third.items() if v["built"]] == ["student"]


def test_arch_and_vocab(loaded):
    role, model, processor = loaded
    expected = {"teacher": "qwen2_5_vl", "student": "qwen3_vl"}[role]
    assert model.config.model_type == expected
    assert model.config.text_config.vocab_size == len(processor.tokenizer)
    assert model.get_output_embeddings().weight.shape[0] == len(processor.tokenizer)


def test_64px_image_is_16_tokens_not_resized(loaded):
    _, model, processor = loaded
    inputs = score_inputs(processor, [ScoreRequest("a red circle", _image(0), "alignment")])
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 8]]  # 64 / patch 8, not resized
    num_image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert num_image_tokens == tiny.image_tokens(64, VLMConfig()) == 16


def test_vision_input_size_resizes_to_a_finer_token_grid():
    cfg = VLMConfig(arch="qwen3_vl", vision_input_size=80)
    processor = tiny.build_processor(cfg, image_size=64)
    inputs = processor(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[_image(0)], return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 10, 10]]  # 64 px resized to 80, patches of 8
    assert int((inputs["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum()) == 25
    assert tiny.image_tokens(64, cfg) == 25
    hf = tiny.vlm_hf_config(cfg, processor.tokenizer, image_size=64)
    assert hf.vision_config.num_position_embeddings == 100  # one learned position per patch of the 10 x 10 grid


def test_forward_and_score_distribution(loaded):
    role, model, processor = loaded
    with torch.no_grad():
        q = score_distribution_hf(model, processor, "a red circle", _image(1), "realism",
                                  reasoning="I see a red circle." if role == "teacher" else None)
        requests = [ScoreRequest("two blue squares", _image(s), "aesthetics", r) for s in (2, 3) for r in (None, "ok")]
        q_batch = score_distributions_hf(model, processor, requests)
        q_single = torch.stack([score_distributions_hf(model, processor, [r])[0] for r in requests])
    assert q.shape == (9,) and torch.isclose(q.sum(), torch.tensor(1.0))
    assert (q_batch - q_single).abs().max() < 1e-5  # left padding keeps the score position last


def test_builder_rejects_bad_sizes(tmp_path):
    with pytest.raises(ValueError, match="image_size=72"):
        tiny.build_tiny_vlm(VLMConfig(), tmp_path, image_size=72)
    with pytest.raises(ValueError, match="vision_input_size=72 is not allowed.*multiple of.*16"):
        tiny.build_tiny_vlm(VLMConfig(vision_input_size=72), tmp_path)
    with pytest.raises(ValueError, match="vision_input_size"):
        VLMConfig(vision_input_size=-8)
    with pytest.raises(ValueError, match="head_dim=32"):
        tiny.build_tiny_vlm(VLMConfig(hidden_size=64, num_heads=1, head_dim=32), tmp_path)


def test_mrope_section_sums_to_half_head_dim():
    for head_dim in (32, 64, 80, 96, 112, 128):
        assert sum(tiny.mrope_section(head_dim)) == head_dim // 2
    assert tiny.mrope_section(128) == [16, 24, 24]
