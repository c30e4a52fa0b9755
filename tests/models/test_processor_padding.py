"""The shared processor (`cached_processor`) is read-only: each caller asks for its padding side per call."""

import io

import numpy as np
import pytest
from PIL import Image

from zray.evaluation.captions import describe_images
from zray.models.vlm import cached_processor, load_vlm
from zray.tasks.caption import CaptionTask
from zray.tasks.score_sft import ScoreSFTTask


def _image(seed):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (64, 64, 3), dtype=np.uint8))


def _png(seed):
    buf = io.BytesIO()
    _image(seed).save(buf, "PNG")
    return buf.getvalue()


def _left_padded(mask_BL):
    return bool(mask_BL[:, -1].all()) and not bool(mask_BL[:, 0].all())


def _right_padded(mask_BL):
    return bool(mask_BL[:, 0].all()) and not bool(mask_BL[:, -1].all())


def test_opposite_paddings_on_one_model_dir_interleaved(tiny_zoo):
    path = str(tiny_zoo["teacher"]["path"])
    shared = cached_processor(path)
    side = shared.tokenizer.padding_side
    caption, sft = CaptionTask(model_dir=path), ScoreSFTTask(model_dir=path)
    assert caption.processor is shared and sft.processor is shared
    rows = {"prompt": np.array(["a red circle", "two blue stars left of a green square on a white background"]),
            "winner_image": [_png(0), _png(1)], "loser_image": [_png(2), _png(3)],
            "dimension": np.array(["alignment", "realism"]), "winner_label": np.array([4.0, 3.0]),
            "loser_label": np.array([1.0, 2.0])}
    images = [_image(4), _image(5)]
    answers = ["a red circle", "two blue stars left of a green square on a white background"]
    model, _ = load_vlm(path)
    for _ in range(2):  # interleaved: neither call leaves anything behind for the other
        assert _left_padded(sft.collate(rows)["attention_mask"])  # score position last in every row
        assert _right_padded(caption.encode(images, answers)["attention_mask"])
        describe_images(model, shared, images, max_new_tokens=2)
        assert shared.tokenizer.padding_side == side
    assert cached_processor(path) is shared


def test_a_mutated_shared_processor_is_caught(tiny_zoo):
    path = str(tiny_zoo["teacher"]["path"])
    tokenizer = cached_processor(path).tokenizer
    side = tokenizer.padding_side
    tokenizer.padding_side = "left" if side == "right" else "right"
    try:
        with pytest.raises(RuntimeError, match="a caller mutated it; pass padding_side= to the processor call"):
            cached_processor(path)
    finally:
        tokenizer.padding_side = side
    assert cached_processor(path).tokenizer is tokenizer


def test_describe_images_pads_on_the_left_whatever_the_default(tiny_zoo):
    model, processor = load_vlm(tiny_zoo["teacher"]["path"])
    processor.tokenizer.padding_side = "right"  # a caller's own processor with the other default
    images = [_image(6), _image(7).resize((32, 32))]  # 16 and 4 image tokens: prompts of different lengths
    batched = describe_images(model, processor, images, max_new_tokens=4, batch_size=2)
    assert batched == describe_images(model, processor, images, max_new_tokens=4, batch_size=1)
    assert processor.tokenizer.padding_side == "right"
