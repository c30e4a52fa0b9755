"""Helpers for the model tests: teacher forcing of a RolloutBatch through transformers."""

import pytest
import torch


def _teacher_force(model, processor, batch, requests):
    """(old-logprob-like log-probs on policy tokens, q at the score position) recomputed by transformers.

    Feeds exactly `batch.sequence(n, g)` with the processor's pixel values for request n, as the learner will,
    and checks that the batch's prompt ids are the processor's. Returns (logprobs_NGT, q_NGK), zeros off-policy.
    """
    from zray.prompts import render_generation_prompt
    from zray.scores import score_distribution, score_token_ids

    score_ids = score_token_ids(processor)
    logprobs = torch.zeros(batch.old_logprobs_NGT.shape)
    q = torch.zeros(batch.q_NGK.shape)
    for n, r in enumerate(requests):
        text = render_generation_prompt(processor, r.prompt, r.dimension, reasoning=True)
        inputs = processor(text=[text], images=[r.image], return_tensors="pt")
        prompt_len = int(batch.prompt_lens_N[n])
        assert inputs["input_ids"][0].tolist() == batch.prompt_ids_NL[n, :prompt_len].tolist()
        for g in range(batch.group_size):
            ids = torch.tensor([batch.sequence(n, g)])
            # transformers 5 needs mm_token_type_ids for the image's 3-D rope positions (silently 1-D without)
            mm_types = torch.zeros_like(ids)
            mm_types[:, :prompt_len] = inputs["mm_token_type_ids"]
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm_types,
                               pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                               use_cache=False).logits[0].float()
            size = int(batch.response_lens_NG[n, g])
            pred = logits[prompt_len - 1: prompt_len - 1 + size]  # position t predicts response token t
            lp = torch.log_softmax(pred, -1).gather(-1, ids[0, prompt_len:, None]).squeeze(-1)
            logprobs[n, g, :size] = lp * batch.policy_mask_NGT[n, g, :size]
            q[n, g] = score_distribution(pred[int(batch.score_index_NG[n, g])], score_ids)
    return logprobs, q


@pytest.fixture(scope="session")
def teacher_force():
    return _teacher_force
