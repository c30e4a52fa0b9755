"""The score decoder (methods.md §1): score-token ids, q = softmax over their logits, mu. Pure: torch only.

The scale itself (bins, tokens, `label_index`) is defined in `zray.rubric` and re-exported here.

Labels live on nine half-point bins S = {1.0, 1.5, ..., 5.0}. Each bin has one dedicated token (`<s_1.0>` ...
`<s_5.0>`), added to the tokenizer so that a score is always exactly one token. A model "outputs a
distribution": at the position that predicts the score token, the logits of the nine score tokens only are
softmaxed, q(s) = softmax(logits[score_ids]); the expected score is mu = sum_s s * q(s).

Shape legend:
    B  batch (any number of leading dimensions is accepted where a function says `...`)
    V  vocabulary size
    K  number of score bins (9)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from zray.rubric import (NUM_BINS, SCORE_BINS, SCORE_MAX, SCORE_MIN, SCORE_RANGE, SCORE_STEP, SCORE_TOKENS,  # noqa: F401
                         label_index, score_token)


def score_bins(device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The bin values as a tensor, shape (K,)."""
    return torch.tensor(SCORE_BINS, device=device, dtype=dtype)


def score_token_ids(tokenizer: Any) -> list[int]:
    """Ids of the nine score tokens in `tokenizer` (a transformers tokenizer or processor).

    Each score token must encode to exactly one id, and the nine ids must be distinct; otherwise the
    tokenizer was not prepared with the score tokens and a ValueError says which token failed.
    """
    tok = getattr(tokenizer, "tokenizer", tokenizer)  # a processor wraps its tokenizer
    ids: list[int] = []
    for text in SCORE_TOKENS:
        encoded = tok.encode(text, add_special_tokens=False)
        if len(encoded) != 1:
            raise ValueError(
                f"score token {text!r} encodes to {len(encoded)} ids {encoded}: expected exactly one; "
                "add the score tokens to the tokenizer (zray.models.tiny adds them) and resize the embeddings")
        ids.append(int(encoded[0]))
    if len(set(ids)) != NUM_BINS:
        raise ValueError(f"score token ids {ids} are not distinct")
    return ids


def _check_score_ids(score_ids: Sequence[int] | torch.Tensor, vocab_size: int) -> torch.Tensor:
    ids = torch.as_tensor(score_ids, dtype=torch.long).flatten()
    if ids.numel() != NUM_BINS:
        raise ValueError(f"score_ids has {ids.numel()} entries: expected {NUM_BINS}")
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise ValueError(f"score_ids {ids.tolist()} out of range for a vocabulary of {vocab_size}")
    return ids


def score_distribution(logits_BV: torch.Tensor, score_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """q_BK = softmax over the nine score-token logits at the score position (shape `...V` -> `...K`).

    Computed in float32 at least (bf16 logits are upcast); differentiable with respect to the logits.
    """
    ids = _check_score_ids(score_ids, logits_BV.shape[-1]).to(logits_BV.device)
    logits_BK = logits_BV.index_select(-1, ids)
    if logits_BK.dtype in (torch.float16, torch.bfloat16):
        logits_BK = logits_BK.float()
    return torch.softmax(logits_BK, dim=-1)


def distribution_from_logprobs(logprobs_BK: torch.Tensor) -> torch.Tensor:
    """q_BK from log-probabilities of the nine score tokens over the full vocabulary (e.g. from vLLM).

    The nine log-probs do not sum to one over the score tokens alone; renormalising them is a softmax of
    the log-probs, which equals the softmax of the nine logits. -inf entries get probability zero.
    """
    if logprobs_BK.shape[-1] != NUM_BINS:
        raise ValueError(f"logprobs_BK has last dimension {logprobs_BK.shape[-1]}: expected {NUM_BINS}")
    if torch.isinf(logprobs_BK).all(dim=-1).any():
        raise ValueError("every score-token log-prob is -inf in some row: no distribution to renormalise")
    return torch.softmax(logprobs_BK.double(), dim=-1).to(torch.float32)


def expected_score(q_BK: torch.Tensor) -> torch.Tensor:
    """mu_B = sum_k q_BK[..., k] * SCORE_BINS[k] (shape `...K` -> `...`)."""
    if q_BK.shape[-1] != NUM_BINS:
        raise ValueError(f"q_BK has last dimension {q_BK.shape[-1]}: expected {NUM_BINS}")
    return q_BK @ score_bins(q_BK.device, q_BK.dtype)


def one_hot_distribution(scores_B: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """q_BK with all mass on the bin of each score (a label as a distribution)."""
    values = torch.as_tensor(scores_B, dtype=torch.float64).flatten().tolist()
    idx = torch.tensor([label_index(s) for s in values], dtype=torch.long)
    return torch.nn.functional.one_hot(idx, NUM_BINS).to(torch.float32)
