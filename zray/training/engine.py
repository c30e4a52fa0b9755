"""One training engine around a model: DeepSpeed ZeRO (stage 0-3) or plain torch DDP as the baseline.

Both backends share the optimizer (torch AdamW), the LR schedule (linear warmup, then constant or cosine),
gradient clipping and gradient accumulation, so a DeepSpeed run and a DDP run of the same `LearnerConfig` do the
same arithmetic (up to reduction order). No Ray here: the engine runs in any process where `torch.distributed`
is initialised (a Ray Train worker, `torchrun`, or a single process with a world of one).

Per optimizer step, with `A = cfg.grad_accum_steps` micro batches per worker:

    for micro in range(A):
        with engine.accumulation_context():          # DDP: no_sync() on all but the last micro batch
            with engine.autocast():                   # DDP + bf16: torch.autocast; DeepSpeed: bf16 weights
                loss, metrics = task.loss(engine.module, engine.prepare_batch(batch))
            info = engine.backward_step(loss)        # StepInfo at the accumulation boundary, else None

Checkpoints: `save(dir)` writes everything needed for an exact resume (weights, optimizer, scheduler, step
counters; DeepSpeed writes one optimizer shard per rank); `load(dir)` restores it. All ranks must call both.
For Hugging Face export, `with engine.gathered_params(): task.save_pretrained(engine.unwrapped, dir)` on rank 0
(under ZeRO-3 every rank enters the context, which gathers the partitioned weights).

Precision: "bf16" under DeepSpeed keeps bf16 weights and fp32 master weights in the optimizer (DeepSpeed's
bf16 mode; `prepare_batch` casts floating inputs to bf16); under DDP it is torch.autocast over fp32 weights.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from zray.config import LearnerConfig

_DDP_STATE_FILE = "ddp_state.pt"
_DS_TAG = "state"


def resolve_precision(cfg: LearnerConfig, device: torch.device) -> str:
    """"auto" -> "bf16" on CUDA with bf16 support, "fp32" elsewhere (fp32 measured faster on CPU)."""
    if cfg.precision != "auto":
        return cfg.precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


class LRSchedule:
    """LR multiplier after `step` optimizer steps: linear warmup to 1, then constant or cosine to `min_ratio`.

    A callable object (not a lambda) so that `LambdaLR.state_dict()` carries it into checkpoints.
    """

    def __init__(self, warmup_steps: int, total_steps: int, kind: str, min_ratio: float) -> None:
        self.warmup_steps, self.total_steps, self.kind, self.min_ratio = warmup_steps, total_steps, kind, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.kind == "constant":
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, cfg: LearnerConfig) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over trainable parameters (no weight decay on biases and norms) and its LambdaLR schedule."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters (every requires_grad is False)")
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, foreach=False)
    schedule = LRSchedule(cfg.warmup_steps, cfg.max_steps, cfg.lr_schedule, cfg.min_lr_ratio)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def deepspeed_config(cfg: LearnerConfig, world_size: int, precision: str,
                     overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The DeepSpeed config dict for `cfg`; `overrides` is merged in (nested dicts merge key by key)."""
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accum_steps * world_size,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "zero_allow_untested_optimizer": True,  # the client optimizer is torch AdamW
        "zero_force_ds_cpu_optimizer": False,   # ... also with optimizer offload (set through overrides)
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    return _merge(config, overrides or {})


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@dataclass(frozen=True)
class StepInfo:
    """What one optimizer step did: the LR it used and the global gradient norm before clipping."""

    lr: float
    grad_norm: float


class TrainEngine:
    """`module` is what to call in the loss; `unwrapped` is the raw model (for export and inspection)."""

    def __init__(self, model: torch.nn.Module, cfg: LearnerConfig, *, device: torch.device | None = None,
                 deepspeed_overrides: dict[str, Any] | None = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError("TrainEngine needs torch.distributed initialised (Ray Train does it per worker; "
                               "for one process use dist.init_process_group('gloo', world_size=1, rank=0, ...))")
        self.cfg = cfg
        self.backend = cfg.backend
        self.device = device or torch.device("cpu")
        self.precision = resolve_precision(cfg, self.device)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self._micro = 0  # micro batches since the last optimizer step
        model = model.to(self.device)
        self.unwrapped = model
        optimizer, scheduler = build_optimizer(model, cfg)
        if self.backend == "deepspeed":
            self._init_deepspeed(model, optimizer, scheduler, deepspeed_overrides)
        else:
            if deepspeed_overrides:
                raise ValueError("deepspeed_overrides given but LearnerConfig.backend='ddp'")
            self._init_ddp(model, optimizer, scheduler)

    # ------------------------------------------------------------------ construction

    def _init_deepspeed(self, model, optimizer, scheduler, overrides) -> None:
        import deepspeed

        deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False, verbose=False)
        self.ds_config = deepspeed_config(self.cfg, self.world_size, self.precision, overrides)
        engine, ds_optimizer, _, ds_scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config,
            dist_init_required=False)
        self.module, self.optimizer, self.scheduler = engine, ds_optimizer, ds_scheduler
        self.unwrapped = engine.module
        self.zero_stage = int(self.ds_config["zero_optimization"].get("stage", 0))

    def _init_ddp(self, model, optimizer, scheduler) -> None:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self.module = DistributedDataParallel(model, device_ids=device_ids)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.zero_stage = 0

    def set_schedule_steps(self, total_steps: int) -> None:
        """Move the end of the LR schedule (where a cosine decay reaches min_lr_ratio) to `total_steps`; the LR of
        the next step follows it. It is part of the scheduler's state, so a checkpoint keeps it."""
        for schedule in self.scheduler.lr_lambdas:
            schedule.total_steps = int(total_steps)

    # ------------------------------------------------------------------ the step

    @property
    def is_boundary(self) -> bool:
        """True when the next backward completes an optimizer step."""
        return self._micro + 1 == self.cfg.grad_accum_steps

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    @property
    def input_dtype(self) -> torch.dtype | None:
        """The dtype floating inputs are cast to (DeepSpeed bf16 keeps bf16 weights), or None to leave them."""
        return torch.bfloat16 if self.backend == "deepspeed" and self.precision == "bf16" else None

    def prepare_batch(self, batch: dict[str, Any], keep_dtype: tuple[str, ...] = ()) -> dict[str, Any]:
        """Move tensors to the device; cast floating tensors to `input_dtype` when set (except `keep_dtype` keys,
        e.g. rollout log-probs, which must stay float32)."""
        out = {}
        for key, value in batch.items():
            if isinstance(value, torch.Tensor):
                value = value.to(self.device, non_blocking=True)
                if self.input_dtype is not None and value.is_floating_point() and key not in keep_dtype:
                    value = value.to(self.input_dtype)
            out[key] = value
        return out

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.backend == "ddp" and self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def accumulation_context(self) -> contextlib.AbstractContextManager:
        """Wrap forward + backward of each micro batch: DDP skips the all-reduce until the last one."""
        if self.backend == "ddp" and not self.is_boundary:
            return self.module.no_sync()
        return contextlib.nullcontext()

    def backward_step(self, loss: torch.Tensor) -> StepInfo | None:
        """Backward of one micro batch; at the accumulation boundary also clip, step and advance the LR."""
        boundary = self.is_boundary
        lr = self.lr
        if self.backend == "deepspeed":
            self.module.backward(loss)  # scales by 1 / grad_accum_steps itself (and all-reduces at the boundary)
            # Without ZeRO, DeepSpeed clips fp32 grads but does not keep the norm: measure it before the step.
            own_norm = _grad_norm(self.unwrapped) if boundary and self.zero_stage == 0 else None
            self.module.step()          # a real step only at the boundary
            norm = self.module.get_global_grad_norm() if boundary else None
            norm = own_norm if norm is None else norm
        else:
            (loss / self.cfg.grad_accum_steps).backward()
            norm = None
            if boundary:
                params = [p for p in self.unwrapped.parameters() if p.grad is not None]
                max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
                norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
        self._micro = 0 if boundary else self._micro + 1
        if not boundary:
            return None
        return StepInfo(lr=lr, grad_norm=float(norm) if norm is not None else float("nan"))

    # ------------------------------------------------------------------ state

    @contextlib.contextmanager
    def gathered_params(self) -> Iterator[torch.nn.Module]:
        """Full (unpartitioned) weights in `unwrapped` inside the block; every rank must enter it."""
        if self.backend == "deepspeed" and self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.unwrapped.parameters()), modifier_rank=None):
                yield self.unwrapped
        else:
            yield self.unwrapped

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The full model state on CPU (every rank must call it; under ZeRO-3 it gathers)."""
        with self.gathered_params() as model:
            return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

    def save(self, out_dir: str | Path) -> None:
        """Weights, optimizer (DeepSpeed: this rank's shard), scheduler and counters. All ranks call it."""
        out_dir = Path(out_dir)
        if self.backend == "deepspeed":
            (out_dir / _DS_TAG).mkdir(parents=True, exist_ok=True)  # each worker may write to its own dir
            self.module.save_checkpoint(str(out_dir), tag=_DS_TAG, save_latest=False)
        else:
            out_dir.mkdir(parents=True, exist_ok=True)
            if self.rank == 0:
                torch.save({"model": self.unwrapped.state_dict(), "optimizer": self.optimizer.state_dict(),
                            "scheduler": self.scheduler.state_dict()}, out_dir / _DDP_STATE_FILE)
            dist.barrier()

    def load(self, ckpt_dir: str | Path) -> None:
        """Restore what `save` wrote (same backend, same world size for ZeRO >= 1). All ranks call it."""
        ckpt_dir = Path(ckpt_dir)
        if self.backend == "deepspeed":
            if not (ckpt_dir / _DS_TAG).is_dir():
                raise FileNotFoundError(f"no DeepSpeed state under {ckpt_dir / _DS_TAG} (saved with backend='ddp'?)")
            path, _ = self.module.load_checkpoint(str(ckpt_dir), tag=_DS_TAG, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
            if path is None:
                raise RuntimeError(f"DeepSpeed could not load the checkpoint under {ckpt_dir}")
        else:
            path = ckpt_dir / _DDP_STATE_FILE
            if not path.is_file():
                raise FileNotFoundError(f"no DDP state at {path} (saved with backend='deepspeed'?)")
            state = torch.load(path, map_location=self.device, weights_only=False)
            self.unwrapped.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        self._micro = 0


def _grad_norm(model: torch.nn.Module) -> float | None:
    """The L2 norm of all (full, already reduced) gradients of `model`, or None if it has none."""
    grads = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(grads))) if grads else None
