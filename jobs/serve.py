"""zray serve: the reward service (actors/reward_app/) on Ray Serve, over a student checkpoint.

    zray serve [--model DIR] [--port N] [--host H] [--detach] [--recipe NAME] [--set serve.key=value ...]

Starts Ray (or joins RAY_ADDRESS), deploys the reward app as a declarative Serve config (the dict form of
cluster/serve.yaml, `actors.reward_app.deploy`), prints the URL and a curl example, and blocks until Ctrl-C,
which shuts Serve down. `--detach` returns once the app is running: on a cluster (RAY_ADDRESS) the service stays
up; with the local Ray this process started, it ends with the process.

The model defaults to this run's trained student, `<out_dir>/train_student/risd/final` (`zray train-student`).
Any Hugging Face dir of a supported architecture (Qwen2.5-VL, Qwen3-VL) with the score tokens serves (e.g. the tiny
zoo's student, for the machinery); another architecture is a one-line error. The served dimensions are those of the
rubric the checkpoint records (`zray_rubric.json`, written by `zray train-student`: an import's rubric with
`data.dir`), else the four built-in ones.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

from actors.learner import init_ray
from actors.reward_app.deploy import deploy, deploy_config
from zray.config import ConfigError, RunConfig

DEFAULT_STUDENT = ("train_student", "risd", "final")


def resolve_model(cfg: RunConfig, model: str | None) -> Path:
    """The checkpoint to serve: `model`, else `serve.model`, else `<out_dir>/train_student/risd/final`; a missing
    dir is a FileNotFoundError naming the path and how to produce it."""
    chosen = model or cfg.serve.model
    path = Path(chosen) if chosen else Path(cfg.out_dir, *DEFAULT_STUDENT)
    if not (path / "config.json").is_file():
        how = ("" if chosen else f"; train one with `zray train-student --recipe {cfg.name}`, or pass --model DIR "
               "(any Qwen-VL dir with the score tokens, e.g. the tiny zoo's student)")
        raise FileNotFoundError(f"no student checkpoint at {path} (no config.json){how}")
    from zray.models.vlm import check_vlm_architecture

    return check_vlm_architecture(path, "--model" if model else "serve.model").resolve()


def run_serve(cfg: RunConfig, *, model: str | None = None, host: str | None = None, port: int | None = None,
              detach: bool = False) -> str:
    """Deploy the reward service; returns its URL (after Ctrl-C unless `detach`)."""
    serve_cfg = dataclasses.replace(cfg.serve, **{k: v for k, v in (("host", host), ("port", port)) if v is not None})
    model_dir = resolve_model(cfg, model)
    if serve_cfg.auth_token_env and not os.environ.get(serve_cfg.auth_token_env):
        raise ConfigError(f"serve.auth_token_env={serve_cfg.auth_token_env!r}: the environment variable is not set; "
                          "export it before `zray serve` (or clear the field to serve without auth)")
    init_ray(serve_cfg.num_replicas * serve_cfg.cpus_per_replica + 1)
    deploy(deploy_config(serve_cfg, model=str(model_dir)))
    shown = "127.0.0.1" if serve_cfg.host in ("0.0.0.0", "::") else serve_cfg.host
    url = f"http://{shown}:{serve_cfg.port}"
    auth = f' -H "Authorization: Bearer ${serve_cfg.auth_token_env}"' if serve_cfg.auth_token_env else ""
    from zray.models.vlm import read_rubric_file

    print(f"reward service: {url} (model {model_dir}, dimensions {', '.join(read_rubric_file(model_dir).dimensions)}); "
          f"OpenAPI docs at {url}/docs")
    print(f'  curl -s {url}/v1/score{auth} -H "Content-Type: application/json" \\\n'
          f'    -d "{{\\"prompt\\": \\"a red circle\\", \\"image\\": \\"$(base64 -w0 image.png)\\"}}"')
    if detach:
        return url
    from ray import serve

    print("serving; Ctrl-C to stop")
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        print("stopping the reward service")
        serve.shutdown()
    return url
