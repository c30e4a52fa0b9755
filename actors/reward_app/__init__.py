"""The reward service: the Z-Reward student behind Ray Serve (HTTP for everyone, a DeploymentHandle in-cluster).

- `validation.py`: request and response schemas (pydantic) and the content checks (base64, image, prompt,
  dimensions); every rejection names its field. No Ray.
- `scorer.py`: `RewardScorer`, the model deployment (`@serve.batch` dynamic batching, `reconfigure` swaps
  checkpoints in place, a version on every result) and its typed items: `ScoreItem` -> `ScoreResult`.
- `app.py`: `RewardIngress`, the FastAPI ingress (auth, limits, /docs), and `build_app(args)`, the app builder
  of `serve deploy` (`import_path: actors.reward_app.app:build_app`).
- `deploy.py`: `deploy_config` (the dict form of cluster/serve.yaml), `deploy`, `with_model` (roll out a checkpoint).

This package file imports nothing, so `actors.reward_app.validation` loads without Ray.
"""
