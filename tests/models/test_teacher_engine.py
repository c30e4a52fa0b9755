"""The teacher's vLLM engine gives the same score distribution as transformers (teacher forcing)."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from zray.models.vlm import load_vlm, score_distributions_hf
from zray.prompts import ScoreRequest

pytestmark = pytest.mark.slow


def _images():
    rng = np.random.RandomState(0)
    return [Image.new("RGB", (64, 64), (220, 30, 30)), Image.new("RGB", (64, 64), (30, 70, 230)),
            Image.fromarray(rng.randint(0, 256, (64, 64, 3), dtype=np.uint8))]


@pytest.fixture(scope="module")
def requests_():
    out = []
    for image in _images():
        out.append(ScoreRequest("a red circle on a white background", image, "alignment"))  # student form
        out.append(ScoreRequest("two blue squares", image, "realism", "I see two blue squares; slight blur."))
    return out


def test_vllm_matches_transformers(teacher_engine, sharp_teacher_dir, requests_):
    q_vllm = torch.stack(teacher_engine.score_distributions(requests_))
    model, processor = load_vlm(sharp_teacher_dir)
    with torch.no_grad():
        q_hf = score_distributions_hf(model, processor, requests_)
    diff = (q_vllm - q_hf).abs().max().item()
    print(f"max |q_vllm - q_hf| = {diff:.2e}; vLLM start {teacher_engine.start_s:.1f} s")
    assert diff < 1e-3
    # meaningful: clearly non-uniform, and different per image / form
    entropy = -(q_hf * q_hf.clamp_min(1e-12).log()).sum(-1)
    assert entropy.max() < math.log(9) - 0.5
    assert (q_hf[0] - q_hf[2]).abs().max() > 1e-3 and (q_hf[0] - q_hf[1]).abs().max() > 1e-2


def test_score_distributions_accept_tuples(teacher_engine, requests_):
    r = requests_[1]
    q = teacher_engine.score_distributions([(r.prompt, r.image, r.dimension, r.reasoning)])[0]
    assert torch.allclose(q, teacher_engine.score_distributions([r])[0])
    with pytest.raises(ValueError, match="dimension='beauty'"):
        teacher_engine.score_distributions([("a red circle", r.image, "beauty")])


def test_generate_smoke(teacher_engine, requests_):
    out = teacher_engine.generate(requests_[:2], max_tokens=8, n=2, temperature=1.0)
    assert len(out) == 2 and all(len(samples) == 2 and all(isinstance(s, str) for s in samples) for samples in out)
