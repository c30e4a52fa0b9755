"""Teacher rollout engines as Ray actors, and a pool that spreads one batch of requests across them.

    engines = start_engines(model_dir, cfg.vllm)               # cfg.vllm.num_engines actors, one placement group
    pool = EnginePool(engines)                                 # shutdown() stops them and frees the group
    batch = pool.generate(requests, group_size=8, max_reasoning_tokens=128, seed=step)   # one RolloutBatch
    pool.load_weights(state_dict, version=step,                                         # every engine, verified
                      checksum=sync_checksum(state_dict, columns=pool.verify_columns, version=step))

Each actor hosts one `TeacherEngine` (a vLLM engine; its environment is set before vllm is imported, inside
the actor). The engines of one `start_engines` call share a placement group (actors/placement.py): one bundle per
engine with its CPUs, GPUs and custom resources (`VLLMConfig.resources`), placed by `VLLMConfig.placement_strategy`;
a recipe the cluster cannot hold fails before anything starts. Requests are cut into contiguous chunks assigned
round-robin to the engines; each chunk carries its offset in the batch, so seeds, and therefore samples, do not depend
on how many engines there are. The chunks' RolloutBatches are concatenated in request order; engines serving
different weight versions make that a `WeightVersionError`.

Fault tolerance: Ray restarts a dead engine actor (`VLLMConfig.max_engine_restarts` times in its life) by running
its `__init__` again, so it comes back serving the base weights of its model dir (version 0). The pool remembers
the weights it last loaded and verified (a reference to the caller's state dict, its version and checksum). When a
chunk is lost to a dead engine (Ray 2.60 raises `ActorUnavailableError` for a call in flight when the actor dies
and for a call made while it restarts, `ActorDiedError` once Ray will not restart it), or an engine serves an
older version than the pool's (it restarted between calls), the pool waits for the engine to come back (at most
`restart_timeout_s`; in its own bundle: Ray keeps a restarted actor's placement), loads the remembered weights into
it with the same version and checksum (the engine verifies them by readback; one line is printed), and runs that
engine's chunks once more: the result is what a healthy pool returns (chunks carry their offsets and seeds). One
restore per engine per call: an engine that fails again in the same call raises `EngineRestartError`, as does a dead
engine that is not restarted or not back in time.

A pickled copy of a pool (e.g. in every learner worker, where only rank 0 loads weights) carries no weights. Without
weights of its own, a pool expects the newest version its engines have served once they agreed, and restores a
restarted engine from its peers: `load_weights` sends one copy of the weights to Ray's object store (`ray.put`) and
hands each engine that reference to keep (`TeacherEngine.kept()`); the pool asks the other engines that answer, in
index order, for what they keep, and loads the first reference at the expected version into the restarted engine
(same version and checksum, verified by readback; the restarted engine keeps the reference too). If no live engine
still holds it (all of them restarted, or a single engine), that is an `EngineRestartError`.

Memory: the object store holds one copy of each pool's last loaded weights for as long as the loading pool or any
engine keeps its reference (two copies for the length of a `load_weights` that replaces them). That copy is owned by
the process that loaded it (the loading pool's, e.g. rank 0's learner worker): if that process dies, the references
the engines keep are lost with it, and restoring from them is an `EngineRestartError` too (the pool that loaded the
weights was on another rank or process).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from ray.exceptions import ActorDiedError, GetTimeoutError, ObjectLostError, RayActorError, RayError

from actors.placement import engine_placement_group, in_bundle, remove_group
from actors.teacher_engine import TeacherEngine
from zray.config import VLLMConfig
from zray.rubric import ScoreRequest
from zray.types import ForcedSequence, RolloutBatch, WeightSyncReport, WeightVersionError, concat_rollouts

TeacherEngineActor = ray.remote(TeacherEngine)
RESTART_POLL_S = 0.5  # how often a pool asks a restarting engine whether it is back


class Engines(list):
    """The engine actors of one `start_engines` call (a list), with the placement group they run in; an EnginePool
    made from it removes the group on shutdown (a slice is a plain list: its pool leaves the group alone)."""

    placement_group: Any = None
    verify_columns: int = 0  # VLLMConfig.verify_columns of the engines: how their weight syncs are checked


def start_engines(model_dir: str | Path, cfg: VLLMConfig, *, seed: int = 0, dtype: str | None = None,
                  num_engines: int | None = None, role: str = "engines", engine_class: Any = None) -> Engines:
    """`cfg.num_engines` (or `num_engines`) TeacherEngine actors, engine i in bundle i of one placement group
    (`actors.placement.engine_placement_group`: `cfg.cpus_per_engine`, `gpus_per_engine` and `resources` per
    bundle, `cfg.placement_strategy`; a PlacementError naming `role` when the cluster cannot hold them), restarted
    by Ray up to `cfg.max_engine_restarts` times in their bundle; returns once every engine is up (raises, and
    frees the group, if one failed to start). No `max_task_retries`: Ray would rerun a lost call on the restarted
    engine's base weights; the EnginePool retries it after restoring the current ones. `engine_class`: a Ray actor
    class to start instead (tests place light stand-ins with it: same constructor, a `version` method)."""
    count = cfg.num_engines if num_engines is None else num_engines
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"num_engines={count!r} is not allowed: expected an integer >= 1")
    pg = engine_placement_group(cfg, count, role=role)
    actor_class = TeacherEngineActor if engine_class is None else engine_class
    engines = Engines(actor_class.options(num_cpus=cfg.cpus_per_engine, num_gpus=cfg.gpus_per_engine,
                                          resources=dict(cfg.resources), max_restarts=cfg.max_engine_restarts,
                                          **in_bundle(pg, i))
                      .remote(str(model_dir), cfg, seed=seed + i, dtype=dtype) for i in range(count))
    engines.placement_group, engines.verify_columns = pg, cfg.verify_columns
    try:
        ray.get([e.version.remote() for e in engines])
    except BaseException:
        remove_group(pg)  # kills the engines that did start
        raise
    return engines


def chunk_bounds(num_requests: int, num_engines: int, chunk_size: int | None = None) -> list[tuple[int, int]]:
    """[(start, stop)] contiguous chunks covering the requests; one per engine unless `chunk_size` is given."""
    if num_requests < 1:
        raise ValueError("requests is empty: expected at least one")
    size = chunk_size or math.ceil(num_requests / num_engines)
    if size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} is not allowed: expected an integer >= 1")
    return [(s, min(s + size, num_requests)) for s in range(0, num_requests, size)]


class EngineRestartError(RuntimeError):
    """An engine died and could not be brought back to the pool's weights within one call."""


@dataclass(frozen=True)
class LoadedWeights:
    """What the pool last loaded into every engine and saw verified; `weights` is the caller's object (no copy),
    `ref` its one copy in the object store (the engines keep it too; a restore loads it again)."""

    weights: Mapping[str, torch.Tensor] | bytes
    version: int
    checksum: str
    ref: Any


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _why_text(why: Any) -> str:
    """Why an engine's chunks run again: the first line of the error it died with, or the old version it serves."""
    return _first_line(why) if isinstance(why, BaseException) else f"it serves version {why}"


def _lost_object(err: BaseException) -> bool:
    """Whether `err` says an object-store object is gone (e.g. its owner died), directly or as a task's cause."""
    return isinstance(err, ObjectLostError) or isinstance(getattr(err, "cause", None), ObjectLostError)


class EnginePool:
    """Several engine actors behind the engine's own verbs; results come back in request order.

    `restart_timeout_s`: how long a call waits for a dead engine to come back before it raises (an engine start,
    seconds for the tiny CPU models, minutes for large ones on GPUs). `restarts` lists the restores this pool did
    (each with its `source`: "this pool", "peer engine j", "this call" for a load_weights, None if nothing was loaded).
    `loaded` keeps the last loaded weights by reference, and their object-store copy (`LoadedWeights.ref`) alive:
    one copy per loading pool (see the module docstring).
    """

    def __init__(self, engines: Sequence[Any], *, chunk_size: int | None = None,
                 restart_timeout_s: float = 600.0, verify_columns: int | None = None) -> None:
        if not engines:
            raise ValueError("engines is empty: expected at least one engine actor")
        if not isinstance(restart_timeout_s, (int, float)) or restart_timeout_s <= 0:
            raise ValueError(f"restart_timeout_s={restart_timeout_s!r} is not allowed: expected a number > 0")
        self.engines = list(engines)
        self.placement_group = getattr(engines, "placement_group", None)  # from start_engines; removed on shutdown
        self.chunk_size = chunk_size
        # how senders checksum weight updates for these engines (zray.checksum.sync_checksum); None: what
        # start_engines set from VLLMConfig.verify_columns (a plain list of engines: 0, every bit)
        self.verify_columns = getattr(engines, "verify_columns", 0) if verify_columns is None else verify_columns
        if not isinstance(self.verify_columns, int) or isinstance(self.verify_columns, bool) or self.verify_columns < 0:
            raise ValueError(f"verify_columns={self.verify_columns!r} is not allowed: expected an integer >= 0")
        self.restart_timeout_s = float(restart_timeout_s)
        self.loaded: LoadedWeights | None = None  # set by load_weights once every engine verified
        self._base_version: int | None = None  # without `loaded`: the newest version served since they agreed
        self.restarts: list[dict[str, Any]] = []

    def __getstate__(self) -> dict[str, Any]:
        # a copy (e.g. shipped to a learner worker) carries the engines, not the weights (no silent state-dict copy)
        # nor the placement group (only the pool that started them frees it)
        return {**self.__dict__, "loaded": None, "_base_version": None, "restarts": [], "placement_group": None}

    # ------------------------------------------------------------------------------------------ verbs
    def generate(self, requests: Sequence[ScoreRequest | tuple], *, group_size: int, max_reasoning_tokens: int,
                 temperature: float = 1.0, seed: int | None = None) -> RolloutBatch:
        """G rollouts per request from all engines, as one validated RolloutBatch in request order."""
        parts = self._spread("generate", requests, group_size=group_size,
                             max_reasoning_tokens=max_reasoning_tokens, temperature=temperature, seed=seed)
        return concat_rollouts(parts).validate()

    def score(self, requests: Sequence[ScoreRequest | tuple]) -> torch.Tensor:
        """q_BK for every request (reasoning teacher-forced where given), in request order."""
        return torch.cat(self._spread("score", requests))

    def token_logprobs(self, sequences: Sequence[ForcedSequence]) -> list[torch.Tensor]:
        """log pi of every response token of each sequence, from all engines, in order (OPD's teacher side)."""
        return [logp for part in self._spread("token_logprobs", sequences) for logp in part]

    def generate_texts(self, requests: Sequence[ScoreRequest | tuple], *, max_tokens: int = 64,
                       temperature: float = 1.0, n: int = 1, seed: int | None = None) -> list[list[str]]:
        """Reasoning texts (`n` per request, stopped before the score prefix) from all engines, in request order."""
        parts = self._spread("generate_texts", requests, max_tokens=max_tokens, temperature=temperature, n=n,
                             seed=seed)
        return [texts for part in parts for texts in part]

    def load_weights(self, weights: Mapping[str, torch.Tensor] | bytes, *, version: int,
                     checksum: str) -> list[WeightSyncReport]:
        """Send one copy of the weights to the object store; every engine reloads and verifies it, and keeps the
        reference (`keep=[ref]`: a pickled copy of this pool restores a restarted engine from it). An engine that
        dies meanwhile is waited for and loaded once more; the pool then remembers `weights` (by reference) and
        the object-store copy."""
        ref = ray.put(weights)
        refs = [e.load_weights.remote(ref, version=version, checksum=checksum, keep=[ref]) for e in self.engines]
        reports: list[Any] = [None] * len(refs)
        lost = {}
        for i, r in enumerate(refs):
            try:
                reports[i] = ray.get(r)
            except RayActorError as err:  # WeightVersionError (a failed verification) propagates as it is
                lost[i] = err
        for i, err in lost.items():
            waited = self._await_engine(i, "load_weights", err)
            try:
                reports[i] = ray.get(self.engines[i].load_weights.remote(ref, version=version, checksum=checksum,
                                                                         keep=[ref]))
            except RayActorError as again:
                raise EngineRestartError(f"engine {i} died again in the same load_weights call (version {version}) "
                                         f"after it was restarted: {_first_line(again)}") from again
            self._record(i, "load_weights", err, waited, reports[i], checksum, source="this call")
        self.loaded = LoadedWeights(weights, version, checksum, ref)
        return reports

    def versions(self) -> list[int]:
        return ray.get([e.version.remote() for e in self.engines])

    def version(self) -> int:
        """The one version all engines serve; WeightVersionError if they disagree."""
        versions = self.versions()
        if len(set(versions)) != 1:
            raise WeightVersionError(f"engines serve different weight versions {versions}")
        return versions[0]

    def shutdown(self) -> None:
        """Stop every engine and its actor (an engine that is already dead is only killed), then remove their
        placement group (when the engines came from `start_engines` whole)."""
        for ref in [e.shutdown.remote() for e in self.engines]:
            try:
                ray.get(ref)
            except RayActorError:
                pass
        for e in self.engines:
            ray.kill(e)
        self.engines = []
        remove_group(self.placement_group)
        self.placement_group = None

    # ------------------------------------------------------------------------------------------ spreading
    def _submit(self, method: str, engine: int, requests: Sequence[Any], bounds: tuple[int, int],
                kwargs: dict[str, Any]) -> Any:
        start, stop = bounds
        extra = {"request_offset": start} if method == "generate" else {}  # seeds follow the request index
        return getattr(self.engines[engine], method).remote(list(requests[start:stop]), **kwargs, **extra)

    def _spread(self, method: str, requests: Sequence[Any], **kwargs: Any) -> list[Any]:
        bounds = chunk_bounds(len(requests), len(self.engines), self.chunk_size)
        owner = [c % len(self.engines) for c in range(len(bounds))]
        expected = self._expected_version()
        results: list[Any] = [None] * len(bounds)
        restored: set[int] = set()
        pending = list(range(len(bounds)))
        while pending:
            refs = {c: self._submit(method, owner[c], requests, bounds[c], kwargs) for c in pending}
            lost: dict[int, Any] = {}  # engine index -> why its chunks are run again (an error or a version)
            for c, ref in refs.items():
                try:
                    results[c] = ray.get(ref)
                except RayActorError as err:
                    lost.setdefault(owner[c], err)
                    continue
                served = getattr(results[c], "weights_version", None)
                if expected is not None and served is not None and served < expected:
                    lost.setdefault(owner[c], served)
            lost.update(self._behind(sorted({owner[c] for c in pending} - set(lost)), expected))
            again = sorted(set(lost) & restored)
            if again:
                i = again[0]
                raise EngineRestartError(f"engine {i} failed again in the same {method} call after it was restarted "
                                         f"and restored ({_why_text(lost[i])}): not retrying again")
            for i, why in lost.items():
                self._restore(i, method, why, expected)
                restored.add(i)
            pending = [c for c in pending if owner[c] in lost]
        return results

    # ------------------------------------------------------------------------------------------ recovery
    def _expected_version(self) -> int | None:
        """The version every engine should serve: the one this pool loaded, else the newest one the engines have
        served since they first agreed (asked at every call: another pool, e.g. rank 0's, loads newer versions; an
        engine serves an older one only after a restart). None until they agree: the pool cannot tell, and
        concat_rollouts / version() complain."""
        if self.loaded is not None:
            return self.loaded.version
        versions = set()
        for ref in [e.version.remote() for e in self.engines]:
            try:
                versions.add(ray.get(ref))
            except RayActorError:  # dead or restarting now: the call itself finds out
                pass
        if self._base_version is not None and versions:
            self._base_version = max(self._base_version, *versions)
        elif len(versions) == 1:
            self._base_version = versions.pop()
        return self._base_version

    def _behind(self, engines: Sequence[int], expected: int | None) -> dict[int, Any]:
        """{engine: what it serves, or the error that says it died} for the `engines` that no longer serve the pool's
        weights (restarted since: older version, or no checksum). Nothing to check at version 0 without weights
        loaded here: a restarted engine serves that version (its model dir) again."""
        if not engines or expected is None or (self.loaded is None and expected == 0):
            return {}
        refs = {i: (self.engines[i].version.remote(),
                    self.engines[i].checksum.remote() if self.loaded is not None else None) for i in engines}
        behind: dict[int, Any] = {}
        for i, (version_ref, checksum_ref) in refs.items():
            try:
                version = ray.get(version_ref)
                checksum = ray.get(checksum_ref) if checksum_ref is not None else None
            except RayActorError as err:
                behind[i] = err
                continue
            if version < expected or (self.loaded is not None and checksum != self.loaded.checksum):
                behind[i] = version
        return behind

    def _await_engine(self, i: int, method: str, why: Any) -> float:
        """Wait until engine `i` answers again; returns the seconds waited. EngineRestartError if Ray will not
        restart it, or it is not back within `restart_timeout_s`."""
        start = time.perf_counter()
        cause = _why_text(why)
        while True:
            left = self.restart_timeout_s - (time.perf_counter() - start)
            try:
                ray.get(self.engines[i].version.remote(), timeout=max(left, 0.01))
                return time.perf_counter() - start
            except ActorDiedError as err:
                raise EngineRestartError(
                    f"engine {i} of {len(self.engines)} died during {method} and Ray will not restart it (started "
                    f"with VLLMConfig.max_engine_restarts=0, or its restarts are used up); waited "
                    f"{time.perf_counter() - start:.1f} s: {_first_line(err)}") from err
            except (RayActorError, GetTimeoutError) as err:  # ActorUnavailableError: restarting
                waited = time.perf_counter() - start
                if waited >= self.restart_timeout_s:
                    raise EngineRestartError(
                        f"engine {i} of {len(self.engines)} is not back {waited:.1f} s after it failed during {method} "
                        f"({cause}; restart_timeout_s={self.restart_timeout_s:g}): {_first_line(err)}") from err
                time.sleep(min(RESTART_POLL_S, max(self.restart_timeout_s - waited, 0.0)))

    def _restore(self, i: int, method: str, why: Any, expected: int | None) -> None:
        """Bring engine `i` back to the pool's weights: wait for it, load the remembered weights, or without any
        the weights a peer engine keeps at the expected version (same version and checksum; the engine verifies
        them by readback), print one line."""
        waited = self._await_engine(i, method, why)
        if self.loaded is not None:
            loaded = self.loaded
            self._reload(i, method, why, waited, loaded.ref, loaded.version, loaded.checksum, source="this pool")
        elif expected:
            self._restore_from_peer(i, method, why, waited, expected)
        else:
            self._record(i, method, why, waited, None, None)  # it serves its model dir's weights again

    def _restore_from_peer(self, i: int, method: str, why: Any, waited: float, expected: int) -> None:
        """Load into engine `i` the weights of version `expected` that another engine keeps (asked in index order;
        dead or restarting ones are skipped); EngineRestartError if none holds them."""
        asked = {j: e.kept.remote() for j, e in enumerate(self.engines)}
        try:
            own_version, own_checksum, _ = ray.get(asked.pop(i))
        except RayActorError as err:
            raise EngineRestartError(f"engine {i} died again while its weights (version {expected}) were restored "
                                     f"during {method}: {_first_line(err)}") from err
        if own_version == expected:  # unreachable for a while, not restarted
            self._record(i, method, why, waited, None, own_checksum, version=own_version)
            return
        for j, ref in asked.items():
            try:
                version, checksum, keep = ray.get(ref)
            except RayActorError:
                continue
            if version == expected and keep:
                try:
                    self._reload(i, method, why, waited, keep[0], version, checksum, source=f"peer engine {j}")
                except RayError as err:
                    if not _lost_object(err):
                        raise
                    raise EngineRestartError(
                        f"engine {i} was restarted during {method} and needs weights version {expected}, but the "
                        f"copy that engine {j} keeps is lost from the object store: the pool that loaded it, on "
                        f"another rank or process, is gone ({_first_line(err)})") from err
                return
        raise EngineRestartError(
            f"engine {i} of {len(self.engines)} was restarted during {method} and serves the base weights of its model "
            f"dir, but it needs weights version {expected} and no live engine still holds them (this pool did not "
            "load them: the pool that did is on another rank or process)")

    def _reload(self, i: int, method: str, why: Any, waited: float, ref: Any, version: int, checksum: str, *,
                source: str) -> None:
        """Load `ref` (version, checksum) into the restarted engine `i`, which keeps the reference too."""
        engine = self.engines[i]
        try:
            served = ray.get(engine.version.remote()), ray.get(engine.checksum.remote())
            if served == (version, checksum):  # unreachable for a while, not restarted
                self._record(i, method, why, waited, None, checksum, version=version)
                return
            report = ray.get(engine.load_weights.remote(ref, version=version, checksum=checksum, keep=[ref]))
        except RayActorError as err:
            raise EngineRestartError(f"engine {i} died again while its weights (version {version}) were "
                                     f"restored during {method}: {_first_line(err)}") from err
        except WeightVersionError as err:
            print(f"[engine-pool] engine {i} restarted: restoring weights version {version} from {source} failed "
                  f"verification: {_first_line(err)}", flush=True)
            raise EngineRestartError(f"engine {i} was restarted during {method} but the restored weights (version "
                                     f"{version}, from {source}) failed verification: {_first_line(err)}") from err
        self._record(i, method, why, waited, report, checksum, source=source)

    def _record(self, i: int, method: str, why: Any, waited: float, report: WeightSyncReport | None,
                checksum: str | None, *, version: int | None = None, source: str | None = None) -> None:
        """Note a restart in `restarts` and print its one line (`version`: what it still serves, nothing reloaded;
        `source`: where the weights it loaded came from)."""
        cause = type(why).__name__ if isinstance(why, BaseException) else f"served version {why}"
        verified = report is not None and report.checksum == checksum
        entry = {"engine": i, "method": method, "cause": cause, "waited_s": round(waited, 3),
                 "version": report.version if report is not None else None, "checksum": checksum,
                 "verified": verified, "source": source if report is not None else None}
        self.restarts.append(entry)
        if report is None:
            what = (f"still serves weights version {version} (not restarted): nothing reloaded"
                    if checksum is not None else "serves the base weights of its model dir: nothing to restore")
        else:
            loaded = "loaded" if method == "load_weights" else "restored"
            origin = f" from {source}" if source and source.startswith("peer") else ""
            what = (f"{loaded} weights version {report.version}{origin}, verify {'ok' if verified else 'FAILED'} "
                    f"(checksum {report.checksum}, readback {report.verify_s:.2f} s)")
        print(f"[engine-pool] engine {i} back after {waited:.1f} s ({cause} during {method}): {what}", flush=True)
