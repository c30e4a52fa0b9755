"""Teacher rollout engines as Ray actors, and a pool that spreads one batch of requests across them.

    engines = start_engines(model_dir, cfg.vllm)               # cfg.vllm.num_engines actors
    pool = EnginePool(engines)
    batch = pool.generate(requests, group_size=8, max_reasoning_tokens=128, seed=step)   # one RolloutBatch
    pool.load_weights(state_dict, version=step, checksum=weights_checksum(state_dict))   # every engine, verified

Each actor hosts one `TeacherEngine` (a vLLM engine; its environment is set before vllm is imported, inside
the actor). Requests are cut into contiguous chunks assigned round-robin to the engines; each chunk carries
its offset in the batch, so seeds, and therefore samples, do not depend on how many engines there are. The
chunks' RolloutBatches are concatenated in request order; engines serving different weight versions make
that a `WeightVersionError`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ray
import torch

from actors.teacher_engine import TeacherEngine
from zray.config import VLLMConfig
from zray.rubric import ScoreRequest
from zray.types import ForcedSequence, RolloutBatch, WeightSyncReport, WeightVersionError, concat_rollouts

TeacherEngineActor = ray.remote(TeacherEngine)


def start_engines(model_dir: str | Path, cfg: VLLMConfig, *, seed: int = 0, dtype: str | None = None,
                  num_engines: int | None = None) -> list[Any]:
    """`cfg.num_engines` (or `num_engines`) TeacherEngine actors with `cfg.cpus_per_engine` / `gpus_per_engine`
    Ray resources each; returns once every engine is up (raises if one failed to start)."""
    count = cfg.num_engines if num_engines is None else num_engines
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"num_engines={count!r} is not allowed: expected an integer >= 1")
    engines = [TeacherEngineActor.options(num_cpus=cfg.cpus_per_engine, num_gpus=cfg.gpus_per_engine)
               .remote(str(model_dir), cfg, seed=seed + i, dtype=dtype) for i in range(count)]
    ray.get([e.version.remote() for e in engines])
    return engines


def chunk_bounds(num_requests: int, num_engines: int, chunk_size: int | None = None) -> list[tuple[int, int]]:
    """[(start, stop)] contiguous chunks covering the requests; one per engine unless `chunk_size` is given."""
    if num_requests < 1:
        raise ValueError("requests is empty: expected at least one")
    size = chunk_size or math.ceil(num_requests / num_engines)
    if size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} is not allowed: expected an integer >= 1")
    return [(s, min(s + size, num_requests)) for s in range(0, num_requests, size)]


class EnginePool:
    """Several engine actors behind the engine's own verbs; results come back in request order."""

    def __init__(self, engines: Sequence[Any], *, chunk_size: int | None = None) -> None:
        if not engines:
            raise ValueError("engines is empty: expected at least one engine actor")
        self.engines = list(engines)
        self.chunk_size = chunk_size

    def _spread(self, method: str, requests: Sequence[Any], **kwargs: Any) -> list[Any]:
        bounds = chunk_bounds(len(requests), len(self.engines), self.chunk_size)
        refs = []
        for c, (start, stop) in enumerate(bounds):
            engine = self.engines[c % len(self.engines)]
            extra = {"request_offset": start} if method == "generate" else {}
            refs.append(getattr(engine, method).remote(list(requests[start:stop]), **kwargs, **extra))
        return ray.get(refs)

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
        """Send one copy of the weights to the object store; every engine reloads and verifies it."""
        ref = ray.put(weights)
        reports = ray.get([e.load_weights.remote(ref, version=version, checksum=checksum) for e in self.engines])
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
        """Stop every engine and its actor."""
        ray.get([e.shutdown.remote() for e in self.engines])
        for e in self.engines:
            ray.kill(e)
        self.engines = []
