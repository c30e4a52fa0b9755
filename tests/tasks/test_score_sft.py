"""Score SFT with the true rationale in context (`ScoreSFTTask(rationales=True)`): each side's own rationale, then
the score prefix, q at the reasoning form's score position; the saved model scores in the reasoning form."""

import io
import json

import numpy as np
import torch
from PIL import Image

from zray.models.vlm import SCORING_FILE, cached_processor, load_vlm
from zray.rubric import render_score_context
from zray.tasks.score_sft import ScoreSFTTask, pair_requests


def _png(seed):
    buf = io.BytesIO()
    Image.fromarray(np.random.RandomState(seed).randint(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


ROWS = {"prompt": np.array(["a red circle on a white background"] * 2), "dimension": np.array(["alignment", "realism"]),
        "winner_image": [_png(0), _png(1)], "loser_image": [_png(2), _png(3)],
        "winner_label": np.array([4.0, 3.0]), "loser_label": np.array([1.0, 2.0]),
        "winner_rationale": np.array(["drawn: a red circle on white; missing: none; extra: none", "defects: none"]),
        "loser_rationale": np.array(["drawn: a blue star on white; missing: a red circle; extra: a blue star",
                                     "defects: noise severe"])}


def test_each_side_reads_its_own_rationale_and_the_plain_task_none():
    requests, labels = pair_requests(ROWS, rationales=True)
    assert [r.reasoning for r in requests] == [ROWS["winner_rationale"][0], ROWS["loser_rationale"][0],
                                               ROWS["winner_rationale"][1], ROWS["loser_rationale"][1]]
    assert labels.tolist() == [[4.0, 1.0], [3.0, 2.0]]
    assert all(r.reasoning is None for r in pair_requests(ROWS)[0])


def test_collate_ends_every_row_at_the_score_prefix_after_the_rationale(tiny_zoo, tmp_path):
    path = str(tiny_zoo["teacher"]["path"])
    task = ScoreSFTTask(model_dir=path, rationales=True)
    batch = task.collate(ROWS)
    tokenizer = cached_processor(path).tokenizer
    requests, _ = pair_requests(ROWS, rationales=True)
    for b, r in enumerate(requests):  # left padded: each row ends exactly where its reasoning-form context ends
        ids = batch["input_ids"][b][batch["attention_mask"][b].bool()].tolist()
        text = tokenizer.decode(ids)
        assert r.reasoning in text and text.endswith(render_score_context(task.processor, r.prompt, r.dimension,
                                                                          r.reasoning)[-40:])
    model, _ = load_vlm(path)
    loss, metrics = task.loss(model, batch)
    assert torch.isfinite(loss) and 0.0 <= metrics["pair_acc"] <= 1.0
    task.save_pretrained(model, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / SCORING_FILE).read_text()) == {"form": "reasoning",
                                                                          "method": "sft_rationales"}
