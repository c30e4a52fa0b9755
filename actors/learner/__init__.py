"""The learner role: any `zray.training.task.LearnerTask` trained by Ray Train workers (DeepSpeed ZeRO inside).

    from actors.learner import fit
    result = fit(task, cfg, datasets={"train": ds}, storage_path="/abs/runs", name="vlm")

- `trainer.py`: `fit` (the driver side: shards, TorchTrainer, resume checks), `fit_phase` (one named phase of a
  job into `root/name`, kept when finished, continued when cut), `init_ray` (with
  `ray_runtime_env`: filters for Ray Train's log noise in every worker process), `LearnerResult`.
- `worker_loop.py`: the loop each Ray Train worker runs (steps, logging, checkpoints, time budgets).
"""

from actors.learner.trainer import LearnerResult, fit, fit_phase, init_ray, ray_runtime_env

__all__ = ["LearnerResult", "fit", "fit_phase", "init_ray", "ray_runtime_env"]
