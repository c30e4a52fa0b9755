"""Teacher rollouts through a vLLM `LLM`: G reasoning samples per input, the score prefix, the score distribution.

Two batched engine calls per batch (methods.md §1-2):

1. **Sample**: per input, `n = G` reasoning samples that stop where the model starts the score prefix, at most
   `max_reasoning_tokens`, `logprobs=0` (the sampled token's log-prob, kept in vLLM's flat container: a few
   lists per sample instead of a dict per token). vLLM forks the G children from one prompt, so the prompt and
   the image are processed once.
2. **Score**: per sample, the token prompt `prompt + kept reasoning + canonical score prefix` with
   `max_tokens=1` and `logprob_token_ids=<the nine score tokens>`: q at the score position. Prefix caching
   reuses the KV blocks of call 1 (prompt and reasoning) that are whole blocks (`VLLMConfig.block_size`), so
   this call costs a prefill of each sample's last partial block and the prefix.

Then the score token is drawn from q (tempered), seeded per sample. The token ids in the `RolloutBatch`
are exactly those that were fed to the engine; a check compares vLLM's expanded prompt of call 2 with the
prompt ids of call 1 plus the appended tokens.

Stopping at the score prefix (`StopRule`): when the tokenizer spells the word "Score" as one token, with and
without a leading space (the tiny tokenizer does), vLLM stops on those token ids and does no detokenisation
at all (`detokenize=False`): on the tiny CPU teacher its per-token detokenising of the sampled text and of the
log-probs took about a quarter of the sampling call. Otherwise it stops on the *text* "Score:" (and
detokenises).

Cutting at the score prefix: the tokens that spelled "Score:" may straddle a boundary, and a stop on the token
may have been preceded by another spelling, so every sample's text is searched afterwards. The kept reasoning is
the longest run of sampled tokens whose text ends before the first "Score:"; with no "Score:" in the text, a
sample stopped by a "Score" token keeps the tokens before it. The canonical prefix ids (" Score: ", or "Score: "
after whitespace or an empty reasoning) follow. Malformed samples (no prefix within the budget, or an
end-of-turn first) keep their sampled tokens (minus the end-of-turn token) and get the prefix by force,
`format_ok = False` (see `zray.types.RolloutBatch`).

Seeds: sample (i, g) of the request at global index `request_offset + i` uses seed
`seed * 1_000_003 + (request_offset + i) * G + g`, for vLLM's sampler and for the score token, so a batch
split across several engines gives the same samples as one engine given the same offsets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from zray.rubric import SCORE_PREFIX, ScoreRequest, render_generation_prompt
from zray.scores import distribution_from_logprobs, expected_score
from zray.types import FINISH_EOS, FINISH_LENGTH, FINISH_PREFIX, ForcedSequence, RolloutBatch

STOP_TEXT = SCORE_PREFIX.strip()  # "Score:": the stop string of the reasoning call
STOP_WORD = STOP_TEXT.rstrip(":")  # "Score": its first word, the stop token where the tokenizer has it whole
SEED_STRIDE = 1_000_003


@dataclass
class RolloutSample:
    """One sample between the two engine calls: its kept reasoning (ids, rollout log-probs), how it finished, the
    score prefix ids that follow, and its seed (for the score token)."""

    reasoning_ids: list[int]
    reasoning_logprobs: list[float]
    finish: int
    prefix_ids: list[int]
    seed: int | None


def as_requests(requests: Sequence[ScoreRequest | tuple]) -> list[ScoreRequest]:
    """ScoreRequests from requests or (prompt, image, dimension) tuples; rollouts write their own reasoning."""
    reqs = [r if isinstance(r, ScoreRequest) else ScoreRequest(*r) for r in requests]
    for i, r in enumerate(reqs):
        if r.reasoning is not None:
            raise ValueError(f"requests[{i}].reasoning={r.reasoning!r} is not allowed: rollouts sample the "
                             "reasoning; pass requests without it")
    if not reqs:
        raise ValueError("requests is empty: expected at least one (prompt, image, dimension)")
    return reqs


def cut_before(decode: Callable[[list[int]], str], token_ids: list[int], stop_text: str) -> int | None:
    """The number of leading tokens whose decoded text ends before the first `stop_text`; None if absent."""
    index = decode(token_ids).find(stop_text)
    if index < 0:
        return None
    k = len(token_ids)
    while k > 0 and len(decode(token_ids[:k])) > index:
        k -= 1
    return k


def collapse_placeholders(token_ids: Sequence[int], placeholder_id: int | None) -> list[int]:
    """Token ids with each run of the image placeholder collapsed to one (vLLM expands it again)."""
    out: list[int] = []
    for t in token_ids:
        if placeholder_id is not None and t == placeholder_id and out and out[-1] == placeholder_id:
            continue
        out.append(int(t))
    return out


class PrefixIds:
    """The canonical score prefix as token ids, with and without the leading space."""

    def __init__(self, tokenizer: Any) -> None:
        self.spaced = tokenizer.encode(" " + SCORE_PREFIX, add_special_tokens=False)
        self.bare = tokenizer.encode(SCORE_PREFIX, add_special_tokens=False)
        self._decode = tokenizer.decode

    def after(self, reasoning_ids: list[int]) -> list[int]:
        """The prefix ids to append to `reasoning_ids` (no double space, no leading space at the start)."""
        if not reasoning_ids:
            return list(self.bare)
        text = self._decode(reasoning_ids, skip_special_tokens=True)
        return list(self.bare if (not text or text[-1].isspace()) else self.spaced)


class StopRule:
    """How call 1 stops at the score prefix: on the token ids of the word "Score" (`token_ids`, no
    detokenisation), or, when the tokenizer splits that word, on the text "Score:" (`token_ids` empty)."""

    def __init__(self, tokenizer: Any) -> None:
        firsts = {SCORE_PREFIX: tokenizer.encode(SCORE_PREFIX, add_special_tokens=False)[0],
                  " " + SCORE_PREFIX: tokenizer.encode(" " + SCORE_PREFIX, add_special_tokens=False)[0]}
        whole = all(tokenizer.decode([i]).strip() == STOP_WORD for i in firsts.values())
        self.token_ids: tuple[int, ...] = tuple(sorted(set(firsts.values()))) if whole else ()

    def sampling_kwargs(self) -> dict[str, Any]:
        """The stop arguments of call 1's `SamplingParams`."""
        if self.token_ids:
            return {"stop_token_ids": list(self.token_ids), "detokenize": False}
        return {"stop": [STOP_TEXT]}


def split_sample(completion: Any, decode: Callable[[list[int]], str],
                 stop_ids: Sequence[int] = ()) -> tuple[int, int]:
    """(tokens of reasoning to keep, finish code) for one vLLM CompletionOutput of call 1; `stop_ids`: the
    `StopRule.token_ids` it was sampled with."""
    ids = list(completion.token_ids)
    if completion.finish_reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM finished a rollout with finish_reason={completion.finish_reason!r} "
                           f"(stop_reason={completion.stop_reason!r}): expected 'stop' or 'length'")
    keep = cut_before(decode, ids, STOP_TEXT)  # any spelling of the prefix, wherever sampling stopped
    if keep is not None:
        return keep, FINISH_PREFIX
    if completion.finish_reason == "stop" and completion.stop_reason == STOP_TEXT:
        return len(ids), FINISH_EOS  # vLLM saw the prefix in its own detokenisation but ours differs
    if completion.finish_reason == "stop" and completion.stop_reason in stop_ids:  # the word "Score" starts it
        return len(ids) - 1, FINISH_PREFIX
    if completion.finish_reason == "stop":  # end-of-turn (eos): the last token is it
        return max(len(ids) - 1, 0), FINISH_EOS
    return len(ids), FINISH_LENGTH


def reasoning_text(completion: Any, decode: Callable[[list[int]], str], stop_ids: Sequence[int] = ()) -> str:
    """The reasoning of one sampled completion as a rollout keeps it (`split_sample`): its text before the score
    prefix (or before the word "Score" where a "Score" token stopped it), without an end-of-turn token. The
    evaluation's reasoning (`TeacherEngine.generate_texts`) ends where a training rollout's does."""
    keep, _ = split_sample(completion, decode, stop_ids)
    return decode([int(t) for t in completion.token_ids[:keep]]).strip()


MULTIMODAL_TOKENS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
BANNED_BIAS = -100.0


def banned_token_bias(hf_config: Any) -> dict[int, float] | None:
    """logit_bias that keeps sampled reasoning free of the model's multimodal placeholder tokens.

    A reasoning trace holding e.g. `<|image_pad|>` cannot be teacher-forced (the learner's model would look for
    image features for it), and a tiny or early policy samples any token at temperature 1. vLLM reports the raw
    log-probs (before this bias) by default, which are what the learner recomputes."""
    ids = sorted({int(v) for v in (getattr(hf_config, name, None) for name in MULTIMODAL_TOKENS)
                  if isinstance(v, int) and not isinstance(v, bool)})
    return {i: BANNED_BIAS for i in ids} or None


def _sample_seed(seed: int | None, index: int, group_size: int, g: int) -> int | None:
    return None if seed is None else seed * SEED_STRIDE + index * group_size + g


def generate_rollouts(llm: Any, requests: Sequence[ScoreRequest | tuple], *, score_ids: Sequence[int],
                      group_size: int, max_reasoning_tokens: int, temperature: float = 1.0,
                      seed: int | None = None, request_offset: int = 0, weights_version: int = 0,
                      max_model_len: int) -> RolloutBatch:
    """G rollouts per request as a validated `RolloutBatch` (see the module docstring for the method)."""
    from vllm import SamplingParams

    reqs = as_requests(requests)
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size={group_size!r} is not allowed: expected an integer >= 1")
    if not isinstance(max_reasoning_tokens, int) or max_reasoning_tokens < 1:
        raise ValueError(f"max_reasoning_tokens={max_reasoning_tokens!r} is not allowed: expected an integer >= 1")
    if not temperature >= 0.0:
        raise ValueError(f"temperature={temperature!r} is not allowed: expected a number >= 0")
    tokenizer = llm.get_tokenizer()
    prefix = PrefixIds(tokenizer)
    stop = StopRule(tokenizer)
    placeholder = getattr(llm.llm_engine.model_config.hf_config, "image_token_id", None)

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    # ---- call 1: reasoning samples (never a multimodal placeholder token: see `banned_token_bias`)
    texts = [render_generation_prompt(tokenizer, r.prompt, r.dimension, reasoning=True, anchors=r.anchors)
             for r in reqs]
    bias = banned_token_bias(llm.llm_engine.model_config.hf_config)
    params = [SamplingParams(n=group_size, max_tokens=max_reasoning_tokens, temperature=temperature,
                             seed=_sample_seed(seed, request_offset + i, group_size, 0), logprobs=0,
                             flat_logprobs=True, logit_bias=bias, **stop.sampling_kwargs())
              for i in range(len(reqs))]
    outputs = llm.generate([{"prompt": t, "multi_modal_data": {"image": r.image}} for t, r in zip(texts, reqs)],
                           params, use_tqdm=False)
    prompts = [list(out.prompt_token_ids) for out in outputs]
    samples: list[list[RolloutSample]] = []
    for i, out in enumerate(outputs):
        if len(out.outputs) != group_size:
            raise RuntimeError(f"vLLM returned {len(out.outputs)} samples for request {i}: expected {group_size}")
        row = []
        for g, c in enumerate(sorted(out.outputs, key=lambda c: c.index)):
            keep, finish = split_sample(c, decode, stop.token_ids)
            ids = [int(t) for t in c.token_ids[:keep]]
            logprobs = [float(step[t].logprob) for t, step in zip(ids, c.logprobs[:keep])]
            pre = prefix.after(ids)
            room = max_model_len - len(prompts[i]) - len(prefix.spaced) - 1
            if len(ids) > room:  # the score position must fit in the context: cut and call it malformed
                ids, logprobs, finish = ids[:max(room, 0)], logprobs[:max(room, 0)], FINISH_LENGTH
                pre = prefix.after(ids)
            row.append(RolloutSample(ids, logprobs, finish, pre, _sample_seed(seed, request_offset + i, group_size, g)))
        samples.append(row)

    # ---- call 2: the score distribution at the score position of every sample
    score_inputs, expected = [], []
    for i, r in enumerate(reqs):
        head = collapse_placeholders(prompts[i], placeholder)
        for s in samples[i]:
            score_inputs.append({"prompt_token_ids": head + s.reasoning_ids + s.prefix_ids,
                                 "multi_modal_data": {"image": r.image}})
            expected.append(prompts[i] + s.reasoning_ids + s.prefix_ids)
    score_params = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=list(score_ids), detokenize=False)
    scored = llm.generate(score_inputs, score_params, use_tqdm=False)
    logprobs_BK = torch.empty(len(scored), len(score_ids), dtype=torch.float64)
    for b, (out, want) in enumerate(zip(scored, expected, strict=True)):
        if list(out.prompt_token_ids) != want:
            raise RuntimeError("vLLM expanded a score prompt differently from the rollout's prompt ids "
                               f"(lengths {len(out.prompt_token_ids)} vs {len(want)}); the learner would "
                               "teacher-force other tokens")
        step = out.outputs[0].logprobs[0]
        missing = [t for t in score_ids if t not in step]
        if missing:
            raise RuntimeError(f"vLLM returned no log-prob for score token ids {missing}")
        logprobs_BK[b] = torch.tensor([step[t].logprob for t in score_ids], dtype=torch.float64)
    return assemble_rollout(prompts, samples, logprobs_BK, score_ids, temperature, weights_version)


def _draw_score(logprobs_K: torch.Tensor, temperature: float, seed: int | None) -> int:
    """Index of the score bin drawn from q^(1/temperature) (argmax at temperature 0)."""
    if temperature == 0.0:
        return int(logprobs_K.argmax())
    probs = torch.softmax(logprobs_K / temperature, dim=-1)
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return int(torch.multinomial(probs, 1, generator=gen))


def assemble_rollout(prompts: list[list[int]], samples: list[list[RolloutSample]], logprobs_BK: torch.Tensor,
                     score_ids: Sequence[int], temperature: float, weights_version: int) -> RolloutBatch:
    """The validated `RolloutBatch` of N prompts (expanded ids), G samples each, and the score-token log-probs
    logprobs_BK (B = N * G, request-major) at their score positions; draws each score token from q. No vLLM:
    the learner's tests build rollouts with it too."""
    n, g = len(samples), len(samples[0])
    el = max(len(p) for p in prompts)
    lengths = [len(s.reasoning_ids) + len(s.prefix_ids) + 1 for row in samples for s in row]
    t = max(lengths)
    prompt_ids = torch.zeros(n, el, dtype=torch.int64)
    prompt_mask = torch.zeros(n, el, dtype=torch.bool)
    response_ids = torch.zeros(n, g, t, dtype=torch.int64)
    response_mask = torch.zeros(n, g, t, dtype=torch.bool)
    policy_mask = torch.zeros(n, g, t, dtype=torch.bool)
    old_logprobs = torch.zeros(n, g, t, dtype=torch.float32)
    score_index = torch.zeros(n, g, dtype=torch.int64)
    finish = torch.zeros(n, g, dtype=torch.int8)
    num_reasoning = torch.zeros(n, g, dtype=torch.int64)
    q = distribution_from_logprobs(logprobs_BK).view(n, g, -1)
    for i in range(n):
        prompt_ids[i, : len(prompts[i])] = torch.tensor(prompts[i])
        prompt_mask[i, : len(prompts[i])] = True
        for j, s in enumerate(samples[i]):
            b = i * g + j
            k = _draw_score(logprobs_BK[b], temperature, s.seed)
            r, p = len(s.reasoning_ids), len(s.prefix_ids)
            ids = s.reasoning_ids + s.prefix_ids + [int(score_ids[k])]
            response_ids[i, j, : len(ids)] = torch.tensor(ids)
            response_mask[i, j, : len(ids)] = True
            policy_mask[i, j, :r] = True
            policy_mask[i, j, r + p] = True
            old_logprobs[i, j, :r] = torch.tensor(s.reasoning_logprobs, dtype=torch.float32)
            old_logprobs[i, j, r + p] = float(logprobs_BK[b, k])
            score_index[i, j] = r + p
            finish[i, j] = s.finish
            num_reasoning[i, j] = r
    return RolloutBatch(
        prompt_ids_NL=prompt_ids, prompt_mask_NL=prompt_mask, response_ids_NGT=response_ids,
        response_mask_NGT=response_mask, policy_mask_NGT=policy_mask, old_logprobs_NGT=old_logprobs,
        score_index_NG=score_index, q_NGK=q, mu_NG=expected_score(q), format_ok_NG=finish == FINISH_PREFIX,
        finish_NG=finish, num_reasoning_NG=num_reasoning, weights_version=weights_version,
        temperature=float(temperature),
    ).validate()


def forced_logprobs(llm: Any, sequences: Sequence[ForcedSequence]) -> list[torch.Tensor]:
    """log pi(response token | everything before) under the served model, for every response token of every
    sequence (float32 tensors of each response's length): one prefill per sequence (`prompt_logprobs=0` returns
    the fed token's log-prob at each position, over the full vocabulary, untempered).

    The prompt ids must expand in this engine exactly as they were given (the same image placeholder count):
    a model whose processor sizes the image differently cannot score another's tokens, and raises ValueError.
    """
    from vllm import SamplingParams

    placeholder = getattr(llm.llm_engine.model_config.hf_config, "image_token_id", None)
    inputs = [{"prompt_token_ids": collapse_placeholders(list(s.prompt_ids), placeholder) + list(s.response_ids),
               "multi_modal_data": {"image": s.image}} for s in sequences]
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False, flat_logprobs=True)
    outputs = llm.generate(inputs, params, use_tqdm=False)
    result = []
    for i, (seq, out) in enumerate(zip(sequences, outputs, strict=True)):
        want = [int(t) for t in seq.prompt_ids] + [int(t) for t in seq.response_ids]
        if list(out.prompt_token_ids) != want:
            raise ValueError(f"sequence {i}: this engine expands the prompt to {len(out.prompt_token_ids)} tokens, "
                             f"the sequence has {len(want)}: the two models see the image differently (processor "
                             "patch or merge size), so one cannot score the other's tokens")
        start = len(seq.prompt_ids)
        result.append(torch.tensor([out.prompt_logprobs[start + t][tok].logprob
                                    for t, tok in enumerate(want[start:])], dtype=torch.float32))
    return result
