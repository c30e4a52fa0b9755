"""What the reward service accepts: the HTTP request and response schemas (pydantic, shown at `/docs`) and the
checks of a request's content (base64, image format and size, prompt, dimensions).

Every rejection is a `RequestError` carrying the HTTP status, the field it concerns (`items[2].image`), a short
machine-readable `reason` (the tag of the rejected-requests metric) and a message naming the field, the value
and what is allowed. The ingress turns it into `{"detail": ..., "field": ..., "reason": ...}`.

    limits = RequestLimits(max_image_pixels=4096 * 4096, min_image_side=32, max_prompt_chars=2000)
    image = decode_image(body.image, field="image", limits=limits)       # PIL RGB, or RequestError

Pure: pydantic and PIL only (no Ray, no torch), so the checks are unit-tested without a service.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageFile, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from zray.rubric import DIMENSIONS, NUM_BINS, SCORE_BINS

IMAGE_FORMATS = ("PNG", "JPEG")
MAX_ASPECT_RATIO = 100.0  # longer side / shorter side; Qwen-VL processors refuse 200 and more
_MAGIC = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG"}


class RequestError(Exception):
    """A request the service refuses: HTTP `status` (4xx), the `field` concerned, a metric `reason`, a message."""

    def __init__(self, status: int, field: str | None, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.field = field
        self.reason = reason
        self.message = message

    def body(self) -> dict[str, Any]:
        return {"detail": self.message, "field": self.field, "reason": self.reason}


@dataclass(frozen=True, kw_only=True)
class RequestLimits:
    """The content limits of one request (from `zray.config.ServeConfig`)."""

    max_image_pixels: int
    min_image_side: int
    max_prompt_chars: int


# ------------------------------------------------------------------------------------------ HTTP schemas


class ScoreBody(BaseModel):
    """One scoring request: a prompt, its image, and the rubric dimensions to score (default: all the served model's:
    the four built-in ones, or those of the rubric its checkpoint records, `GET /v1/model`)."""

    model_config = ConfigDict(extra="forbid")

    prompt: StrictStr = Field(description="the text-to-image prompt the image was generated from")
    image: StrictStr = Field(description="the image, base64 PNG or JPEG (a data: URL prefix is accepted)")
    dimensions: list[StrictStr] | None = Field(
        default=None, description=f"rubric dimensions to score, a subset of the served model's (GET /v1/model; "
                                  f"{list(DIMENSIONS)} unless its checkpoint records another rubric); default all")


class ScoreBatchBody(BaseModel):
    """Several scoring requests at once; each item is scored as `POST /v1/score` would."""

    model_config = ConfigDict(extra="forbid")

    items: list[ScoreBody] = Field(description="the requests (at most ServeConfig.max_batch_items)")


class DimensionScoreOut(BaseModel):
    distribution: list[float] = Field(description=f"q over the {NUM_BINS} score bins {list(SCORE_BINS)}")
    expected_score: float = Field(description="mu = sum_s s q(s)")
    std: float = Field(description="standard deviation of the score under q")


class ScoreResponse(BaseModel):
    model_version: str = Field(description="checksum of the weights that scored this request")
    model_dir: str = Field(description="the checkpoint those weights were loaded from")
    scores: dict[str, DimensionScoreOut]


class ScoreBatchResponse(BaseModel):
    results: list[ScoreResponse]


class ErrorResponse(BaseModel):
    detail: str = Field(description="what is wrong, naming the field")
    field: str | None = Field(description="the request field concerned, e.g. items[2].image")
    reason: str = Field(description="machine-readable reason (the rejected-requests metric's tag)")


# ------------------------------------------------------------------------------------------ content checks


def check_prompt_text(prompt: str, *, field: str, limits: RequestLimits) -> str:
    if not prompt.strip():
        raise RequestError(422, field, "empty_prompt", f"{field}: the prompt is empty: expected a non-empty string")
    if len(prompt) > limits.max_prompt_chars:
        raise RequestError(422, field, "prompt_too_long", f"{field}: the prompt has {len(prompt)} characters: "
                           f"expected at most {limits.max_prompt_chars}")
    return prompt


def check_dimensions(dimensions: list[str] | None, *, field: str,
                     allowed: tuple[str, ...] = DIMENSIONS) -> tuple[str, ...]:
    """The requested dimensions (default all of `allowed`, the served model's rubric, in its order); unknown,
    repeated or none is a 422."""
    if dimensions is None:
        return allowed
    if not dimensions:
        raise RequestError(422, field, "no_dimensions", f"{field}: the list is empty: expected a non-empty "
                           f"subset of {list(allowed)} (or leave it out for all)")
    for i, dim in enumerate(dimensions):
        if dim not in allowed:
            raise RequestError(422, f"{field}[{i}]", "unknown_dimension",
                               f"{field}[{i}]={dim[:40]!r} is not a dimension of the served model's rubric: "
                               f"expected one of {list(allowed)}")
    if len(set(dimensions)) != len(dimensions):
        raise RequestError(422, field, "repeated_dimension", f"{field}={dimensions} names a dimension twice")
    return tuple(dimensions)


def decode_base64(text: str, *, field: str) -> bytes:
    """Strict base64 (standard alphabet, padding), after an optional `data:image/...;base64,` prefix."""
    if text.startswith("data:"):
        head, sep, text = text.partition(",")
        if not sep or not head.endswith(";base64"):
            raise RequestError(422, field, "bad_base64", f"{field}: a data URL must look like "
                               "data:image/png;base64,<data>")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(422, field, "bad_base64", f"{field}: not valid base64 (standard alphabet with "
                           "padding)") from None
    if not data:
        raise RequestError(422, field, "empty_image", f"{field}: empty: expected a base64 PNG or JPEG")
    return data


def decode_image(text: str, *, field: str, limits: RequestLimits) -> Image.Image:
    """The RGB image of a base64 PNG or JPEG, fully decoded; a `RequestError` for anything else.

    The size is read from the header and checked before the pixels are decoded, so a huge image costs nothing;
    a truncated file fails in `load()` (this requires PIL's `ImageFile.LOAD_TRUNCATED_IMAGES` to be False: a
    process that turned it on would score half-decoded images, so that is a server error, not a request's).
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process: truncated images would "
                           "be accepted; set it to False")
    data = decode_base64(text, field=field)
    if not any(data.startswith(magic) for magic in _MAGIC):
        raise RequestError(422, field, "not_an_image", f"{field}: the decoded bytes are not a PNG or JPEG image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise RequestError(413, field, "image_too_large", f"{field}: the image is too large: expected at most "
                           f"{limits.max_image_pixels} pixels") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise RequestError(422, field, "not_an_image", f"{field}: not a readable PNG or JPEG image") from None
    width, height = image.size
    if width * height > limits.max_image_pixels:
        raise RequestError(413, field, "image_too_large", f"{field}: the image is {width}x{height} = "
                           f"{width * height} pixels: expected at most {limits.max_image_pixels}")
    if min(width, height) < limits.min_image_side:
        raise RequestError(422, field, "image_too_small", f"{field}: the image is {width}x{height}: expected "
                           f"both sides at least {limits.min_image_side} pixels")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise RequestError(422, field, "image_aspect", f"{field}: the image is {width}x{height}: expected the "
                           f"longer side at most {MAX_ASPECT_RATIO:g} times the shorter")
    try:
        image.load()
        return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, EOFError):
        raise RequestError(422, field, "corrupt_image", f"{field}: the {image.format} data is truncated or "
                           "corrupt") from None


def validation_error(errors: list[dict[str, Any]]) -> RequestError:
    """A short `RequestError` (422) for FastAPI's RequestValidationError errors: the first error's field path
    (`items[1].prompt`) and what was expected, plus how many more errors there were."""
    if not errors:
        return RequestError(422, None, "schema", "the request body is not valid")
    first = errors[0]
    loc = [part for part in first.get("loc", ()) if part != "body"]
    field = ""
    for part in loc:
        field += f"[{part}]" if isinstance(part, int) else (f".{part}" if field else str(part))
    kind = str(first.get("type", ""))
    if kind == "json_invalid":
        return RequestError(422, "body", "bad_json", "body: not valid JSON")
    if kind == "missing":
        message = f"{field}: missing: this field is required"
    elif kind == "extra_forbidden":
        message = f"{field}: unknown field: not allowed"
    else:
        message = f"{field or 'body'}: {first.get('msg', 'invalid value')}"
    more = len(errors) - 1
    if more:
        message += f" (and {more} more error{'s' if more > 1 else ''})"
    return RequestError(422, field or "body", "schema", message)
