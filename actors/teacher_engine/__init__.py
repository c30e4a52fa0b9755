"""The teacher engine role: a vLLM engine serving a Qwen-VL teacher (rollouts, score distributions, weight sync).

- `engine.py`: `TeacherEngine`, the engine's verbs (`generate`, `score`, `generate_texts`, `load_weights`).
- `rollouts.py`: G reasoning samples per input and their score distributions, as a `RolloutBatch`.
- `weight_sync.py`: live weight reload in place, verified by reading the served weights back.

`actors/engine_pool.py` hosts engines as Ray actors and spreads requests over them.
"""

from actors.teacher_engine.engine import TeacherEngine

__all__ = ["TeacherEngine"]
