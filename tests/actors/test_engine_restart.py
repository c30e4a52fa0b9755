"""Fault tolerance of the engine pool: a killed engine actor is restarted by Ray (on its base weights), the pool
restores the weights it last loaded (checksum verified by the engine) and retries the lost chunk once; a pickled
copy of the pool (a learner worker's) restores from the object-store copy a peer engine keeps.

Real vLLM engines for the main paths (a death in flight or while restarting, a restart between calls, no restarts
allowed); stand-in actors (no vLLM) for the bounds (a second death in one call, an engine not back in time) and
for restores by a pool that did not load the weights.
"""

import dataclasses
import os
import pickle
import time

import pytest
import ray
import torch
from PIL import Image

from actors.engine_pool import EnginePool, EngineRestartError, start_engines
from zray.checksum import weights_checksum
from zray.config import ConfigError, VLLMConfig
from zray.rubric import ScoreRequest
from zray.types import RolloutBatch, WeightSyncReport, WeightVersionError


def _pid(actor):
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))


def _wait_until_down(actor, pid, timeout_s=30.0):
    """Block until the killed actor no longer answers from its old process (ray.kill is asynchronous)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if _pid(actor) != pid:
                return
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.05)
    raise AssertionError(f"actor still answers from pid {pid} {timeout_s} s after ray.kill")


def _wait_until_back(actor, timeout_s=240.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            return ray.get(actor.version.remote())
        except ray.exceptions.ActorUnavailableError:
            time.sleep(0.2)
    raise AssertionError(f"actor not back within {timeout_s} s")


def _same_batch(a: RolloutBatch, b: RolloutBatch) -> None:
    for f in dataclasses.fields(RolloutBatch):
        x, y = getattr(a, f.name), getattr(b, f.name)
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, f.name


def _perturbed(model_dir):
    """The teacher's weights, every floating tensor moved by seeded noise: version 1 is not the base."""
    from zray.models.vlm import load_vlm

    model, _ = load_vlm(model_dir)
    gen = torch.Generator().manual_seed(0)
    return {k: v.detach() + 0.05 * torch.randn(v.shape, generator=gen, dtype=v.dtype) if v.is_floating_point()
            else v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def requests_3():
    image = Image.new("RGB", (64, 64), (30, 70, 230))
    return [ScoreRequest("two blue squares", image, "realism"), ScoreRequest("a red circle", image, "alignment"),
            ScoreRequest("one green star", Image.new("RGB", (64, 64), (20, 200, 40)), "realism")]


def test_max_engine_restarts_is_validated():
    assert VLLMConfig().max_engine_restarts == 3 and VLLMConfig(max_engine_restarts=0).max_engine_restarts == 0
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ConfigError, match=r"VLLMConfig.max_engine_restarts=.* is not allowed: expected an integer"):
            VLLMConfig(max_engine_restarts=bad)


@pytest.fixture(scope="module")
def two_engines(ray_session, sharp_teacher_dir):
    """Two real engine actors shared by this module's real-vLLM tests (an engine start is what these tests cost),
    each restartable twice; every test kills one engine once. The killed-engine test runs first (file order): it
    reads the base weights' scores before loading its own; the GDSO fit loads its weights before its first rollout."""
    engines = start_engines(sharp_teacher_dir, VLLMConfig(max_model_len=1024, num_engines=2, max_engine_restarts=2))
    yield engines
    EnginePool(engines).shutdown()


def test_killed_engine_is_restarted_restored_and_its_chunk_retried(two_engines, sharp_teacher_dir, requests_3,
                                                                   capsys):
    engines = two_engines
    pool = EnginePool(engines, restart_timeout_s=240)
    base_q = pool.score(requests_3)
    state = _perturbed(sharp_teacher_dir)
    checksum = weights_checksum(state)
    pool.load_weights(state, version=1, checksum=checksum)
    assert pool.loaded.weights is state  # remembered by reference
    version, kept_checksum, (kept_ref,) = ray.get(engines[1].kept.remote())
    assert (version, kept_checksum) == (1, checksum) and kept_ref == pool.loaded.ref  # the engines keep the copy
    current_q = pool.score(requests_3)
    assert (current_q - base_q).abs().max() > 1e-3  # a restarted engine (base weights) would answer otherwise
    kwargs = dict(group_size=2, max_reasoning_tokens=4, seed=5)
    healthy = pool.generate(requests_3, **kwargs)  # chunks [0, 2) on engine 0, [2, 3) on engine 1
    assert healthy.weights_version == 1

    # 1. engine 1 killed: the next generate finds it dead or restarting, waits, restores, retries its chunk
    pid = _pid(engines[1])
    ray.kill(engines[1], no_restart=False)
    _wait_until_down(engines[1], pid)
    _same_batch(pool.generate(requests_3, **kwargs), healthy)
    (entry,) = pool.restarts
    assert entry["engine"] == 1 and entry["method"] == "generate" and entry["version"] == 1
    assert entry["verified"] and entry["checksum"] == checksum and entry["cause"] == "ActorUnavailableError"
    assert entry["source"] == "this pool"
    assert _pid(engines[1]) != pid and pool.versions() == [1, 1]
    assert ray.get(engines[1].checksum.remote()) == checksum
    out = capsys.readouterr().out
    assert "[engine-pool] engine 1 back after" in out and "restored weights version 1, verify ok" in out
    assert torch.equal(pool.score(requests_3), current_q)  # the restored engine scores as before its death


# ------------------------------------------------------------------------------------------ stand-in engines


def _fake_engine_class():
    """A stand-in engine actor (no vLLM) with the pool's verbs. `die_in_generate`: its generate kills its process;
    `restart_sleep_s`: a restarted instance takes that long to start."""

    class FakeEngine:
        def __init__(self, *, die_in_generate=False, restart_sleep_s=0.0):
            if ray.get_runtime_context().was_current_actor_reconstructed:
                time.sleep(restart_sleep_s)
            self.die_in_generate = die_in_generate
            self._version, self._checksum, self._kept = 0, None, []

        def generate(self, requests, *, group_size, max_reasoning_tokens, temperature, seed, request_offset):
            if self.die_in_generate:
                os._exit(1)
            n, g = len(requests), group_size  # one reasoning token, the score prefix, the score token
            ones = torch.ones(n, g, 3, dtype=torch.bool)
            policy = ones.clone()
            policy[..., 1] = False
            return RolloutBatch(
                prompt_ids_NL=(torch.arange(n) + request_offset + 1).view(n, 1),
                prompt_mask_NL=torch.ones(n, 1, dtype=torch.bool),
                response_ids_NGT=torch.tensor([5, 6, 7]).repeat(n, g, 1), response_mask_NGT=ones, policy_mask_NGT=policy, old_logprobs_NGT=-0.5 * policy.float(),
                score_index_NG=torch.full((n, g), 2), q_NGK=torch.full((n, g, 9), 1 / 9),
                mu_NG=torch.full((n, g), 3.0), format_ok_NG=torch.ones(n, g, dtype=torch.bool),
                finish_NG=torch.zeros(n, g, dtype=torch.int8), num_reasoning_NG=torch.ones(n, g, dtype=torch.int64),
                weights_version=self._version, temperature=temperature)

        def load_weights(self, weights, *, version, checksum, keep=None):
            if weights_checksum(weights) != checksum:  # TeacherEngine verifies by readback
                raise WeightVersionError(f"checksum {checksum} does not match the weights received")
            self._version, self._checksum, self._kept = version, checksum, list(keep or [])
            return WeightSyncReport(version=version, checksum=checksum, num_tensors=len(weights), num_bytes=0,
                                    load_s=0.0, verify_s=0.0)

        def version(self):
            return self._version

        def kept(self):
            return self._version, self._checksum, list(self._kept)

        def checksum(self):
            return self._checksum

        def shutdown(self):
            pass

    return FakeEngine


@pytest.fixture
def fake_actor(ray_session):
    started = []

    def start(**kwargs):
        """A fake engine actor, not waited for: a test's first call on it waits, so the actors a test starts
        together start in parallel (each process imports torch)."""
        actor = ray.remote(num_cpus=0.1, max_restarts=3)(_fake_engine_class()).remote(**kwargs)
        started.append(actor)
        return actor

    yield start
    for actor in started:
        ray.kill(actor)


def test_a_second_death_in_one_call_raises(fake_actor):
    pool = EnginePool([fake_actor(), fake_actor(die_in_generate=True)])
    state = {"w": torch.ones(2)}
    pool.load_weights(state, version=1, checksum=weights_checksum(state))
    with pytest.raises(EngineRestartError, match=r"engine 1 failed again in the same generate call after it was "
                                                 r"restarted and restored .*: not retrying again"):
        pool.generate(list(range(4)), group_size=2, max_reasoning_tokens=4, seed=0)
    assert [(e["engine"], e["version"], e["verified"]) for e in pool.restarts] == [(1, 1, True)]


def test_an_engine_not_back_in_time_is_named_with_the_time_waited(fake_actor):
    engines = [fake_actor(), fake_actor(restart_sleep_s=30.0)]
    pool = EnginePool(engines, restart_timeout_s=1.0)
    state = {"w": torch.ones(2)}
    pool.load_weights(state, version=1, checksum=weights_checksum(state))
    pid = _pid(engines[1])
    ray.kill(engines[1], no_restart=False)
    _wait_until_down(engines[1], pid)
    start = time.perf_counter()
    with pytest.raises(EngineRestartError, match=r"engine 1 of 2 is not back 1\.\d s after it failed during generate"):
        pool.generate(list(range(4)), group_size=2, max_reasoning_tokens=4, seed=0)
    assert time.perf_counter() - start < 10


# ------------------------------------------------------------------------------------------ a GDSO fit


def _pair_rows(num_pairs: int) -> list[dict]:
    import io

    import numpy as np

    def png(seed):
        buf = io.BytesIO()
        Image.fromarray(np.random.RandomState(seed).randint(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
        return buf.getvalue()

    return [{"prompt": f"{p + 1} red circles", "winner_image": png(2 * p), "loser_image": png(2 * p + 1),
             "dimension": "alignment", "winner_label": 4.0, "loser_label": 1.5} for p in range(num_pairs)]


def test_gdso_fit_completes_when_an_engine_is_killed_after_step_1(two_engines, sharp_teacher_dir, tmp_path):
    """The hook (a thread of the test) kills engine 0 as soon as it serves version 2 (synced after step 1): the
    learner's pool restores version 2 (or loads version 3 into the restarted engine) and the fit completes."""
    import threading

    from actors.learner import fit
    from jobs.recipes import tiny_cpu
    from zray.tasks.gdso import GDSOTask

    base = tiny_cpu().train_teacher
    learner = dataclasses.replace(base.learner, num_workers=1, backend="ddp", precision="fp32", micro_batch_size=1,
                                  max_steps=3, checkpoint_every=3, log_every=1)
    tcfg = dataclasses.replace(base, learner=learner, group_size=2, max_reasoning_tokens=4, inner_steps=2)
    engines = two_engines
    pool = EnginePool(engines, restart_timeout_s=240)
    killed, stop = {}, threading.Event()

    def kill_after_step_1():
        pid = _pid(engines[0])
        while not stop.is_set():
            if ray.get(engines[0].version.remote()) >= 2:
                ray.kill(engines[0], no_restart=False)
                killed["pid"] = pid
                return
            time.sleep(0.05)

    hook = threading.Thread(target=kill_after_step_1, daemon=True)
    hook.start()
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        task = GDSOTask(model_dir=str(sharp_teacher_dir), cfg=tcfg, rollouts=pool, seed=0)
        fitted = fit(task, learner, datasets={"train": ray.data.from_items(_pair_rows(3))}, storage_path=tmp_path,
                     name="gdso_restart")
        stop.set()
        hook.join(timeout=30)
        assert "pid" in killed, "the hook did not kill the engine"
        assert fitted.final_step == learner.max_steps
        assert [h["weights_version"] for h in fitted.history] == [1.0, 2.0, 3.0]
        assert _pid(engines[0]) != killed["pid"] and pool.versions() == [learner.max_steps] * 2  # restarted, restored
    finally:
        stop.set()


def test_an_engine_dead_during_load_weights_gets_the_new_weights(fake_actor):
    engines = [fake_actor(restart_sleep_s=3.0), fake_actor()]  # still restarting when the weights are sent
    pool = EnginePool(engines)
    pid = _pid(engines[0])
    ray.kill(engines[0], no_restart=False)
    _wait_until_down(engines[0], pid)
    state = {"w": torch.ones(2)}
    reports = pool.load_weights(state, version=2, checksum=weights_checksum(state))
    assert [r.version for r in reports] == [2, 2] and pool.versions() == [2, 2]
    assert [(e["engine"], e["method"], e["version"], e["verified"]) for e in pool.restarts] == [
        (0, "load_weights", 2, True)]


# ------------------------------------------------------------------------------------------ a pool that did not load


def _shipped(pool):
    """The copy a learner worker gets (only rank 0's pool loads weights), used once as a worker does every step."""
    copy = pickle.loads(pickle.dumps(pool))
    assert copy.loaded is None and copy.restarts == []
    copy.generate(list(range(4)), group_size=2, max_reasoning_tokens=4, seed=0)
    return copy


def _kill(actor):
    pid = _pid(actor)
    ray.kill(actor, no_restart=False)
    _wait_until_down(actor, pid)


def test_a_pool_that_did_not_load_restores_from_a_peer_engine(fake_actor, capsys):
    engines = [fake_actor(), fake_actor()]
    pool_a = EnginePool(engines)
    state = {"w": torch.arange(4.0)}
    checksum = weights_checksum(state)
    pool_a.load_weights(state, version=1, checksum=checksum)
    pool_b = _shipped(pool_a)

    _kill(engines[1])
    batch = pool_b.generate(list(range(4)), group_size=2, max_reasoning_tokens=4, seed=0)
    assert batch.weights_version == 1 and batch.prompt_ids_NL[:, 0].tolist() == [1, 2, 3, 4]
    assert ray.get(engines[1].version.remote()) == 1 and ray.get(engines[1].checksum.remote()) == checksum
    (entry,) = pool_b.restarts
    assert (entry["engine"], entry["method"], entry["version"], entry["checksum"], entry["verified"],
            entry["source"]) == (1, "generate", 1, checksum, True, "peer engine 0")
    assert "restored weights version 1 from peer engine 0, verify ok" in capsys.readouterr().out
    assert pool_a.restarts == [] and pool_a.versions() == [1, 1]

    # the restored engine keeps the copy too: engine 0 restarted next is restored from engine 1
    _kill(engines[0])
    assert pool_b.generate(list(range(4)), group_size=2, max_reasoning_tokens=4, seed=0).weights_version == 1
    assert [(e["engine"], e["source"], e["verified"]) for e in pool_b.restarts[1:]] == [(0, "peer engine 1", True)]
    assert ray.get(engines[0].checksum.remote()) == checksum

    # a newer version loaded by pool A is what pool B expects (and restores) from then on
    state2 = {"w": torch.arange(4.0) + 1}
    pool_a.load_weights(state2, version=2, checksum=weights_checksum(state2))
    assert pool_b.generate(list(range(4)), group_size=2, max_reasoning_tokens=4, seed=0).weights_version == 2
    _kill(engines[1])
    assert pool_b.generate(list(range(4)), group_size=2, max_reasoning_tokens=4, seed=0).weights_version == 2
    assert [(e["engine"], e["version"], e["source"]) for e in pool_b.restarts[2:]] == [(1, 2, "peer engine 0")]

    # an engine killed and back (on its base weights, version 0) before the next call: the call's answer names the
    # old version, so the pool restores (the loading pool: its own copy) and reruns that chunk
    pid = _pid(engines[0])
    ray.kill(engines[0], no_restart=False)
    _wait_until_down(engines[0], pid)
    assert _wait_until_back(engines[0]) == 0
    assert pool_a.generate(list(range(4)), group_size=2, max_reasoning_tokens=4, seed=0).weights_version == 2
    assert [(e["engine"], e["cause"], e["version"], e["verified"], e["source"]) for e in pool_a.restarts] == [
        (0, "served version 0", 2, True, "this pool")]
    assert pool_a.versions() == [2, 2]


@pytest.mark.parametrize("num_engines", [1, 2])
def test_no_live_engine_holding_the_weights_is_a_clear_error(fake_actor, num_engines):
    engines = [fake_actor() for _ in range(num_engines)]
    pool_a = EnginePool(engines)
    state = {"w": torch.ones(2)}
    pool_a.load_weights(state, version=1, checksum=weights_checksum(state))
    pool_b = _shipped(pool_a)
    for actor in engines:  # every engine restarted: none keeps the weights
        _kill(actor)
    with pytest.raises(EngineRestartError, match=rf"engine 0 of {num_engines} was restarted during generate and serves "
                                                 r"the base weights of its model dir, but it needs weights version 1 "
                                                 r"and no live engine still holds them \(this pool did not load them: "
                                                 r"the pool that did is on another rank or process\)"):
        pool_b.generate(list(range(4)), group_size=2, max_reasoning_tokens=4, seed=0)


def test_weights_lost_with_the_process_that_loaded_them_are_a_clear_error(fake_actor):
    """The object-store copy is owned by the loading pool's process: once it is gone, the references the engines
    keep cannot be loaded."""

    class Loader:
        def load(self, engines, state, version, checksum):
            from actors.engine_pool import EnginePool

            self.pool = EnginePool(engines)
            self.pool.load_weights(state, version=version, checksum=checksum)

    engines = [fake_actor(), fake_actor()]
    loader = ray.remote(num_cpus=0.1)(Loader).remote()
    state = {"w": torch.ones(2)}
    ray.get(loader.load.remote(engines, state, 1, weights_checksum(state)))
    pool_b = _shipped(EnginePool(engines))
    pid = _pid(loader)
    ray.kill(loader)
    _wait_until_down(loader, pid)
    _kill(engines[1])
    with pytest.raises(EngineRestartError, match=r"engine 1 was restarted during generate and needs weights version 1, "
                                                 r"but the copy that engine 0 keeps is lost from the object store"):
        pool_b.generate(list(range(4)), group_size=2, max_reasoning_tokens=4, seed=0)
