"""Rollout throughput: group sampling through the vLLM teacher engine vs transformers `generate`, same run.

    .venv/bin/python bench/rollout.py                                  # G=8, 64 inputs, 128-token reasoning
    .venv/bin/python bench/rollout.py --inputs 16 --group 4 --tokens 32   # a quick look

The teacher is the tiny Qwen2.5-VL of the `tiny_cpu` recipe (random weights, built locally into a temporary
folder; `--model DIR` uses a Hugging Face format dir instead). Each input is a 64x64 image, a prompt and a
rubric dimension rendered as the teacher's generation prompt.

- baseline: transformers `generate(do_sample=True, num_return_sequences=G, min_new_tokens=max_new_tokens=T,
  output_logits=True)` over batches of `--hf-batch` inputs, plus the per-token log-probs from the logits
  (what a rollout needs); no score pass, so the baseline is favoured.
- candidate: `TeacherEngine.generate` (actors/teacher_engine/rollouts.py): the same G x T sampling with
  log-probs, plus the second engine call that reads the score distribution of every sample, assembled into a
  RolloutBatch.

Throughput = reasoning tokens sampled / wall seconds (after one small warm-up call each). The baseline runs
first, before vLLM binds its threads. Printed: tokens/s of each and the ratio. Shares the CPU with whatever
else runs on the machine: compare the ratio, not the absolute figures, and rerun when the load changes.

No recorded runs yet; record them in docs/experiments.md (section 5).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_requests(num_inputs: int, seed: int = 0) -> list:
    import numpy as np
    from PIL import Image

    from zray.rubric import DIMENSIONS, ScoreRequest

    rng = np.random.default_rng(seed)
    prompts = ["a red circle on a white background", "two blue squares", "a green star above a yellow triangle"]
    return [ScoreRequest(prompts[i % len(prompts)],
                         Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)),
                         DIMENSIONS[i % len(DIMENSIONS)]) for i in range(num_inputs)]


def hf_rollouts(model, processor, requests, group: int, tokens: int, batch: int) -> int:
    """Sample G x T tokens per request with transformers, with per-token log-probs; returns tokens sampled."""
    import torch

    from zray.rubric import render_generation_prompt

    sampled = 0
    for start in range(0, len(requests), batch):
        chunk = requests[start: start + batch]
        texts = [render_generation_prompt(processor, r.prompt, r.dimension, reasoning=True) for r in chunk]
        inputs = processor(text=texts, images=[r.image for r in chunk], return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 num_return_sequences=group, max_new_tokens=tokens, min_new_tokens=tokens,
                                 output_logits=True, return_dict_in_generate=True)
        new = out.sequences[:, inputs["input_ids"].shape[1]:]
        logits = torch.stack(out.logits, dim=1).float()
        logprobs = torch.log_softmax(logits, -1).gather(-1, new[..., None]).squeeze(-1)
        assert logprobs.shape == new.shape
        sampled += new.numel()
    return sampled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=64)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--hf-batch", type=int, default=8, help="inputs per transformers generate call")
    parser.add_argument("--model", default="", help="a Hugging Face format teacher dir (default: build tiny)")
    args = parser.parse_args()

    import torch

    from jobs.recipes import tiny_cpu
    from zray.models.tiny import build_tiny_vlm
    from zray.models.vlm import load_vlm

    recipe = tiny_cpu()
    tmp = tempfile.TemporaryDirectory()
    model_dir = args.model or str(build_tiny_vlm(recipe.teacher, os.path.join(tmp.name, "teacher")))
    requests = make_requests(args.inputs)
    print(f"teacher {model_dir}; {args.inputs} inputs x G={args.group} x {args.tokens} tokens; "
          f"torch threads {torch.get_num_threads()}, cores {os.cpu_count()}")

    model, processor = load_vlm(model_dir)
    hf_rollouts(model, processor, requests[:1], 2, 4, 1)  # warm-up
    start = time.perf_counter()
    hf_tokens = hf_rollouts(model, processor, requests, args.group, args.tokens, args.hf_batch)
    hf_s = time.perf_counter() - start
    del model
    print(f"baseline  transformers generate: {hf_tokens} tokens in {hf_s:.1f} s = {hf_tokens / hf_s:,.0f} tokens/s")

    from actors.teacher_engine import TeacherEngine
    from zray.config import VLLMConfig

    max_len = max(recipe.vllm.max_model_len, 512 + args.tokens)
    engine = TeacherEngine(model_dir, VLLMConfig(kv_cache_gib=recipe.vllm.kv_cache_gib, max_model_len=max_len))
    engine.generate(requests[:1], group_size=2, max_reasoning_tokens=4, seed=0)  # warm-up
    start = time.perf_counter()
    batch = engine.generate(requests, group_size=args.group, max_reasoning_tokens=args.tokens, seed=1)
    vllm_s = time.perf_counter() - start
    vllm_tokens = int(batch.num_reasoning_NG.sum())
    engine.shutdown()
    print(f"candidate vLLM TeacherEngine.generate (+ score pass): {vllm_tokens} tokens in {vllm_s:.1f} s = "
          f"{vllm_tokens / vllm_s:,.0f} tokens/s ({batch.num_malformed()} of {batch.format_ok_NG.numel()} "
          f"samples without a score prefix, engine start {engine.start_s:.1f} s)")
    print(f"ratio vLLM / transformers: {(vllm_tokens / vllm_s) / (hf_tokens / hf_s):.2f}x")


if __name__ == "__main__":
    main()
