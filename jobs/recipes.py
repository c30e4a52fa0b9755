"""Named runs: each recipe is a function returning a validated `RunConfig`.

- `tiny_cpu`: what tests and the demo use; seconds on a 2-core CPU.
- `dev`: the sizes used to train and report results on a CPU machine (minutes).
- `full`: real checkpoints on a GPU cluster: a Qwen3-VL teacher and student and Z-Image-Turbo. Weights are
  loaded from the Hugging Face hub (or a local mirror given with `--set teacher.checkpoint=/path`), so this
  recipe builds its config anywhere but runs only where the weights can be reached.
"""

from __future__ import annotations

from collections.abc import Callable

from zray.config import (ConfigError, DistillGeneratorConfig, EvaluateConfig, GeneratorConfig, LearnerConfig,
                         PretrainGeneratorConfig, PretrainVLMConfig, RunConfig, TrainStudentConfig, TrainTeacherConfig,
                         TURBO_VARIANTS, RewardFinetuneConfig, TurboConfig, VLLMConfig, VLMConfig, WorldConfig)


def tiny_cpu() -> RunConfig:
    return RunConfig(
        name="tiny_cpu",
        size="tiny",
        out_dir="runs/tiny_cpu",
        world=WorldConfig(
            num_train_prompts=24, num_test_prompts=8, num_heldout_prompts=6, candidates_per_prompt=4,
            num_caption_images=64, num_caption_test_images=16, num_generator_images=64,
            num_generator_test_prompts=16,
        ),
        teacher=VLMConfig(hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=64,
                          intermediate_size=256, vision_hidden_size=64, vision_depth=2, vision_num_heads=2),
        student=VLMConfig(hidden_size=64, num_layers=2, num_heads=1, num_kv_heads=1, head_dim=64,
                          intermediate_size=128, vision_hidden_size=32, vision_depth=1, vision_num_heads=1),
        generator=GeneratorConfig(dim=64, num_layers=2, num_refiner_layers=1, num_heads=2,
                                  vae_block_channels=(16, 32, 32), text_hidden_size=64, text_num_layers=2),
        vllm=VLLMConfig(kv_cache_gib=1, enforce_eager=True, in_process=True, max_model_len=1024),
        # A few steps: the plumbing end to end (tests), not a trained model.
        pretrain_vlm=PretrainVLMConfig(
            learner=LearnerConfig(max_steps=4, micro_batch_size=8, lr=2e-3, checkpoint_every=2, keep_checkpoints=2,
                                  log_every=1, length_window=2),
            eval_every=2, num_eval_images=4, max_new_tokens=32,
            vision=LearnerConfig(max_steps=2, micro_batch_size=8, lr=2e-3, checkpoint_every=2, log_every=1),
            instruct_learner=LearnerConfig(max_steps=2, micro_batch_size=8, lr=2e-3, checkpoint_every=2, log_every=1),
            num_instruct_prompts=2, num_instruct_eval_prompts=1, instruct_max_new_tokens=8,
        ),
        # A few steps per phase: the plumbing end to end (tests), not a trained generator.
        pretrain_generator=PretrainGeneratorConfig(
            vae=LearnerConfig(max_steps=3, micro_batch_size=8, lr=2e-3, checkpoint_every=2, log_every=1),
            flow=LearnerConfig(max_steps=3, micro_batch_size=8, lr=2e-3, checkpoint_every=2, log_every=1),
            num_eval_prompts=4,
        ),
        # Two updates of 2 pairs x G=4 per side: the plumbing end to end (tests), not a trained teacher.
        train_teacher=TrainTeacherConfig(
            learner=LearnerConfig(max_steps=2, micro_batch_size=2, lr=1e-3, checkpoint_every=1, keep_checkpoints=2,
                                  log_every=1),
            group_size=4, max_reasoning_tokens=8, inner_steps=2,
        ),
        # Two prompts' candidates in every dimension (32 inputs), two updates: the plumbing, not a trained student.
        train_student=TrainStudentConfig(
            learner=LearnerConfig(max_steps=2, micro_batch_size=4, lr=1e-3, checkpoint_every=1, keep_checkpoints=2,
                                  log_every=1),
            num_distill_prompts=2, max_reasoning_tokens=8,
        ),
        # Two updates on 8 precomputed teacher samples: the plumbing end to end (tests), not a trained student.
        distill_generator=DistillGeneratorConfig(
            turbo=TurboConfig(lora_rank=2, disc_head_hidden=8),
            learner=LearnerConfig(max_steps=2, micro_batch_size=4, lr=1e-4, checkpoint_every=1, keep_checkpoints=2,
                                  log_every=1),
            num_teacher_samples=8, num_eval_prompts=4, bootstrap_samples=10,
        ),
        # Two updates, evaluated after each: the plumbing end to end (tests), not a fine-tuned generator.
        reward_finetune=RewardFinetuneConfig(
            learner=LearnerConfig(max_steps=2, micro_batch_size=2, lr=1e-3, checkpoint_every=1, keep_checkpoints=2,
                                  log_every=1),
            lora_rank=2, eval_every=1, num_eval_prompts=2,
        ),
        evaluate=EvaluateConfig(num_prompts=2, max_reasoning_tokens=8, num_plot_images=2),
    )


def dev() -> RunConfig:
    return RunConfig(
        name="dev",
        size="dev",
        out_dir="runs/dev",
        world=WorldConfig(
            num_train_prompts=400, num_test_prompts=100, num_heldout_prompts=60, candidates_per_prompt=6,
            num_caption_images=20000, num_caption_test_images=500, num_generator_images=20000,
            num_generator_test_prompts=200,
        ),
        # Qwen3-VL (as the full recipe): its vision tower's learned absolute position embeddings let the tiny
        # language model order objects left to right; Qwen2.5-VL's (rotary positions only) did not.
        teacher=VLMConfig(arch="qwen3_vl", hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=64,
                          intermediate_size=256, vision_hidden_size=64, vision_depth=2, vision_num_heads=2),
        # The student is compact in its language model only: with a 32-wide, 1-layer vision tower it was far
        # less accurate (exact 68.5% against 79% in 20 minutes; docs/experiments.md, pretrain-vlm).
        student=VLMConfig(arch="qwen3_vl", hidden_size=64, num_layers=2, num_heads=1, num_kv_heads=1, head_dim=64,
                          intermediate_size=128, vision_hidden_size=64, vision_depth=2, vision_num_heads=2),
        # VAE: 64x64 -> 16x16x16 latents (64 transformer tokens); GroupNorm with 4 groups (see GeneratorConfig).
        generator=GeneratorConfig(dim=128, num_layers=4, num_refiner_layers=1, num_heads=4,
                                  vae_block_channels=(16, 32, 64), vae_norm_groups=4, text_hidden_size=64,
                                  text_num_layers=2),
        vllm=VLLMConfig(kv_cache_gib=2, enforce_eager=True, in_process=True, max_model_len=1024),
        # Calibrated for 20 minutes of training per model on a 2-core CPU (docs/experiments.md, pretrain-vlm).
        pretrain_vlm=PretrainVLMConfig(
            # The budget ends captioning: budget_schedule moves the end of the cosine decay to where the budget is
            # expected to end (the step rate of this machine varies by a third from day to day); max_steps only
            # caps it. length_window: micro batches of similar caption length (less padding).
            learner=LearnerConfig(num_workers=2, max_steps=20000, micro_batch_size=8, lr=2e-3, warmup_steps=100,
                                  lr_schedule="cosine", checkpoint_every=1000, keep_checkpoints=25, log_every=50,
                                  length_window=8, budget_schedule=True),
            time_budget_s=1200.0, eval_every=1000, num_eval_images=200, max_new_tokens=128,
            vision=LearnerConfig(num_workers=2, max_steps=20000, micro_batch_size=16, lr=1e-3, checkpoint_every=1000,
                                 keep_checkpoints=2, log_every=100),
            vision_time_budget_s=200.0,
            # The instruction phase: 400 fresh prompts x 6 candidates x 4 dimensions (9,600 examples), 6 minutes.
            instruct_learner=LearnerConfig(num_workers=2, max_steps=5000, micro_batch_size=8, lr=1e-3, warmup_steps=20,
                                           lr_schedule="cosine", checkpoint_every=500, keep_checkpoints=2,
                                           log_every=50, length_window=8, budget_schedule=True),
            instruct_time_budget_s=360.0, num_instruct_prompts=400, num_instruct_eval_prompts=20,
            instruct_max_new_tokens=48,
        ),
        # Calibrated for about 38 minutes in all on a 2-core CPU (docs/experiments.md, pretrain-generator): 8 min of
        # VAE, 26 min of flow transformer, about 4 min of start-up, checkpoints and evaluation. One thread per
        # worker: two were faster only on an idle machine and several times slower beside other jobs. The step
        # caps are above what the budgets allow; the budgets end each phase (with a final checkpoint).
        pretrain_generator=PretrainGeneratorConfig(
            vae=LearnerConfig(cpus_per_worker=1, micro_batch_size=16, lr=2e-3, warmup_steps=50, max_steps=4000,
                              checkpoint_every=500, keep_checkpoints=2, log_every=25),
            flow=LearnerConfig(cpus_per_worker=1, micro_batch_size=32, lr=1e-3, warmup_steps=100, max_steps=8000,
                               checkpoint_every=1000, keep_checkpoints=2, log_every=50),
            vae_time_budget_s=480.0, flow_time_budget_s=1560.0, vae_object_weight=2.0, vae_kl_weight=1e-6,
            flow_ema_decay=0.999, num_eval_prompts=200,
        ),
        # Every method sees the same pairs (max_steps x micro_batch_size of the train split, same order); see
        # docs/experiments.md (train-teacher) for the calibration. The base model is the teacher of `zray pretrain-vlm`.
        train_teacher=TrainTeacherConfig(
            learner=LearnerConfig(max_steps=150, micro_batch_size=4, lr=2e-4, warmup_steps=5, checkpoint_every=25,
                                  keep_checkpoints=2, log_every=5),
            group_size=8, max_reasoning_tokens=48, inner_steps=10,
        ),
        # RISD / OPD: 400 fresh unlabelled prompts x 6 candidates x 4 dimensions (9,600 inputs; the teacher's
        # targets are collected once and reused); every method gets the same 600 updates of 16 examples (one pass
        # over the inputs), from the same student base. SFT: 9,600 examples of the labelled train pairs.
        train_student=TrainStudentConfig(
            learner=LearnerConfig(num_workers=2, max_steps=600, micro_batch_size=8, lr=5e-4, warmup_steps=20,
                                  lr_schedule="cosine", checkpoint_every=100, keep_checkpoints=2, log_every=10),
            num_distill_prompts=400, max_reasoning_tokens=48,
        ),
        # LoRA on the 8-step base generator (or --generator turbo), ReFL over the whole schedule; judged every 100
        # steps on 64 held-out prompts. Dev runs (docs/experiments.md §10): the RISD reward is hacked at this lr and
        # its alignment does not track the judge's on generated images; no setting has raised true alignment yet.
        reward_finetune=RewardFinetuneConfig(
            learner=LearnerConfig(cpus_per_worker=1, max_steps=600, micro_batch_size=8, lr=3e-4, warmup_steps=20,
                                  checkpoint_every=100, keep_checkpoints=2, log_every=10),
            lora_rank=16, eval_every=100, num_eval_prompts=64, gap_threshold=0.5,
        ),
        # Turbo++ from the dev base generator: 4,000 precomputed teacher samples (8 steps each, same noise as the
        # student), then 300 steps of batch 32 per variant (about 9 minutes each on one core; the same steps for every
        # variant, not the same time). lam_1 = 16 = 1 / (1 - sigma_2)^2 makes the step-1 regression of x_s2 as strong
        # as a regression of step 1's x0 estimate (x_s2 carries x0_1 at weight 1 - sigma_2 = 0.25). The adversarial
        # term alone at lr 1e-4 diverged (docs/experiments.md §8): the paired regression anchors it. lr 2e-4 (with
        # it): 89% of naive 2-step's Frechet gap closed against 70% at 2e-5 on the same base (§8, 7 Dec).
        distill_generator=DistillGeneratorConfig(
            turbo=TurboConfig(disc_lr=2e-4, lam_1=16.0, lam_adv=0.1, lam_reg=1.0),
            learner=LearnerConfig(cpus_per_worker=1, micro_batch_size=32, lr=2e-4, warmup_steps=20, max_steps=300,
                                  checkpoint_every=100, keep_checkpoints=2, log_every=25),
            num_teacher_samples=4000, num_eval_prompts=200,
            variants=TURBO_VARIANTS,
        ),
        evaluate=EvaluateConfig(num_prompts=50, max_reasoning_tokens=48, num_plot_images=4),
    )


def full() -> RunConfig:
    return RunConfig(
        name="full",
        size="full",
        out_dir="runs/full",
        world=WorldConfig(
            image_size=512, num_train_prompts=20000, num_test_prompts=2000, num_heldout_prompts=1000,
            candidates_per_prompt=8, num_caption_images=200000, num_caption_test_images=5000,
            num_generator_images=200000, num_generator_test_prompts=2000,
        ),
        # Z-Reward uses a large reasoning teacher and a compact student of the same family.
        teacher=VLMConfig(arch="qwen3_vl", checkpoint="Qwen/Qwen3-VL-32B-Instruct", hidden_size=5120,
                          num_layers=64, num_heads=64, num_kv_heads=8, head_dim=128, intermediate_size=25600,
                          vision_hidden_size=1152, vision_depth=27, vision_num_heads=16, vision_patch_size=16),
        student=VLMConfig(arch="qwen3_vl", checkpoint="Qwen/Qwen3-VL-8B-Instruct", hidden_size=4096,
                          num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128, intermediate_size=12288,
                          vision_hidden_size=1152, vision_depth=27, vision_num_heads=16, vision_patch_size=16),
        generator=GeneratorConfig(checkpoint="Tongyi-MAI/Z-Image-Turbo", dim=3840, num_layers=30,
                                  num_refiner_layers=2, num_heads=30, vae_block_channels=(128, 256, 512, 512),
                                  text_hidden_size=2560, text_num_layers=36),
        # Four engines of one GPU each (no tensor parallelism yet: the 32B teacher in bf16 needs an 80 GB card).
        # Placement: engines and learners on separate nodes. Engines run only on engine nodes (started with
        # `--resources='{"engine_node": 8}'`, one unit per GPU), packed (one set of 4, or the student stage's two
        # sets, on one node); learner workers only on learner nodes ({"learner_node": 8}, see _gpu_learner). The
        # node types of cluster/cluster.yaml and the worker groups of cluster/kuberay/ advertise them.
        vllm=VLLMConfig(kv_cache_gib=40, enforce_eager=False, in_process=False, max_model_len=8192,
                        gpu_memory_utilization=0.85, num_engines=4, gpus_per_engine=1.0,
                        resources={"engine_node": 1.0}, placement_strategy="PACK"),
        # Every learner: 8 GPU workers (one learner node); with the engines (on the engine node), the teacher
        # stage holds 12 GPUs and the student stage (teacher and student engine sets) 16: two nodes, as in
        # cluster/kuberay/rayjob-train-teacher.yaml / rayjob-train-student.yaml.
        pretrain_vlm=PretrainVLMConfig(learner=_gpu_learner(max_steps=20000, checkpoint_every=1000),
                                       vision=_gpu_learner(max_steps=2000, checkpoint_every=500),
                                       instruct_learner=_gpu_learner(max_steps=5000, checkpoint_every=500)),
        pretrain_generator=PretrainGeneratorConfig(vae=_gpu_learner(max_steps=4000, checkpoint_every=500),
                                                   flow=_gpu_learner(max_steps=8000, checkpoint_every=1000)),
        train_teacher=TrainTeacherConfig(learner=_gpu_learner(max_steps=3000, checkpoint_every=100)),
        train_student=TrainStudentConfig(learner=_gpu_learner(max_steps=3000, checkpoint_every=100)),
        distill_generator=DistillGeneratorConfig(learner=_gpu_learner(max_steps=3000, checkpoint_every=100)),
        reward_finetune=RewardFinetuneConfig(learner=_gpu_learner(max_steps=1000, checkpoint_every=100)),
    )


def _gpu_learner(**kwargs) -> LearnerConfig:
    """A learner of the `full` recipe: 8 GPU workers on the learner node (its custom resource `learner_node`),
    DeepSpeed ZeRO-2, bf16."""
    return LearnerConfig(num_workers=8, use_gpu=True, precision="bf16", resources={"learner_node": 1.0}, **kwargs)


RECIPES: dict[str, Callable[[], RunConfig]] = {"tiny_cpu": tiny_cpu, "dev": dev, "full": full}


def get_recipe(name: str) -> RunConfig:
    if name not in RECIPES:
        raise ConfigError(f"--recipe {name!r} is not allowed: expected one of {', '.join(RECIPES)}")
    return RECIPES[name]()
