"""Score bins, tokens and decoder, with hand-computed values."""

import math

import pytest
import torch

from zray import scores


def test_bins_and_tokens():
    assert scores.SCORE_BINS == (1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0)
    assert scores.SCORE_TOKENS[0] == "<s_1.0>"
    assert scores.SCORE_TOKENS[4] == "<s_3.0>"
    assert scores.SCORE_TOKENS[-1] == "<s_5.0>"
    assert len(set(scores.SCORE_TOKENS)) == 9


@pytest.mark.parametrize("score,index", [(1.0, 0), (1.5, 1), (3.0, 4), (4.5, 7), (5.0, 8), (2.7, 3), (3.76, 6)])
def test_label_index(score, index):
    assert scores.label_index(score) == index


@pytest.mark.parametrize("bad", [0.99, 5.01, -1.0, float("nan"), float("inf")])
def test_label_index_rejects_outside_range(bad):
    with pytest.raises(ValueError, match=r"score=.* expected a number in \[1.0, 5.0\]"):
        scores.label_index(bad)


def test_score_token():
    assert scores.score_token(3.5) == "<s_3.5>"


def test_score_distribution_hand_values():
    # Vocabulary of 12; score ids at 3..11. Logits 0 everywhere except two score tokens.
    logits_BV = torch.zeros(2, 12)
    logits_BV[0, 3] = math.log(3.0)  # bin 1.0 gets weight 3, the eight others weight 1 -> 3/11
    logits_BV[1, 11] = 100.0  # bin 5.0 takes (almost) all the mass
    logits_BV[:, 0] = 50.0  # a non-score token: must be ignored
    q_BK = scores.score_distribution(logits_BV, list(range(3, 12)))
    assert q_BK.shape == (2, 9)
    assert torch.allclose(q_BK.sum(-1), torch.ones(2))
    assert q_BK[0, 0].item() == pytest.approx(3 / 11)
    assert q_BK[0, 1].item() == pytest.approx(1 / 11)
    assert q_BK[1, 8].item() == pytest.approx(1.0)
    mu_B = scores.expected_score(q_BK)
    # (3*1.0 + 1.5 + 2.0 + ... + 5.0) / 11 = (3 + 27 - 1) / 11 = 29 / 11
    assert mu_B[0].item() == pytest.approx(29 / 11)
    assert mu_B[1].item() == pytest.approx(5.0)


def test_score_distribution_leading_dims_and_bf16():
    logits = torch.randn(2, 3, 20, dtype=torch.bfloat16)
    q = scores.score_distribution(logits, torch.arange(9))
    assert q.shape == (2, 3, 9) and q.dtype == torch.float32


def test_score_distribution_is_differentiable():
    logits = torch.randn(1, 10, requires_grad=True)
    scores.expected_score(scores.score_distribution(logits, range(1, 10))).sum().backward()
    assert logits.grad is not None and logits.grad[0, 0] == 0  # token 0 is not a score token


def test_score_distribution_rejects_bad_ids():
    with pytest.raises(ValueError, match="expected 9"):
        scores.score_distribution(torch.zeros(1, 12), [0, 1, 2])
    with pytest.raises(ValueError, match="out of range"):
        scores.score_distribution(torch.zeros(1, 12), list(range(4, 13)))


def test_expected_score_uniform_is_three():
    assert scores.expected_score(torch.full((9,), 1 / 9)).item() == pytest.approx(3.0)


def test_distribution_from_logprobs_renormalises():
    # Full-vocabulary log-probs of the nine score tokens: they sum to 0.5 + 0.25 = 0.75 of the mass.
    probs = torch.tensor([0.5, 0.25, 0, 0, 0, 0, 0, 0, 0], dtype=torch.float64)
    logprobs = torch.log(probs)  # zeros become -inf
    q = scores.distribution_from_logprobs(logprobs)
    assert q[0].item() == pytest.approx(2 / 3)
    assert q[1].item() == pytest.approx(1 / 3)
    assert q[2:].abs().sum().item() == 0.0
    # Equivalent to softmax of the logits: the same logits shifted by a log-partition give the same q.
    logits = torch.randn(4, 9)
    lp = torch.log_softmax(torch.cat([logits, torch.randn(4, 30)], dim=-1), dim=-1)[:, :9]
    assert torch.allclose(scores.distribution_from_logprobs(lp), torch.softmax(logits, -1), atol=1e-6)


def test_distribution_from_logprobs_rejects_all_inf():
    with pytest.raises(ValueError, match="-inf"):
        scores.distribution_from_logprobs(torch.full((9,), -math.inf))
    with pytest.raises(ValueError, match="expected 9"):
        scores.distribution_from_logprobs(torch.zeros(8))


def test_one_hot_distribution():
    q = scores.one_hot_distribution([1.0, 3.5])
    assert q.shape == (2, 9) and q[0, 0] == 1 and q[1, 5] == 1 and q.sum() == 2


class _FakeTokenizer:
    def __init__(self, split: str | None = None):
        self.split = split

    def encode(self, text, add_special_tokens=False):
        if text == self.split:
            return [1, 2]
        return [100 + scores.SCORE_TOKENS.index(text)]


def test_score_token_ids():
    assert scores.score_token_ids(_FakeTokenizer()) == list(range(100, 109))
    with pytest.raises(ValueError, match=r"'<s_2.5>' encodes to 2 ids"):
        scores.score_token_ids(_FakeTokenizer(split="<s_2.5>"))

