"""Building, loading and saving networks (no training objectives: those are `zray.tasks`).

    tiny.py             local builders: the tiny tokenizer, tiny Qwen-VL teacher/student, tiny Z-Image
    vlm.py              Qwen-VL through transformers: load, save, score distributions, the scoring-file record
    teacher_forcing.py  the learner's view of a rollout: its inputs, and PolicyModel (log-probs of the sampled
                        tokens and q, with the LM head applied in chunks)
    vision_heads.py     vision heads on a VLM's image tokens, their targets and loss
    generator.py        the Z-Image pipeline through diffusers: sampling, prompt encoding, VAE helpers
    reward.py           DifferentiableReward: the student as a reward with gradients to the pixels
    turbo.py            TwoStepStudent: Turbo++'s step-decoupled generator (two copies, per-step LoRA, or shared)
    discriminator.py    the LADD-style discriminator: a frozen teacher transformer's block features, trainable heads
"""
