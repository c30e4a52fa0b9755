"""`PolicyModel`: teacher forcing with the LM head in chunks equals the full-logits computation, without B x T x V.

The reference is the plain computation (all logits of the sequence, then log-softmax and gathers). Both tiny
architectures (Qwen2.5-VL teacher, Qwen3-VL student); values and parameter gradients within 1e-5.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from zray.models.teacher_forcing import MODEL_INPUT_KEYS, PolicyModel, forced_logprobs, rollout_inputs
from zray.models.vlm import load_vlm
from zray.rubric import ScoreRequest
from zray.scores import score_token_ids


def full_logits_logprobs(model, inputs, score_ids):
    """The plain computation: B x L x V float logits, log-softmax, gathers (what PolicyModel must equal)."""
    out = model(**{k: inputs[k] for k in MODEL_INPUT_KEYS if k in inputs}, use_cache=False)
    logits_BLV = out.logits.float()
    pred_pos_BT = (inputs["resp_pos"] - 1).clamp(min=0)
    logits_BTV = logits_BLV.gather(1, pred_pos_BT[..., None].expand(-1, -1, logits_BLV.shape[-1]))
    logp_BT = torch.log_softmax(logits_BTV, dim=-1).gather(-1, inputs["resp_ids"][..., None]).squeeze(-1)
    logp_BT = logp_BT * inputs["resp_mask"].to(logp_BT.dtype)
    rows = torch.arange(logits_BLV.shape[0])
    score_logits_BK = logits_BLV[rows, inputs["score_pos"] - 1][:, torch.as_tensor(score_ids)]
    return logp_BT, torch.log_softmax(score_logits_BK, dim=-1)


def _image(seed):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (64, 64, 3), dtype=np.uint8))


@pytest.fixture(scope="module", params=["teacher", "student"])
def forced(request, tiny_zoo, synthetic_rollout):
    """(model, score_ids, inputs) of 2 requests x 3 samples on the tiny teacher (Qwen2.5-VL) or student (Qwen3-VL)."""
    torch.manual_seed(0)
    model, processor = load_vlm(tiny_zoo[request.param]["path"])
    requests = [ScoreRequest("a red circle", _image(0), "alignment"),
                ScoreRequest("two blue stars left of a green square", _image(1), "realism")]
    rollout = synthetic_rollout(processor, requests, group_size=3, max_reasoning=7)
    inputs = rollout_inputs(processor, rollout, [r.image for r in requests])
    return model, score_token_ids(processor), inputs


def _loss_and_grads(model, fn):
    model.zero_grad(set_to_none=True)
    logp_BT, log_q_BK = fn()
    gen = torch.Generator().manual_seed(1)
    loss = (logp_BT * torch.randn(logp_BT.shape, generator=gen)).sum() + (
        log_q_BK * torch.randn(log_q_BK.shape, generator=gen)).sum()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logp_BT.detach(), log_q_BK.detach(), grads


def test_chunked_equals_full_logits_values_and_gradients(forced):
    model, score_ids, inputs = forced
    num_tokens = int(inputs["resp_mask"].sum())
    chunk = 4
    assert chunk < inputs["resp_ids"].shape[1] < num_tokens  # several chunks, each shorter than T
    ref_logp, ref_q, ref_grads = _loss_and_grads(model, lambda: full_logits_logprobs(model, inputs, score_ids))
    policy = PolicyModel(model, score_ids, chunk_tokens=chunk)
    logp, log_q, grads = _loss_and_grads(model, lambda: forced_logprobs(policy, inputs, score_ids))
    assert (logp - ref_logp).abs().max() < 1e-5 and (log_q - ref_q).abs().max() < 1e-5
    assert (logp[~inputs["resp_mask"]] == 0).all() and (logp[inputs["resp_mask"]] < 0).all()
    assert set(grads) == set(ref_grads) and "lm_head.weight" in grads
    worst = max((grads[n] - ref_grads[n]).abs().max().item() for n in grads)
    assert worst < 1e-5, worst


def test_chunk_of_one_never_forms_batch_by_length_by_vocabulary_logits(forced):
    model, score_ids, inputs = forced
    vocab = model.lm_head.weight.shape[0]
    batch = inputs["input_ids"].shape[0]
    head_outputs, saved = [], []
    hook = model.lm_head.register_forward_hook(lambda _m, _i, out: head_outputs.append(tuple(out.shape)))
    policy = PolicyModel(model, score_ids, chunk_tokens=1)
    try:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
            logp_BT, log_q_BK = policy(**{k: inputs[k] for k in inputs if k not in ("policy_mask", "old_logp")})
        (logp_BT.sum() + log_q_BK.sum()).backward()  # recomputes each chunk's logits, one token at a time
    finally:
        hook.remove()
        model.zero_grad(set_to_none=True)
    num_tokens = int(inputs["resp_mask"].sum())
    # forward: one (1, V) call per response token and one (B, V) call for the score positions; backward: the
    # recomputed (1, V) chunks. Never a B x T x V (or B x L x V) tensor.
    assert sorted(set(head_outputs)) == sorted({(1, vocab), (batch, vocab)})
    assert head_outputs.count((1, vocab)) == 2 * num_tokens
    # nothing of vocabulary size is kept for the backward but the head's own weight ((V, H) or its transpose)
    weight = tuple(model.lm_head.weight.shape)
    assert saved and [s for s in saved if vocab in s and s not in (weight, weight[::-1])] == []


def test_policy_model_state_dict_is_the_vlms(forced):
    model, score_ids, _ = forced
    policy = PolicyModel(model, score_ids)
    mine, theirs = policy.state_dict(), model.state_dict()
    assert list(mine) == list(theirs)  # Hugging Face names: what vLLM and load_vlm_weights take
    assert all(mine[k].data_ptr() == theirs[k].data_ptr() for k in mine)
    assert policy.vlm is model and "vlm" not in dict(policy.named_children())
    assert sum(p.numel() for p in policy.parameters()) == sum(p.numel() for p in model.parameters())


def test_policy_model_rejects_other_modules_and_bad_chunks(forced):
    model, score_ids, _ = forced
    with pytest.raises(ValueError, match="chunk_tokens=0 is not allowed"):
        PolicyModel(model, score_ids, chunk_tokens=0)
    with pytest.raises(ValueError, match="expected a Hugging Face VLM made of `model` and `lm_head`"):
        PolicyModel(torch.nn.Linear(2, 2), score_ids)
    with pytest.raises(ValueError, match="score_ids"):
        forced_logprobs(PolicyModel(model, score_ids), {}, list(score_ids)[::-1])
