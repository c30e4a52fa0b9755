"""Frozen, keyword-only run configuration, validated on construction.

A run is one `RunConfig`; named runs are Python functions in `jobs/recipes.py`. Overrides from the CLI
(`--set world.seed=3`) go through `apply_overrides`, which type-checks each value against the dataclass
field and rejects unknown keys with the list of valid ones.

Import-light: standard library only.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

Size = Literal["tiny", "dev", "full"]

# vLLM's CPU attention backend accepts these head sizes (stack notes).
VLLM_CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256)


class ConfigError(ValueError):
    """A configuration value is not allowed. The message names the field, the value and what is allowed."""


def _require(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r} is not allowed: expected {allowed}")


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _require(isinstance(value, int) and not isinstance(value, bool) and value > 0,  # True is an int in Python
                 f"{type(obj).__name__}.{name}", value, "an integer > 0")


PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray's placement group strategies
# Resources with their own config fields (cpus_per_*, gpus_per_* / use_gpu) or their own Ray argument.
_NOT_CUSTOM = ("CPU", "GPU", "memory", "object_store_memory")


def _resources(obj: Any, name: str, instead: str) -> None:
    """Check a field of custom Ray resources ({name: amount}) and store a plain copy of it (the config stays
    independent of the dict it was given). Amounts follow Ray's rule: in (0, 1], or a whole number."""
    value = getattr(obj, name)
    where = f"{type(obj).__name__}.{name}"
    _require(isinstance(value, dict) and all(isinstance(k, str) for k in value), where, value,
             "a dict of custom Ray resource names to amounts, e.g. {'engine_node': 1}")
    for key, amount in value.items():
        _require(bool(key.strip()) and "," not in key and "=" not in key, where, value,
                 f"resource names without ',' or '=' (got {key!r})")
        _require(key not in _NOT_CUSTOM, where, value,
                 f"custom resources only: {key!r} is set by {instead}" if key in ("CPU", "GPU")
                 else f"custom resources only, not {key!r}")
        _require(isinstance(amount, (int, float)) and not isinstance(amount, bool) and amount > 0
                 and (amount <= 1 or float(amount).is_integer()), f"{where}[{key!r}]", amount,
                 "a number in (0, 1] or a whole number > 1 (Ray's rule for resource amounts)")
    object.__setattr__(obj, name, {k: float(v) for k, v in value.items()})


@dataclass(frozen=True, kw_only=True)
class WorldConfig:
    """The Shapes world (../shared/spec/shapes-world.md): sizes of every split and the annotator model."""

    seed: int = 0
    image_size: int = 64
    num_train_prompts: int = 40
    num_test_prompts: int = 12
    num_heldout_prompts: int = 8
    candidates_per_prompt: int = 4
    relation_prob: float = 0.3
    max_objects: int = 3
    train_label_noise: float = 0.2
    num_annotators: int = 5
    annotator_bias: float = 0.25
    annotator_noise: float = 0.35
    num_caption_images: int = 200
    num_caption_test_images: int = 50
    num_generator_images: int = 200
    num_generator_test_prompts: int = 50

    def __post_init__(self) -> None:
        _positive(self, "image_size", "num_train_prompts", "num_test_prompts", "num_heldout_prompts",
                  "candidates_per_prompt", "num_annotators", "num_caption_images", "num_caption_test_images",
                  "num_generator_images", "num_generator_test_prompts")
        _require(self.image_size % 16 == 0 and self.image_size >= 32, "WorldConfig.image_size", self.image_size,
                 "a multiple of 16, at least 32 (the generator's VAE needs multiples of 16)")
        _require(self.candidates_per_prompt >= 2, "WorldConfig.candidates_per_prompt", self.candidates_per_prompt,
                 "at least 2 (pairs are formed within a prompt)")
        _require(self.num_annotators >= 3, "WorldConfig.num_annotators", self.num_annotators,
                 "at least 3 (the highest and lowest are dropped)")
        _require(1 <= self.max_objects <= 3, "WorldConfig.max_objects", self.max_objects, "1, 2 or 3")
        _require(0.0 <= self.relation_prob <= 1.0, "WorldConfig.relation_prob", self.relation_prob, "in [0, 1]")
        for name in ("train_label_noise", "annotator_bias", "annotator_noise"):
            value = getattr(self, name)
            _require(0.0 <= value <= 2.0, f"WorldConfig.{name}", value, "in [0, 2]")


@dataclass(frozen=True, kw_only=True)
class VLMConfig:
    """A Qwen-VL model: either built tiny from this architecture, or loaded from `checkpoint`."""

    arch: Literal["qwen2_5_vl", "qwen3_vl"] = "qwen2_5_vl"
    checkpoint: str = ""  # Hugging Face id or local dir; empty = build tiny locally
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 1
    num_kv_heads: int = 1
    head_dim: int = 64
    intermediate_size: int = 128
    vision_hidden_size: int = 32
    vision_depth: int = 1
    vision_num_heads: int = 1
    vision_patch_size: int = 8
    spatial_merge_size: int = 2
    # The side (pixels) the processor resizes a square image to before cutting patches; 0 keeps the image's
    # own size. A multiple of vision_patch_size * spatial_merge_size (checked when the model is built).
    vision_input_size: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        _require(self.arch in ("qwen2_5_vl", "qwen3_vl"), "VLMConfig.arch", self.arch, "'qwen2_5_vl' or 'qwen3_vl'")
        _positive(self, "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
                  "vision_hidden_size", "vision_depth", "vision_num_heads", "vision_patch_size", "spatial_merge_size")
        _require(self.head_dim in VLLM_CPU_HEAD_DIMS, "VLMConfig.head_dim", self.head_dim,
                 f"one of {VLLM_CPU_HEAD_DIMS} (vLLM CPU attention)")
        _require(self.num_heads % self.num_kv_heads == 0, "VLMConfig.num_kv_heads", self.num_kv_heads,
                 f"a divisor of num_heads={self.num_heads}")
        _require(self.vision_hidden_size % self.vision_num_heads == 0, "VLMConfig.vision_num_heads",
                 self.vision_num_heads, f"a divisor of vision_hidden_size={self.vision_hidden_size}")
        _require(self.vision_input_size >= 0, "VLMConfig.vision_input_size", self.vision_input_size,
                 "0 (the image's own size) or a side in pixels")


@dataclass(frozen=True, kw_only=True)
class GeneratorConfig:
    """A Z-Image pipeline: either built tiny from these sizes, or loaded from `checkpoint`."""

    checkpoint: str = ""  # Hugging Face id or local dir; empty = build tiny locally
    dim: int = 64
    num_layers: int = 2
    num_refiner_layers: int = 1
    num_heads: int = 2
    vae_block_channels: tuple[int, ...] = (32, 64)  # n blocks downsample by 2^(n-1)
    vae_layers_per_block: int = 1
    # GroupNorm groups in the VAE. Keep several channels per group: with one channel per group GroupNorm is
    # InstanceNorm, which removes each channel's mean and with it the flat colours of the Shapes world.
    vae_norm_groups: int = 4
    vae_latent_channels: int = 16
    text_hidden_size: int = 64
    text_num_layers: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        _positive(self, "dim", "num_layers", "num_refiner_layers", "num_heads", "vae_layers_per_block",
                  "vae_latent_channels", "text_hidden_size", "text_num_layers")
        _require(self.dim % self.num_heads == 0 and (self.dim // self.num_heads) % 2 == 0, "GeneratorConfig.num_heads",
                 self.num_heads, f"a divisor of dim={self.dim} leaving an even head size")
        _require(len(self.vae_block_channels) >= 1 and all(c > 0 for c in self.vae_block_channels),
                 "GeneratorConfig.vae_block_channels", self.vae_block_channels, "a non-empty tuple of positive ints")
        _require(self.vae_norm_groups > 0 and all(c % self.vae_norm_groups == 0 for c in self.vae_block_channels),
                 "GeneratorConfig.vae_norm_groups", self.vae_norm_groups,
                 f"a positive divisor of every vae_block_channels entry {self.vae_block_channels}")
        _require(self.text_num_layers >= 2, "GeneratorConfig.text_num_layers", self.text_num_layers,
                 "at least 2 (the pipeline reads hidden_states[-2])")


@dataclass(frozen=True, kw_only=True)
class VLLMConfig:
    """How vLLM engines are started (CPU build here, CUDA build on clusters)."""

    kv_cache_gib: int = 1
    enforce_eager: bool = True
    in_process: bool = True  # VLLM_ENABLE_V1_MULTIPROCESSING=0: faster start, less memory
    max_model_len: int = 1024
    # Sequences one engine step decodes together (vLLM's scheduler cap). A GDSO rollout of P pairs x 2 sides x G
    # samples is one batch; above the cap it runs in waves, each paying the per-step overhead again.
    max_num_seqs: int = 512
    # KV-cache block size in tokens; 0 = vLLM's default (128 on CPU, 16 on CUDA; the CPU attention needs a
    # multiple of 32). Prefix caching reuses whole blocks only: the rollouts' score pass re-reads each sample's
    # prompt and reasoning, so smaller blocks let it reuse more of the KV its sampling call computed.
    block_size: int = 32
    gpu_memory_utilization: float = 0.5
    # Chunked prefill splits long prompt batches across steps. vLLM 0.32's CPU runner then rewinds the seeded
    # per-request generators with a CUDA-only call and the engine dies ("CPU Generator does not use offset"),
    # so seeded rollouts on CPU need it off; CUDA recipes may turn it on.
    chunked_prefill: bool = False
    # Rollout engines as Ray actors (actors/engine_pool.py): how many, and the Ray resources of each.
    num_engines: int = 1
    cpus_per_engine: float = 1.0
    gpus_per_engine: float = 0.0
    # Ray restarts a dead engine actor (on the base weights of its model dir) up to this many times in its life;
    # the EnginePool then restores the weights it last loaded and retries the lost chunk once. 0 = a dead engine
    # fails the call. 3: a restart costs an engine start plus one verified weight sync (seconds here, minutes for a
    # 7B engine on a GPU), so a few absorb the rare OOM kill, crash or preempted node of a long run, while an
    # engine that keeps dying (a deterministic crash) fails the job after 3 tries instead of looping forever.
    max_engine_restarts: int = 3
    # How a weight sync is verified (actors/teacher_engine/weight_sync.py, zray/checksum.py): 0 = every bit of
    # every tensor (on CPU engines the readback of repacked layers then costs 5-7x vLLM's own reload); k > 0 =
    # every row of each tensor on k columns drawn afresh each update (1-D tensors whole): a stale, missing, swapped,
    # shifted or wrongly fused tensor is still caught, one changed element with probability k / its width. At 4
    # the verification adds about a fifth to vLLM's reload on CPU (docs/experiments.md §2, bench/weight_sync.py).
    verify_columns: int = 4
    # Placement (actors/placement.py): one placement group per engine set, one bundle per engine holding its CPUs,
    # GPUs and these custom resources (e.g. {"engine_node": 1}: only nodes started with that resource take
    # engines; `--set vllm.resources=engine_node=1`). The strategy says how engines share nodes: STRICT_SPREAD one
    # engine per node, STRICT_PACK all on one node, PACK / SPREAD as Ray prefers (not guaranteed).
    resources: dict[str, float] = field(default_factory=dict)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # How long starting an engine set waits for its placement group (seconds). A group the cluster can never hold
    # fails at once; this bounds the wait for one that is busy, or for nodes an autoscaler still has to start.
    placement_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        _require(isinstance(self.max_engine_restarts, int) and not isinstance(self.max_engine_restarts, bool)
                 and self.max_engine_restarts >= 0, "VLLMConfig.max_engine_restarts", self.max_engine_restarts,
                 "an integer >= 0 (0: a dead engine is not restarted; Ray's -1, restart forever, is not allowed)")
        _positive(self, "kv_cache_gib", "max_model_len", "max_num_seqs", "num_engines")
        _require(isinstance(self.verify_columns, int) and not isinstance(self.verify_columns, bool)
                 and self.verify_columns >= 0, "VLLMConfig.verify_columns", self.verify_columns,
                 "an integer >= 0 (0: verify every bit; k: every row on k sampled columns)")
        _require(isinstance(self.block_size, int) and self.block_size >= 0 and self.block_size % 16 == 0,
                 "VLLMConfig.block_size", self.block_size, "0 (vLLM's default) or a multiple of 16")
        _require(0.0 < self.gpu_memory_utilization <= 1.0, "VLLMConfig.gpu_memory_utilization",
                 self.gpu_memory_utilization, "in (0, 1]")
        _require(isinstance(self.cpus_per_engine, (int, float)) and self.cpus_per_engine > 0,
                 "VLLMConfig.cpus_per_engine", self.cpus_per_engine, "a number > 0")
        _require(isinstance(self.gpus_per_engine, (int, float)) and self.gpus_per_engine >= 0,
                 "VLLMConfig.gpus_per_engine", self.gpus_per_engine, "a number >= 0")
        _resources(self, "resources", "cpus_per_engine / gpus_per_engine")
        _require(self.placement_strategy in PLACEMENT_STRATEGIES, "VLLMConfig.placement_strategy",
                 self.placement_strategy, "one of " + ", ".join(repr(s) for s in PLACEMENT_STRATEGIES))
        _require(isinstance(self.placement_timeout_s, (int, float)) and self.placement_timeout_s > 0,
                 "VLLMConfig.placement_timeout_s", self.placement_timeout_s, "seconds > 0")


@dataclass(frozen=True, kw_only=True)
class LearnerConfig:
    """A Ray Train learner: N workers, DeepSpeed ZeRO inside each (or plain DDP as a baseline)."""

    num_workers: int = 1
    cpus_per_worker: int = 1
    use_gpu: bool = False
    backend: Literal["deepspeed", "ddp"] = "deepspeed"
    zero_stage: int = 2
    # "auto": bf16 where the device runs it fast (CUDA with bf16), fp32 on CPU (measured faster there).
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "cosine"] = "constant"  # after warmup; cosine decays to min_lr_ratio * lr
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    micro_batch_size: int = 16
    grad_accum_steps: int = 1
    max_steps: int = 100
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    # Worker failures (a worker process that raises or dies: OOM kill, lost node, a segfault) that Ray Train recovers
    # from within one `fit`: it restarts the worker group, which continues from the run's latest registered checkpoint
    # with the exact state (weights, optimizer, data position, RNG). 2 rather than Ray's 0: a long run should survive
    # a stray death without losing its progress or a person's attention; bounded, so a failure that recurs (a bug)
    # still ends the fit after 3 attempts instead of looping. Node preemptions are counted apart (Ray: unlimited).
    # 0 = the first failure ends the fit (it can then be continued with fit(..., resume=True)).
    max_failures: int = 2
    log_every: int = 10
    seed: int = 0
    # A fresh seeded permutation of each worker's shard every epoch (False: dataset order every epoch).
    shuffle: bool = True
    # Length grouping: > 0 cuts each epoch's permutation into windows of this many micro batches and sorts each
    # window's rows by the task's `row_lengths` before slicing it into micro batches (less padding); every rank
    # takes the window's micro batches in the same seeded order, so the ranks of a step get similar lengths.
    # 0 = off. Needs a task with `row_lengths` (zray.training.task.LengthGrouped).
    length_window: int = 0
    # With a time budget (fit's time_budget_s): every log_every steps, move the end of the LR schedule to the step
    # the budget is expected to end at (the mean step rate so far, agreed by all ranks), capped by max_steps, so a
    # cosine decay ends with the budget on a machine of any speed. The LR per step then depends on the timing.
    budget_schedule: bool = False
    # Custom Ray resources each worker asks for besides its CPUs (and GPU with use_gpu), e.g. {"learner_node": 1}:
    # only nodes started with that resource take learner workers (`--set <stage>.learner.resources=learner_node=1`).
    # Ray Train packs the workers into its own placement group (PACK); `fit` checks the cluster can hold them first.
    resources: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _resources(self, "resources", "cpus_per_worker / use_gpu")
        _require(self.length_window >= 0, "LearnerConfig.length_window", self.length_window,
                 "an integer >= 0 (0 = off)")
        _require(isinstance(self.max_failures, int) and not isinstance(self.max_failures, bool)
                 and self.max_failures >= 0, "LearnerConfig.max_failures", self.max_failures,
                 "an integer >= 0 (worker failures recovered from within one fit; 0 = none)")
        _positive(self, "num_workers", "cpus_per_worker", "micro_batch_size", "grad_accum_steps", "max_steps",
                  "checkpoint_every", "keep_checkpoints", "log_every")
        _require(self.lr_schedule in ("constant", "cosine"), "LearnerConfig.lr_schedule", self.lr_schedule,
                 "'constant' or 'cosine'")
        _require(0 <= self.min_lr_ratio <= 1, "LearnerConfig.min_lr_ratio", self.min_lr_ratio, "a float in [0, 1]")
        _require(self.backend in ("deepspeed", "ddp"), "LearnerConfig.backend", self.backend, "'deepspeed' or 'ddp'")
        _require(self.zero_stage in (0, 1, 2, 3), "LearnerConfig.zero_stage", self.zero_stage, "0, 1, 2 or 3")
        _require(self.precision in ("auto", "fp32", "bf16"), "LearnerConfig.precision", self.precision,
                 "'auto', 'fp32' or 'bf16'")
        _require(self.lr > 0, "LearnerConfig.lr", self.lr, "a float > 0")
        _require(self.grad_clip >= 0, "LearnerConfig.grad_clip", self.grad_clip, "a float >= 0 (0 = off)")
        _require(self.warmup_steps >= 0, "LearnerConfig.warmup_steps", self.warmup_steps, "an integer >= 0")


@dataclass(frozen=True, kw_only=True)
class PretrainVLMConfig:
    """Base VLM pre-training on the captioning corpus (image -> scene description)."""

    learner: LearnerConfig = field(default_factory=lambda: LearnerConfig(max_steps=50, checkpoint_every=25))
    # The student's step cap (0 = learner.max_steps): a smaller model takes more steps in the same time budget,
    # and the cosine decay should end where its budget does.
    student_max_steps: int = 0
    time_budget_s: float = 0.0  # stop training after this many seconds (0 = no limit), then evaluate
    # Evaluate every kept checkpoint whose step is a multiple of this, after training (0 = only the final model).
    eval_every: int = 0
    num_eval_images: int = 16
    max_new_tokens: int = 128  # a canonical description of three objects is at most about 115 tokens
    # Target text (zray.data.captions): "canonical" (each object's position written out) or "compact" (without,
    # about a third fewer tokens). Canonical teaches the vertical relations: writing each object's y gives the
    # language model a dense position target, where compact captions have only the sparse above/below words.
    caption_style: Literal["canonical", "compact"] = "canonical"
    # Vision warm-up before captioning (zray/models/vision_heads.py): the vision tower learns the scene's
    # attributes first, as real VLMs start from a pre-trained vision encoder. Its time counts in time_budget_s.
    vision_warmup: bool = True
    vision: LearnerConfig = field(default_factory=lambda: LearnerConfig(max_steps=20, checkpoint_every=20,
                                                                        log_every=10, lr=2e-3))
    vision_time_budget_s: float = 0.0  # stop the warm-up after this many seconds (0 = only vision.max_steps)
    # Weight of the vision loss (scene attributes + object map, from the same image tokens) added to the caption
    # loss; 0 = captioning alone. map_weight: the object-map term's weight inside the vision loss, in both phases
    # (zray/models/vision_heads.py, VisionHeads.loss).
    vision_aux_weight: float = 1.0
    map_weight: float = 0.4
    # The cover term's weight inside the vision loss, in both phases (every token names the objects covering its
    # cell; VisionHeads.loss); 0 = no cover head.
    cover_weight: float = 0.0
    # Loss weight of the position digits of canonical captions ("at (36, 74)"), the other answer tokens weighing 1
    # (zray/tasks/caption.py, CaptionTask.position_weight); 1 = the plain mean over the answer tokens.
    position_weight: float = 1.0
    # Instruction phase after captioning (zray/tasks/instruct.py): the scoring conversation (a ground-truth
    # rationale, then the score prefix; never the score token) on `num_instruct_prompts` fresh prompts' candidates in
    # every dimension. Its model is the base of train-teacher and train-student (zray.training.runs.pretrained_vlm_dir)
    # for the roles in `instruct_roles`. Evaluated on `num_instruct_eval_prompts` other fresh prompts' candidates.
    instruct: bool = True
    instruct_roles: tuple[str, ...] = ("teacher", "student")
    instruct_learner: LearnerConfig = field(default_factory=lambda: LearnerConfig(max_steps=20, checkpoint_every=20,
                                                                                  log_every=10, lr=1e-3))
    instruct_time_budget_s: float = 0.0  # 0 = only instruct_learner.max_steps
    num_instruct_prompts: int = 50
    num_instruct_eval_prompts: int = 10
    instruct_max_new_tokens: int = 48  # the evaluation's answer budget (as train_teacher.max_reasoning_tokens)

    def __post_init__(self) -> None:
        _positive(self, "num_eval_images", "max_new_tokens")
        _require(self.time_budget_s >= 0, "PretrainVLMConfig.time_budget_s", self.time_budget_s, "a float >= 0")
        for name in ("eval_every", "student_max_steps"):
            _require(getattr(self, name) >= 0, f"PretrainVLMConfig.{name}", getattr(self, name), "an integer >= 0")
        for name in ("vision_time_budget_s", "vision_aux_weight", "map_weight", "cover_weight", "position_weight"):
            _require(getattr(self, name) >= 0, f"PretrainVLMConfig.{name}", getattr(self, name), "a float >= 0")
        _require(self.caption_style in ("canonical", "compact"), "PretrainVLMConfig.caption_style",
                 self.caption_style, "'canonical' or 'compact'")
        _positive(self, "num_instruct_prompts", "num_instruct_eval_prompts", "instruct_max_new_tokens")
        _require(self.instruct_time_budget_s >= 0, "PretrainVLMConfig.instruct_time_budget_s",
                 self.instruct_time_budget_s, "a float >= 0")
        _require(all(r in ("teacher", "student") for r in self.instruct_roles), "PretrainVLMConfig.instruct_roles",
                 self.instruct_roles, "a subset of ('teacher', 'student')")


@dataclass(frozen=True, kw_only=True)
class PretrainGeneratorConfig:
    """Base generator pre-training: the VAE (reconstruction), then the flow-matching transformer."""

    vae: LearnerConfig = field(default_factory=lambda: LearnerConfig(max_steps=50, checkpoint_every=25))
    flow: LearnerConfig = field(default_factory=lambda: LearnerConfig(max_steps=50, checkpoint_every=25))
    vae_time_budget_s: float = 0.0  # 0 = no limit
    flow_time_budget_s: float = 0.0
    # VAE loss: per-pixel (L1 + L2) weighted by 1 + vae_object_weight * chroma (objects over grey backgrounds),
    # plus vae_kl_weight * KL (zray/tasks/vae.py).
    vae_object_weight: float = 2.0
    vae_kl_weight: float = 1e-6
    # Each flow worker keeps the frozen encoders' outputs of its shard (only the first epoch encodes).
    flow_cache_encodings: bool = True
    # The exported transformer is an exponential moving average of the trained one (0 = the raw weights).
    flow_ema_decay: float = 0.999
    num_eval_prompts: int = 16
    sample_steps: int = 8
    shift: float = 3.0  # training sigmas and both samplers; also written into the saved scheduler

    def __post_init__(self) -> None:
        _positive(self, "num_eval_prompts", "sample_steps")
        for name in ("vae_time_budget_s", "flow_time_budget_s", "vae_object_weight", "vae_kl_weight"):
            _require(getattr(self, name) >= 0, f"PretrainGeneratorConfig.{name}", getattr(self, name), "a float >= 0")
        _require(self.shift > 0, "PretrainGeneratorConfig.shift", self.shift, "a float > 0")
        _require(0.0 <= self.flow_ema_decay < 1.0, "PretrainGeneratorConfig.flow_ema_decay", self.flow_ema_decay,
                 "a float in [0, 1)")


@dataclass(frozen=True, kw_only=True)
class TurboConfig:
    """Turbo++: the two-step student distilled from the 8-step teacher (methods.md §6).

    Every [chosen] design item of the spec is a knob here, with the spec's default. The student samples
    `1 -> sigma_2 -> 0` (`zray.sampling.two_step_sample`); its step-1 regression target is the teacher's state
    after `teacher_mid_steps` of its `teacher_steps` Euler steps (shift `teacher_shift`), which must sit at
    sigma_2 (checked), so that no interpolation is needed. Losses: `zray.losses.turbo`; networks:
    `zray.models.turbo.TwoStepStudent`, `zray.models.discriminator.LADDDiscriminator`.
    """

    # sampler
    sigma_2: float = 0.75
    teacher_steps: int = 8
    teacher_shift: float = 3.0
    teacher_mid_steps: int = 4
    renoise: Literal["same", "fresh"] = "same"  # x_s2 re-noised with step 1's eps (spec) or fresh noise
    # step-decoupled parameterisation and end-to-end training
    decoupling: Literal["copies", "lora", "shared"] = "copies"  # "shared": one parameter set, the ablation
    lora_rank: int = 16
    lora_alpha: float = 0.0  # 0 = lora_rank
    detach_steps: bool = False  # True: the "no end-to-end" baseline (step 1 only learns from its own loss)
    # generator loss: lam_adv L_adv(x0_2) + lam_1 L_1 + lam_reg ||x0_2 - teacher x0||^2
    step1_loss: Literal["regression", "adversarial", "none"] = "regression"
    lam_adv: float = 1.0
    lam_1: float = 1.0
    lam_1_decay_steps: int = 0  # lam_1 decays linearly to 0 over this many generator steps; 0 = constant
    lam_reg: float = 0.0
    # discriminator (LADD-style: frozen teacher transformer, heads on the image tokens of some blocks)
    real_data: Literal["teacher", "renders"] = "teacher"  # "real" = 8-step teacher outputs (spec) or world renders
    disc_blocks: tuple[int, ...] = (0, -1)  # indices into transformer.layers, negative from the end
    disc_tau_range: tuple[float, ...] = (0.1, 0.9)  # (lo, hi): re-noising sigma ~ U(lo, hi)
    disc_head: Literal["conv", "linear"] = "conv"
    disc_head_hidden: int = 64
    disc_lr: float = 1e-4
    disc_steps_per_gen_step: int = 1  # alternating updates: discriminator steps per generator step

    @property
    def teacher_mid_sigma(self) -> float:
        """The teacher's sigma after `teacher_mid_steps` of its `teacher_steps` (zray.sampling.flow_sigmas)."""
        base = 1.0 - self.teacher_mid_steps / self.teacher_steps
        return self.teacher_shift * base / (1.0 + (self.teacher_shift - 1.0) * base)

    @property
    def sigma_2_is_teacher_state(self) -> bool:
        """Whether the student's intermediate sigma is the teacher's after `teacher_mid_steps` (to 1e-4): required by
        the step-1 regression, and what makes the two trajectories comparable there."""
        return abs(self.teacher_mid_sigma - self.sigma_2) < 1e-4

    def __post_init__(self) -> None:
        _positive(self, "teacher_steps", "teacher_mid_steps", "lora_rank", "disc_head_hidden",
                  "disc_steps_per_gen_step")
        _require(0.0 < self.sigma_2 < 1.0, "TurboConfig.sigma_2", self.sigma_2, "a float in (0, 1)")
        _require(self.teacher_shift > 0, "TurboConfig.teacher_shift", self.teacher_shift, "a float > 0")
        _require(self.teacher_mid_steps < self.teacher_steps, "TurboConfig.teacher_mid_steps",
                 self.teacher_mid_steps, f"an integer in [1, teacher_steps={self.teacher_steps})")
        if self.step1_loss == "regression":
            _require(self.sigma_2_is_teacher_state, "TurboConfig.sigma_2", self.sigma_2,
                     f"{self.teacher_mid_sigma:.4f}, the teacher's sigma after teacher_mid_steps="
                     f"{self.teacher_mid_steps} of teacher_steps={self.teacher_steps} at shift {self.teacher_shift} "
                     "(the step-1 regression target), or change those")
        choices = {"renoise": ("same", "fresh"), "decoupling": ("copies", "lora", "shared"),
                   "step1_loss": ("regression", "adversarial", "none"), "real_data": ("teacher", "renders"),
                   "disc_head": ("conv", "linear")}
        for name, allowed in choices.items():
            _require(getattr(self, name) in allowed, f"TurboConfig.{name}", getattr(self, name), f"one of {allowed}")
        for name in ("lam_adv", "lam_1", "lam_reg", "lora_alpha"):
            _require(getattr(self, name) >= 0, f"TurboConfig.{name}", getattr(self, name), "a float >= 0")
        _require(self.lam_1_decay_steps >= 0, "TurboConfig.lam_1_decay_steps", self.lam_1_decay_steps,
                 "an integer >= 0 (0 = no decay)")
        _require(self.disc_lr > 0, "TurboConfig.disc_lr", self.disc_lr, "a float > 0")
        _require(len(self.disc_blocks) >= 1 and len(set(self.disc_blocks)) == len(self.disc_blocks),
                 "TurboConfig.disc_blocks", self.disc_blocks, "a non-empty tuple of distinct block indices")
        _require(len(self.disc_tau_range) == 2 and 0.0 <= self.disc_tau_range[0] <= self.disc_tau_range[1] <= 1.0,
                 "TurboConfig.disc_tau_range", self.disc_tau_range, "(lo, hi) with 0 <= lo <= hi <= 1")


TeacherSamples = Literal["online", "latents", "images"]
TURBO_BASELINE = "turbo"  # the recipe as given: the variant every ablation is compared with
TURBO_VARIANTS: tuple[str, ...] = (TURBO_BASELINE, "shared", "detached", "renders", "no_step1")


@dataclass(frozen=True, kw_only=True)
class DistillGeneratorConfig:
    """`zray distill-generator`: Turbo++ (methods.md §6) from the base generator of `pretrain-generator`.

    `teacher_samples`: "online" samples the 8-step teacher inside each learner step (fresh noise every step);
    "latents" precomputes `num_teacher_samples` teacher samples (noise seed, latent after `turbo.teacher_mid_steps`
    steps, final latent, decoded image) into Parquet once, and the discriminator's real data are the stored final
    latents; "images" uses the same Parquet but the real data are the stored images encoded by the VAE. Variants
    (`variants`, run in order, each a named change of `turbo`): "turbo" (the recipe as given), "shared" (one
    parameter set for both steps), "detached" (no end-to-end gradient), "renders" (world renders as real data),
    "no_step1" (no step-1 loss).
    """

    turbo: TurboConfig = field(default_factory=TurboConfig)
    learner: LearnerConfig = field(default_factory=lambda: LearnerConfig(max_steps=4, micro_batch_size=4,
                                                                         checkpoint_every=2, lr=1e-4))
    time_budget_s: float = 0.0  # per variant; 0 = no limit
    teacher_dir: str = ""  # a ZImagePipeline folder (the 8-step teacher); empty = this run's pretrain-generator
    teacher_samples: TeacherSamples = "latents"
    num_teacher_samples: int = 64  # precomputed teacher samples ("latents" / "images"), from generator_train prompts
    variants: tuple[str, ...] = ("turbo",)
    num_eval_prompts: int = 16  # held-out prompts (generator_test) judged for every variant
    disc_grad_clip: float = 1.0  # the discriminator heads' gradient-norm clip (0 = off)
    # Paired bootstrap samples over the held-out prompts for the Frechet intervals of results.md (gap closed, and
    # each variant minus Turbo++); 0 = none.
    bootstrap_samples: int = 200
    # Training runs of each variant, with learner seeds learner.seed, + 1, ... (data order, discriminator heads,
    # re-noising); the first in <variant>/, the k-th in <variant>_seed<k>/. With several, results.md adds each
    # variant's mean over seeds and its difference from Turbo++ seed by seed (the spread between training runs).
    seeds: int = 1

    def __post_init__(self) -> None:
        _positive(self, "num_teacher_samples", "num_eval_prompts", "seeds")
        _require(self.bootstrap_samples >= 0, "DistillGeneratorConfig.bootstrap_samples", self.bootstrap_samples,
                 "an integer >= 0 (0 = no intervals)")
        _require(self.time_budget_s >= 0, "DistillGeneratorConfig.time_budget_s", self.time_budget_s, "a float >= 0")
        _require(self.disc_grad_clip >= 0, "DistillGeneratorConfig.disc_grad_clip", self.disc_grad_clip,
                 "a float >= 0 (0 = off)")
        _require(self.teacher_samples in ("online", "latents", "images"), "DistillGeneratorConfig.teacher_samples",
                 self.teacher_samples, "'online', 'latents' or 'images'")
        _require(bool(self.variants) and all(v in TURBO_VARIANTS for v in self.variants)
                 and len(set(self.variants)) == len(self.variants), "DistillGeneratorConfig.variants", self.variants,
                 f"a non-empty subset of {TURBO_VARIANTS}, no repeats")


def turbo_variant(turbo: TurboConfig, variant: str) -> TurboConfig:
    """`turbo` changed as the variant names (DistillGeneratorConfig's docstring): the ablations of issue 17."""
    changes: dict[str, dict[str, Any]] = {TURBO_BASELINE: {}, "shared": {"decoupling": "shared"},
                                          "detached": {"detach_steps": True}, "renders": {"real_data": "renders"},
                                          "no_step1": {"step1_loss": "none"}}
    if variant not in changes:
        raise ValueError(f"variant={variant!r} is not allowed: expected one of {TURBO_VARIANTS}")
    return dataclasses.replace(turbo, **changes[variant])


TeacherMethod = Literal["gdso", "grpo", "sft", "zero_shot"]
TEACHER_METHODS: tuple[str, ...] = ("gdso", "grpo", "sft", "zero_shot")


@dataclass(frozen=True, kw_only=True)
class TrainTeacherConfig:
    """Z-Reward teacher training (methods.md §2): GDSO and its baselines, from the base VLM.

    One learner step = one inner step for SFT; for GDSO / GRPO one inner step is a rollout of `group_size`
    outputs per side of `learner.micro_batch_size` pairs per worker, then `updates_per_rollout` (K) updates, so
    `learner.max_steps` counts updates. `inner_steps` (M) rollouts make an outer iteration (pi_ref reset).
    """

    method: TeacherMethod = "gdso"
    learner: LearnerConfig = field(default_factory=lambda: LearnerConfig(max_steps=8, micro_batch_size=2,
                                                                         checkpoint_every=4, lr=1e-4))
    time_budget_s: float = 0.0  # 0 = no limit
    base_model: str = ""  # HF dir of the base VLM; empty = the pre-trained teacher of this run (pretrain-vlm)
    group_size: int = 8  # G
    max_reasoning_tokens: int = 48
    temperature: float = 1.0
    inner_steps: int = 4  # M rollouts per outer iteration (pi_ref <- pi_theta at its start)
    updates_per_rollout: int = 1  # K
    beta: float = 0.01
    lam_pt: float = 1.0
    lam_pw: float = 1.0
    alpha_pt: float = 0.5  # GDSO direct terms; GRPO uses 0, 0 and lam_pw = 0 whatever is set here
    alpha_pw: float = 0.5
    clip_eps: float = 0.2
    aggregation: Literal["sum", "mean"] = "sum"
    format_penalty: float = 0.5  # subtracted from the reward of a malformed output (no score prefix written)
    # SFT only, a diagnostic: q read after each candidate's true rationale in context (the Shapes world's splits)
    sft_rationales: bool = False
    # runs of each RL method (GRPO, GDSO), with seeds seed, seed + 1, ... (rollout sampling and data order); the
    # results table gives their mean and standard error
    seeds: int = 1
    # the pairs trained on; empty = every dimension of the rubric (the four built-in ones, or data.dir's rubric)
    dimensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _require(self.method in TEACHER_METHODS, "TrainTeacherConfig.method", self.method,
                 f"one of {', '.join(TEACHER_METHODS)}")
        _positive(self, "group_size", "max_reasoning_tokens", "inner_steps", "updates_per_rollout", "seeds")
        _require(self.group_size >= 2, "TrainTeacherConfig.group_size", self.group_size,
                 "an integer >= 2 (advantages are normalised within a group)")
        _require(self.temperature > 0, "TrainTeacherConfig.temperature", self.temperature, "a float > 0")
        for name in ("time_budget_s", "beta", "lam_pt", "lam_pw", "alpha_pt", "alpha_pw", "clip_eps",
                     "format_penalty"):
            _require(getattr(self, name) >= 0, f"TrainTeacherConfig.{name}", getattr(self, name), "a float >= 0")
        _require(self.aggregation in ("sum", "mean"), "TrainTeacherConfig.aggregation", self.aggregation,
                 "'sum' or 'mean'")
        _require(len(set(self.dimensions)) == len(self.dimensions), "TrainTeacherConfig.dimensions",
                 self.dimensions, "distinct rubric dimensions (empty = all of them)")  # which ones: RunConfig
        _require(self.learner.checkpoint_every % self.updates_per_rollout == 0,
                 "TrainTeacherConfig.learner.checkpoint_every", self.learner.checkpoint_every,
                 f"a multiple of updates_per_rollout={self.updates_per_rollout} (checkpoints between rollouts)")


StudentMethod = Literal["risd", "opd", "sft"]
STUDENT_METHODS: tuple[str, ...] = ("risd", "opd", "sft")


@dataclass(frozen=True, kw_only=True)
class TrainStudentConfig:
    """Z-Reward student training (methods.md §3): RISD from a frozen teacher, and its baselines OPD and SFT.

    RISD and OPD need no labels: their inputs are `num_distill_prompts` fresh prompts of the world (disjoint from
    every labelled split's prompts), each with `world.candidates_per_prompt` candidate images, in every dimension
    of `dimensions`. The teacher samples `teacher_samples` (n) reasoning traces per input through the engines and
    returns q_T after each; RISD fits the student's one-token q_S to them. OPD: the student (served by its own
    engines, weights synced before every rollout) samples `opd_samples` reasoning + score outputs per input, and the
    teacher engines score the same tokens. SFT trains on the labelled train pairs. With `data.dir` set, the inputs,
    the pairs and the rubric are the import's (`zray.data.imported.imported_distill_inputs`; num_distill_prompts
    is then not used: every input of the import is).
    """

    method: StudentMethod = "risd"
    learner: LearnerConfig = field(default_factory=lambda: LearnerConfig(max_steps=8, micro_batch_size=8,
                                                                         checkpoint_every=4, lr=1e-4))
    time_budget_s: float = 0.0  # 0 = no limit
    base_model: str = ""  # HF dir of the student's base VLM; empty = the pre-trained student of this run
    teacher_model: str = ""  # HF dir of the frozen teacher; empty = this run's GDSO teacher (train-teacher)
    num_distill_prompts: int = 16
    teacher_samples: int = 1  # n: reasoning samples per input, q_T averaged over them (paper: 1)
    max_reasoning_tokens: int = 48
    temperature: float = 1.0  # sampling temperature of the reasoning (the teacher's for RISD, the student's for OPD)
    opd_samples: int = 1  # OPD: student samples per input per rollout
    # the dimensions distilled and trained on; empty = every dimension of the rubric (built-in, or data.dir's)
    dimensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _require(self.method in STUDENT_METHODS, "TrainStudentConfig.method", self.method,
                 f"one of {', '.join(STUDENT_METHODS)}")
        _positive(self, "num_distill_prompts", "teacher_samples", "max_reasoning_tokens", "opd_samples")
        _require(self.temperature > 0, "TrainStudentConfig.temperature", self.temperature, "a float > 0")
        _require(self.time_budget_s >= 0, "TrainStudentConfig.time_budget_s", self.time_budget_s, "a float >= 0")
        _require(len(set(self.dimensions)) == len(self.dimensions), "TrainStudentConfig.dimensions",
                 self.dimensions, "distinct rubric dimensions (empty = all of them)")  # which ones: RunConfig


@dataclass(frozen=True, kw_only=True)
class RewardFinetuneConfig:
    """`zray reward-finetune`: reward-gradient fine-tuning of a generator with the frozen differentiable student
    reward (methods.md §5; `zray/tasks/reward_grad.py`).

    Each update takes gradient through one sampler step k ~ U{k_min .. k_max} over the whole schedule and jumps to
    x0_hat (ReFL, extended), or through the last `draft_k` steps (DRaFT-K, when > 0). The job trains in segments of
    `eval_every` steps and after each one judges held-out prompts: the student's reward beside the judge's true
    alignment; when the gap (student alignment minus judge alignment, relative to the first evaluation) exceeds
    `gap_threshold`, or the judge's verdicts fall by more than `decline_threshold` of the prompts (net GSB against
    the first evaluation, or its main-colour rate), it stops (`on_gap="stop"`) or warns. With `data.dir` (a prompts
    import) the judge cannot score the prompts: no watch, and `on_gap` must be "warn" (the job says so). A segment
    is one `fit` whose `max_steps` is the segment's end, so the LR schedule must be "constant" (a cosine would decay
    within every segment).
    """

    learner: LearnerConfig = field(default_factory=lambda: LearnerConfig(max_steps=4, micro_batch_size=2,
                                                                         checkpoint_every=2, lr=1e-4))
    generator_dir: str = ""  # base: a ZImagePipeline folder; turbo: a TwoStepStudent folder; empty = this run's
    pipeline_dir: str = ""  # VAE, text encoder, tokenizer (turbo); empty = this run's pretrain-generator pipeline
    reward_dir: str = ""  # the student reward (one-token form); empty = this run's train-student risd/final
    finetune: Literal["lora", "full"] = "lora"
    lora_rank: int = 8
    lora_alpha: float = 0.0  # 0 = lora_rank
    gradient_checkpointing: bool = False
    base_steps: int = 8  # the base generator's sampler: N Euler steps along flow_sigmas(N, shift)
    shift: float = 3.0
    sigma_2: float = 0.75  # the Turbo++ student's middle sigma (TurboConfig.sigma_2 of its distillation)
    k_min: int = 1  # ReFL: the step with gradient is drawn uniformly from k_min .. k_max (1-based)
    k_max: int = 0  # 0 = the sampler's last step (8 for the base, 2 for the student)
    draft_k: int = 0  # > 0: DRaFT-K, gradient through the last K steps instead (k_min / k_max unused)
    # the dimensions of R: a subset of the reward's rubric (its zray_rubric.json, else the built-in four); empty = all
    dimensions: tuple[str, ...] = ("alignment", "realism", "aesthetics", "plausibility")
    weights: tuple[float, ...] = ()  # R = sum_d w_d mu_d; empty = equal weights 1 / D
    fm_weight: float = 0.0  # the flow-matching regulariser on world renders; 0 = off (refused with data.dir)
    eval_every: int = 2
    num_eval_prompts: int = 16  # held-out prompts (generator_test), the same noise at every evaluation
    gap_threshold: float = 0.5  # on the 1..5 scale
    # the judge's own decline (zray.evaluation.reward_hacking.decline): a share of the held-out prompts; 0 = off
    decline_threshold: float = 0.25
    on_gap: Literal["stop", "warn"] = "stop"  # on either alarm: the gap or the decline past its threshold

    def __post_init__(self) -> None:
        _positive(self, "lora_rank", "base_steps", "k_min", "eval_every", "num_eval_prompts")
        _require(self.finetune in ("lora", "full"), "RewardFinetuneConfig.finetune", self.finetune, "'lora' or 'full'")
        _require(self.on_gap in ("stop", "warn"), "RewardFinetuneConfig.on_gap", self.on_gap, "'stop' or 'warn'")
        _require(self.gap_threshold > 0, "RewardFinetuneConfig.gap_threshold", self.gap_threshold, "a float > 0")
        _require(0 <= self.decline_threshold <= 1, "RewardFinetuneConfig.decline_threshold", self.decline_threshold,
                 "a float in [0, 1] (a share of the prompts; 0 = off)")
        _require(self.lora_alpha >= 0, "RewardFinetuneConfig.lora_alpha", self.lora_alpha, "a float >= 0 (0 = rank)")
        _require(self.shift > 0, "RewardFinetuneConfig.shift", self.shift, "a float > 0")
        _require(0.0 < self.sigma_2 < 1.0, "RewardFinetuneConfig.sigma_2", self.sigma_2, "a float in (0, 1)")
        _require(self.k_max == 0 or self.k_min <= self.k_max <= self.base_steps, "RewardFinetuneConfig.k_max",
                 self.k_max, f"0 (the last step) or an integer in [k_min={self.k_min}, base_steps={self.base_steps}]")
        _require(self.k_min <= self.base_steps, "RewardFinetuneConfig.k_min", self.k_min,
                 f"an integer in [1, base_steps={self.base_steps}]")
        _require(0 <= self.draft_k <= self.base_steps, "RewardFinetuneConfig.draft_k", self.draft_k,
                 f"an integer in [0, base_steps={self.base_steps}] (0 = ReFL)")
        # which dimensions: the reward's rubric (zray_rubric.json), checked where the reward is read
        # (zray.tasks.reward_grad); 'alignment' among them for the judge's watch (zray.evaluation.reward_hacking)
        _require(len(set(self.dimensions)) == len(self.dimensions), "RewardFinetuneConfig.dimensions",
                 self.dimensions, "distinct rubric dimensions (empty = all of the reward's rubric)")
        _require((not self.dimensions or len(self.weights) in (0, len(self.dimensions)))
                 and all(-float("inf") < w < float("inf") for w in self.weights),
                 "RewardFinetuneConfig.weights", self.weights,
                 f"{len(self.dimensions) or 'D'} finite floats, one per dimension of "
                 f"{self.dimensions or 'the reward rubric'}, or none (equal)")
        _require(self.fm_weight >= 0, "RewardFinetuneConfig.fm_weight", self.fm_weight, "a float >= 0 (0 = off)")
        _require(self.gap_threshold > 0, "RewardFinetuneConfig.gap_threshold", self.gap_threshold, "a float > 0")
        _require(self.learner.lr_schedule == "constant", "RewardFinetuneConfig.learner.lr_schedule",
                 self.learner.lr_schedule, "'constant' (the job trains in segments of eval_every steps, each a fit "
                 "ending at its own max_steps)")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where every stage reads its data (docs/data-formats.md, "What each stage needs").

    `dir` empty: the Shapes world of the run (`world.*`, its own train / heldout / test splits). Else a
    `zray data import` folder (train-teacher, evaluate: `--kind rated`; train-student: rated or scoring;
    distill-generator, reward-finetune: prompts): its rubric (manifest) gives the dimensions and anchors, and its prompts
    are split by a hash of `prompt_id` (`zray.data.imported.split_of`): test if u < test_frac, heldout if
    u < test_frac + heldout_frac, else train, with u = the first 8 bytes of sha256(prompt_id) / 2**64. The split
    depends on nothing but the id, so it is the same on every machine and run, and adding prompts moves none.
    """

    dir: str = ""  # an import folder (rated images + derived pairs); empty = the Shapes world of the run
    test_frac: float = 0.2
    heldout_frac: float = 0.1

    def __post_init__(self) -> None:
        _require(isinstance(self.test_frac, (int, float)) and 0 < self.test_frac < 1, "DataConfig.test_frac",
                 self.test_frac, "a float in (0, 1)")
        _require(isinstance(self.heldout_frac, (int, float)) and 0 <= self.heldout_frac < 1,
                 "DataConfig.heldout_frac", self.heldout_frac, "a float in [0, 1)")
        _require(self.test_frac + self.heldout_frac < 1, "DataConfig.heldout_frac", self.heldout_frac,
                 f"a float < 1 - test_frac = {1 - self.test_frac:g} (the rest is the train split)")


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig:
    """Reward-model evaluation on the Shapes test candidates (methods.md §4): HPA, Margin HPA, PLCC, SRCC."""

    split: Literal["test", "heldout"] = "test"
    num_prompts: int = 0  # 0 = every prompt of the split
    max_reasoning_tokens: int = 48  # greedy reasoning before the score prefix (reasoning form)
    num_plot_images: int = 4  # predicted distributions drawn in the PNG
    # reasoning form: "model" = the model's own greedy reasoning; "truth" = each candidate's ground-truth rationale
    # (the Shapes world's; a diagnostic of the score given right reasoning)
    reasoning: Literal["model", "truth"] = "model"

    def __post_init__(self) -> None:
        _require(self.split in ("test", "heldout"), "EvaluateConfig.split", self.split, "'test' or 'heldout'")
        _require(self.reasoning in ("model", "truth"), "EvaluateConfig.reasoning", self.reasoning,
                 "'model' or 'truth'")
        _require(self.num_prompts >= 0, "EvaluateConfig.num_prompts", self.num_prompts, "an integer >= 0 (0 = all)")
        _positive(self, "max_reasoning_tokens", "num_plot_images")


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """The reward service (`zray serve`, actors/reward_app/): the student behind Ray Serve, its limits and auth."""

    model: str = ""  # student checkpoint (HF dir); empty = this run's <out_dir>/train_student/risd/final
    app_name: str = "reward"
    host: str = "127.0.0.1"  # Serve's HTTP proxy (http_options); 0.0.0.0 to listen on every interface
    port: int = 8000
    num_replicas: int = 1  # scorer replicas, one model each
    cpus_per_replica: float = 1.0
    # Ray resources of each scorer replica beyond its CPUs: GPUs (reserved for it; the scorer itself runs the model
    # on CPU today), and custom resources, e.g. {"serve_node": 1}, that pick the nodes replicas may run on.
    gpus_per_replica: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    max_ongoing_requests: int = 32  # per replica (Serve queues or refuses beyond it)
    max_batch_size: int = 8  # items (prompt + image, 1-4 dimension rows each) per forward pass
    batch_wait_timeout_s: float = 0.01
    max_body_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    min_image_side: int = 16
    max_prompt_chars: int = 2000
    max_batch_items: int = 32  # items per POST /v1/score/batch
    auth_token_env: str = ""  # name of the environment variable holding the bearer token; empty = no auth
    request_timeout_s: float = 60.0  # the ingress's wait for the scorer (504 after it)
    # How often Serve checks a scorer replica (Serve's default is 10 s): a dead replica is replaced after about this.
    health_check_period_s: float = 2.0

    def __post_init__(self) -> None:
        _positive(self, "port", "num_replicas", "max_ongoing_requests", "max_batch_size", "max_body_bytes",
                  "max_image_pixels", "min_image_side", "max_prompt_chars", "max_batch_items")
        _require(self.port <= 65535, "ServeConfig.port", self.port, "an integer in [1, 65535]")
        _require(bool(self.host), "ServeConfig.host", self.host, "a host name or address, e.g. 127.0.0.1")
        _require(bool(self.app_name), "ServeConfig.app_name", self.app_name, "a non-empty name")
        _require(isinstance(self.cpus_per_replica, (int, float)) and self.cpus_per_replica > 0,
                 "ServeConfig.cpus_per_replica", self.cpus_per_replica, "a number > 0")
        _require(isinstance(self.gpus_per_replica, (int, float)) and not isinstance(self.gpus_per_replica, bool)
                 and self.gpus_per_replica >= 0, "ServeConfig.gpus_per_replica", self.gpus_per_replica,
                 "a number >= 0")
        _resources(self, "resources", "cpus_per_replica / gpus_per_replica")
        _require(0.0 <= self.batch_wait_timeout_s <= 10.0, "ServeConfig.batch_wait_timeout_s",
                 self.batch_wait_timeout_s, "seconds in [0, 10]")
        _require(self.request_timeout_s > 0, "ServeConfig.request_timeout_s", self.request_timeout_s, "seconds > 0")
        _require(self.health_check_period_s > 0, "ServeConfig.health_check_period_s", self.health_check_period_s,
                 "seconds > 0")
        _require(self.auth_token_env == "" or (self.auth_token_env.replace("_", "a").isalnum()
                                               and not self.auth_token_env[0].isdigit()),
                 "ServeConfig.auth_token_env", self.auth_token_env,
                 "empty (no auth) or an environment variable name such as ZRAY_SERVE_TOKEN")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """One run: the world, the model zoo and where outputs go."""

    name: str = "tiny_cpu"
    size: Size = "tiny"
    out_dir: str = "runs/tiny_cpu"
    seed: int = 0
    world: WorldConfig = field(default_factory=WorldConfig)
    data: DataConfig = field(default_factory=DataConfig)  # the reward stages' data: the world, or an import
    teacher: VLMConfig = field(default_factory=VLMConfig)
    student: VLMConfig = field(default_factory=VLMConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    pretrain_vlm: PretrainVLMConfig = field(default_factory=PretrainVLMConfig)
    pretrain_generator: PretrainGeneratorConfig = field(default_factory=PretrainGeneratorConfig)
    train_teacher: TrainTeacherConfig = field(default_factory=TrainTeacherConfig)
    train_student: TrainStudentConfig = field(default_factory=TrainStudentConfig)
    distill_generator: DistillGeneratorConfig = field(default_factory=DistillGeneratorConfig)
    reward_finetune: RewardFinetuneConfig = field(default_factory=RewardFinetuneConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def __post_init__(self) -> None:
        _require(self.size in ("tiny", "dev", "full"), "RunConfig.size", self.size, "'tiny', 'dev' or 'full'")
        _require(bool(self.out_dir), "RunConfig.out_dir", self.out_dir, "a non-empty path")
        builtin = ("alignment", "realism", "aesthetics", "plausibility")
        if not self.data.dir:  # with an import, its rubric's dimensions are checked where it is read
            for name in ("train_teacher", "train_student"):
                dims = getattr(self, name).dimensions
                _require(all(d in builtin for d in dims), f"{name}.dimensions", dims,
                         f"a subset of {builtin} (the Shapes world's rubric; empty = all), "
                         "or set data.dir to an import with other dimensions")


# --------------------------------------------------------------------------------------------- overrides


def config_keys(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Every settable dotted key of a config tree, mapped to its field type."""
    keys: dict[str, Any] = {}
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            keys.update(config_keys(value, f"{prefix}{f.name}."))
        else:
            keys[f"{prefix}{f.name}"] = hints[f.name]
    return keys


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        return "a comma-separated list of " + _type_name(typing.get_args(tp)[0])
    if typing.get_origin(tp) is dict:
        return "comma-separated name=amount pairs, e.g. engine_node=1,other=0.5 (empty: none)"
    return getattr(tp, "__name__", str(tp))


def parse_value(key: str, text: str, tp: Any) -> Any:
    """Parse `text` as a value of type `tp`; raise ConfigError naming `key` on failure."""
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            lowered = text.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            return int(text)
        if tp is float:
            return float(text)
        if tp is str:
            return text
        if origin is Literal:
            allowed = typing.get_args(tp)
            if text not in allowed:
                raise ValueError
            return text
        if origin is tuple:
            inner = typing.get_args(tp)[0]
            return tuple(parse_value(key, part, inner) for part in text.split(",") if part.strip())
        if origin is dict:  # name=amount,name=amount (the field's own check then validates names and amounts)
            pairs = [part.partition("=") for part in text.split(",") if part.strip()]
            if any(not sep or not name.strip() for name, sep, _ in pairs):
                raise ValueError
            return {name.strip(): float(amount) for name, _, amount in pairs}
        if origin in (typing.Union, types.UnionType):
            for arg in typing.get_args(tp):
                try:
                    return parse_value(key, text, arg)
                except ConfigError:
                    continue
            raise ValueError
    except ValueError:
        raise ConfigError(f"{key}={text!r} is not allowed: expected {_type_name(tp)}") from None
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def apply_overrides(cfg: Any, overrides: dict[str, str]) -> Any:
    """Return `cfg` with dotted-key overrides (string values) applied, type-checked and re-validated."""
    keys = config_keys(cfg)
    for key in overrides:
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown config key {key!r}{hint}; valid keys: {', '.join(sorted(keys))}")
    return _replace_tree(cfg, {k: parse_value(k, v, keys[k]) for k, v in overrides.items()}, "")


def _replace_tree(cfg: Any, values: dict[str, Any], prefix: str) -> Any:
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        key = f"{prefix}{f.name}"
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            sub = {k: v for k, v in values.items() if k.startswith(key + ".")}
            if sub:
                changes[f.name] = _replace_tree(value, sub, key + ".")
        elif key in values:
            changes[f.name] = values[key]
    return dataclasses.replace(cfg, **changes) if changes else cfg


def parse_set_args(items: list[str]) -> dict[str, str]:
    """`["a.b=1", "c=x"]` -> `{"a.b": "1", "c": "x"}`; a malformed item raises ConfigError."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r} is not allowed: expected key=value, e.g. world.seed=3")
        out[key.strip()] = value
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config tree (for manifests and run records)."""
    return dataclasses.asdict(cfg)
