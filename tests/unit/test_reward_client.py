"""zray.client against a scripted stdlib HTTP server (no Ray, no model): typed results, bounded retries on 503 and
connection errors only, no retry on 4xx or timeouts, errors carrying status, field and message."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from zray.client import RewardClient, RewardServiceError, image_base64

GOOD = {"model_version": "abc123", "model_dir": "/ckpt/a",
        "scores": {"alignment": {"distribution": [1 / 9] * 9, "expected_score": 3.0, "std": 1.29}}}


class Stub:
    """A local HTTP server answering from a script: a list of (status, body, delay_s), the last one repeated."""

    def __init__(self, script: list[tuple[int, dict, float]]) -> None:
        self.script, self.requests = script, []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                stub.requests.append((self.command, self.path, self.headers.get("Authorization"),
                                      json.loads(self.rfile.read(length)) if length else None))
                status, body, delay = stub.script[min(len(stub.requests), len(stub.script)) - 1]
                time.sleep(delay)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    servers = []

    def make(script):
        servers.append(Stub(script))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def test_score_sends_the_request_and_types_the_answer(stub):
    server = stub([(200, GOOD, 0.0)])
    image = Image.new("RGB", (32, 32), (255, 0, 0))
    with RewardClient(server.url, token="t0k") as client:
        result = client.score("a red square", image, dimensions=["alignment"])
    method, path, auth, body = server.requests[0]
    assert (method, path, auth) == ("POST", "/v1/score", "Bearer t0k")
    assert body["prompt"] == "a red square" and body["dimensions"] == ["alignment"]
    assert Image.open(io.BytesIO(base64.b64decode(body["image"]))).size == (32, 32)
    assert result.model_version == "abc123" and result.scores["alignment"].expected_score == 3.0
    assert len(result.scores["alignment"].distribution) == 9


def test_503_is_retried_a_bounded_number_of_times(stub):
    server = stub([(503, {"detail": "busy"}, 0.0), (503, {"detail": "busy"}, 0.0), (200, GOOD, 0.0)])
    with RewardClient(server.url, max_retries=3, backoff_s=0.01) as client:
        assert client.score("p", b"\x89PNG").model_version == "abc123"
    assert len(server.requests) == 3
    always = stub([(503, {"detail": "busy", "reason": "overloaded"}, 0.0)])
    with RewardClient(always.url, max_retries=2, backoff_s=0.01) as client, pytest.raises(RewardServiceError) as info:
        client.health()
    assert (info.value.status, info.value.attempts, len(always.requests)) == (503, 3, 3)


def test_4xx_is_never_retried_and_names_the_field(stub):
    server = stub([(422, {"detail": "image: not valid base64", "field": "image", "reason": "bad_base64"}, 0.0)])
    with RewardClient(server.url, max_retries=5, backoff_s=0.01) as client, pytest.raises(RewardServiceError) as info:
        client.score("p", b"data")
    err = info.value
    assert (err.status, err.field, err.reason, err.attempts) == (422, "image", "bad_base64", 1)
    assert "image" in str(err) and len(server.requests) == 1


def test_timeouts_are_not_retried(stub):
    server = stub([(200, GOOD, 1.0)])
    with RewardClient(server.url, timeout_s=0.2, max_retries=3) as client, pytest.raises(RewardServiceError) as info:
        client.score("p", b"data")
    assert info.value.status is None and "timed out" in info.value.message and len(server.requests) == 1


def test_connection_errors_are_retried_then_raised():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    start = time.perf_counter()
    with RewardClient(f"http://127.0.0.1:{port}", max_retries=2, backoff_s=0.02) as client:
        with pytest.raises(RewardServiceError) as info:
            client.model_info()
    assert info.value.status is None and info.value.attempts == 3 and "cannot connect" in info.value.message
    assert time.perf_counter() - start < 5.0


def test_image_inputs(tmp_path):
    image = Image.new("RGB", (8, 8))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    path = tmp_path / "a.png"
    path.write_bytes(buf.getvalue())
    assert image_base64(image) == image_base64(buf.getvalue()) == image_base64(path) == image_base64(str(path))
    with pytest.raises(TypeError, match="PIL image, bytes or a path"):
        image_base64(3)
    with pytest.raises(ValueError, match="max_retries"):
        RewardClient("http://x", max_retries=-1)
