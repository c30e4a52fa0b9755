"""Typed batches that cross role boundaries (design.md: one typed batch per edge). Pure: torch only.

Edges defined here:
- rollout engine -> learner: `RolloutBatch` (teacher rollouts, methods.md §1-2)
- learner -> rollout engine: a weight update (state dict or safetensors bytes + version + checksum of
  `zray.checksum`), answered by a `WeightSyncReport`; a checksum that does not match is a `WeightVersionError`.
- learner -> teacher engine: `ForcedSequence`s (another model's sampled tokens), answered by the teacher's
  log-prob of every response token (OPD, methods.md §3)

Shape legend:
    N  inputs (one (prompt, image, dimension) request each)
    G  samples per input (the group)
    L  prompt tokens (padded to the longest prompt in the batch)
    T  response tokens (padded to the longest response in the batch)
    K  score bins (9)

A response is `reasoning tokens + score prefix tokens + one score token`. The learner teacher-forces the
full sequence `prompt_ids[n, :prompt_len] + response_ids[n, g, :response_len]` (with the image's pixel values
from the processor: the prompt ids already contain the expanded image placeholder tokens, exactly as the
Hugging Face processor produces them; with transformers 5 also pass the processor's `mm_token_type_ids`,
zero-extended over the response, or Qwen-VL silently uses 1-D rope positions for the image) and recomputes

- log pi(response_ids[t] | ...) at every position where `policy_mask` is set (the policy term and KL), and
- q at the score position, i.e. the logits that predict the token at `score_index` (the direct terms).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from zray.scores import NUM_BINS, expected_score

# How a sample's reasoning ended (`RolloutBatch.finish_NG`).
FINISH_PREFIX = 0  # the model wrote the score prefix itself: well-formed
FINISH_LENGTH = 1  # no score prefix within the reasoning budget (or the context length): prefix forced
FINISH_EOS = 2  # the model ended its answer (end-of-turn / stop token) without a score prefix: prefix forced
FINISH_NAMES = {FINISH_PREFIX: "prefix", FINISH_LENGTH: "length", FINISH_EOS: "eos"}


class WeightVersionError(RuntimeError):
    """An engine does not serve the weights (version, checksum) that the learner sent."""


@dataclass(frozen=True)
class ForcedSequence:
    """Token ids to teacher-force through an engine: `prompt_ids` exactly as a rollout holds them (image placeholder
    expanded), then `response_ids`; `image` is the prompt's one image (PIL). The engine answers with
    log pi(response_ids[t] | everything before) for every response token."""

    prompt_ids: Sequence[int]
    response_ids: Sequence[int]
    image: object

    @staticmethod
    def from_rollout(rollout: RolloutBatch, images: Sequence[object]) -> list[ForcedSequence]:
        """One per sample, request-major (row n * G + g), with request n's image."""
        if len(images) != rollout.num_inputs:
            raise ValueError(f"{len(images)} images for a rollout of {rollout.num_inputs} inputs: expected one each")
        out = []
        for n in range(rollout.num_inputs):
            prompt = rollout.prompt_ids_NL[n, : int(rollout.prompt_lens_N[n])].tolist()
            for g in range(rollout.group_size):
                response = rollout.response_ids_NGT[n, g, : int(rollout.response_lens_NG[n, g])].tolist()
                out.append(ForcedSequence(prompt, response, images[n]))
        return out


@dataclass(frozen=True)
class WeightSyncReport:
    """What an engine answers to a weight update: the version and the checksum it now serves, and timings."""

    version: int
    checksum: str  # of the weights read back out of the engine (zray.checksum), equal to the one sent
    num_tensors: int
    num_bytes: int
    load_s: float  # deserialise + reload in place + cache resets
    verify_s: float  # read back + checksum


@dataclass(frozen=True)
class RolloutBatch:
    """G sampled teacher outputs per input, ready to teacher-force (methods.md §2, `o_{j,i} = (rho, score)`).

    Treatment of malformed outputs (never dropped): when the model does not write the score prefix within
    `max_reasoning_tokens` (or ends its answer first), the reasoning it sampled is kept (minus a trailing
    end-of-turn token), the score prefix is appended by force, q is read at the forced score position, and
    the sample gets `format_ok = False` and `finish = FINISH_LENGTH / FINISH_EOS`. The loss decides what a
    malformed sample is worth (GDSO: zero reward and a format penalty); its tokens stay valid to
    teacher-force.

    Tokens: every response token is in `response_mask`; the sampled ones (reasoning and the score token) are
    also in `policy_mask` and have their rollout log-prob `old_logprobs` (log pi_old over the full
    vocabulary, unscaled by temperature: what the learner recomputes). The score prefix is forced text, never
    in `policy_mask`: a model that wrote "Score:" itself has those tokens replaced by the canonical prefix
    ids. The score token is drawn from q (tempered by `temperature`), i.e. sampling constrained to the nine
    score tokens; its old log-prob is its full-vocabulary log-prob.
    """

    prompt_ids_NL: torch.Tensor  # int64, right-padded with 0
    prompt_mask_NL: torch.Tensor  # bool, True on real prompt tokens
    response_ids_NGT: torch.Tensor  # int64: reasoning + score prefix + score token, right-padded with 0
    response_mask_NGT: torch.Tensor  # bool, True on real response tokens
    policy_mask_NGT: torch.Tensor  # bool, True on sampled tokens (reasoning, score token)
    old_logprobs_NGT: torch.Tensor  # float32, log pi_old of each sampled token; 0 elsewhere
    score_index_NG: torch.Tensor  # int64, index in T of the score token (the last real response token)
    q_NGK: torch.Tensor  # float32, 9-bin score distribution at the score position
    mu_NG: torch.Tensor  # float32, expected score sum_k q_k s_k
    format_ok_NG: torch.Tensor  # bool, True iff the model wrote the score prefix itself
    finish_NG: torch.Tensor  # int8, FINISH_PREFIX / FINISH_LENGTH / FINISH_EOS
    num_reasoning_NG: torch.Tensor  # int64, reasoning tokens kept (before the score prefix)
    weights_version: int  # the weight version that produced every sample
    temperature: float  # the sampling temperature of the reasoning and the score token

    # ----------------------------------------------------------------------------------------- sizes
    @property
    def num_inputs(self) -> int:
        return int(self.response_ids_NGT.shape[0])

    @property
    def group_size(self) -> int:
        return int(self.response_ids_NGT.shape[1])

    @property
    def prompt_lens_N(self) -> torch.Tensor:
        return self.prompt_mask_NL.sum(-1)

    @property
    def response_lens_NG(self) -> torch.Tensor:
        return self.response_mask_NGT.sum(-1)

    def num_malformed(self) -> int:
        return int((~self.format_ok_NG).sum())

    def sequence(self, n: int, g: int) -> list[int]:
        """The full token ids of sample (n, g): prompt then response, unpadded (what the learner feeds)."""
        prompt = self.prompt_ids_NL[n, : int(self.prompt_lens_N[n])]
        response = self.response_ids_NGT[n, g, : int(self.response_lens_NG[n, g])]
        return prompt.tolist() + response.tolist()

    # ------------------------------------------------------------------------------------ validation
    def validate(self) -> RolloutBatch:
        """Check shapes, dtypes and the invariants stated on the fields; returns self. Raises ValueError."""
        n, g, t = self.response_ids_NGT.shape if self.response_ids_NGT.dim() == 3 else (None, None, None)
        if n is None:
            raise ValueError(f"response_ids_NGT has shape {tuple(self.response_ids_NGT.shape)}: expected (N, G, T)")
        el = self.prompt_ids_NL.shape[-1] if self.prompt_ids_NL.dim() == 2 else -1
        expected = {
            "prompt_ids_NL": ((n, el), torch.int64), "prompt_mask_NL": ((n, el), torch.bool),
            "response_mask_NGT": ((n, g, t), torch.bool), "policy_mask_NGT": ((n, g, t), torch.bool),
            "old_logprobs_NGT": ((n, g, t), torch.float32), "score_index_NG": ((n, g), torch.int64),
            "q_NGK": ((n, g, NUM_BINS), torch.float32), "mu_NG": ((n, g), torch.float32),
            "format_ok_NG": ((n, g), torch.bool), "finish_NG": ((n, g), torch.int8),
            "num_reasoning_NG": ((n, g), torch.int64), "response_ids_NGT": ((n, g, t), torch.int64),
        }
        for name, (shape, dtype) in expected.items():
            value = getattr(self, name)
            if tuple(value.shape) != shape or value.dtype != dtype:
                raise ValueError(f"{name} has shape {tuple(value.shape)} and dtype {value.dtype}: "
                                 f"expected {shape} and {dtype}")
        if n == 0 or g == 0:
            raise ValueError(f"empty batch: N={n}, G={g}")
        if not isinstance(self.weights_version, int) or self.weights_version < 0:
            raise ValueError(f"weights_version={self.weights_version!r}: expected an integer >= 0")
        _check_left_aligned("prompt_mask_NL", self.prompt_mask_NL)
        _check_left_aligned("response_mask_NGT", self.response_mask_NGT)
        if (self.prompt_lens_N == 0).any():
            raise ValueError("some prompt is empty (prompt_mask_NL has a row without tokens)")
        if (self.policy_mask_NGT & ~self.response_mask_NGT).any():
            raise ValueError("policy_mask_NGT is set outside response_mask_NGT")
        if ((self.prompt_ids_NL != 0) & ~self.prompt_mask_NL).any() or \
                ((self.response_ids_NGT != 0) & ~self.response_mask_NGT).any():
            raise ValueError("padding positions hold token ids other than 0")
        if not torch.equal(self.score_index_NG, self.response_lens_NG - 1):
            raise ValueError("score_index_NG is not the last real response token of every sample")
        at_score = self.policy_mask_NGT.gather(-1, self.score_index_NG.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        if not at_score.all():
            raise ValueError("the score token is not in policy_mask_NGT for some sample")
        if (self.num_reasoning_NG < 0).any() or (self.num_reasoning_NG + 2 > self.response_lens_NG).any():
            raise ValueError("num_reasoning_NG leaves no room for the score prefix and the score token")
        lp = self.old_logprobs_NGT
        if not torch.isfinite(lp).all() or (lp[self.policy_mask_NGT] > 1e-6).any():
            raise ValueError("old_logprobs_NGT must be finite and <= 0 on policy tokens")
        if (lp[~self.policy_mask_NGT] != 0).any():
            raise ValueError("old_logprobs_NGT must be 0 outside policy_mask_NGT")
        if (self.q_NGK < 0).any() or not torch.allclose(self.q_NGK.sum(-1), torch.ones(n, g), atol=1e-4):
            raise ValueError("q_NGK rows must be probability distributions over the 9 bins")
        if not torch.allclose(self.mu_NG, expected_score(self.q_NGK), atol=1e-4):
            raise ValueError("mu_NG is not the expected score of q_NGK")
        if not set(self.finish_NG.unique().tolist()) <= set(FINISH_NAMES):
            raise ValueError(f"finish_NG holds codes {sorted(self.finish_NG.unique().tolist())}: "
                             f"expected some of {FINISH_NAMES}")
        if not torch.equal(self.format_ok_NG, self.finish_NG == FINISH_PREFIX):
            raise ValueError("format_ok_NG disagrees with finish_NG == FINISH_PREFIX")
        return self


def _check_left_aligned(name: str, mask: torch.Tensor) -> None:
    """Real tokens first, padding after: a mask that never goes from False back to True."""
    if mask.shape[-1] > 1 and (mask[..., 1:] & ~mask[..., :-1]).any():
        raise ValueError(f"{name} is not right-padded (a real token follows a padding position)")


def _pad_last(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size:
        return x
    out = x.new_zeros((*x.shape[:-1], size))
    out[..., : x.shape[-1]] = x
    return out


def concat_rollouts(batches: Sequence[RolloutBatch]) -> RolloutBatch:
    """Concatenate batches along N, in order (re-padding L and T). All must share G, version and temperature."""
    if not batches:
        raise ValueError("no batches to concatenate")
    first = batches[0]
    for b in batches[1:]:
        if b.group_size != first.group_size:
            raise ValueError(f"group sizes differ: {first.group_size} vs {b.group_size}")
        if b.weights_version != first.weights_version:
            raise WeightVersionError(f"rollouts come from weight versions {first.weights_version} and "
                                     f"{b.weights_version}: every engine must serve the same version")
        if b.temperature != first.temperature:
            raise ValueError(f"temperatures differ: {first.temperature} vs {b.temperature}")
    el = max(b.prompt_ids_NL.shape[-1] for b in batches)
    t = max(b.response_ids_NGT.shape[-1] for b in batches)

    def cat(name: str, size: int | None = None) -> torch.Tensor:
        parts = [getattr(b, name) for b in batches]
        return torch.cat([_pad_last(p, size) for p in parts] if size is not None else parts, dim=0)

    return RolloutBatch(
        prompt_ids_NL=cat("prompt_ids_NL", el), prompt_mask_NL=cat("prompt_mask_NL", el),
        response_ids_NGT=cat("response_ids_NGT", t), response_mask_NGT=cat("response_mask_NGT", t),
        policy_mask_NGT=cat("policy_mask_NGT", t), old_logprobs_NGT=cat("old_logprobs_NGT", t),
        score_index_NG=cat("score_index_NG"), q_NGK=cat("q_NGK"), mu_NG=cat("mu_NG"),
        format_ok_NG=cat("format_ok_NG"), finish_NG=cat("finish_NG"), num_reasoning_NG=cat("num_reasoning_NG"),
        weights_version=first.weights_version, temperature=first.temperature,
    )
