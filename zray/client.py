"""A small typed client of the reward service (actors/reward_app/): requests and the standard library, no Ray.

    from zray.client import RewardClient
    client = RewardClient("http://127.0.0.1:8000", token=os.environ.get("ZRAY_SERVE_TOKEN"))
    result = client.score("a red circle left of a blue square", "image.png")      # PIL image, bytes or path
    result.model_version, result.scores["alignment"].expected_score, result.scores["alignment"].distribution
    client.score_batch([(prompt, image), ...]);  client.health();  client.model_info()

Errors: every failure raises `RewardServiceError` with `status` (None when no HTTP answer came), the server's
`message` and `field`, and `attempts`. Retries are bounded: only connection errors and 503 are retried (up to
`max_retries` more attempts, exponential backoff from `backoff_s`, or the server's Retry-After when shorter than
`max_backoff_s`); a 4xx is never retried (the same request would fail the same way); a read timeout is not retried
(the server may still be working on it). `requests` is a dependency of Ray itself, so wherever zray installs, this
client works.
"""

from __future__ import annotations

import base64
import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests


class RewardServiceError(Exception):
    """A request to the reward service failed: `status` (None: no HTTP answer), `message`, `field`, `attempts`."""

    def __init__(self, message: str, *, status: int | None = None, field: str | None = None,
                 reason: str | None = None, attempts: int = 1) -> None:
        super().__init__(f"{status}: {message}" if status is not None else message)
        self.status = status
        self.message = message
        self.field = field
        self.reason = reason
        self.attempts = attempts


@dataclass(frozen=True)
class DimensionScore:
    distribution: tuple[float, ...]  # q over ModelInfo.score_bins
    expected_score: float
    std: float


@dataclass(frozen=True)
class ScoreResult:
    model_version: str
    model_dir: str
    scores: dict[str, DimensionScore] = field(default_factory=dict)


@dataclass(frozen=True)
class Health:
    ok: bool
    model_version: str


@dataclass(frozen=True)
class ModelInfo:
    model_dir: str
    model_version: str
    dimensions: tuple[str, ...]
    score_bins: tuple[float, ...]
    max_batch_size: int
    max_batch_items: int
    raw: dict[str, Any] = field(default_factory=dict)  # the whole answer (limits, replica ids)


def image_base64(image: Any) -> str:
    """Base64 of a PIL image (sent as PNG), of PNG / JPEG bytes, or of a file at a path."""
    if isinstance(image, (bytes, bytearray)):
        data = bytes(image)
    elif isinstance(image, (str, Path)):
        data = Path(image).read_bytes()
    elif hasattr(image, "save"):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        data = buf.getvalue()
    else:
        raise TypeError(f"image={type(image).__name__} is not allowed: expected a PIL image, bytes or a path")
    return base64.b64encode(data).decode("ascii")


def _result(body: dict[str, Any]) -> ScoreResult:
    scores = {dim: DimensionScore(distribution=tuple(s["distribution"]), expected_score=float(s["expected_score"]),
                                  std=float(s["std"])) for dim, s in body["scores"].items()}
    return ScoreResult(model_version=body["model_version"], model_dir=body["model_dir"], scores=scores)


class RewardClient:
    """Calls the reward service over HTTP; one connection pool (a requests Session: one client per thread), closed
    by `close()` or a `with` block."""

    def __init__(self, url: str, *, token: str | None = None, timeout_s: float = 60.0, connect_timeout_s: float = 5.0,
                 max_retries: int = 3, backoff_s: float = 0.2, max_backoff_s: float = 5.0) -> None:
        """`timeout_s`: the wait for an answer once connected; `connect_timeout_s`: the wait for a connection."""
        if not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries={max_retries!r} is not allowed: expected an integer >= 0")
        if timeout_s <= 0 or connect_timeout_s <= 0 or backoff_s < 0:
            raise ValueError(f"timeout_s={timeout_s!r}, connect_timeout_s={connect_timeout_s!r}, backoff_s="
                             f"{backoff_s!r}: expected both timeouts > 0, backoff_s >= 0")
        self.url = url.rstrip("/")
        self.timeout_s, self.connect_timeout_s = timeout_s, connect_timeout_s
        self.max_retries, self.backoff_s, self.max_backoff_s = max_retries, backoff_s, max_backoff_s
        self._http = requests.Session()
        if token:
            self._http.headers["Authorization"] = f"Bearer {token}"

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, json: Any = None) -> Any:
        attempt = 0
        while True:
            attempt += 1
            retry_after = None
            try:
                response = self._http.request(method, self.url + path, json=json,
                                              timeout=(self.connect_timeout_s, self.timeout_s))
            except requests.exceptions.ReadTimeout as err:
                raise RewardServiceError(f"{method} {path} timed out after {self.timeout_s} s",
                                         attempts=attempt) from err
            except requests.exceptions.ConnectionError as err:  # refused, reset: retry (scoring is idempotent)
                if attempt > self.max_retries:
                    raise RewardServiceError(f"{method} {self.url}{path}: cannot connect ({err})",
                                             attempts=attempt) from err
            else:
                if response.status_code < 400:
                    return response.json()
                if response.status_code != 503 or attempt > self.max_retries:
                    raise self._error(response, attempt)
                retry_after = response.headers.get("Retry-After")
            delay = self.backoff_s * 2 ** (attempt - 1)
            if retry_after and retry_after.isdigit():
                delay = max(delay, float(retry_after))
            time.sleep(min(delay, self.max_backoff_s))

    @staticmethod
    def _error(response: requests.Response, attempts: int) -> RewardServiceError:
        try:
            body = response.json()
        except ValueError:
            body = {}
        body = body if isinstance(body, dict) else {}
        message = str(body.get("detail") or response.text[:200] or response.reason)
        return RewardServiceError(message, status=response.status_code, field=body.get("field"),
                                  reason=body.get("reason"), attempts=attempts)

    @staticmethod
    def _body(prompt: str, image: Any, dimensions: Any) -> dict[str, Any]:
        body: dict[str, Any] = {"prompt": prompt, "image": image_base64(image)}
        if dimensions is not None:
            body["dimensions"] = list(dimensions)
        return body

    def score(self, prompt: str, image: Any, dimensions: Any = None) -> ScoreResult:
        """The score distributions of one image (all four dimensions unless `dimensions` is given)."""
        return _result(self._request("POST", "/v1/score", self._body(prompt, image, dimensions)))

    def score_batch(self, items: list[tuple[str, Any]] | list[tuple[str, Any, Any]]) -> list[ScoreResult]:
        """Several (prompt, image[, dimensions]) at once; results in order."""
        bodies = [self._body(it[0], it[1], it[2] if len(it) > 2 else None) for it in items]
        return [_result(r) for r in self._request("POST", "/v1/score/batch", {"items": bodies})["results"]]

    def health(self) -> Health:
        """ok=True once the service has a model loaded; a 503 (not ready) raises after the retries."""
        body = self._request("GET", "/healthz")
        return Health(ok=body.get("status") == "ok", model_version=body.get("model_version", ""))

    def model_info(self) -> ModelInfo:
        body = self._request("GET", "/v1/model")
        return ModelInfo(model_dir=body["model_dir"], model_version=body["model_version"],
                         dimensions=tuple(body["dimensions"]), score_bins=tuple(body["score_bins"]),
                         max_batch_size=int(body["max_batch_size"]), max_batch_items=int(body["max_batch_items"]),
                         raw=body)
