"""Live weight sync into the session's vLLM engine: in place, caches reset, verified by readback checksum.

Every test first serves the weights it starts from (each load a new version), so none depends on another's
order; the checkpoint's weights are restored at the end, so that other modules see the engine they expect.
"""

import itertools
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from actors.teacher_engine.weight_sync import encode_weights
from zray.checksum import sample_columns, sampled_checksum, weights_checksum
from zray.models.vlm import load_vlm, score_distributions_hf
from zray.rubric import ScoreRequest
from zray.types import FINISH_LENGTH, FINISH_PREFIX, WeightVersionError

pytestmark = pytest.mark.slow

REASONING_TOKENS = (" Score", ":")  # the format-following teacher writes only these two tokens


def _format_following(state, tokenizer, score_ids):
    """A copy of `state` whose text model writes " Score" or ":" with probability ~1/2 each at every step, so
    that it writes the score prefix after a few tokens, sometimes not within a small budget.

    Residual dimension 0 is pinned to a constant at text positions (embedding column 0 = 100, no layer writes
    dimension 0), the final norm keeps only dimension 0, and lm_head reads only dimension 0: the two reasoning
    tokens get logit ~11, the nine score tokens -5.6..5.6 (so q is sharp but not one-hot), all others 0.
    """
    s = {k: v.clone() for k, v in state.items()}
    s["model.language_model.embed_tokens.weight"][:, 0] = 100.0
    for k in s:
        if k.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")) and "language_model" in k:
            s[k][0, :] = 0.0
    s["model.language_model.norm.weight"].zero_()
    s["model.language_model.norm.weight"][0] = 1.0
    head = s["lm_head.weight"]
    head.zero_()
    for text in REASONING_TOKENS:
        (token,) = tokenizer.encode(text, add_special_tokens=False)
        head[token, 0] = 1.0
    head[score_ids, 0] = torch.linspace(-0.5, 0.5, len(score_ids))
    return s


@pytest.fixture(scope="module")
def hf(sharp_teacher_dir):
    return load_vlm(sharp_teacher_dir)


@pytest.fixture(scope="module")
def original(hf):
    return {k: v.detach().clone() for k, v in hf[0].state_dict().items()}


@pytest.fixture(scope="module")
def formatted(original, teacher_engine):
    return _format_following(original, teacher_engine.tokenizer, teacher_engine.score_ids)


@pytest.fixture(scope="module")
def engine(teacher_engine, original):
    yield teacher_engine
    teacher_engine.load_weights(original, version=1000, checksum=weights_checksum(original))  # restore


_VERSIONS = itertools.count(1)


@pytest.fixture
def serve(engine):
    """serve(state) -> the new version: loads `state` into the session engine (verified), as a fresh version."""
    def load(state):
        version = next(_VERSIONS)
        engine.load_weights(state, version=version, checksum=weights_checksum(state))
        return version

    return load


@pytest.fixture(scope="module")
def score_requests():
    rng = np.random.RandomState(1)
    images = [Image.new("RGB", (64, 64), (220, 30, 30)),
              Image.fromarray(rng.randint(0, 256, (64, 64, 3), dtype=np.uint8))]
    return [r for im in images for r in (ScoreRequest("a red circle", im, "alignment"),
                                         ScoreRequest("two blue squares", im, "realism", "I see two squares."))]


def _hf_scores(hf, state, requests):
    model, processor = hf
    model.load_state_dict(state)
    with torch.no_grad():
        return score_distributions_hf(model, processor, requests)


def test_sync_serves_the_new_weights(engine, serve, hf, original, formatted, score_requests):
    serve(original)
    before = engine.score(score_requests)  # these images are now in the encoder and prefix caches
    checksum, version = weights_checksum(formatted), next(_VERSIONS)
    report = engine.load_weights(formatted, version=version, checksum=checksum)
    assert (report.version, report.checksum, engine.version(), engine.checksum()) == (version, checksum, version,
                                                                                       checksum)
    assert report.num_tensors == len(formatted)
    assert report.num_bytes == sum(t.numel() * t.element_size() for t in formatted.values())
    after = engine.score(score_requests)  # same images after the update: no stale cache, no dead engine
    expected = _hf_scores(hf, formatted, score_requests)
    diff = (after - expected).abs().max().item()
    print(f"after sync: max |q_vllm - q_hf(new)| = {diff:.2e}; load {report.load_s:.3f} s, "
          f"verify {report.verify_s:.3f} s")
    assert diff < 1e-3
    assert (after - before).abs().max() > 0.1  # the update changed what is served


def test_rollouts_after_sync(engine, serve, hf, formatted, score_requests, teacher_force):
    """Well-formed and malformed samples from the new weights; both are exactly what transformers computes."""
    version = serve(formatted)
    requests = [ScoreRequest(r.prompt, r.image, r.dimension) for r in score_requests[::2]]
    b = engine.generate(requests, group_size=4, max_reasoning_tokens=3, seed=0)
    assert b.weights_version == version
    assert set(b.finish_NG.flatten().tolist()) == {FINISH_PREFIX, FINISH_LENGTH}
    tok = engine.tokenizer
    for n in range(b.num_inputs):
        for g in range(b.group_size):
            r = int(b.num_reasoning_NG[n, g])
            reasoning = tok.decode(b.response_ids_NGT[n, g, :r].tolist())
            assert "Score:" not in reasoning
            if b.format_ok_NG[n, g]:
                assert r < 3  # the model's own "Score:" was cut off and replaced by the canonical prefix
    hf[0].load_state_dict(formatted)
    logprobs, q = teacher_force(hf[0], hf[1], b, requests)
    assert (logprobs - b.old_logprobs_NGT).abs().max() < 1e-4 and (q - b.q_NGK).abs().max() < 1e-4


def test_wrong_checksum_or_dtype_loads_nothing(engine, serve, original, formatted, score_requests):
    version = serve(formatted)
    before = engine.score(score_requests)
    with pytest.raises(WeightVersionError, match="nothing was loaded"):
        engine.load_weights(original, version=next(_VERSIONS), checksum="0" * 32)
    with pytest.raises(ValueError, match="checksum='cols4-0'.*32 hex digits"):
        engine.load_weights(original, version=next(_VERSIONS), checksum="cols4-0")
    half = {k: v.to(torch.bfloat16) for k, v in original.items()}
    with pytest.raises(ValueError, match="dtype"):
        engine.load_weights(half, version=next(_VERSIONS), checksum=weights_checksum(half))
    assert engine.version() == version
    assert torch.equal(engine.score(score_requests), before)


def test_readback_catches_what_the_engine_did_not_load(engine, serve, hf, original, formatted, score_requests):
    serve(formatted)
    def skip_down_proj(llm, state, data):
        kept = [(k, v) for k, v in state.items() if "layers.1.mlp.down_proj" not in k]
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(kept)})

    with pytest.raises(WeightVersionError, match="layers.1.mlp.down_proj"):
        engine.load_weights(original, version=next(_VERSIONS), checksum=weights_checksum(original),
                            reload=skip_down_proj)
    with pytest.raises(WeightVersionError, match="failed to verify"):
        engine.score(score_requests)  # unknown weights are not served
    partial = {k: v for k, v in original.items() if k != "model.language_model.norm.weight"}
    with pytest.raises(WeightVersionError, match="not written.*language_model.model.norm.weight"):
        engine.load_weights(partial, version=next(_VERSIONS), checksum=weights_checksum(partial))
    # safetensors bytes (the multi-process wire format) work in-process too
    version = next(_VERSIONS)
    report = engine.load_weights(encode_weights(original), version=version, checksum=weights_checksum(original))
    assert engine.version() == version and report.checksum == weights_checksum(original)
    diff = (engine.score(score_requests) - _hf_scores(hf, original, score_requests)).abs().max().item()
    assert diff < 1e-3


def test_readback_reads_each_shard_of_a_fused_weight_at_its_offset(engine, serve, original):
    """q/k/v live in one repacked qkv_proj: a k_proj that was not loaded is named, and only it (q and v verify)."""
    serve(original)
    prefix = "model.language_model.layers.0.self_attn"
    changed = dict(original)
    for i, shard in enumerate(("q_proj", "k_proj", "v_proj")):
        changed[f"{prefix}.{shard}.weight"] = original[f"{prefix}.{shard}.weight"] + 0.01 * (i + 1)

    def skip_k_proj(llm, state, data):
        kept = [(k, v) for k, v in state.items() if k != f"{prefix}.k_proj.weight"]
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(kept)})

    with pytest.raises(WeightVersionError, match=rf"1 tensors differ, e.g. \['{prefix}.k_proj.weight'\]"):
        engine.load_weights(changed, version=next(_VERSIONS), checksum=weights_checksum(changed), reload=skip_k_proj)
    serve(changed)  # all three shards loaded: verified


def test_sampled_checksum_reads_back_k_columns_and_still_names_a_stale_shard(engine, serve, original,
                                                                              score_requests):
    """The sampled form (VLLMConfig.verify_columns): the readback runs each repacked layer's kernel on 4 identity
    rows; a k_proj that was not loaded is still named, and a load of everything verifies and is served."""
    serve(original)
    prefix = "model.language_model.layers.0.self_attn"
    changed = dict(original)
    changed[f"{prefix}.k_proj.weight"] = original[f"{prefix}.k_proj.weight"] + 0.01

    def skip_k_proj(llm, state, data):
        kept = [(k, v) for k, v in state.items() if k != f"{prefix}.k_proj.weight"]
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(kept)})

    version = next(_VERSIONS)
    with pytest.raises(WeightVersionError, match=rf"1 tensors differ, e.g. \['{prefix}.k_proj.weight'\]"):
        engine.load_weights(changed, version=version, checksum=sampled_checksum(changed, columns=4, seed=version),
                            reload=skip_k_proj)
    version = next(_VERSIONS)
    checksum = sampled_checksum(changed, columns=4, seed=version)
    report = engine.load_weights(changed, version=version, checksum=checksum)
    assert (report.checksum, engine.checksum(), engine.version()) == (checksum, checksum, version)
    # no transport check: a sampled column changed in transit is loaded, caught by the readback, and not served
    width = changed[f"{prefix}.q_proj.weight"].shape[1]
    column = int(sample_columns(width, 4, version + 1)[0])
    sent = sampled_checksum(changed, columns=4, seed=version + 1)
    tampered = dict(changed)
    tampered[f"{prefix}.q_proj.weight"] = changed[f"{prefix}.q_proj.weight"].clone()
    tampered[f"{prefix}.q_proj.weight"][0, column] += 1.0
    with pytest.raises(WeightVersionError, match="changed in transit"):
        engine.load_weights(tampered, version=version + 1, checksum=sent)
    with pytest.raises(WeightVersionError, match="failed to verify"):
        engine.score(score_requests)


def test_a_sync_logs_no_per_call_info_and_keeps_warnings(engine, serve, original):
    """vLLM's two INFO lines per reload (prefix cache reset, weights reprocessed) are kept out of the log; a
    warning from the same loggers still gets through."""
    from actors.teacher_engine.engine import PER_SYNC_INFO_LOGGERS

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("vllm").addHandler(handler)
    try:
        serve(original)
        assert [r.getMessage() for r in records if r.name in PER_SYNC_INFO_LOGGERS] == []
        logging.getLogger(PER_SYNC_INFO_LOGGERS[0]).warning("a block pool warning")
        assert [r.getMessage() for r in records if r.name in PER_SYNC_INFO_LOGGERS] == ["a block pool warning"]
    finally:
        logging.getLogger("vllm").removeHandler(handler)
