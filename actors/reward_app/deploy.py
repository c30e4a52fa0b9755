"""Deploying the reward app as a declarative Serve config, and rolling out a new checkpoint in place.

    config = deploy_config(cfg.serve, model="/ckpt/a")      # the dict form of cluster/serve.yaml
    deploy(config)                                           # as `serve deploy` would; returns once RUNNING
    roll_out(config, "/ckpt/b")                              # deploy(with_model(config, ...)): only the scorer's
                                                             # user_config changes: replicas reconfigure in place,
                                                             # no request is dropped; checked, undone on failure

Why a config and not `serve.run(build_app(...))`: Serve gives every deployment of a Python `serve.run` a new
random code version, so a second `serve.run` replaces every replica (a rolling restart: new processes, models
loaded from scratch). A config deploy versions the code by import path, args and runtime env, so a change to a
deployment's `user_config` alone is applied by `reconfigure` on the running replicas (scorer.py swaps the model).
`deploy` does what `serve deploy` / `serve run config.yaml` do (`serve_start`, then the controller client's
`deploy_apps`; Ray 2.60's own CLI path), so it needs no dashboard. A config deploy declares every application of
the cluster: an application it does not name is deleted. Before anything is deployed, `deploy` checks that the
cluster can hold the scorer replicas (ServeConfig cpus_per_replica, gpus_per_replica, resources; actors/placement.py):
a PlacementError naming the application's scorer and the missing resource instead of replicas pending forever.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.schema import ServeDeploySchema

from zray.config import ServeConfig

IMPORT_PATH = "actors.reward_app.app:build_app"
SCORER = "RewardScorer"
INGRESS = "RewardIngress"
_HTTP_FIELDS = ("host", "port", "app_name", "model")  # not app args: Serve's http_options, the app name, user_config


def deploy_config(cfg: ServeConfig, *, model: str, auth_token: str | None = None) -> dict[str, Any]:
    """A ServeDeploySchema dict for the reward app (cluster/serve.yaml has the same shape): the scorer's checkpoint
    and batching in its `user_config`, every other ServeConfig field in the builder's args. `auth_token` (a literal
    token in the args, for local tests) is visible in Serve's config state: prefer `cfg.auth_token_env`."""
    if not model:
        raise ValueError("model='' is not allowed: expected a student checkpoint dir")
    args = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _HTTP_FIELDS}
    args["model"] = str(model)  # the builder reads its rubric (the served dimensions); roll_out changes user_config
    if auth_token:
        args["auth_token"] = auth_token
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": cfg.host, "port": cfg.port},
        "applications": [{
            "name": cfg.app_name,
            "route_prefix": "/",
            "import_path": IMPORT_PATH,
            "args": args,
            "deployments": [{
                "name": SCORER,
                "num_replicas": cfg.num_replicas,
                "max_ongoing_requests": cfg.max_ongoing_requests,
                "health_check_period_s": cfg.health_check_period_s,
                "user_config": {"model": str(model), "max_batch_size": cfg.max_batch_size,
                                "batch_wait_timeout_s": cfg.batch_wait_timeout_s},
            }],
        }],
    }


def with_model(config: dict[str, Any], model: str, app_name: str | None = None) -> dict[str, Any]:
    """A copy of `config` whose scorer serves `model` (of the application `app_name`, or the only one)."""
    out = copy.deepcopy(config)
    apps = [a for a in out["applications"] if app_name is None or a["name"] == app_name]
    if len(apps) != 1:
        raise ValueError(f"app_name={app_name!r}: expected exactly one matching application in the config, found "
                         f"{[a['name'] for a in out['applications']]}")
    scorers = [d for d in apps[0].get("deployments", []) if d.get("name") == SCORER]
    if not scorers:
        raise ValueError(f"the application {apps[0]['name']!r} has no {SCORER} deployment entry to set the model in")
    scorers[0].setdefault("user_config", {})["model"] = str(model)
    return out


def deploy(config: dict[str, Any] | ServeDeploySchema, *, timeout_s: float = 300.0) -> ServeDeploySchema:
    """Deploy a Serve config (start Serve with its http_options if needed), then wait until every application in
    it is RUNNING with this deployment; raise RuntimeError with Serve's message if one fails, TimeoutError after
    `timeout_s`. Returns the validated schema."""
    from ray.serve._private.api import serve_start

    schema = config if isinstance(config, ServeDeploySchema) else ServeDeploySchema.model_validate(config)
    client = serve_start(http_options=schema.http_options.model_dump(), proxy_location=schema.proxy_location)
    check_placement(schema)
    started = time.time()
    client.deploy_apps(schema)
    wait_running([app.name for app in schema.applications], since=started - 1.0, timeout_s=timeout_s)
    return schema


def check_placement(schema: ServeDeploySchema) -> None:
    """PlacementError if the live cluster can never hold the scorer replicas of a reward app in `schema` (their
    count from the scorer's deployment entry, else the args; their resources from the args, as build_app sets
    them); other applications are not checked."""
    from actors.placement import check_feasible, scorer_bundles
    from actors.reward_app.app import serve_config_from_args

    for app in schema.applications:
        if app.import_path != IMPORT_PATH:
            continue
        cfg = serve_config_from_args({k: v for k, v in (app.args or {}).items() if k != "auth_token"})
        entry = {d.name: d.model_dump(exclude_unset=True) for d in app.deployments}.get(SCORER, {})
        replicas = entry.get("num_replicas")
        count = replicas if isinstance(replicas, int) else cfg.num_replicas
        check_feasible(f"reward scorer of {app.name!r}", scorer_bundles(cfg, count), "SPREAD")


def wait_running(app_names: list[str], *, since: float, timeout_s: float) -> None:
    """Poll serve.status() until each named application was deployed after `since` and is RUNNING with every
    deployment HEALTHY."""
    deadline = time.time() + timeout_s
    while True:
        apps = serve.status().applications
        pending = []
        for name in app_names:
            app = apps.get(name)
            status = getattr(app, "status", None)
            if status in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise RuntimeError(f"Serve application {name!r} is {status}: {app.message}")
            healthy = app is not None and all(d.status == "HEALTHY" for d in app.deployments.values())
            if not (status == "RUNNING" and healthy and app.last_deployed_time_s >= since):
                pending.append(f"{name}={status}")
        if not pending:
            return
        if time.time() > deadline:
            raise TimeoutError(f"Serve applications not running after {timeout_s} s: {', '.join(pending)}")
        time.sleep(0.2)


def roll_out(config: dict[str, Any], model: str, *, app_name: str | None = None, timeout_s: float = 300.0
             ) -> dict[str, Any]:
    """Serve `model` instead of the checkpoint of `config` (the config deployed now): deploy `with_model(config,
    model)` and wait until the scorer reports the new checkpoint. If it fails to load (the replicas keep serving
    the old one), re-deploy `config`, so that the declared state is again what runs, and raise RuntimeError with
    the load error. Returns the new config (pass it to the next roll_out) once a scorer replica serves the new
    checkpoint; with several replicas, the others switch as they finish loading (each response names its version)."""
    new = with_model(config, model, app_name)
    name = app_name or new["applications"][0]["name"]
    deploy(new, timeout_s=timeout_s)
    handle = serve.get_deployment_handle(SCORER, app_name=name)
    want, deadline = str(Path(model).resolve()), time.time() + timeout_s
    while True:
        info = handle.info.remote().result(timeout_s=60)
        if info["model_dir"] == want:
            return new
        if info["load_error"].startswith(f"model={str(model)!r}"):
            deploy(config, timeout_s=timeout_s)
            raise RuntimeError(f"roll-out of {model} failed, still serving {info['model_dir']} "
                               f"({info['model_version']}): {info['load_error']}")
        if time.time() > deadline:
            raise TimeoutError(f"the scorer of {name!r} still serves {info['model_dir']} after {timeout_s} s")
        time.sleep(0.2)
