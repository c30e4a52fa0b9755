"""The teacher's vLLM engine: reasoning rollouts, score distributions, live weight sync (methods.md §1-2).

A plain class with coarse, verb-named methods that take and return plain data (CPU tensors, typed batches);
`actors/engine_pool.py` hosts it in Ray actors (`TeacherEngineActor = ray.remote(TeacherEngine)`).

    generate(requests, group_size=, max_reasoning_tokens=, ...) -> RolloutBatch   (rollouts.py)
    score(requests) -> q_BK                                                       (teacher forcing of text)
    load_weights(weights, version=, checksum=, keep=) -> WeightSyncReport         (weight_sync.py)
    version() -> int                                                              (0: the checkpoint)
    kept() -> (version, checksum, keep)                     what the last verified load_weights was told to keep

vLLM starts its engine with spawn: any script that builds a `TeacherEngine` must guard its entry point with
`if __name__ == "__main__":`. Environment variables that vLLM reads (KV-cache size, in-process engine) are
set from the `VLLMConfig` before vllm is imported, inside `__init__`.

Score distributions: the prompt is the rendered score context (`zray.rubric.render_score_context`), which
ends right before the score token; one step with `SamplingParams(max_tokens=1, logprob_token_ids=score_ids)`
returns the log-probs of exactly the nine score tokens at the score position, renormalised over the nine
(`zray.scores.distribution_from_logprobs`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from actors.teacher_engine.rollouts import StopRule, forced_logprobs, generate_rollouts, reasoning_text
from actors.teacher_engine.weight_sync import apply_weights, receive_weights
from zray.config import VLLMConfig
from zray.models.vlm import checkpoint_dtype
from zray.rubric import ScoreRequest, render_generation_prompt, render_score_context
from zray.scores import distribution_from_logprobs, score_token_ids
from zray.types import ForcedSequence, RolloutBatch, WeightSyncReport, WeightVersionError


# vLLM's CPU worker replaces `torch.set_num_threads` in its process by a function that only logs this warning
# (vllm/v1/worker/cpu_worker.py); vLLM's renderer then calls it twice per multimodal request
# (`set_default_torch_num_threads`), so an in-process engine logs it thousands of times a run.
CPU_WORKER_LOGGER = "vllm.v1.worker.cpu_worker"
SKIPPED_SET_NUM_THREADS = ("CPU backend doesn't allow to use `torch.set_num_threads` after the thread binding, "
                           "skip it.")


class SkippedSetNumThreadsFilter(logging.Filter):
    """Drops exactly vLLM's CPU-worker warning `SKIPPED_SET_NUM_THREADS`; every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != SKIPPED_SET_NUM_THREADS


# vLLM loggers whose only INFO records come once per weight sync ("Successfully reset prefix cache", "Reloading
# and processing weights took ... seconds": two lines a GDSO step, 3,000 in a 3-seed table) and say nothing the
# WeightSyncReport does not; their warnings still pass.
PER_SYNC_INFO_LOGGERS = ("vllm.v1.core.block_pool", "vllm.model_executor.model_loader.reload.inplace")


class WarningsOnlyFilter(logging.Filter):
    """Drops records below WARNING (a filter, not a level: vLLM's logging setup resets its loggers' levels)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


def quiet_per_call_logs() -> None:
    """In this process, once: `SkippedSetNumThreadsFilter` on vLLM's CPU-worker logger, `WarningsOnlyFilter` on
    the `PER_SYNC_INFO_LOGGERS`."""
    for name, kind in ((CPU_WORKER_LOGGER, SkippedSetNumThreadsFilter),
                       *((n, WarningsOnlyFilter) for n in PER_SYNC_INFO_LOGGERS)):
        logger = logging.getLogger(name)
        if not any(isinstance(f, kind) for f in logger.filters):
            logger.addFilter(kind())


def _set_vllm_env(cfg: VLLMConfig) -> None:
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.kv_cache_gib)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if cfg.in_process else "1"
    if not cfg.in_process:  # weight sync sends bytes and a readback function to the engine's worker process
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"


class TeacherEngine:
    """A vLLM `LLM` on a Qwen-VL dir (Hugging Face format) that scores and generates with one image a prompt."""

    def __init__(self, model_dir: str | Path, cfg: VLLMConfig, *, seed: int = 0, dtype: str | None = None) -> None:
        """`dtype=None` keeps the checkpoint's dtype (vLLM's "auto" downcasts float32 to bfloat16 on CPU)."""
        _set_vllm_env(cfg)
        dtype = dtype or checkpoint_dtype(model_dir)
        from vllm import LLM  # after the environment is set

        quiet_per_call_logs()  # the in-process worker's records (a separate worker process keeps its own)
        start = time.perf_counter()
        self.cfg = cfg
        self.model_dir = str(model_dir)
        self.llm = LLM(model=self.model_dir, enforce_eager=cfg.enforce_eager, max_model_len=cfg.max_model_len,
                       max_num_seqs=cfg.max_num_seqs, block_size=cfg.block_size or None,
                       gpu_memory_utilization=cfg.gpu_memory_utilization, limit_mm_per_prompt={"image": 1},
                       seed=seed, dtype=dtype, enable_chunked_prefill=cfg.chunked_prefill,
                       max_num_batched_tokens=None if cfg.chunked_prefill else max(cfg.max_model_len, 8192))
        self.start_s = time.perf_counter() - start
        self.tokenizer = self.llm.get_tokenizer()
        self.score_ids = score_token_ids(self.tokenizer)
        self._version: int | None = 0  # 0: the checkpoint it started from; None: a failed, unverified update
        self._checksum: str | None = None
        self._kept: list[Any] = []  # opaque, from load_weights(keep=): the pool's handle on the served weights

    # ------------------------------------------------------------------------------------------ state
    def version(self) -> int:
        """The weight version this engine serves (0 = the checkpoint it was started from)."""
        return self._require_verified()

    def checksum(self) -> str | None:
        """The checksum (zray.checksum) of the served weights after the last update; None before any."""
        return self._checksum

    def kept(self) -> tuple[int | None, str | None, list[Any]]:
        """(version, checksum, keep): the served weights and what their last verified `load_weights` was told to
        keep (`keep`, as given: the EnginePool's object-store reference to them; [] before any, or after a failed
        update). A pool that did not load the weights restores a restarted engine from it."""
        return self._version, self._checksum, list(self._kept)

    def _require_verified(self) -> int:
        if self._version is None:
            raise WeightVersionError("this engine failed to verify its last weight update and serves unknown "
                                     "weights: load weights again before using it")
        return self._version

    # ------------------------------------------------------------------------------------------ rollouts
    def generate(self, requests: Sequence[ScoreRequest | tuple], *, group_size: int, max_reasoning_tokens: int,
                 temperature: float = 1.0, seed: int | None = None, request_offset: int = 0) -> RolloutBatch:
        """G rollouts per (prompt, image, dimension): reasoning, score prefix, score token, q (RolloutBatch).

        `request_offset` is the index of `requests[0]` in the whole batch (seeds depend on it, so that a batch
        split across engines samples as one engine would). See `actors/teacher_engine/rollouts.py`.
        """
        version = self._require_verified()
        return generate_rollouts(self.llm, requests, score_ids=self.score_ids, group_size=group_size,
                                 max_reasoning_tokens=max_reasoning_tokens, temperature=temperature, seed=seed,
                                 request_offset=request_offset, weights_version=version,
                                 max_model_len=self.cfg.max_model_len)

    def generate_texts(self, requests: Sequence[ScoreRequest | tuple], *, max_tokens: int = 64,
                       temperature: float = 1.0, n: int = 1, seed: int | None = None) -> list[list[str]]:
        """Reasoning texts only: `n` samples per request, each stopped and cut before the score prefix exactly as a
        training rollout is (`StopRule`, `reasoning_text`: on a tokenizer with the word "Score" whole, the word
        starts the prefix, whatever follows it).

        Pass one back as `reasoning` to `score`. For training rollouts use `generate` (token ids, log-probs).
        """
        from vllm import SamplingParams

        self._require_verified()
        reqs = [r if isinstance(r, ScoreRequest) else ScoreRequest(*r) for r in requests]
        texts = [render_generation_prompt(self.tokenizer, r.prompt, r.dimension, reasoning=True,
                                          anchors=r.anchors) for r in reqs]
        stop = StopRule(self.tokenizer)
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, n=n, seed=seed,
                                **stop.sampling_kwargs())
        outputs = self.llm.generate(self._inputs(texts, [r.image for r in reqs]), params, use_tqdm=False)

        def decode(ids: list[int]) -> str:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

        return [[reasoning_text(c, decode, stop.token_ids) for c in sorted(out.outputs, key=lambda c: c.index)]
                for out in outputs]

    # ------------------------------------------------------------------------------------------ scoring
    def token_logprobs(self, sequences: Sequence[ForcedSequence]) -> list[torch.Tensor]:
        """log pi of every response token of each sequence (another model's samples, teacher-forced): OPD's teacher
        side. See `actors.teacher_engine.rollouts.forced_logprobs`."""
        self._require_verified()
        return forced_logprobs(self.llm, sequences)

    def _inputs(self, texts: Sequence[str], images: Sequence[Any]) -> list[dict[str, Any]]:
        return [{"prompt": t, "multi_modal_data": {"image": im}} for t, im in zip(texts, images, strict=True)]

    def score(self, requests: Sequence[ScoreRequest | tuple]) -> torch.Tensor:
        """q_BK (float32, CPU): the score distribution of each request, its reasoning (if any) teacher-forced."""
        return torch.stack(self.score_distributions(requests))

    def score_distributions(self, requests: Sequence[ScoreRequest | tuple]) -> list[torch.Tensor]:
        """q_K (float32, CPU) for each request: (prompt, image, dimension[, reasoning]) or a ScoreRequest."""
        from vllm import SamplingParams

        self._require_verified()
        reqs = [r if isinstance(r, ScoreRequest) else ScoreRequest(*r) for r in requests]
        texts = [render_score_context(self.tokenizer, r.prompt, r.dimension, r.reasoning, r.anchors) for r in reqs]
        params = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=list(self.score_ids),
                                detokenize=False)
        outputs = self.llm.generate(self._inputs(texts, [r.image for r in reqs]), params, use_tqdm=False)
        result = []
        for out in outputs:
            step = out.outputs[0].logprobs[0]  # {token_id: Logprob} at the score position
            missing = [i for i in self.score_ids if i not in step]
            if missing:
                raise RuntimeError(f"vLLM returned no log-prob for score token ids {missing}")
            logprobs_K = torch.tensor([step[i].logprob for i in self.score_ids], dtype=torch.float64)
            result.append(distribution_from_logprobs(logprobs_K))
        return result

    # ------------------------------------------------------------------------------------------ weights
    @property
    def verify_columns(self) -> int:
        """How senders checksum weight updates for this engine (`VLLMConfig.verify_columns`, `sync_checksum`)."""
        return self.cfg.verify_columns

    def load_weights(self, weights: Mapping[str, torch.Tensor] | bytes, *, version: int, checksum: str,
                     reload: Any = None, keep: Sequence[Any] | None = None) -> WeightSyncReport:
        """Serve new weights in place and verify them; see `actors/teacher_engine/weight_sync.py`.

        `weights`: a Hugging Face state dict (name -> tensor, in the served dtype) or its safetensors bytes;
        `checksum`: `zray.checksum.weights_checksum` of it, computed by the sender. A mismatch raises
        `WeightVersionError`: before loading (the old version stays served) or after the readback (the
        engine then refuses work until a later update verifies). `reload` replaces the reload step (tests).
        `keep`: a list stored as it is once the weights verify and returned by `kept()` (the EnginePool passes
        `[ref]`, its object-store reference to these weights: in a list, Ray hands over the reference itself).
        """
        start = time.perf_counter()
        state, data = receive_weights(self.llm, weights, version=version, checksum=checksum)  # loads nothing
        received_s = time.perf_counter() - start
        self._version, self._kept = None, []  # unverified until the readback matches
        report = apply_weights(self.llm, state, data, version=version, checksum=checksum,
                               in_process=self.cfg.in_process, reload=reload)
        self._version, self._checksum = report.version, report.checksum
        self._kept = list(keep) if keep is not None else []
        return dataclasses.replace(report, load_s=report.load_s + received_s)

    def shutdown(self) -> None:
        """Stop the engine core (its process, if not in-process) and drop the engine."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        llm.llm_engine.engine_core.shutdown()
        self.llm = None
