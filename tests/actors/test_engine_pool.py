"""Teacher engines as Ray actors: the pool spreads requests, merges in order, syncs and verifies weights."""

import os
import time

import pytest
import ray
import torch

from actors.engine_pool import EnginePool, chunk_bounds
from zray.checksum import sync_checksum
from zray.config import ConfigError, VLLMConfig
from zray.rubric import ScoreRequest
from zray.types import RolloutBatch, WeightVersionError

def _fake_engine_class():
    """A stand-in engine actor (no vLLM): sample (i, g) of request `offset + i` has prompt id offset + i + 1."""

    class FakeEngine:
        def __init__(self, version=0):
            self._version = version

        def generate(self, requests, *, group_size, max_reasoning_tokens, temperature, seed, request_offset):
            n, g = len(requests), group_size
            prompt = (torch.arange(n) + request_offset + 1).view(n, 1)
            response = torch.tensor([5, 6, 7]).repeat(n, g, 1)
            ones = torch.ones(n, g, 3, dtype=torch.bool)
            policy = ones.clone()
            policy[..., 1] = False
            q = torch.full((n, g, 9), 1 / 9)
            return RolloutBatch(
                prompt_ids_NL=prompt, prompt_mask_NL=torch.ones(n, 1, dtype=torch.bool), response_ids_NGT=response,
                response_mask_NGT=ones, policy_mask_NGT=policy, old_logprobs_NGT=-0.5 * policy.float(),
                score_index_NG=torch.full((n, g), 2), q_NGK=q, mu_NG=torch.full((n, g), 3.0),
                format_ok_NG=torch.ones(n, g, dtype=torch.bool), finish_NG=torch.zeros(n, g, dtype=torch.int8),
                num_reasoning_NG=torch.ones(n, g, dtype=torch.int64), weights_version=self._version,
                temperature=temperature)

        def score(self, requests):
            return torch.tensor([[float(r)] * 9 for r in requests])

        def version(self):
            return self._version

    return FakeEngine


@pytest.fixture(scope="module")
def fakes(ray_session):
    fake = ray.remote(num_cpus=0.1)(_fake_engine_class())
    actors = [fake.remote(), fake.remote(), fake.remote(version=1)]
    yield actors
    for actor in actors:  # the session's Ray instance outlives this module
        ray.kill(actor)


def test_chunk_bounds():
    assert chunk_bounds(5, 2) == [(0, 3), (3, 5)]
    assert chunk_bounds(5, 2, chunk_size=2) == [(0, 2), (2, 4), (4, 5)]
    assert chunk_bounds(1, 4) == [(0, 1)]
    with pytest.raises(ValueError, match="empty"):
        chunk_bounds(0, 2)


@pytest.mark.parametrize("chunk_size", [None, 1, 2])
def test_pool_merges_in_request_order(fakes, chunk_size):
    pool = EnginePool(fakes[:2], chunk_size=chunk_size)
    batch = pool.generate(list(range(5)), group_size=2, max_reasoning_tokens=4, seed=0)
    assert batch.num_inputs == 5 and batch.prompt_ids_NL[:, 0].tolist() == [1, 2, 3, 4, 5]
    assert pool.score(list(range(5)))[:, 0].tolist() == [0, 1, 2, 3, 4]
    assert pool.version() == 0


def test_pool_refuses_mixed_versions(fakes):
    pool = EnginePool([fakes[0], fakes[2]])
    with pytest.raises(WeightVersionError, match="different weight versions"):
        pool.version()
    with pytest.raises(WeightVersionError, match="versions 0 and 1"):
        pool.generate(list(range(4)), group_size=2, max_reasoning_tokens=4)


def test_engine_actor_generates_syncs_and_without_restarts_dies_with_a_clear_error(ray_session, sharp_teacher_dir):
    """One real vLLM engine in a Ray actor: rollouts, scores, a verified weight sync, a refused checksum; then,
    started with `max_engine_restarts=0`, killed: the next call is a clear error (one engine start for both)."""
    from PIL import Image

    from actors.engine_pool import EngineRestartError, start_engines
    from zray.models.vlm import load_vlm
    from zray.scores import score_token_ids

    engines = start_engines(sharp_teacher_dir, VLLMConfig(max_model_len=1024, num_engines=1, max_engine_restarts=0))
    (actor,) = engines
    pool = EnginePool(engines)
    assert pool.verify_columns == VLLMConfig().verify_columns == 4  # sampled checksums, from the engines' config
    try:
        image = Image.new("RGB", (64, 64), (30, 70, 230))
        requests = [ScoreRequest("two blue squares", image, "realism"),
                    ScoreRequest("a red circle", image, "alignment")]
        batch = pool.generate(requests, group_size=2, max_reasoning_tokens=4, seed=1)
        assert batch.num_inputs == 2 and batch.weights_version == 0
        model, processor = load_vlm(sharp_teacher_dir)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        state["lm_head.weight"][score_token_ids(processor)] = 0.0  # every score token gets logit 0: q uniform
        (report,) = pool.load_weights(state, version=7, checksum=sync_checksum(state, columns=4, version=7))
        assert report.version == 7 and pool.versions() == [7] and report.checksum.startswith("cols4-seed7-")
        assert torch.allclose(pool.score(requests), torch.full((2, 9), 1 / 9), atol=1e-6)
        with pytest.raises(WeightVersionError, match="nothing was loaded"):
            pool.load_weights(state, version=8, checksum="f" * 32)
        assert pool.version() == 7

        ray.kill(actor, no_restart=False)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # ray.kill is asynchronous: until the process no longer answers
            try:
                ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))
            except ray.exceptions.RayActorError:
                break
            time.sleep(0.05)
        with pytest.raises(EngineRestartError, match=r"engine 0 of 1 died during generate and Ray will not restart "
                                                     r"it \(started with VLLMConfig.max_engine_restarts=0"):
            pool.generate(requests, group_size=2, max_reasoning_tokens=4, seed=5)
    finally:
        pool.shutdown()


def test_verify_columns_is_validated():
    assert EnginePool(["e"]).verify_columns == 0 and EnginePool(["e"], verify_columns=8).verify_columns == 8
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match=r"VLLMConfig.verify_columns=.* is not allowed: expected an integer"):
            VLLMConfig(verify_columns=bad)
        with pytest.raises(ValueError, match="verify_columns=.* is not allowed"):
            EnginePool(["e"], verify_columns=bad)
