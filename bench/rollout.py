"""Rollout throughput: group sampling through the vLLM teacher engine vs transformers `generate`, same run.

    .venv/bin/python bench/rollout.py                                  # G=8, 64 inputs, 128-token reasoning
    .venv/bin/python bench/rollout.py --inputs 16 --group 4 --tokens 32   # a quick look
    .venv/bin/python bench/rollout.py --hidden 512 --layers 6          # the ~20M-parameter teacher of
                                                                       # bench/weight_sync.py
    .venv/bin/python bench/rollout.py --text-stop                      # also time the detokenising stop

The teacher is the tiny Qwen2.5-VL of the `tiny_cpu` recipe (random weights, built locally into a temporary
folder; `--hidden` / `--layers` widen and deepen it as bench/weight_sync.py sizes its model, `scaled_vlm_config`;
`--model DIR` uses a Hugging Face format dir instead). Each input is a 64x64 image, a prompt and a rubric
dimension rendered as the teacher's generation prompt.

- baseline: transformers `generate(do_sample=True, num_return_sequences=G, min_new_tokens=max_new_tokens=T,
  output_logits=True)` over batches of `--hf-batch` inputs, plus the per-token log-probs from the logits
  (what a rollout needs); no score pass, so the baseline is favoured.
- candidate: `TeacherEngine.generate` (actors/teacher_engine/rollouts.py): the same G x T sampling with
  log-probs, plus the second engine call that reads the score distribution of every sample, assembled into a
  RolloutBatch. Its time is split into the sampling call, the score call and the rest (cutting, assembling).
- `--text-stop`: the candidate again with the reasoning stopped on the text "Score:" (vLLM detokenises every
  sampled token and log-prob), as rollouts did before they stopped on the "Score" token ids.

Throughput = reasoning tokens sampled / wall seconds (after one small warm-up call each). The baseline runs
first, before vLLM binds its threads. Printed: tokens/s of each and the ratio. Shares the CPU with whatever
else runs on the machine: compare the ratio, not the absolute figures, and rerun when the load changes.
Recorded runs: docs/experiments.md, section 2 ("rollout throughput").
"""

from __future__ import annotations

import argparse
import contextlib
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
    parser.add_argument("--hidden", type=int, default=0, help="hidden size of the built teacher (0: tiny_cpu's)")
    parser.add_argument("--layers", type=int, default=0, help="decoder layers of the built teacher (0: tiny_cpu's)")
    parser.add_argument("--max-num-seqs", type=int, default=0, help="vLLM's scheduler cap (0: VLLMConfig's)")
    parser.add_argument("--text-stop", action="store_true", help="also time the detokenising text stop")
    args = parser.parse_args()

    import torch

    from jobs.recipes import tiny_cpu
    from zray.models.tiny import build_tiny_vlm, count_parameters, scaled_vlm_config
    from zray.models.vlm import load_vlm

    recipe = tiny_cpu()
    tmp = tempfile.TemporaryDirectory()
    model_dir = args.model or str(build_tiny_vlm(scaled_vlm_config(recipe.teacher, args.hidden, args.layers),
                                                 os.path.join(tmp.name, "teacher")))
    requests = make_requests(args.inputs)
    print(f"teacher {model_dir} ({count_parameters(model_dir) / 1e6:.1f}M parameters); {args.inputs} inputs x "
          f"G={args.group} x {args.tokens} tokens; torch threads {torch.get_num_threads()}, cores {os.cpu_count()}")

    model, processor = load_vlm(model_dir)
    hf_rollouts(model, processor, requests[:1], 2, 4, 1)  # warm-up
    start = time.perf_counter()
    hf_tokens = hf_rollouts(model, processor, requests, args.group, args.tokens, args.hf_batch)
    hf_s = time.perf_counter() - start
    del model
    print(f"baseline  transformers generate: {hf_tokens} tokens in {hf_s:.1f} s = {hf_tokens / hf_s:,.0f} tokens/s")

    import dataclasses

    from actors.teacher_engine import TeacherEngine, rollouts
    from zray.config import VLLMConfig

    max_len = max(recipe.vllm.max_model_len, 512 + args.tokens)
    cfg = VLLMConfig(kv_cache_gib=recipe.vllm.kv_cache_gib, max_model_len=max_len)
    if args.max_num_seqs:
        cfg = dataclasses.replace(cfg, max_num_seqs=args.max_num_seqs)
    engine = TeacherEngine(model_dir, cfg)
    calls = time_engine_calls(engine)
    engine.generate(requests[:1], group_size=2, max_reasoning_tokens=4, seed=0)  # warm-up
    runs = [("candidate vLLM TeacherEngine.generate (+ score pass)", None)]
    if args.text_stop:
        runs.append(("          the same, stopped on the text (detokenising)", text_stop_rule(rollouts)))
    for name, patch in runs:
        calls.clear()
        with patch or contextlib.nullcontext():
            start = time.perf_counter()
            batch = engine.generate(requests, group_size=args.group, max_reasoning_tokens=args.tokens, seed=1)
            vllm_s = time.perf_counter() - start
        vllm_tokens = int(batch.num_reasoning_NG.sum())
        print(f"{name}: {vllm_tokens} tokens in {vllm_s:.1f} s = {vllm_tokens / vllm_s:,.0f} tokens/s "
              f"(sampling {calls[0]:.2f} s, score pass {calls[1]:.2f} s, the rest {vllm_s - sum(calls):.2f} s; "
              f"{batch.num_malformed()} of {batch.format_ok_NG.numel()} samples without a score prefix)")
        print(f"ratio vLLM / transformers: {(vllm_tokens / vllm_s) / (hf_tokens / hf_s):.2f}x")
    print(f"engine start {engine.start_s:.1f} s, max_num_seqs {cfg.max_num_seqs}")
    engine.shutdown()


def time_engine_calls(engine) -> list[float]:
    """Wraps the engine's `llm.generate`: the returned list gets each call's wall seconds."""
    calls: list[float] = []
    generate = engine.llm.generate

    def timed(*a, **k):
        start = time.perf_counter()
        try:
            return generate(*a, **k)
        finally:
            calls.append(time.perf_counter() - start)

    engine.llm.generate = timed
    return calls


@contextlib.contextmanager
def text_stop_rule(rollouts):
    """Rollouts stop on the text "Score:" (the detokenising path) while inside."""
    init = rollouts.StopRule.__init__

    def text_only(self, tokenizer):
        init(self, tokenizer)
        self.token_ids = ()

    rollouts.StopRule.__init__ = text_only
    try:
        yield
    finally:
        rollouts.StopRule.__init__ = init


if __name__ == "__main__":
    main()
