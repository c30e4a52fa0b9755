"""How well a VLM describes Shapes images: greedy descriptions, and per-attribute accuracy against the true scenes.

- `describe_images`: batched greedy descriptions of PIL images (the captioning prompt of `zray.tasks.caption`).
- `score_caption` / `caption_metrics`: which attributes of each description are right, and their accuracy.
- `caption_slices`: the same accuracy over slices of the images (object count, shared colours, clean or degraded).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from zray.data.captions import Description, description_of, parse_description
from zray.data.prompt_grammar import Combo
from zray.data.scene import Defects, Scene
from zray.tasks.caption import caption_messages

ATTRIBUTES = ("background", "colour", "shape", "count", "relation")
_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

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
    out: list[str] = []
    try:
        for i in range(0, len(images), batch_size):
            chunk = list(images[i:i + batch_size])
            texts = [processor.apply_chat_template(caption_messages(img), tokenize=False, add_generation_prompt=True)
                     for img in chunk]
            # left padding (asked per call: the processor may be shared), so that generation continues every row
            inputs = processor(text=texts, images=chunk, return_tensors="pt", padding=True,
                               padding_side="left").to(model.device)
            ids = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens,
                                 eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                                 pad_token_id=tokenizer.pad_token_id)
            new = ids[:, inputs["input_ids"].shape[1]:]
            out.extend(t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
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
