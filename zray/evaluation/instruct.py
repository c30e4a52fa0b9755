"""How well an instruction-tuned base VLM holds the scoring conversation (the targets of its instruction phase).

On held-out instruction examples (fresh images, their ground-truth rationales; `zray.data.rationales`):

- **format failures**: the fraction of answers sampled at temperature 1 (zero-shot sampling, as GDSO rolls out)
  that do not write the score prefix "Score:" within `max_new_tokens`. Target: below 5%.
- **rationale accuracy** of greedy answers, per dimension: `exact` (the rationale equals the truth); for
  alignment also `drawn` (the drawn objects and background are named correctly: the part that shows what the
  model sees, comparable with the captioning accuracy of the base) and `verdict` (missing, extra, background and
  relation parts all right); for the other dimensions `defects` (the same set of visible defects, levels
  ignored) beside `exact` (levels right too).

    metrics, answers = evaluate_instruct(model, processor, rows, max_new_tokens=48, seed=0)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from zray.data.render import decode_png
from zray.rubric import DIMENSIONS, SCORE_PREFIX, render_generation_prompt

STOP = SCORE_PREFIX.strip()  # "Score:"


def generate_answers(model: Any, processor: Any, rows: Sequence[dict[str, Any]], *, max_new_tokens: int,
                     sample: bool, seed: int = 0, batch_size: int = 32) -> list[str]:
    """The assistant text of each row's reasoning-form prompt (special tokens dropped), greedy or sampled at
    temperature 1 (seeded), `batch_size` rows at a time."""
    tokenizer = processor.tokenizer
    was_training = model.training
    model.eval()
    out: list[str] = []
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            texts = [render_generation_prompt(processor, r["prompt"], r["dimension"], reasoning=True) for r in chunk]
            images = [decode_png(bytes(r["image"])) for r in chunk]
            inputs = processor(text=texts, images=images, return_tensors="pt", padding=True,
                               padding_side="left").to(model.device)
            with torch.no_grad():
                ids = model.generate(**inputs, do_sample=sample, temperature=1.0 if sample else None,
                                     top_k=0 if sample else None, top_p=1.0 if sample else None,
                                     max_new_tokens=max_new_tokens,
                                     eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                                     pad_token_id=tokenizer.pad_token_id)
            out.extend(tokenizer.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    finally:
        torch.random.set_rng_state(generator_state)
        model.train(was_training)
    return out


def rationale_of(answer: str) -> str | None:
    """The rationale before the score prefix, or None when the answer never writes it (a format failure)."""
    cut = answer.find(STOP)
    return None if cut < 0 else answer[:cut].strip()


def _parts(text: str) -> dict[str, str]:
    out = {}
    for part in text.split(";"):
        key, sep, value = part.strip().partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


def _defect_names(text: str) -> set[str] | None:
    """The defect names after "defects:" ("noise severe; banding mild" -> {noise, banding}); None without it."""
    head, sep, value = text.partition("defects:")
    if not sep:
        return None
    value = value.strip()
    return set() if value == "none" else {item.split()[0] for item in value.split(";") if item.split()}


def rationale_scores(predicted: str | None, truth: str, dimension: str) -> dict[str, float]:
    """{exact, drawn, verdict} (alignment) or {exact, defects} (other dimensions), each 0 or 1."""
    if predicted is None:
        return ({"exact": 0.0, "drawn": 0.0, "verdict": 0.0} if dimension == "alignment"
                else {"exact": 0.0, "defects": 0.0})
    scores = {"exact": float(predicted == truth)}
    if dimension == "alignment":
        got, want = _parts(predicted), _parts(truth)
        scores["drawn"] = float(got.get("drawn") == want.get("drawn"))
        keys = set(want) - {"drawn"}
        scores["verdict"] = float(set(got) - {"drawn"} == keys and all(got[k] == want[k] for k in keys))
    else:
        scores["defects"] = float(_defect_names(predicted) == _defect_names(truth))
    return scores


def evaluate_instruct(model: Any, processor: Any, rows: Sequence[dict[str, Any]], *, max_new_tokens: int,
                      seed: int = 0) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(metrics, one record per row with the greedy and the sampled answer); see the module docstring."""
    if not rows:
        raise ValueError("rows is empty: expected instruction examples with prompt, image, dimension, rationale")
    greedy = generate_answers(model, processor, rows, max_new_tokens=max_new_tokens, sample=False)
    sampled = generate_answers(model, processor, rows, max_new_tokens=max_new_tokens, sample=True, seed=seed)
    records, per_dim = [], {d: [] for d in DIMENSIONS}
    for row, g, s in zip(rows, greedy, sampled, strict=True):
        scores = rationale_scores(rationale_of(g), row["rationale"], row["dimension"])
        per_dim[row["dimension"]].append(scores)
        records.append({"example_id": row["example_id"], "dimension": row["dimension"], "truth": row["rationale"],
                        "greedy": g, "sampled": s, **scores})
    metrics: dict[str, Any] = {
        "num_examples": len(rows),
        "format_fail_sampled": sum(rationale_of(s) is None for s in sampled) / len(rows),
        "format_fail_greedy": sum(rationale_of(g) is None for g in greedy) / len(rows),
        "dimensions": {d: {k: sum(s[k] for s in items) / len(items) for k in items[0]}
                       for d, items in per_dim.items() if items},
    }
    metrics["exact"] = sum(r["exact"] for r in records) / len(records)
    return metrics, records
