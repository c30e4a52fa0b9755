"""Captioning: the task that pre-trains a tiny VLM to perceive the Shapes world.

Chat layout (Qwen-VL template of the tiny tokenizer), trained on the assistant answer only:

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
    <|im_start|>user\\n<|vision_start|><|image_pad|> x 16<|vision_end|>Describe the image.<|im_end|>\\n
    <|im_start|>assistant\\n<description><|im_end|>\\n
                             ^^^^^^^^^^^^^^^^^^^^^^^^^ labels (the rest is -100)

The description is the corpus's canonical text in the task's caption style (`zray.data.captions`; 'compact'
drops object positions). `<|im_end|>` is trained so that greedy decoding stops by itself.

- `CaptionTask`: a `zray.training.task.LearnerTask` for a VLM directory in Hugging Face format (a tiny
  teacher or student from `zray.models.tiny`, or a real Qwen-VL checkpoint).
- Evaluation (greedy descriptions and their accuracy against the true scenes): `zray.evaluation.captions`.

No Ray here: the Ray Train side is `actors/learner/`, the driver `jobs/pretrain_vlm.py`.

Shape legend: B batch, L sequence length, V vocabulary.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zray.data.captions import STYLES, restyle
from zray.data.render import decode_png
from zray.models.vision_heads import HEAD_FILE, VISION_TARGET_KEYS, VisionProbe, vision_loss, vision_targets
from zray.models.vlm import cached_processor, load_vlm_weights, save_vlm, trainable_vlm

CAPTION_INSTRUCTION = "Describe the image."
IGNORE_INDEX = -100
LOSS_WEIGHTS = "loss_weights"  # batch key of the per-token caption loss weights (CaptionTask.position_weight)


def caption_messages(image: Any, answer: str | None = None) -> list[dict[str, Any]]:
    """Chat messages of one captioning example: user (image + instruction), and the answer if given."""
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": CAPTION_INSTRUCTION}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def _answer_header(tokenizer: Any) -> list[int]:
    """Token ids of `<|im_start|>assistant\\n`, the text right before every answer."""
    return tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]


def mask_to_answer(input_ids_BL: torch.Tensor, tokenizer: Any, lengths_B: torch.Tensor | None = None) -> torch.Tensor:
    """labels_BL: input ids on the last assistant answer (its text and its `<|im_end|>`), -100 elsewhere.

    With `lengths_B` (the real tokens of each right-padded row), the answer is open-ended instead: it runs from the
    last assistant header to the row's last real token (a context cut before the end of the turn, e.g. at the score
    position). Raises ValueError when a row has no complete (or, open-ended, no non-empty) assistant answer."""
    header = _answer_header(tokenizer)
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    labels = torch.full_like(input_ids_BL, IGNORE_INDEX)
    for b, row in enumerate(input_ids_BL.tolist()):
        length = len(row) if lengths_B is None else int(lengths_B[b])
        start = next((i + len(header) for i in range(length - len(header), -1, -1)
                      if row[i:i + len(header)] == header), None)
        if lengths_B is not None:
            if start is None or start >= length:
                raise ValueError(f"row {b}: no assistant answer to train on (the context must end after the score "
                                 "prefix)")
            labels[b, start:length] = input_ids_BL[b, start:length]
            continue
        end = next((i for i in range(start, len(row)) if row[i] == end_id), None) if start is not None else None
        if end is None:
            raise ValueError(f"row {b}: no complete '<|im_start|>assistant ... <|im_end|>' turn to train on")
        labels[b, start:end + 1] = input_ids_BL[b, start:end + 1]
    return labels


def position_digits(input_ids_BL: torch.Tensor, tokenizer: Any) -> torch.Tensor:
    """bool_BL: the digit tokens inside parentheses, i.e. the written positions "at (36, 74)" of canonical
    captions (object numbers and relation indices are outside parentheses)."""
    digits, opens, closes = _bracket_token_ids(tokenizer)
    out = torch.zeros_like(input_ids_BL, dtype=torch.bool)
    for b, row in enumerate(input_ids_BL.tolist()):
        inside = False
        for i, token in enumerate(row):
            if token in opens:
                inside = True
            elif token in closes:
                inside = False
            elif inside and token in digits:
                out[b, i] = True
    return out


@functools.lru_cache(maxsize=8)
def _bracket_token_ids(tokenizer: Any) -> tuple[frozenset[int], frozenset[int], frozenset[int]]:
    """(digit, "(" and ")..." token ids) of `tokenizer`'s vocabulary; Qwen's pre-tokenizer splits numbers into
    single digits."""
    texts = {i: tokenizer.decode([i]).strip() for i in range(len(tokenizer))}
    return (frozenset(i for i, t in texts.items() if t.isdigit()), frozenset(i for i, t in texts.items() if t == "("),
            frozenset(i for i, t in texts.items() if t.startswith(")")))


@dataclass(frozen=True, kw_only=True)
class CaptionTask:
    """Image -> scene description, token cross-entropy on the answer (a `LearnerTask`).

    model_dir: a Hugging Face format VLM dir (model + processor). style: the caption style trained on.
    Rows (Ray Data numpy batches) need the captions table's `image` (PNG bytes) and `description` columns.

    vision_aux_weight > 0 adds `vision_aux_weight * L_vision` (zray/models/vision_heads.py: scene attributes and
    object map from the same image tokens the language model reads, captured in the one forward pass), which keeps
    the vision tower learning what the captions name; rows then also need `scene_json`. The model is then a
    `VisionProbe` (VLM + heads; the heads start from `model_dir`'s HEAD_FILE when a warm-up wrote one), and the
    saved directory is the VLM alone in Hugging Face format plus that heads file in a subdirectory. cover_weight > 0
    adds the heads' cover term (every token names the objects covering its cell) to the vision loss.

    position_weight != 1 weights the loss of the position digits of canonical captions ("at (36, 74)",
    `position_digits`) by it, the other answer tokens by 1: the caption loss is then sum_t w_t CE_t / sum_t w_t.
    In canonical captions the position digits are 22% of the answer tokens but 61% of the dev teacher's held-out
    loss (a position is uncertain by a few units), against 7% for the colour, shape and count words that the
    descriptions are scored on: with weight 1 the digits dominate the gradient.
    """

    model_dir: str
    name: str = "caption"
    style: str = "compact"
    vision_aux_weight: float = 0.0
    map_weight: float = 0.4
    cover_weight: float = 0.0
    position_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise ValueError(f"CaptionTask.style={self.style!r} is not allowed: expected one of {STYLES}")
        if not self.position_weight >= 0:
            raise ValueError(f"CaptionTask.position_weight={self.position_weight!r} is not allowed: expected a "
                             "float >= 0")
        if not (Path(self.model_dir) / "config.json").exists():
            raise ValueError(f"CaptionTask.model_dir={self.model_dir!r} is not allowed: expected a Hugging Face "
                             "format model dir (no config.json there)")

    @property
    def processor(self) -> Any:
        return cached_processor(str(self.model_dir))

    def build_model(self) -> torch.nn.Module:
        vlm = trainable_vlm(self.model_dir)
        if not self.vision_aux_weight:
            return vlm
        probe = VisionProbe(vlm, cover=self.cover_weight > 0).train()
        if (Path(self.model_dir) / HEAD_FILE).is_file():
            probe.load(self.model_dir, vlm=False)
        return probe

    def collate(self, rows: dict[str, Any]) -> dict[str, torch.Tensor]:
        images = [decode_png(bytes(b)) for b in rows["image"]]
        answers = [restyle(str(t), self.style) for t in rows["description"]]
        batch = self.encode(images, answers)
        if self.vision_aux_weight:
            merge = int(self.processor.image_processor.merge_size)
            batch.update(vision_targets(rows["scene_json"], batch["image_grid_thw"], merge,
                                        cover=self.cover_weight > 0))
        return batch

    def encode(self, images: Sequence[Any], answers: Sequence[str]) -> dict[str, torch.Tensor]:
        """The processor's model inputs (input_ids_BL, attention_mask_BL, pixel_values, image_grid_thw, ...) plus
        labels_BL; right padding."""
        processor = self.processor
        texts = [processor.apply_chat_template(caption_messages(img, ans), tokenize=False)
                 for img, ans in zip(images, answers, strict=True)]
        inputs = processor(text=texts, images=list(images), return_tensors="pt", padding=True, padding_side="right")
        batch = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}  # Qwen3-VL: also mm_token_type_ids
        batch["labels"] = mask_to_answer(batch["input_ids"], processor.tokenizer)
        if self.position_weight != 1.0:
            weights = torch.ones(batch["labels"].shape)
            weights[position_digits(batch["input_ids"], processor.tokenizer)] = self.position_weight
            batch[LOSS_WEIGHTS] = weights
        return batch

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean token cross-entropy over the answer tokens of the batch, weighted when position_weight != 1 (plus
        the weighted vision loss); also answer-token accuracy. One forward of `model` (the VLM, the `VisionProbe`,
        or a DDP / DeepSpeed wrapper of either).

        The language model head runs only from the batch's first answer position on (`logits_to_keep`). Every row's
        prompt has the same length here, so that skips the prompts, about half of a batch's positions; the head
        (hidden x vocabulary) costs as much per position as a layer of the tiny models."""
        labels_BL = batch["labels"]
        inputs = {k: v for k, v in batch.items() if k not in ("labels", LOSS_WEIGHTS, *VISION_TARGET_KEYS)}
        target_BL = labels_BL[:, 1:]
        answers = (target_BL != IGNORE_INDEX).any(dim=0).nonzero()
        first = int(answers[0]) if len(answers) else target_BL.shape[1] - 1
        out = model(**inputs, use_cache=False, logits_to_keep=labels_BL.shape[1] - first)
        if not self.vision_aux_weight:
            return self._caption_loss(out.logits, batch, first)
        loss, info = self._caption_loss(out.lm.logits, batch, first)
        aux_loss, aux_info = vision_loss(out.heads, batch, self.map_weight, self.cover_weight)
        info["caption_loss"] = info.pop("loss")  # "loss" is the total (the learner logs it)
        info.update(vision_loss=float(aux_loss.detach()), **aux_info)
        return loss + self.vision_aux_weight * aux_loss, info

    def _caption_loss(self, logits_BKV: torch.Tensor, batch: dict[str, torch.Tensor],
                      first: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The caption loss from logits_BKV, the logits of positions `first` .. L-1 (`logits_to_keep`)."""
        target_BK = batch["labels"][:, 1:][:, first:]
        mask_BK = target_BK != IGNORE_INDEX
        logits_TV = logits_BKV[:, :-1][mask_BK].float()  # the T answer tokens (predictions for first+1 .. L-1)
        target_T = target_BK[mask_BK]
        ce_T = torch.nn.functional.cross_entropy(logits_TV, target_T, reduction="none")
        weight_T = batch[LOSS_WEIGHTS][:, 1:][:, first:][mask_BK] if LOSS_WEIGHTS in batch else torch.ones_like(ce_T)
        loss = (ce_T * weight_T).sum() / weight_T.sum().clamp_min(1e-8)
        with torch.no_grad():
            acc = (logits_TV.argmax(-1) == target_T).float().mean()
        return loss, {"loss": float(loss.detach()), "token_acc": float(acc), "answer_tokens": float(mask_BK.sum())}

    def row_lengths(self, columns: dict[str, Any]) -> np.ndarray:
        """Characters of each row's description in the trained style: what varies in its sequence length (the
        image tokens and the prompt are the same for every row). For `LearnerConfig.length_window`."""
        return np.array([len(restyle(str(t), self.style)) for t in columns["description"]])

    def save_pretrained(self, model: torch.nn.Module, out_dir: Path) -> None:
        """Model (safetensors) + processor + tokenizer: loads in transformers (`load_vlm`) and vLLM."""
        if isinstance(model, VisionProbe):
            model.save(self.model_dir, out_dir)
        else:
            save_vlm(model, self.model_dir, out_dir)

    def load_pretrained(self, model: torch.nn.Module, ckpt_dir: Path) -> None:
        if isinstance(model, VisionProbe):
            model.load(ckpt_dir)
        else:
            load_vlm_weights(model, ckpt_dir)
