"""Teacher forcing of vLLM rollouts in transformers reproduces the rollout's log-probs and score distributions."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from zray.models.teacher_forcing import forced_logprobs, rollout_inputs
from zray.models.vlm import load_vlm
from zray.rubric import ScoreRequest
from zray.scores import score_token_ids

pytestmark = pytest.mark.slow


def test_forced_logprobs_match_the_engine(teacher_engine, sharp_teacher_dir):
    rng = np.random.RandomState(1)
    images = [Image.new("RGB", (64, 64), (220, 30, 30)),
              Image.fromarray(rng.randint(0, 256, (64, 64, 3), dtype=np.uint8))]
    requests = [ScoreRequest("a red circle", images[0], "alignment"), ScoreRequest("two blue stars", images[1],
                                                                                   "realism")]
    rollout = teacher_engine.generate(requests, group_size=3, max_reasoning_tokens=12, seed=5)
    model, processor = load_vlm(sharp_teacher_dir)
    inputs = rollout_inputs(processor, rollout, images)
    assert inputs["input_ids"].shape[0] == 6 and inputs["image_grid_thw"].shape[0] == 6
    with torch.no_grad():
        logp_BT, log_q_BK = forced_logprobs(model, inputs, score_token_ids(processor))
    mask = inputs["policy_mask"]
    diff = (logp_BT - inputs["old_logp"])[mask].abs().max().item()
    q_diff = (log_q_BK.exp() - rollout.q_NGK.reshape(6, -1)).abs().max().item()
    print(f"max |logp_hf - logp_vllm| = {diff:.2e}, max |q_hf - q_vllm| = {q_diff:.2e}, "
          f"{int(mask.sum())} sampled tokens")
    assert mask.sum() > 6  # reasoning tokens were sampled, not only score tokens
    assert diff < 1e-3 and q_diff < 1e-3
    # the forced positions really are the response: shifting them by one breaks the match
    shifted = dict(inputs, resp_pos=(inputs["resp_pos"] + 1) * inputs["resp_mask"])
    shifted["resp_pos"] = shifted["resp_pos"].clamp(max=inputs["input_ids"].shape[1] - 1)
    with torch.no_grad():
        bad, _ = forced_logprobs(model, shifted, score_token_ids(processor))
    assert (bad - inputs["old_logp"])[mask].abs().max().item() > 1e-2


def test_rollout_inputs_reject_wrong_images(teacher_engine, sharp_teacher_dir):
    image = Image.new("RGB", (64, 64), (20, 200, 30))
    rollout = teacher_engine.generate([ScoreRequest("a green square", image, "alignment")], group_size=2,
                                      max_reasoning_tokens=4, seed=0)
    _, processor = load_vlm(sharp_teacher_dir)
    with pytest.raises(ValueError, match="one image per request"):
        rollout_inputs(processor, rollout, [image, image])
    with pytest.raises(ValueError, match="different images"):
        rollout_inputs(processor, rollout, [Image.new("RGB", (64, 32), (20, 200, 30))])  # 8 image tokens, not 16
    # a response holding the image placeholder cannot be teacher-forced: a clear error, not a shape crash
    image_token = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    ids = rollout.response_ids_NGT.clone()
    ids[0, 0, 0] = image_token
    with pytest.raises(ValueError, match="image placeholder token"):
        rollout_inputs(processor, dataclasses.replace(rollout, response_ids_NGT=ids), [image])


def test_rollouts_never_sample_multimodal_placeholders(sharp_teacher_dir):
    from transformers import AutoConfig

    from actors.teacher_engine.rollouts import BANNED_BIAS, banned_token_bias

    hf = AutoConfig.from_pretrained(sharp_teacher_dir)
    bias = banned_token_bias(hf)
    assert set(bias) == {hf.image_token_id, hf.video_token_id, hf.vision_start_token_id, hf.vision_end_token_id}
    assert set(bias.values()) == {BANNED_BIAS}
    assert banned_token_bias(object()) is None
