"""One GDSO learner step at 7B-class size on a GPU: teacher-forced log-probs and score distributions for
2 x G sequences of about 750 tokens, every loss term, backward. Time and peak memory.

    python bench/gpu_gdso_step.py                          # Qwen2.5-VL-7B shapes, bf16, CUDA, G=8, 750 tokens
    python bench/gpu_gdso_step.py --size tiny --device cpu --seq-len 120 --response-len 40   # smoke run on CPU

The model is a Qwen2.5-VL built from config with random weights (7B: text 3584 x 28 layers, vocabulary 152064,
vision tower 1280 x 32 blocks; ~8.3 B parameters), gradient checkpointing on. One same-prompt pair (P = 1):
each side has its own image (448 x 448 -> 256 image tokens) and G sampled responses of `--response-len` tokens
(reasoning + score prefix + score token), all sequences `--seq-len` long. A step is, as the learner does it:

1. reference forward without gradient (log pi_ref of the response tokens; the same weights stand in for the
   reference model, so its memory is not counted),
2. policy forward with gradient: log pi_theta of the response tokens (logits only for the response, fp32
   log-softmax) and log q at the score position (softmax over the nine score tokens),
3. rewards and per-side advantages from rollout expected scores, then `zray.losses.gdso.gdso_loss` (clipped
   ratio, k3 KL, pointwise CE, pairwise L1 gap),
4. backward. The optimizer step is not included (under DeepSpeed ZeRO it is sharded across the GPUs).

Printed: the median over `--steps` timed steps (after one warm-up) of each phase, tokens/s, and the peak memory.

No recorded runs yet; record them in docs/experiments.md (section 5).
"""

from __future__ import annotations

import argparse
import statistics
import time

SIZES = {
    "7b": dict(text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064),
               vision=dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420,
                           fullatt_block_indexes=[7, 15, 23, 31]),
               head_dim=128, image_size=448),
    "tiny": dict(text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1, vocab_size=1000),
                 vision=dict(depth=2, hidden_size=64, num_heads=2, intermediate_size=128, fullatt_block_indexes=[1]),
                 head_dim=64, image_size=56),
}
PATCH, MERGE, TEMPORAL = 14, 2, 2


def build_model(size: str, dtype, device):
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    spec = SIZES[size]
    vocab = spec["text"]["vocab_size"]
    ids = dict(image_token_id=vocab - 400, video_token_id=vocab - 399, vision_start_token_id=vocab - 398,
               vision_end_token_id=vocab - 397)
    half = spec["head_dim"] // 2
    t = half // 4
    section = [t, (half - t) // 2, half - t - (half - t) // 2]
    text = dict(spec["text"], max_position_embeddings=32768,
                rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": section})
    vision = dict(spec["vision"], patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL,
                  window_size=112, out_hidden_size=spec["text"]["hidden_size"])
    config = Qwen2_5_VLConfig(vision_config=vision, text_config=text, tie_word_embeddings=False, **ids)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: no transient fp32 copy of 8 B parameters
    try:
        with torch.device(device):
            model = Qwen2_5_VLForConditionalGeneration(config).to(dtype)
    finally:
        torch.set_default_dtype(default)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    return model, ids, vocab


def build_batch(size: str, ids: dict, vocab: int, group: int, seq_len: int, response_len: int, dtype, device):
    """2 x G sequences: [text][vision_start][image pads][vision_end][text][response]; side j uses image j."""
    import torch

    gen = torch.Generator().manual_seed(1)
    grid = SIZES[size]["image_size"] // PATCH
    num_image_tokens = (grid // MERGE) ** 2
    prompt_len = seq_len - response_len
    text_len = prompt_len - num_image_tokens - 2
    if text_len < 2 or response_len < 5:
        raise SystemExit(f"--seq-len {seq_len} leaves {text_len} prompt text tokens: increase it")
    n = 2 * group
    input_ids = torch.randint(0, vocab - 500, (n, seq_len), generator=gen)
    start = text_len // 2
    input_ids[:, start] = ids["vision_start_token_id"]
    input_ids[:, start + 1: start + 1 + num_image_tokens] = ids["image_token_id"]
    input_ids[:, start + 1 + num_image_tokens] = ids["vision_end_token_id"]
    score_ids = torch.arange(vocab - 480, vocab - 471)
    input_ids[:, -1] = score_ids[torch.randint(0, 9, (n,), generator=gen)]
    mm_token_type_ids = (input_ids == ids["image_token_id"]).long()
    side_images = torch.randn(2, grid * grid, 3 * TEMPORAL * PATCH * PATCH, generator=gen)
    pixel_values = side_images.repeat_interleave(group, dim=0).flatten(0, 1)  # sequence order: side 0 x G, side 1 x G
    image_grid_thw = torch.tensor([[1, grid, grid]] * n)
    inputs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), mm_token_type_ids=mm_token_type_ids,
                  pixel_values=pixel_values.to(dtype), image_grid_thw=image_grid_thw)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    rollout = dict(old_logp=-torch.rand(1, 2, group, response_len, generator=gen),
                   old_mu=1.0 + 4.0 * torch.rand(1, 2, group, generator=gen), labels=torch.tensor([[4.5, 2.0]]))
    return inputs, {k: v.to(device) for k, v in rollout.items()}, score_ids.to(device)


def response_logprobs(model, inputs, response_len: int, score_ids):
    """(log pi of each response token (2G, R), log q at the score position (2G, K)), teacher-forced."""
    import torch

    logits = model(**inputs, logits_to_keep=response_len + 1, use_cache=False).logits  # predicting the response
    targets = inputs["input_ids"][:, -response_len:]
    pred = logits[:, :response_len].float()
    logp = pred.gather(-1, targets[..., None]).squeeze(-1) - torch.logsumexp(pred, dim=-1)
    log_q = torch.log_softmax(pred[:, -1].index_select(-1, score_ids), dim=-1)
    return logp, log_q


def step(model, inputs, rollout, score_ids, group: int, response_len: int, sync) -> dict[str, float]:
    import torch

    from zray.losses.gdso import gdso_loss, gdso_rewards, side_advantages

    times = {}
    clock = time.perf_counter()
    with torch.no_grad():
        ref_logp, _ = response_logprobs(model, inputs, response_len, score_ids)
    sync()
    times["ref_forward_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    logp, log_q = response_logprobs(model, inputs, response_len, score_ids)
    shape = (1, 2, group)
    advantages = side_advantages(gdso_rewards(rollout["old_mu"], rollout["labels"]))
    mask = torch.ones(*shape, response_len, device=logp.device)
    loss, metrics = gdso_loss(logp_P2GT=logp.view(*shape, -1), old_logp_P2GT=rollout["old_logp"],
                              ref_logp_P2GT=ref_logp.view(*shape, -1), mask_P2GT=mask, advantages_P2G=advantages,
                              log_q_P2GK=log_q.view(*shape, -1), labels_P2=rollout["labels"], aggregation="mean")
    sync()
    times["forward_loss_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    loss.backward()
    sync()
    times["backward_s"] = time.perf_counter() - clock
    model.zero_grad(set_to_none=False)
    times["step_s"] = sum(times.values())
    times["loss"] = float(metrics["loss"])
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=750)
    parser.add_argument("--response-len", type=int, default=400)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    import torch

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --size tiny --device cpu for a smoke run")
    dtype = torch.bfloat16 if cuda else torch.float32
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    clock = time.perf_counter()
    model, ids, vocab = build_model(args.size, dtype, args.device)
    num_params = sum(p.numel() for p in model.parameters())
    inputs, rollout, score_ids = build_batch(args.size, ids, vocab, args.group, args.seq_len, args.response_len,
                                             dtype, args.device)
    print(f"{args.size}: {num_params / 1e6:,.1f} M parameters ({dtype}), built in {time.perf_counter() - clock:.0f} s;"
          f" 2 x G={args.group} sequences x {args.seq_len} tokens ({args.response_len} response); {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if cuda else ""))
    step(model, inputs, rollout, score_ids, args.group, args.response_len, sync)  # warm-up
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    runs = [step(model, inputs, rollout, score_ids, args.group, args.response_len, sync) for _ in range(args.steps)]
    median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    tokens = 2 * args.group * args.seq_len
    print("  ".join(f"{k} {v:.3f}" for k, v in median.items()))
    print(f"GDSO step (ref forward + forward + loss + backward): {median['step_s']:.3f} s, "
          f"{tokens / median['step_s']:,.0f} tokens/s"
          + (f", peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if cuda else ""))


if __name__ == "__main__":
    main()
