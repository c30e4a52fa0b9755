"""Teacher forcing of rollouts: the learner's view of a `RolloutBatch` (methods.md §2, "q recomputed under the
current policy by teacher-forcing the sampled o").

The engines return token ids exactly as they were fed (the prompt with its image placeholders expanded, then
the response: reasoning, score prefix, score token). The learner feeds the same ids to the transformers model,
with the image's pixels from the processor, and reads

- `logp_BT`: log pi(token) over the full vocabulary for every response token (the policy's log-probs, what the
  rollout's `old_logprobs` hold under pi_old), and
- `log_q_BK`: the log of the nine-bin score distribution at the score position (softmax over the score tokens'
  logits only, methods.md §1).

`PolicyModel` computes both from the last hidden states with the LM head applied in chunks of tokens, so a real
vocabulary (V = 152k) never needs B x T x V logits; the learner tasks train it in place of the bare VLM.

Sequences are laid out request-major: row b = n * G + g is sample g of request n. Shapes: B = N * G sequences,
L tokens per sequence (prompt + response, right-padded), T response tokens, K = 9 score bins, V vocabulary,
H hidden size, S real (unpadded) response tokens of the batch, C tokens of an LM-head chunk.
No Ray here: `zray/tasks/gdso.py` uses it inside the learner.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.utils.checkpoint

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
POLICY_INPUT_KEYS = (*MODEL_INPUT_KEYS, "resp_pos", "resp_ids", "resp_mask", "score_pos")
DEFAULT_CHUNK_TOKENS = 512  # response tokens per LM-head chunk: 512 x 152k vocabulary x 4 bytes = 311 MB of logits


class PolicyModel(torch.nn.Module):
    """A Qwen-VL model whose forward returns (logp_BT, log_q_BK) of teacher-forced rollouts, never B x T x V logits.

    The forward runs the VLM's base model (`vlm.model`: vision tower, language model, final norm) for the last
    hidden states, then applies the LM head (`vlm.lm_head`, tied to the input embeddings or not) only where it
    is needed: to the response tokens' predicting positions in chunks of `chunk_tokens` tokens, each chunk under
    `torch.utils.checkpoint` while gradients are on (the backward recomputes a chunk's logits instead of keeping
    them), and to the B score positions once. So at most max(chunk_tokens, B) x V logits exist at a time. This is
    the Hugging Face forward (`Qwen2_5_VL/Qwen3VLForConditionalGeneration.forward` is `lm_head(model(...)[0])`,
    no logit scaling) with the head applied piecewise.

    It adopts the VLM's children (`model`, `lm_head`) as its own: its parameters and `state_dict()` are the VLM's,
    under the VLM's Hugging Face names (what vLLM loads and `load_vlm_weights` / `load_state_dict` take), and
    `self.vlm` (not a submodule) is the VLM itself for `save_pretrained`. Call the module (or its DDP / DeepSpeed
    wrapper) so that the wrapper's hooks run.
    """

    def __init__(self, vlm: torch.nn.Module, score_ids: Sequence[int], chunk_tokens: int = DEFAULT_CHUNK_TOKENS
                 ) -> None:
        super().__init__()
        if not isinstance(chunk_tokens, int) or chunk_tokens < 1:
            raise ValueError(f"PolicyModel.chunk_tokens={chunk_tokens!r} is not allowed: expected an integer >= 1")
        children = dict(vlm.named_children())
        own = [n for n, _ in vlm.named_parameters(recurse=False)] + [n for n, _ in vlm.named_buffers(recurse=False)]
        if set(children) != {"model", "lm_head"} or own or vlm.get_output_embeddings() is not children["lm_head"]:
            raise ValueError(f"PolicyModel: a {type(vlm).__name__} with children {sorted(children)} and own tensors "
                             f"{own} is not allowed: expected a Hugging Face VLM made of `model` and `lm_head` only "
                             "(Qwen2.5-VL, Qwen3-VL)")
        for name, child in children.items():
            self.add_module(name, child)
        object.__setattr__(self, "vlm", vlm)  # a plain attribute: the same modules must not appear twice
        self.score_ids = tuple(int(i) for i in score_ids)
        self.chunk_tokens = chunk_tokens

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, resp_pos: torch.Tensor,
                resp_ids: torch.Tensor, resp_mask: torch.Tensor, score_pos: torch.Tensor,
                mm_token_type_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                image_grid_thw: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logp_BT, log_q_BK) of `rollout_inputs`' batch: see `forced_logprobs`."""
        hidden_BLH = self.model(input_ids=input_ids, attention_mask=attention_mask,
                                mm_token_type_ids=mm_token_type_ids, pixel_values=pixel_values,
                                image_grid_thw=image_grid_thw, use_cache=False).last_hidden_state
        pred_pos_BT = (resp_pos - 1).clamp(min=0)
        rows_S, steps_S = resp_mask.nonzero(as_tuple=True)  # the S real response tokens
        hidden_SH = hidden_BLH[rows_S, pred_pos_BT[rows_S, steps_S]]
        ids_S = resp_ids[rows_S, steps_S]
        chunks = []
        for start in range(0, ids_S.shape[0], self.chunk_tokens):
            args = (hidden_SH[start:start + self.chunk_tokens], ids_S[start:start + self.chunk_tokens])
            if torch.is_grad_enabled():
                chunks.append(torch.utils.checkpoint.checkpoint(self._chunk_logprobs, *args, use_reentrant=False))
            else:
                chunks.append(self._chunk_logprobs(*args))
        logp_S = torch.cat(chunks) if chunks else hidden_SH.new_zeros(0, dtype=torch.float32)
        logp_BT = torch.zeros(resp_ids.shape, dtype=torch.float32, device=hidden_BLH.device)
        logp_BT = logp_BT.index_put((rows_S, steps_S), logp_S)
        rows_B = torch.arange(hidden_BLH.shape[0], device=hidden_BLH.device)
        ids_K = torch.as_tensor(self.score_ids, device=hidden_BLH.device)
        score_logits_BK = self.lm_head(hidden_BLH[rows_B, score_pos - 1]).float()[:, ids_K]
        return logp_BT, torch.log_softmax(score_logits_BK, dim=-1)

    def _chunk_logprobs(self, hidden_CH: torch.Tensor, ids_C: torch.Tensor) -> torch.Tensor:
        """log softmax(lm_head(hidden))[id] of C tokens (float32), through C x V logits."""
        logits_CV = self.lm_head(hidden_CH).float()
        return logits_CV.gather(-1, ids_C[:, None]).squeeze(-1) - torch.logsumexp(logits_CV, dim=-1)


def policy_inputs(inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The entries of a `rollout_inputs` batch that `PolicyModel.forward` takes."""
    return {k: inputs[k] for k in POLICY_INPUT_KEYS if k in inputs}


def forced_logprobs(model: Any, inputs: dict[str, torch.Tensor], score_ids: Sequence[int],
                    chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp_BT, log_q_BK) of the response tokens and at the score position, with gradient through `model`.

    logp_BT[b, t] = log softmax(logits[b, resp_pos[b, t] - 1])[resp_ids[b, t]] (0 on padding);
    log_q_BK[b] = log softmax over the score tokens of logits[b, score_pos[b] - 1].

    `model` is a `PolicyModel` (or a DDP / DeepSpeed wrapper of one, with a `.module`), which is called, or a
    plain Qwen-VL model, which is wrapped in a `PolicyModel` for the call (its `chunk_tokens`). Either way no
    B x T x V logits are formed.
    """
    inner = getattr(model, "module", model)
    if isinstance(inner, PolicyModel):
        if inner.score_ids != tuple(int(i) for i in score_ids):
            raise ValueError(f"score_ids={list(score_ids)} differ from the PolicyModel's {list(inner.score_ids)}")
        return model(**policy_inputs(inputs))
    return PolicyModel(model, score_ids, chunk_tokens)(**policy_inputs(inputs))
