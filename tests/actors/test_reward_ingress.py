"""The reward service's FastAPI app (actors/reward_app/app.py) on a stand-in scorer, without Ray: auth, every kind
of bad input as a 4xx naming its field (counted by reason), the body limit, the OpenAPI docs; and the Serve
config cluster/serve.yaml against Serve's schema and `build_app`."""

from __future__ import annotations

import base64
import io
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from fastapi.testclient import TestClient
from PIL import Image

from actors.reward_app.app import Ingress, build_app, create_api, resolve_token
from zray.client import DimensionScore, ScoreResult
from zray.config import ConfigError, ServeConfig
from zray.rubric import DIMENSIONS

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "s3cret"
CFG = ServeConfig(max_body_bytes=200_000, max_image_pixels=256 * 256, min_image_side=16, max_prompt_chars=100,
                  max_batch_items=3)


class _Remote:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        return self.fn(*args)


class StandInScorer:
    """`score.remote(items)` / `info.remote()` like the scorer's handle; records what reached it."""

    def __init__(self) -> None:
        self.seen = []
        self.score = _Remote(self._score)
        self.info = _Remote(self._info)

    async def _score(self, items):
        self.seen += items
        return [ScoreResult(model_version="v1", model_dir="/ckpt", scores={
            d: DimensionScore(distribution=(1 / 9,) * 9, expected_score=3.0, std=1.29) for d in it.dimensions})
            for it in items]

    async def _info(self):
        return {"model_dir": "/ckpt", "model_version": "v1", "max_batch_size": 8, "batch_wait_timeout_s": 0.01,
                "load_error": "", "replica_id": "r", "pid": 1}


class CountingCounter:
    def __init__(self) -> None:
        self.counts = Counter()

    def inc(self, value=1, tags=None):
        self.counts[tags["reason"]] += value


@pytest.fixture(scope="module")
def service():
    scorer = StandInScorer()
    ingress = Ingress(scorer, CFG, auth_token=TOKEN)
    ingress.rejected = CountingCounter()
    with TestClient(create_api(ingress), headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        yield client, scorer, ingress


def png_b64(side: int = 64, fmt: str = "PNG", seed: int = 0) -> str:
    pixels = np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def good_body(**change):
    return {"prompt": "a red circle", "image": png_b64(), **change}


def test_good_request_and_batch(service):
    client, scorer, _ = service
    r = client.post("/v1/score", json=good_body(dimensions=["realism", "alignment"]))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == "v1" and list(body["scores"]) == ["realism", "alignment"]
    assert scorer.seen[-1].dimensions == ("realism", "alignment") and scorer.seen[-1].image.mode == "RGB"
    r = client.post("/v1/score/batch", json={"items": [good_body(), good_body(image=png_b64(fmt="JPEG"))]})
    assert r.status_code == 200 and [list(x["scores"]) for x in r.json()["results"]] == [list(DIMENSIONS)] * 2
    assert client.get("/healthz", headers={"Authorization": ""}).json() == {"status": "ok", "model_version": "v1"}
    info = client.get("/v1/model").json()
    assert info["dimensions"] == list(DIMENSIONS) and len(info["score_bins"]) == 9 and info["max_batch_items"] == 3


def test_auth(service):
    client, _, ingress = service
    for headers, status, reason in [({"Authorization": ""}, 401, "auth_missing"),
                                    ({"Authorization": "Basic abc"}, 401, "auth_missing"),
                                    ({"Authorization": "Bearer wrong"}, 403, "auth_wrong")]:
        for method, path, kwargs in [("post", "/v1/score", {"json": good_body()}), ("get", "/v1/model", {})]:
            r = getattr(client, method)(path, headers=headers, **kwargs)
            assert (r.status_code, r.json()["reason"], r.json()["field"]) == (status, reason, "Authorization")
    # auth comes before validation: an anonymous caller learns nothing about the body
    r = client.post("/v1/score", json={"prompt": 3}, headers={"Authorization": ""})
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
    assert TOKEN not in r.text
    assert client.get("/docs", headers={"Authorization": ""}).status_code == 200
    assert "/v1/score/batch" in client.get("/openapi.json", headers={"Authorization": ""}).json()["paths"]


def _truncated_png() -> str:
    return base64.b64encode(base64.b64decode(png_b64())[:3000]).decode()


def bad_requests() -> list[tuple[str, dict, int, str]]:
    """(name, request kwargs, status, field): one of each kind of bad input."""
    huge = Image.new("RGB", (300, 300))
    buf = io.BytesIO()
    huge.save(buf, format="PNG")
    huge_b64 = base64.b64encode(buf.getvalue()).decode()
    return [
        ("body_too_large", {"json": good_body(prompt="x" * 250_000)}, 413, "body"),
        ("huge_image", {"json": good_body(image=huge_b64)}, 413, "image"),
        ("one_pixel", {"json": good_body(image=png_b64(side=1))}, 422, "image"),
        ("bad_base64", {"json": good_body(image="%%%not-base64%%%")}, 422, "image"),
        ("not_an_image", {"json": good_body(image=base64.b64encode(b"just some text").decode())}, 422, "image"),
        ("truncated_png", {"json": good_body(image=_truncated_png())}, 422, "image"),
        ("unknown_dimension", {"json": good_body(dimensions=["alignment", "beauty"])}, 422, "dimensions[1]"),
        ("empty_dimensions", {"json": good_body(dimensions=[])}, 422, "dimensions"),
        ("empty_prompt", {"json": good_body(prompt="   ")}, 422, "prompt"),
        ("long_prompt", {"json": good_body(prompt="y" * 101)}, 422, "prompt"),
        ("prompt_not_string", {"json": good_body(prompt=42)}, 422, "prompt"),
        ("image_null", {"json": good_body(image=None)}, 422, "image"),
        ("dimensions_not_list", {"json": good_body(dimensions="alignment")}, 422, "dimensions"),
        ("missing_image", {"json": {"prompt": "a red circle"}}, 422, "image"),
        ("unknown_field", {"json": good_body(seed=3)}, 422, "seed"),
        ("not_json", {"content": b"{not json", "headers": {"Content-Type": "application/json"}}, 422, "body"),
        ("json_list", {"json": [1, 2]}, 422, "body"),
    ]


@pytest.mark.parametrize("case", bad_requests(), ids=lambda c: c[0])
def test_bad_input_is_a_4xx_naming_the_field(service, case):
    client, scorer, ingress = service
    name, kwargs, status, field = case
    before, seen = sum(ingress.rejected.counts.values()), len(scorer.seen)
    r = client.post("/v1/score", **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["field"] == field and body["detail"].startswith(field), body
    assert sum(ingress.rejected.counts.values()) == before + 1 and ingress.rejected.counts[body["reason"]] >= 1
    assert len(scorer.seen) == seen  # nothing bad reaches the model


def test_batch_limits_name_the_item(service):
    client, scorer, _ = service
    seen = len(scorer.seen)
    r = client.post("/v1/score/batch", json={"items": [good_body()] * 4})
    assert (r.status_code, r.json()["field"]) == (413, "items")
    r = client.post("/v1/score/batch", json={"items": []})
    assert (r.status_code, r.json()["field"]) == (422, "items")
    r = client.post("/v1/score/batch", json={"items": [good_body(), good_body(image="@@")]})
    assert (r.status_code, r.json()["field"]) == (422, "items[1].image")
    r = client.post("/v1/score/batch", json={"items": [good_body(), {"prompt": 1, "image": "x"}]})
    assert (r.status_code, r.json()["field"]) == (422, "items[1].prompt")
    assert len(scorer.seen) == seen


def test_chunked_body_over_the_limit(service):
    client, _, _ = service

    def chunks():
        for _ in range(30):
            yield b"x" * 10_000

    r = client.post("/v1/score", content=chunks(), headers={"Content-Type": "application/json"})
    assert (r.status_code, r.json()["field"]) == (413, "body")


def test_token_from_the_environment(monkeypatch):
    monkeypatch.setenv("ZRAY_TEST_REWARD_TOKEN", "from-env")
    assert resolve_token("ZRAY_TEST_REWARD_TOKEN") == "from-env"
    assert resolve_token("ZRAY_TEST_REWARD_TOKEN", "literal") == "literal"
    assert resolve_token("") is None
    monkeypatch.delenv("ZRAY_TEST_REWARD_TOKEN")
    with pytest.raises(ConfigError, match="ZRAY_TEST_REWARD_TOKEN"):
        resolve_token("ZRAY_TEST_REWARD_TOKEN")


def test_a_custom_rubric_is_what_the_ingress_serves(tmp_path):
    """The checkpoint's rubric (zray_rubric.json, written by train-student on an import) sets the accepted
    dimensions, their default and /v1/model's list; a built-in one it lacks is a 422 naming the field."""
    from zray.models.vlm import read_rubric_file, write_rubric_file
    from zray.rubric import RUBRICS, Rubric

    rubric = Rubric(("alignment", "composition"), (RUBRICS["alignment"], tuple("abcde")), source="mine")
    write_rubric_file(tmp_path, rubric)
    assert read_rubric_file(tmp_path).to_dict() == rubric.to_dict()
    assert read_rubric_file(tmp_path / "none").dimensions == DIMENSIONS  # no file: the built-in four
    scorer = StandInScorer()
    with TestClient(create_api(Ingress(scorer, CFG, rubric=read_rubric_file(tmp_path)))) as client:
        assert client.get("/v1/model").json()["dimensions"] == ["alignment", "composition"]
        r = client.post("/v1/score", json=good_body())
        assert r.status_code == 200 and list(r.json()["scores"]) == ["alignment", "composition"]
        r = client.post("/v1/score", json=good_body(dimensions=["composition", "realism"]))
        assert r.status_code == 422 and r.json()["field"] == "dimensions[1]"
        assert r.json()["reason"] == "unknown_dimension" and "'composition'" in r.json()["detail"]
    assert build_app({"model": str(tmp_path)}) is not None  # the builder reads the same file


def test_serve_yaml_is_a_valid_serve_config_for_build_app():
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((ROOT / "cluster/serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    (app,) = schema.applications
    assert app.import_path == "actors.reward_app.app:build_app"
    scorer = {d.name: d for d in app.deployments}["RewardScorer"]
    assert set(scorer.user_config) == {"model", "max_batch_size", "batch_wait_timeout_s"}
    assert build_app(app.args) is not None
    with pytest.raises(ConfigError, match="not allowed"):
        build_app({**app.args, "max_batch_sise": 4})
    with pytest.raises(ConfigError, match="ServeConfig.max_batch_items"):
        build_app({**app.args, "max_batch_items": 0})
