"""The teacher's vLLM engine: reasoning rollouts and score distributions (methods.md §1).

A plain class for now; a Ray actor wraps it later (`ray.remote(TeacherEngine)`), so it keeps to coarse,
verb-named methods that take and return plain data (CPU tensors, strings).

vLLM starts its engine with spawn: any script that builds a `TeacherEngine` must guard its entry point with
`if __name__ == "__main__":`. Environment variables that vLLM reads (KV-cache size, in-process engine) are
set from the `VLLMConfig` before vllm is imported, inside `__init__`.

Score distributions: the prompt is the rendered score context (`zray.prompts.render_score_context`), which
ends right before the score token; one step with `SamplingParams(max_tokens=1, logprob_token_ids=score_ids)`
returns the log-probs of exactly the nine score tokens at the score position, renormalised over the nine
(`zray.scores.distribution_from_logprobs`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from zray.config import VLLMConfig
from zray.prompts import SCORE_PREFIX, ScoreRequest, render_generation_prompt, render_score_context
from zray.scores import distribution_from_logprobs, score_token_ids


def _set_vllm_env(cfg: VLLMConfig) -> None:
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.kv_cache_gib)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if cfg.in_process else "1"


def checkpoint_dtype(model_dir: str | Path) -> str:
    """The dtype recorded in a Hugging Face config.json ("float32", "bfloat16", ...), or "auto" if none."""
    path = Path(model_dir) / "config.json"
    if not path.exists():
        return "auto"
    config = json.loads(path.read_text())
    text_config = config.get("text_config") or {}
    return str(config.get("dtype") or config.get("torch_dtype") or text_config.get("dtype") or "auto")


class TeacherEngine:
    """A vLLM `LLM` on a Qwen-VL dir (Hugging Face format) that scores and generates with one image a prompt."""

    def __init__(self, model_dir: str | Path, cfg: VLLMConfig, *, seed: int = 0, dtype: str | None = None) -> None:
        """`dtype=None` keeps the checkpoint's dtype (vLLM's "auto" downcasts float32 to bfloat16 on CPU)."""
        _set_vllm_env(cfg)
        dtype = dtype or checkpoint_dtype(model_dir)
        from vllm import LLM  # after the environment is set

        start = time.perf_counter()
        self.model_dir = str(model_dir)
        self.llm = LLM(model=self.model_dir, enforce_eager=cfg.enforce_eager, max_model_len=cfg.max_model_len,
                       gpu_memory_utilization=cfg.gpu_memory_utilization, limit_mm_per_prompt={"image": 1},
                       seed=seed, dtype=dtype)
        self.start_s = time.perf_counter() - start
        self.tokenizer = self.llm.get_tokenizer()
        self.score_ids = score_token_ids(self.tokenizer)

    def _inputs(self, texts: Sequence[str], images: Sequence[Any]) -> list[dict[str, Any]]:
        return [{"prompt": t, "multi_modal_data": {"image": im}} for t, im in zip(texts, images, strict=True)]

    def score_distributions(self, requests: Sequence[ScoreRequest | tuple]) -> list[torch.Tensor]:
        """q_K (float32, CPU) for each request: (prompt, image, dimension[, reasoning]) or a ScoreRequest."""
        from vllm import SamplingParams

        reqs = [r if isinstance(r, ScoreRequest) else ScoreRequest(*r) for r in requests]
        texts = [render_score_context(self.tokenizer, r.prompt, r.dimension, r.reasoning) for r in reqs]
        params = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=list(self.score_ids))
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

    def generate(self, requests: Sequence[ScoreRequest | tuple], *, max_tokens: int = 64, temperature: float = 1.0,
                 n: int = 1, seed: int | None = None) -> list[list[str]]:
        """Reasoning rollouts: `n` samples per request, each stopped before the fixed score prefix.

        The returned texts are the reasoning only; pass one back as `reasoning` to `score_distributions`.
        """
        from vllm import SamplingParams

        reqs = [r if isinstance(r, ScoreRequest) else ScoreRequest(*r) for r in requests]
        texts = [render_generation_prompt(self.tokenizer, r.prompt, r.dimension, reasoning=True) for r in reqs]
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, n=n, seed=seed,
                                stop=[SCORE_PREFIX.strip()])
        outputs = self.llm.generate(self._inputs(texts, [r.image for r in reqs]), params, use_tqdm=False)
        return [[c.text.strip() for c in out.outputs] for out in outputs]

    def shutdown(self) -> None:
        """Stop the engine core (its process, if not in-process) and drop the engine."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        llm.llm_engine.engine_core.shutdown()
        self.llm = None
