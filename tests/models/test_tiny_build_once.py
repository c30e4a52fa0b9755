"""`build_once` reuses a built tiny model only when its config, image size and tokenizer are the current ones."""

import json
from pathlib import Path

from zray.config import VLMConfig
from zray.models import tiny


def _builder(calls):
    def build(cfg, path, image_size):
        calls.append(image_size)
        Path(path).mkdir(parents=True)
        (Path(path) / "model.txt").write_text(str(len(calls)))
    return build


def test_a_changed_tokenizer_rebuilds_the_model(tmp_path, monkeypatch):
    calls, out = [], tmp_path / "teacher"
    monkeypatch.setattr(tiny, "tokenizer_digest", lambda: "digest-1")
    assert tiny.build_once(VLMConfig(), out, _builder(calls))["built"]
    assert not tiny.build_once(VLMConfig(), out, _builder(calls))["built"]  # same config and tokenizer: reused
    monkeypatch.setattr(tiny, "tokenizer_digest", lambda: "digest-2")
    assert tiny.build_once(VLMConfig(), out, _builder(calls))["built"]  # the old folder kept the old tokenizer
    assert (out / "model.txt").read_text() == "2" and len(calls) == 2
    marker = json.loads((out / tiny._DONE).read_text())
    assert marker["build"]["tokenizer"] == "digest-2"
    del marker["build"]["tokenizer"]  # a folder built before the tokenizer was recorded
    (out / tiny._DONE).write_text(json.dumps(marker))
    assert tiny.build_once(VLMConfig(), out, _builder(calls))["built"]


def test_tokenizer_digest_follows_the_tokenizer(monkeypatch):
    tiny.tokenizer_digest.cache_clear()
    base = tiny.tokenizer_digest()
    assert len(base) == 64 and tiny.tokenizer_digest() == base
    real = tiny.build_tokenizer

    def with_extra_token():
        tok = real()
        tok.add_tokens(["<extra>"])
        return tok

    monkeypatch.setattr(tiny, "build_tokenizer", with_extra_token)
    tiny.tokenizer_digest.cache_clear()
    try:
        assert tiny.tokenizer_digest() != base
    finally:
        tiny.tokenizer_digest.cache_clear()
