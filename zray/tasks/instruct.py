"""The base VLM's instruction phase: the scoring conversation, up to (never including) the score token.

The paper's base is an instruction-tuned VLM that already writes a rationale and a score when asked; ours only
captions. This phase (part of `zray pretrain-vlm`, before GDSO, which still starts from this base) teaches the
teacher's reasoning form of `zray.rubric`:

    [system rubric] [user: image, prompt, dimension, "Explain briefly, then give the score."]
    assistant: <rationale> Score: |<s_x>
               ^^^^^^^^^^^^^^^^^^^  labels (the rest is -100)

The rationales are the world's ground truth in words (`zray.data.rationales`), on fresh images and prompts
disjoint from every labelled split. The context ends at the score position: the score token is not in the
sequence at all, so no loss ever reaches it (zero-shot stays an honest baseline: the base has never been told a
score). Loss: the mean cross-entropy over the answer tokens (rationale and score prefix).

Shape legend: B batch, L sequence length, K kept logit positions, V vocabulary, T answer tokens of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zray.data.render import decode_png
from zray.models.vlm import cached_processor, load_vlm_weights, save_vlm, trainable_vlm
from zray.rubric import render_score_context
from zray.tasks.caption import IGNORE_INDEX, mask_to_answer


def answer_labels(input_ids_BL: torch.Tensor, attention_mask_BL: torch.Tensor, tokenizer: Any) -> torch.Tensor:
    """labels_BL: the input ids after the last `<|im_start|>assistant\\n` of each row, up to its last real token
    (right padding), -100 elsewhere (`zray.tasks.caption.mask_to_answer`, open-ended). Raises ValueError for a row
    without an assistant answer."""
    return mask_to_answer(input_ids_BL, tokenizer, lengths_B=attention_mask_BL.sum(-1))


@dataclass(frozen=True, kw_only=True)
class InstructTask:
    """Rationale + score prefix in the teacher's reasoning form (a `LearnerTask`, `LengthGrouped`); rows carry
    prompt, image (PNG), dimension, rationale (`zray.data.rationales.instruct_corpus`)."""

    model_dir: str
    name: str = "instruct"

    @property
    def processor(self) -> Any:
        return cached_processor(str(self.model_dir))

    def build_model(self) -> torch.nn.Module:
        return trainable_vlm(self.model_dir)

    def collate(self, rows: dict[str, Any]) -> dict[str, torch.Tensor]:
        processor = self.processor
        texts = [render_score_context(processor, str(p), str(d), str(r))
                 for p, d, r in zip(rows["prompt"], rows["dimension"], rows["rationale"], strict=True)]
        images = [decode_png(bytes(im)) for im in rows["image"]]
        inputs = processor(text=texts, images=images, return_tensors="pt", padding=True, padding_side="right")
        batch = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        batch["labels"] = answer_labels(batch["input_ids"], batch["attention_mask"], processor.tokenizer)
        return batch

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean token cross-entropy over the answer tokens; the LM head runs from the batch's first answer position
        on (`logits_to_keep`)."""
        labels_BL = batch["labels"]
        target_BL = labels_BL[:, 1:]
        answers = (target_BL != IGNORE_INDEX).any(dim=0).nonzero()
        first = int(answers[0]) if len(answers) else target_BL.shape[1] - 1
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        out = model(**inputs, use_cache=False, logits_to_keep=labels_BL.shape[1] - first)
        target_BK = target_BL[:, first:]
        mask_BK = target_BK != IGNORE_INDEX
        logits_TV = out.logits[:, :-1][mask_BK].float()
        target_T = target_BK[mask_BK]
        loss = torch.nn.functional.cross_entropy(logits_TV, target_T)
        with torch.no_grad():
            acc = (logits_TV.argmax(-1) == target_T).float().mean()
        return loss, {"loss": float(loss.detach()), "token_acc": float(acc), "answer_tokens": float(mask_BK.sum())}

    def row_lengths(self, columns: dict[str, Any]) -> np.ndarray:
        """Characters of each row's rationale and prompt: what varies in its sequence length."""
        return np.array([len(str(r)) + len(str(p)) for r, p in zip(columns["rationale"], columns["prompt"],
                                                                    strict=True)])

    def save_pretrained(self, model: torch.nn.Module, out_dir: Path) -> None:
        save_vlm(model, self.model_dir, out_dir)

    def load_pretrained(self, model: torch.nn.Module, ckpt_dir: Path) -> None:
        load_vlm_weights(model, ckpt_dir)
