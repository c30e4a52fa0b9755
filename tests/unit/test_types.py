"""RolloutBatch: invariants checked by validate(), concatenation across engines, sequences to teacher-force."""

import dataclasses

import pytest
import torch

from zray.scores import expected_score
from zray.types import (FINISH_LENGTH, FINISH_PREFIX, RolloutBatch, WeightVersionError, concat_rollouts)


def make_batch(prompt_lens=(3, 5), reasoning=((2, 0), (1, 4)), prefix=2, version=0, seed=0) -> RolloutBatch:
    """A valid batch: N = len(prompt_lens), G = len(reasoning[0]); sample (n, g) reasons reasoning[n][g] tokens."""
    gen = torch.Generator().manual_seed(seed)
    n, g = len(prompt_lens), len(reasoning[0])
    el, t = max(prompt_lens), max(r for row in reasoning for r in row) + prefix + 1
    prompt_ids = torch.zeros(n, el, dtype=torch.int64)
    prompt_mask = torch.zeros(n, el, dtype=torch.bool)
    response_ids = torch.zeros(n, g, t, dtype=torch.int64)
    response_mask = torch.zeros(n, g, t, dtype=torch.bool)
    policy_mask = torch.zeros(n, g, t, dtype=torch.bool)
    old_logprobs = torch.zeros(n, g, t)
    score_index = torch.zeros(n, g, dtype=torch.int64)
    finish = torch.zeros(n, g, dtype=torch.int8)
    for i, length in enumerate(prompt_lens):
        prompt_ids[i, :length] = torch.randint(1, 50, (length,), generator=gen)
        prompt_mask[i, :length] = True
        for j in range(g):
            r = reasoning[i][j]
            size = r + prefix + 1
            response_ids[i, j, :size] = torch.randint(1, 50, (size,), generator=gen)
            response_mask[i, j, :size] = True
            policy_mask[i, j, :r] = True
            policy_mask[i, j, size - 1] = True
            old_logprobs[i, j][policy_mask[i, j]] = -torch.rand(int(policy_mask[i, j].sum()), generator=gen)
            score_index[i, j] = size - 1
            finish[i, j] = FINISH_PREFIX if (i + j) % 2 == 0 else FINISH_LENGTH
    q = torch.softmax(torch.randn(n, g, 9, generator=gen), -1)
    return RolloutBatch(prompt_ids_NL=prompt_ids, prompt_mask_NL=prompt_mask, response_ids_NGT=response_ids,
                        response_mask_NGT=response_mask, policy_mask_NGT=policy_mask, old_logprobs_NGT=old_logprobs,
                        score_index_NG=score_index, q_NGK=q, mu_NG=expected_score(q),
                        format_ok_NG=finish == FINISH_PREFIX, finish_NG=finish,
                        num_reasoning_NG=torch.tensor(reasoning, dtype=torch.int64), weights_version=version,
                        temperature=1.0)


def test_valid_batch_and_sizes():
    b = make_batch().validate()
    assert (b.num_inputs, b.group_size) == (2, 2)
    assert b.prompt_lens_N.tolist() == [3, 5]
    assert b.response_lens_NG.tolist() == [[5, 3], [4, 7]]
    assert b.num_malformed() == 2
    seq = b.sequence(1, 1)
    assert len(seq) == 5 + 7 and seq[:5] == b.prompt_ids_NL[1, :5].tolist()


@pytest.mark.parametrize("change, match", [
    (lambda b: {"mu_NG": b.mu_NG + 0.1}, "expected score"),
    (lambda b: {"q_NGK": b.q_NGK * 2}, "probability distributions"),
    (lambda b: {"format_ok_NG": ~b.format_ok_NG}, "format_ok_NG disagrees"),
    (lambda b: {"score_index_NG": b.score_index_NG - 1}, "last real response token"),
    (lambda b: {"old_logprobs_NGT": b.old_logprobs_NGT + b.policy_mask_NGT * 1.0}, "<= 0 on policy tokens"),
    (lambda b: {"old_logprobs_NGT": b.old_logprobs_NGT - (~b.policy_mask_NGT) * 1.0}, "0 outside policy_mask"),
    (lambda b: {"policy_mask_NGT": torch.ones_like(b.policy_mask_NGT)}, "outside response_mask"),
    (lambda b: {"response_mask_NGT": b.response_mask_NGT.flip(-1)}, "right-padded"),
    (lambda b: {"mu_NG": b.mu_NG.double()}, "dtype"),
    (lambda b: {"finish_NG": b.finish_NG + 5}, "finish_NG holds codes"),
    (lambda b: {"weights_version": -1}, "weights_version"),
])
def test_validate_rejects(change, match):
    b = make_batch()
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(b, **change(b)).validate()


def test_concat_pads_and_keeps_order():
    a = make_batch(prompt_lens=(3,), reasoning=((1, 2),), seed=1)
    b = make_batch(prompt_lens=(6, 2), reasoning=((5, 0), (3, 3)), seed=2)
    c = concat_rollouts([a, b]).validate()
    assert c.num_inputs == 3 and c.prompt_ids_NL.shape[-1] == 6 and c.response_ids_NGT.shape[-1] == 8
    assert c.sequence(0, 1) == a.sequence(0, 1) and c.sequence(2, 0) == b.sequence(1, 0)
    assert torch.equal(c.q_NGK, torch.cat([a.q_NGK, b.q_NGK]))


def test_concat_refuses_mixed_versions():
    with pytest.raises(WeightVersionError, match="versions 0 and 1"):
        concat_rollouts([make_batch(version=0), make_batch(version=1)])
    with pytest.raises(ValueError, match="group sizes differ"):
        concat_rollouts([make_batch(), make_batch(reasoning=((1,), (2,)))])
