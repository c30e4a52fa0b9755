"""The reward service live on Ray Serve (actors/reward_app/), over the tiny zoo's student: HTTP on 127.0.0.1,
the DeploymentHandle path, the typed client, a storm of bad requests, and a checkpoint hot swap under load.

One Serve application for the whole module (deployed as a Serve config, as `zray serve` and `serve deploy` do),
shut down at the end (Serve only: the session's Ray stays up).
"""

from __future__ import annotations

import base64
import io
import json
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image, ImageDraw

from zray.config import ServeConfig
from zray.rubric import DIMENSIONS, ScoreRequest

TOKEN = "test-token-0"
APP = "reward_test"


@dataclass
class Service:
    url: str
    config: dict
    student: Path
    other: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shapes_png(seed: int = 0, side: int = 64) -> bytes:
    rng = random.Random(seed)
    image = Image.new("RGB", (side, side), (200, 200, 200))
    draw = ImageDraw.Draw(image)
    for _ in range(2):
        x, y = rng.randrange(side - 20), rng.randrange(side - 20)
        draw.ellipse((x, y, x + 18, y + 18), fill=(rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def reward_service(ray_session, tiny_zoo, tmp_path_factory):
    from ray import serve

    from actors.reward_app.deploy import deploy, deploy_config
    from zray.models.tiny import sharpen_score_head
    from zray.models.vlm import load_vlm
    from zray.scores import score_token_ids

    student = Path(tiny_zoo["student"]["path"])
    model, processor = load_vlm(student)  # a second checkpoint: the same student, score head sharpened
    sharpen_score_head(model, score_token_ids(processor), scale=3.0, seed=5)
    other = tmp_path_factory.mktemp("student_b")
    model.save_pretrained(other)
    processor.save_pretrained(other)
    cfg = ServeConfig(app_name=APP, port=_free_port(), max_body_bytes=300_000, max_image_pixels=512 * 512,
                      min_image_side=16, max_prompt_chars=200, max_batch_items=4, max_batch_size=8,
                      batch_wait_timeout_s=0.005, cpus_per_replica=1.0)
    config = deploy_config(cfg, model=str(student), auth_token=TOKEN)
    deploy(config, timeout_s=180)
    yield Service(url=f"http://127.0.0.1:{cfg.port}", config=config, student=student, other=other)
    serve.shutdown()


@pytest.fixture(scope="module")
def expected(tiny_zoo):
    """Reference scoring by transformers, in this process: {(png seed, dimension): q_K} and the weights version."""
    from zray.checksum import weights_checksum
    from zray.models.vlm import load_vlm, score_distributions_hf

    model, processor = load_vlm(tiny_zoo["student"]["path"])

    def score(png: bytes, prompt: str, dims=DIMENSIONS) -> torch.Tensor:
        image = Image.open(io.BytesIO(png)).convert("RGB")
        with torch.no_grad():
            return score_distributions_hf(model, processor, [ScoreRequest(prompt, image, d) for d in dims])

    return score, weights_checksum(model.state_dict())[:16]


def post(client: httpx.Client, url: str, body: dict, token: str | None = TOKEN) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return client.post(url + "/v1/score", json=body, headers=headers)


def check_scores(body: dict, q_expected: torch.Tensor, dims=DIMENSIONS) -> None:
    assert list(body["scores"]) == list(dims)
    for k, dim in enumerate(dims):
        s = body["scores"][dim]
        q = torch.tensor(s["distribution"], dtype=torch.float64)
        assert torch.allclose(q, q_expected[k].double(), atol=1e-5), (dim, q, q_expected[k])
        bins = torch.linspace(1.0, 5.0, 9, dtype=torch.float64)
        assert s["expected_score"] == pytest.approx(float(q @ bins), abs=1e-9)
        assert s["std"] == pytest.approx(float((q * (bins - s["expected_score"]) ** 2).sum().sqrt()), abs=1e-9)


def test_good_request_scores_as_transformers(reward_service, expected):
    score, version = expected
    png = shapes_png(1)
    with httpx.Client(timeout=60) as client:
        r = post(client, reward_service.url, {"prompt": "two circles", "image": b64(png)})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model_version"] == version and body["model_dir"] == str(reward_service.student.resolve())
        check_scores(body, score(png, "two circles"))
        r = post(client, reward_service.url, {"prompt": "two circles", "image": b64(png), "dimensions": ["realism"]})
        check_scores(r.json(), score(png, "two circles", ("realism",)), ("realism",))
        r = client.post(reward_service.url + "/v1/score/batch", headers={"Authorization": f"Bearer {TOKEN}"},
                        json={"items": [{"prompt": "two circles", "image": b64(png)},
                                        {"prompt": "a circle", "image": b64(shapes_png(2)),
                                         "dimensions": ["aesthetics"]}]})
        assert r.status_code == 200
        first, second = r.json()["results"]
        check_scores(first, score(png, "two circles"))
        check_scores(second, score(shapes_png(2), "a circle", ("aesthetics",)), ("aesthetics",))
        assert {first["model_version"], second["model_version"]} == {version}
        assert client.get(reward_service.url + "/healthz").json() == {"status": "ok", "model_version": version}
        assert client.get(reward_service.url + "/docs").status_code == 200


def test_auth_over_http(reward_service):
    body = {"prompt": "a circle", "image": b64(shapes_png(3))}
    with httpx.Client(timeout=60) as client:
        assert post(client, reward_service.url, body, token=None).status_code == 401
        assert post(client, reward_service.url, body, token="nope").status_code == 403
        assert post(client, reward_service.url, body).status_code == 200
        assert client.get(reward_service.url + "/v1/model").status_code == 401


def _bad_cases() -> list[tuple[str, bytes, dict, int, str]]:
    """(name, raw body, headers, status, field): pre-encoded bad requests of every kind."""
    good = {"prompt": "a circle", "image": b64(shapes_png(4))}
    auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    huge = io.BytesIO()
    Image.new("RGB", (1024, 1024)).save(huge, format="PNG")
    tiny = io.BytesIO()
    Image.new("RGB", (1, 1)).save(tiny, format="PNG")
    png = shapes_png(5)
    cases = [
        ("no_auth", good, {"Content-Type": "application/json"}, 401, "Authorization"),
        ("wrong_token", good, {**auth, "Authorization": "Bearer wrong"}, 403, "Authorization"),
        ("body_too_large", {**good, "prompt": "x" * 310_000}, auth, 413, "body"),
        ("huge_image", {**good, "image": b64(huge.getvalue())}, auth, 413, "image"),
        ("one_pixel", {**good, "image": b64(tiny.getvalue())}, auth, 422, "image"),
        ("bad_base64", {**good, "image": "!!!"}, auth, 422, "image"),
        ("not_an_image", {**good, "image": b64(b"GIF89a not really")}, auth, 422, "image"),
        ("truncated_png", {**good, "image": b64(png[: len(png) // 2])}, auth, 422, "image"),
        ("unknown_dimension", {**good, "dimensions": ["sharpness"]}, auth, 422, "dimensions[0]"),
        ("empty_prompt", {**good, "prompt": ""}, auth, 422, "prompt"),
        ("long_prompt", {**good, "prompt": "p" * 201}, auth, 422, "prompt"),
        ("prompt_type", {**good, "prompt": ["a"]}, auth, 422, "prompt"),
        ("dimensions_type", {**good, "dimensions": {"a": 1}}, auth, 422, "dimensions"),
        ("missing_prompt", {"image": good["image"]}, auth, 422, "prompt"),
        ("not_json", b"{\"prompt\": ", auth, 422, "body"),
    ]
    return [(name, body if isinstance(body, bytes) else json.dumps(body).encode(), headers, status, field)
            for name, body, headers, status, field in cases]


def test_a_thousand_bad_requests_change_nothing(reward_service, expected):
    score, version = expected
    cases = _bad_cases()
    rng = random.Random(0)
    picks = [rng.randrange(len(cases)) for _ in range(1000)]
    with httpx.Client(timeout=60) as client:
        before = client.get(reward_service.url + "/v1/model", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    local = threading.local()

    def send(i: int) -> tuple[int, int, dict]:
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=60)
        name, body, headers, _, _ = cases[i]
        r = local.client.post(reward_service.url + "/v1/score", content=body, headers=headers)
        return i, r.status_code, r.json()

    start = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(send, picks))
    elapsed = time.perf_counter() - start
    wrong = [(cases[i][0], status, body) for i, status, body in results
             if status != cases[i][3] or body.get("field") != cases[i][4] or cases[i][4] not in body.get("detail", "")]
    assert not wrong, wrong[:5]
    assert not [s for _, s, _ in results if s >= 500]
    assert len({cases[i][0] for i in picks}) == len(cases) and elapsed < 120, elapsed
    png = shapes_png(1)
    with httpx.Client(timeout=60) as client:
        r = post(client, reward_service.url, {"prompt": "two circles", "image": b64(png)})
        assert r.status_code == 200 and r.json()["model_version"] == version
        check_scores(r.json(), score(png, "two circles"))
        after = client.get(reward_service.url + "/v1/model", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert after["replicas"] == before["replicas"]  # no replica restarted (same replica ids and processes)
    from ray import serve

    deployments = serve.status().applications[APP].deployments
    assert {name: d.replica_states for name, d in deployments.items()} == {"RewardScorer": {"RUNNING": 1},
                                                                           "RewardIngress": {"RUNNING": 1}}


def test_deployment_handle_scores_typed_items(reward_service, expected):
    from ray import serve

    from actors.reward_app.scorer import ScoreResult, ScoreItem

    score, version = expected
    handle = serve.get_deployment_handle("RewardScorer", app_name=APP)
    pngs = [shapes_png(seed) for seed in range(6)]
    items = [ScoreItem(prompt=f"circle {i}", image=Image.open(io.BytesIO(p)).convert("RGB"),
                       dimensions=DIMENSIONS if i % 2 else ("plausibility", "alignment")) for i, p in enumerate(pngs)]
    responses = [handle.score.remote([it]) for it in items]  # concurrent callers: batched together
    results = [r.result(timeout_s=120)[0] for r in responses] + handle.score.remote(items[:2]).result(timeout_s=120)
    for it, res in zip(items + items[:2], results):
        assert isinstance(res, ScoreResult) and res.model_version == version
        q = torch.tensor([res.scores[d].distribution for d in it.dimensions])
        ref = score(pngs[int(it.prompt.split()[1])], it.prompt, it.dimensions)
        assert torch.allclose(q.double(), ref.double(), atol=1e-5)
    info = handle.info.remote().result(timeout_s=60)
    assert info["max_batch_size"] == 8 and info["model_version"] == version
    with pytest.raises(Exception, match="ScoreItem"):
        handle.score.remote([{"prompt": "x"}]).result(timeout_s=60)


def test_client_against_the_live_service(reward_service, expected):
    from zray.client import RewardClient, RewardServiceError

    score, version = expected
    png = shapes_png(1)
    with RewardClient(reward_service.url, token=TOKEN, timeout_s=60) as client:
        assert client.health().ok and client.health().model_version == version
        info = client.model_info()
        assert info.model_version == version and info.dimensions == DIMENSIONS and info.max_batch_items == 4
        result = client.score("two circles", Image.open(io.BytesIO(png)))
        q = torch.tensor([result.scores[d].distribution for d in DIMENSIONS])
        assert result.model_version == version and torch.allclose(q.double(), score(png, "two circles").double(),
                                                                  atol=1e-5)
        batch = client.score_batch([("two circles", png), ("a circle", png, ["realism"])])
        assert [list(b.scores) for b in batch] == [list(DIMENSIONS), ["realism"]]
        with pytest.raises(RewardServiceError) as info:
            client.score("two circles", png, dimensions=["sharpness"])
        assert (info.value.status, info.value.field, info.value.attempts) == (422, "dimensions[0]", 1)
    with RewardClient(reward_service.url, token="wrong", max_retries=3) as client, \
            pytest.raises(RewardServiceError) as info:
        client.score("two circles", png)
    assert (info.value.status, info.value.attempts) == (403, 1)
    with RewardClient(reward_service.url, token=TOKEN, timeout_s=0.001, max_retries=3) as client, \
            pytest.raises(RewardServiceError) as info:
        client.score("two circles", png)
    assert info.value.status is None and "timed out" in info.value.message and info.value.attempts == 1


def test_hot_swap_under_load_drops_nothing(reward_service, expected):
    from actors.reward_app.deploy import roll_out

    _, old_version = expected
    body = {"prompt": "a circle", "image": b64(shapes_png(7)), "dimensions": ["alignment"]}
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(timeout=60) as client:
        before = client.get(reward_service.url + "/v1/model", headers=headers).json()
    stop = threading.Event()
    seen: list[list[tuple[int, str]]] = [[] for _ in range(4)]

    def load(k: int) -> None:
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                r = client.post(reward_service.url + "/v1/score", json=body, headers=headers)
                seen[k].append((r.status_code, r.json().get("model_version", "")))

    threads = [threading.Thread(target=load, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        swapped = roll_out(reward_service.config, str(reward_service.other), timeout_s=120)
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join()
    with httpx.Client(timeout=60) as client:
        after = client.get(reward_service.url + "/v1/model", headers=headers).json()
    new_version = after["model_version"]
    assert new_version != old_version and after["model_dir"] == str(reward_service.other.resolve())
    assert after["replicas"] == before["replicas"]  # reconfigured in place, not restarted
    for per_thread in seen:
        statuses = {s for s, _ in per_thread}
        versions = [v for _, v in per_thread]
        assert statuses == {200}, statuses
        switch = versions.index(new_version) if new_version in versions else len(versions)
        assert versions[:switch] == [old_version] * switch and set(versions[switch:]) <= {new_version}
    assert any(old_version in [v for _, v in t] for t in seen) and any(new_version in [v for _, v in t] for t in seen)
    assert roll_out(swapped, str(reward_service.student), timeout_s=120) == reward_service.config  # and back


def test_a_checkpoint_that_fails_to_load_leaves_the_old_one_serving(reward_service, expected, tmp_path):
    from actors.reward_app.deploy import roll_out

    _, version = expected
    headers = {"Authorization": f"Bearer {TOKEN}"}
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with httpx.Client(timeout=60) as client:
        before = client.get(reward_service.url + "/v1/model", headers=headers).json()
        with pytest.raises(RuntimeError, match="still serving"):
            roll_out(reward_service.config, str(broken), timeout_s=120)
        r = post(client, reward_service.url, {"prompt": "a circle", "image": b64(shapes_png(8))})
        assert r.status_code == 200 and r.json()["model_version"] == version
        after = client.get(reward_service.url + "/v1/model", headers=headers).json()
    assert after["replicas"] == before["replicas"] and after["model_version"] == version
