"""Captioning: the task that pre-trains a tiny VLM to perceive the Shapes world, and how it is evaluated.

Chat layout (Qwen-VL template of the tiny tokenizer), trained on the assistant answer only:

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
    <|im_start|>user\\n<|vision_start|><|image_pad|> x 16<|vision_end|>Describe the image.<|im_end|>\\n
    <|im_start|>assistant\\n<description><|im_end|>\\n
                             ^^^^^^^^^^^^^^^^^^^^^^^^^ labels (the rest is -100)

The description is the corpus's canonical text in the task's caption style (`zray.data.captions`; 'compact'
drops object positions). `<|im_end|>` is trained so that greedy decoding stops by itself.

- `CaptionTask`: a `zray.training.task.LearnerTask` for a VLM directory in Hugging Face format (a tiny
  teacher or student from `zray.models.tiny`, or a real Qwen-VL checkpoint).
- `describe_images`: batched greedy descriptions of PIL images.
- `score_caption` / `caption_metrics`: per-attribute accuracy of generated descriptions against the true scenes.

No Ray here: the Ray Train side is `actors/learner.py`, the driver `jobs/pretrain_vlm.py`.

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

from zray.data.captions import STYLES, Description, description_of, parse_description, restyle
from zray.data.prompts import Combo
from zray.data.render import decode_png
from zray.data.scene import Defects, Scene
from zray.models.vision_warmup import HEAD_FILE, VISION_TARGET_KEYS, VisionProbe, vision_targets, visual_tokens
from zray.models.vlm import cached_processor, load_vlm_weights, save_vlm, trainable_vlm

CAPTION_INSTRUCTION = "Describe the image."
IGNORE_INDEX = -100
LOSS_WEIGHTS = "loss_weights"  # batch key of the per-token caption loss weights (CaptionTask.position_weight)
ATTRIBUTES = ("background", "colour", "shape", "count", "relation")
_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


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


def mask_to_answer(input_ids_BL: torch.Tensor, tokenizer: Any) -> torch.Tensor:
    """labels_BL: input ids on the last assistant answer (its text and its `<|im_end|>`), -100 elsewhere.

    Raises ValueError when a row has no complete assistant turn (truncated or not a chat)."""
    header = _answer_header(tokenizer)
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    labels = torch.full_like(input_ids_BL, IGNORE_INDEX)
    for b, row in enumerate(input_ids_BL.tolist()):
        start = next((i + len(header) for i in range(len(row) - len(header), -1, -1)
                      if row[i:i + len(header)] == header), None)
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

    vision_aux_weight > 0 adds `vision_aux_weight * L_vision` (zray/models/vision_warmup.py: scene attributes and
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
        processor.tokenizer.padding_side = "right"
        inputs = processor(text=texts, images=list(images), return_tensors="pt", padding=True)
        batch = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}  # Qwen3-VL: also mm_token_type_ids
        batch["labels"] = mask_to_answer(batch["input_ids"], processor.tokenizer)
        if self.position_weight != 1.0:
            weights = torch.ones(batch["labels"].shape)
            weights[position_digits(batch["input_ids"], processor.tokenizer)] = self.position_weight
            batch[LOSS_WEIGHTS] = weights
        return batch

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean token cross-entropy over the answer tokens of the batch, weighted when position_weight != 1 (plus
        the weighted vision loss); also answer-token accuracy."""
        if not self.vision_aux_weight:
            return self._caption_loss(model, batch)
        num_images = batch["image_grid_thw"].shape[0]
        captured: list[torch.Tensor] = []
        hook = model.vlm.model.visual.register_forward_hook(
            lambda _m, _i, out: captured.append(visual_tokens(out, num_images)))
        try:
            loss, info = self._caption_loss(model.vlm, batch)
        finally:
            hook.remove()
        vision_loss, vision_info = model.heads.loss(captured[0], batch, self.map_weight, self.cover_weight)
        info["caption_loss"] = info.pop("loss")  # "loss" is the total (the learner logs it)
        info.update(vision_loss=float(vision_loss.detach()), **vision_info)
        return loss + self.vision_aux_weight * vision_loss, info

    def _caption_loss(self, model: torch.nn.Module,
                      batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """The language model head runs only from the batch's first answer position on (`logits_to_keep`). Every
        row's prompt has the same length here, so that skips the prompts, about half of a batch's positions; the
        head (hidden x vocabulary) costs as much per position as a layer of the tiny models."""
        labels_BL = batch["labels"]
        inputs = {k: v for k, v in batch.items() if k not in ("labels", LOSS_WEIGHTS, *VISION_TARGET_KEYS)}
        target_BL = labels_BL[:, 1:]
        answers = (target_BL != IGNORE_INDEX).any(dim=0).nonzero()
        first = int(answers[0]) if len(answers) else target_BL.shape[1] - 1
        out = model(**inputs, use_cache=False, logits_to_keep=labels_BL.shape[1] - first)
        logits_BKV = out.logits[:, :-1]  # predictions for target positions first .. L-2
        target_BK = target_BL[:, first:]
        mask_BK = target_BK != IGNORE_INDEX
        logits_TV = logits_BKV[mask_BK].float()  # the T answer tokens of the batch
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


# ------------------------------------------------------------------------------------------ generation


@torch.no_grad()
def describe_images(model: Any, processor: Any, images: Sequence[Any], max_new_tokens: int = 128,
                    batch_size: int = 32) -> list[str]:
    """Greedy descriptions of PIL images (the assistant text, special tokens dropped), `batch_size` at a time."""
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}, batch_size={batch_size}: expected integers >= 1")
    was_training = model.training
    model.eval()
    tokenizer = processor.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    out: list[str] = []
    try:
        for i in range(0, len(images), batch_size):
            chunk = list(images[i:i + batch_size])
            texts = [processor.apply_chat_template(caption_messages(img), tokenize=False, add_generation_prompt=True)
                     for img in chunk]
            inputs = processor(text=texts, images=chunk, return_tensors="pt", padding=True).to(model.device)
            ids = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens,
                                 eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                                 pad_token_id=tokenizer.pad_token_id)
            new = ids[:, inputs["input_ids"].shape[1]:]
            out.extend(t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out


# ------------------------------------------------------------------------------------------ metrics


def _predicted_counts(pred: Description) -> dict[Combo, int] | None:
    """(colour, shape) -> number: from the `objects:` line, else from the numbered object lines, else None."""
    counts = pred.counts()
    if counts is not None:
        return counts
    if not pred.objects:
        return None
    out: dict[Combo, int] = {}
    for o in pred.objects:
        out[(o.color, o.shape)] = out.get((o.color, o.shape), 0) + 1
    return out


def _multiset(counts: dict[Combo, int], index: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for combo, n in counts.items():
        out[combo[index]] = out.get(combo[index], 0) + n
    return out


def score_caption(prediction: str, scene: Scene, defects: Defects | None = None) -> dict[str, bool | None]:
    """Which attributes of one generated description are right, against the drawn `scene`.

    The prediction is parsed leniently (`parse_description(text, strict=False)`); a missing or unparsable
    line makes its attributes wrong. Predicted objects are read from the `objects:` line (else from the
    numbered object lines). Definitions:

    - background: the background colour name equals the scene's.
    - colour: the multiset of object colours equals the scene's (e.g. {red: 2, blue: 1}).
    - shape: the multiset of object shapes equals the scene's.
    - count: the number of objects equals the scene's.
    - relation: only for a scene with a relation (a relation prompt's two objects; None otherwise). With
      T = (subject (colour, shape), predicate, reference (colour, shape)) and T' the same with the
      opposite predicate: right when the prediction's `relation_triples()` holds T exactly when the true
      description's does, and likewise T' (the truth is computed from the drawn positions, so a layout
      defect that undid the relation expects the prediction not to state it).
    - exact: background right, the (colour, shape) -> number map equal (so colours are on the right
      shapes), and the relation right where there is one. Sizes, positions and defects are not part of it.
    - defects (only when `defects` is given, else None): the set of (name, mild|severe) equals the truth's.
    """
    pred = parse_description(prediction, strict=False)
    truth = description_of(scene, defects)
    true_counts, got = scene.counts(), _predicted_counts(pred)
    result: dict[str, bool | None] = {
        "background": pred.background == truth.background,
        "colour": got is not None and _multiset(got, 0) == _multiset(true_counts, 0),
        "shape": got is not None and _multiset(got, 1) == _multiset(true_counts, 1),
        "count": got is not None and sum(got.values()) == len(scene.objects),
        "relation": None,
        "defects": None if defects is None else (pred.defects is not None
                                                 and set(pred.defects) == set(truth.defects)),
    }
    if scene.relation is not None:
        a, b = scene.objects[scene.relation.subject], scene.objects[scene.relation.reference]
        predicate = scene.relation.predicate
        claims = [((a.color, a.shape), p, (b.color, b.shape)) for p in (predicate, _OPPOSITE[predicate])]
        true_triples, pred_triples = truth.relation_triples(), pred.relation_triples()
        result["relation"] = all((t in pred_triples) == (t in true_triples) for t in claims)
    result["exact"] = bool(result["background"] and got == true_counts and result["relation"] is not False)
    return result


def caption_metrics(predictions: Sequence[str], truth_scenes: Sequence[Scene],
                    truth_defects: Sequence[Defects] | None = None) -> dict[str, float]:
    """Accuracy per attribute (`score_caption`) over the images, as fractions in [0, 1].

    Returns background, colour, shape, count, exact (over all images), relation (over the images whose scene
    has a relation; NaN when none has), defects (when `truth_defects` is given), num_images,
    num_relation_images.
    """
    if len(predictions) != len(truth_scenes) or not predictions:
        raise ValueError(f"caption_metrics: {len(predictions)} predictions for {len(truth_scenes)} scenes: "
                         "expected equal, non-zero lengths")
    if truth_defects is not None and len(truth_defects) != len(truth_scenes):
        raise ValueError(f"caption_metrics: {len(truth_defects)} defects for {len(truth_scenes)} scenes")
    defects = list(truth_defects) if truth_defects is not None else [None] * len(truth_scenes)
    scored = [score_caption(p, s, d) for p, s, d in zip(predictions, truth_scenes, defects, strict=True)]
    out: dict[str, float] = {}
    for key in (*ATTRIBUTES, "exact", "defects"):
        values = [r[key] for r in scored if r[key] is not None]
        if key == "defects" and truth_defects is None:
            continue
        out[key] = sum(values) / len(values) if values else float("nan")
    out["num_images"] = float(len(scored))
    out["num_relation_images"] = float(sum(r["relation"] is not None for r in scored))
    return out


def caption_slices(predictions: Sequence[str], truth_scenes: Sequence[Scene],
                   truth_defects: Sequence[Defects]) -> list[dict[str, float | str]]:
    """Where descriptions fail: shape, count and exact accuracy (fractions) over slices of the images.

    Slices: all; 1, 2 and 3 objects; two or more objects of one colour (which a tiny model tells apart least
    well); clean (no defect at the visible level of the descriptions) and degraded. Each row: slice, images,
    shape, count, exact. A slice without images is left out.
    """
    if not (len(predictions) == len(truth_scenes) == len(truth_defects)) or not predictions:
        raise ValueError(f"caption_slices: {len(predictions)} predictions, {len(truth_scenes)} scenes and "
                         f"{len(truth_defects)} defects: expected equal, non-zero lengths")
    members: dict[str, list[dict[str, bool | None]]] = {}
    for text, scene, defects in zip(predictions, truth_scenes, truth_defects, strict=True):
        scored = score_caption(text, scene)
        colours = [o.color for o in scene.objects]
        names = ["all", f"{len(scene.objects)} object" + ("s" if len(scene.objects) != 1 else "")]
        if len(set(colours)) < len(colours):
            names.append("objects sharing a colour")
        names.append("degraded" if description_of(scene, defects).defects else "clean")
        for name in names:
            members.setdefault(name, []).append(scored)
    order = ["all", "1 object", "2 objects", "3 objects", "objects sharing a colour", "clean", "degraded"]
    return [{"slice": name, "images": float(len(members[name])),
             **{key: sum(bool(r[key]) for r in members[name]) / len(members[name])
                for key in ("shape", "count", "exact")}}
            for name in sorted(members, key=lambda n: (order.index(n) if n in order else len(order), n))]
