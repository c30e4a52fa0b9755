"""Teacher forcing of rollouts: the learner's view of a `RolloutBatch` (methods.md §2, "q recomputed under the
current policy by teacher-forcing the sampled o").

The engines return token ids exactly as they were fed (the prompt with its image placeholders expanded, then
the response: reasoning, score prefix, score token). The learner feeds the same ids to the transformers model,
with the image's pixels from the processor, and reads

- `logp_BT`: log pi(token) over the full vocabulary for every response token (the policy's log-probs, what the
  rollout's `old_logprobs` hold under pi_old), and
- `log_q_BK`: the log of the nine-bin score distribution at the score position (softmax over the score tokens'
  logits only, methods.md §1).

Sequences are laid out request-major: row b = n * G + g is sample g of request n. Shapes: B = N * G sequences,
L tokens per sequence (prompt + response, right-padded), T response tokens, K = 9 score bins, V vocabulary.
No Ray here: `zray/tasks/gdso.py` uses it inside the learner.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from zray.types import RolloutBatch


def rollout_inputs(processor: Any, rollout: RolloutBatch, images: Sequence[Any]) -> dict[str, torch.Tensor]:
    """Model inputs for the N * G sequences of `rollout` (request n's image is `images[n]`).

    Returns input_ids_BL, attention_mask_BL, mm_token_type_ids_BL (1 on image tokens), pixel_values,
    image_grid_thw (one image per row), and resp_pos_BT (the index in L of each response token, clamped to 0 on
    padding), resp_ids_BT, resp_mask_BT, policy_mask_BT, old_logp_BT, score_pos_B (index in L of the score
    token).
    """
    n, g, t = rollout.response_ids_NGT.shape
    if len(images) != n:
        raise ValueError(f"{len(images)} images for a rollout of {n} requests: expected one image per request")
    prompt_lens = rollout.prompt_lens_N.tolist()
    resp_lens = rollout.response_lens_NG.tolist()
    rows = [rollout.sequence(i, j) for i in range(n) for j in range(g)]
    length = max(len(r) for r in rows)
    input_ids = torch.zeros(n * g, length, dtype=torch.int64)
    attention = torch.zeros(n * g, length, dtype=torch.int64)
    for b, row in enumerate(rows):
        input_ids[b, : len(row)] = torch.tensor(row)
        attention[b, : len(row)] = 1
    image_token = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    pixels = processor.image_processor(images=[images[i] for i in range(n) for _ in range(g)], return_tensors="pt")
    per_image = pixels["image_grid_thw"].prod(-1) // (processor.image_processor.merge_size ** 2)
    found = (input_ids == image_token).sum(-1)
    in_response = (rollout.response_ids_NGT.reshape(n * g, t) == image_token).sum(-1)
    if in_response.any():
        raise ValueError(f"{int((in_response > 0).sum())} sampled responses hold the image placeholder token, which "
                         "cannot be teacher-forced: the engine must not sample it (actors.teacher_engine.rollouts.banned_token_bias)")
    if not torch.equal(found, per_image):
        bad = int(torch.nonzero(found != per_image)[0])
        raise ValueError(f"sequence {bad}: the rollout's prompt holds {int(found[bad])} image tokens but its image "
                         f"needs {int(per_image[bad])}: the engine and the learner see different images")
    offsets = torch.tensor([prompt_lens[i] for i in range(n) for _ in range(g)])
    steps = torch.arange(t)
    resp_pos = (offsets[:, None] + steps[None, :]).clamp(max=length - 1)
    resp_mask = rollout.response_mask_NGT.reshape(n * g, t)
    resp_pos = torch.where(resp_mask, resp_pos, torch.zeros_like(resp_pos))
    score_pos = offsets + rollout.score_index_NG.reshape(-1)
    if any(resp_lens[i][j] != int(rollout.score_index_NG[i, j]) + 1 for i in range(n) for j in range(g)):
        raise ValueError("every response must end with its score token (score_index = response length - 1)")
    return {
        "input_ids": input_ids, "attention_mask": attention, "mm_token_type_ids": (input_ids == image_token).long(),
        "pixel_values": pixels["pixel_values"], "image_grid_thw": pixels["image_grid_thw"],
        "resp_pos": resp_pos, "resp_ids": rollout.response_ids_NGT.reshape(n * g, t), "resp_mask": resp_mask,
        "policy_mask": rollout.policy_mask_NGT.reshape(n * g, t),
        "old_logp": rollout.old_logprobs_NGT.reshape(n * g, t), "score_pos": score_pos,
    }


MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")


def forced_logprobs(model: Any, inputs: dict[str, torch.Tensor], score_ids: Sequence[int]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp_BT, log_q_BK) of the response tokens and at the score position, with gradient through `model`.

    logp_BT[b, t] = log softmax(logits[b, resp_pos[b, t] - 1])[resp_ids[b, t]] (0 on padding);
    log_q_BK[b] = log softmax over the score tokens of logits[b, score_pos[b] - 1].
    """
    out = model(**{k: inputs[k] for k in MODEL_INPUT_KEYS if k in inputs}, use_cache=False)
    logits_BLV = out.logits.float()
    pred_pos_BT = (inputs["resp_pos"] - 1).clamp(min=0)
    logits_BTV = logits_BLV.gather(1, pred_pos_BT[..., None].expand(-1, -1, logits_BLV.shape[-1]))
    logp_BT = torch.log_softmax(logits_BTV, dim=-1).gather(-1, inputs["resp_ids"][..., None]).squeeze(-1)
    logp_BT = logp_BT * inputs["resp_mask"].to(logp_BT.dtype)
    rows = torch.arange(logits_BLV.shape[0], device=logits_BLV.device)
    ids = torch.as_tensor(list(score_ids), device=logits_BLV.device)
    score_logits_BK = logits_BLV[rows, inputs["score_pos"] - 1][:, ids]
    return logp_BT, torch.log_softmax(score_logits_BK, dim=-1)
