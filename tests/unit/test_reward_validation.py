"""The reward service's request checks (actors/reward_app/validation.py), without a service: every rejection has
its status, names its field, and a valid image decodes to the same pixels."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image, ImageFile

from actors.reward_app.validation import (RequestError, RequestLimits, check_dimensions, check_prompt_text,
                                          decode_image, validation_error)
from zray.rubric import DIMENSIONS

LIMITS = RequestLimits(max_image_pixels=256 * 256, min_image_side=16, max_prompt_chars=50)


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def noisy(side: int = 64, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8))


def rejected(fn, *args, **kwargs) -> RequestError:
    with pytest.raises(RequestError) as info:
        fn(*args, **kwargs)
    return info.value


def test_png_and_jpeg_decode_to_rgb():
    image = noisy()
    out = decode_image(b64(encoded(image)), field="image", limits=LIMITS)
    assert out.mode == "RGB" and np.array_equal(np.asarray(out), np.asarray(image))
    jpeg = decode_image(b64(encoded(image, "JPEG")), field="image", limits=LIMITS)
    assert jpeg.size == (64, 64) and jpeg.mode == "RGB"
    rgba = decode_image("data:image/png;base64," + b64(encoded(image.convert("RGBA"))), field="image", limits=LIMITS)
    assert rgba.mode == "RGB"


@pytest.mark.parametrize("name,payload,status,reason", [
    ("bad_base64", "not base64 !!", 422, "bad_base64"),
    ("bad_padding", "aGVsbG8", 422, "bad_base64"),
    ("empty", "", 422, "empty_image"),
    ("text_bytes", b64(b"hello, this is not an image at all"), 422, "not_an_image"),
    ("png_magic_garbage", b64(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64), 422, "not_an_image"),
    ("gif", b64(encoded(noisy(), "GIF")), 422, "not_an_image"),
    ("one_pixel", b64(encoded(Image.new("RGB", (1, 1)))), 422, "image_too_small"),
    ("thin", b64(encoded(Image.new("RGB", (200, 8)))), 422, "image_too_small"),
    ("too_many_pixels", b64(encoded(Image.new("RGB", (300, 300)))), 413, "image_too_large"),
    ("too_thin", b64(encoded(Image.new("RGB", (16, 1700)))), 422, "image_aspect"),
    ("truncated_png", b64(encoded(noisy())[:3000]), 422, "corrupt_image"),
    ("truncated_jpeg", b64(encoded(noisy(), "JPEG")[:1500]), 422, "corrupt_image"),
    ("bad_data_url", "data:image/png," + b64(encoded(noisy())), 422, "bad_base64"),
])
def test_bad_images_are_4xx_naming_the_field(name, payload, status, reason):
    err = rejected(decode_image, payload, field="items[3].image", limits=LIMITS)
    assert (err.status, err.reason, err.field) == (status, reason, "items[3].image")
    assert err.message.startswith("items[3].image")


def test_truncated_images_fail_only_while_load_truncated_images_is_off():
    truncated = b64(encoded(noisy())[:3000])
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
            decode_image(truncated, field="image", limits=LIMITS)
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False


def test_prompt_and_dimensions():
    assert check_prompt_text("a red circle", field="prompt", limits=LIMITS) == "a red circle"
    assert rejected(check_prompt_text, "  ", field="prompt", limits=LIMITS).reason == "empty_prompt"
    err = rejected(check_prompt_text, "x" * 51, field="prompt", limits=LIMITS)
    assert (err.status, err.reason) == (422, "prompt_too_long") and "at most 50" in err.message
    assert check_dimensions(None, field="dimensions") == DIMENSIONS
    assert check_dimensions(["realism"], field="dimensions") == ("realism",)
    err = rejected(check_dimensions, ["realism", "beauty"], field="dimensions")
    assert (err.field, err.reason) == ("dimensions[1]", "unknown_dimension") and "alignment" in err.message
    assert rejected(check_dimensions, [], field="dimensions").reason == "no_dimensions"
    assert rejected(check_dimensions, ["realism", "realism"], field="dimensions").reason == "repeated_dimension"



def test_dimensions_of_a_served_custom_rubric():
    served = ("alignment", "composition")  # the rubric the student checkpoint records (zray_rubric.json)
    assert check_dimensions(None, field="dimensions", allowed=served) == served
    assert check_dimensions(["composition"], field="dimensions", allowed=served) == ("composition",)
    err = rejected(check_dimensions, ["realism"], field="items[1].dimensions", allowed=served)
    assert (err.status, err.field, err.reason) == (422, "items[1].dimensions[0]", "unknown_dimension")
    assert "'realism'" in err.message and "['alignment', 'composition']" in err.message


def test_validation_errors_name_the_field():
    err = validation_error([{"type": "string_type", "loc": ("body", "items", 2, "prompt"), "msg": "Input should be a "
                             "valid string"}, {"type": "missing", "loc": ("body", "image"), "msg": "Field required"}])
    assert (err.status, err.field) == (422, "items[2].prompt")
    assert err.message == "items[2].prompt: Input should be a valid string (and 1 more error)"
    missing = validation_error([{"type": "missing", "loc": ("body", "image"), "msg": "Field required"}])
    assert missing.field == "image" and "missing" in missing.message
    assert validation_error([{"type": "json_invalid", "loc": ("body", 1), "msg": "JSON decode error"}]).field == "body"
