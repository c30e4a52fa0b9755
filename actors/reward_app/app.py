"""The reward service's HTTP face: a FastAPI ingress deployment in front of the scorer, and `build_app`, the app
builder `serve deploy` / `serve run` call (import path `actors.reward_app.app:build_app`).

    POST /v1/score        {prompt, image: base64 PNG/JPEG, dimensions?} -> per dimension q (9 bins), mu, std,
                          and the model version that scored it
    POST /v1/score/batch  {items: [...]} (at most max_batch_items) -> {results: [...]}, in order
    GET  /v1/model        model dir, version, dimensions (the checkpoint's rubric), score bins, limits, replica ids
    GET  /healthz         200 {"status": "ok", ...} once a model is loaded, else 503 (no auth)
    GET  /docs            OpenAPI docs (no auth)

- Auth: with a token configured (`ServeConfig.auth_token_env`, the name of an environment variable of the
  replica, or a literal `auth_token` arg for local tests), /v1/* needs `Authorization: Bearer <token>`: 401
  without it, 403 with a wrong one. The token is never logged or returned.
- Bad input is a 4xx whose JSON body `{"detail", "field", "reason"}` names the field (validation.py); it is
  rejected in the ingress, never reaches the scorer, and is counted in `zray_reward_rejected_requests{reason}`.
  Bodies over `max_body_bytes` are refused (413) before they are parsed.
- The ingress holds no model: it decodes and checks images, then awaits the scorer's handle (bounded by
  `request_timeout_s`: 504 after it; Serve answers 503 when the scorer refuses more work).
- `Ingress` is the logic without Serve and `create_api(ingress)` its FastAPI app, built in each replica
  (`__serve_build_asgi_app__`), so tests run the app on a stand-in scorer without Ray.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import os
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from PIL import ImageFile
from ray import serve
from ray.util import metrics

from actors.placement import scorer_actor_options
from actors.reward_app.scorer import ScoreResult, RewardScorer, ScoreItem
from actors.reward_app.validation import (ErrorResponse, RequestError, RequestLimits, ScoreBatchBody,
                                          ScoreBatchResponse, ScoreBody, ScoreResponse, check_dimensions,
                                          check_prompt_text, decode_image, validation_error)
from zray.config import ConfigError, ServeConfig
from zray.rubric import BUILTIN_RUBRIC, SCORE_BINS, Rubric

_ERRORS = {code: {"model": ErrorResponse} for code in (401, 403, 413, 422)}


def resolve_token(auth_token_env: str, auth_token: str | None = None) -> str | None:
    """The token the service requires: the literal `auth_token` if given, else the environment variable named by
    `auth_token_env` (which must then be set and non-empty), else None (no auth)."""
    if auth_token:
        return auth_token
    if not auth_token_env:
        return None
    value = os.environ.get(auth_token_env, "")
    if not value:
        raise ConfigError(f"ServeConfig.auth_token_env={auth_token_env!r}: the environment variable is not set in "
                          "the replica's environment: set it (runtime_env env_vars on a cluster) or clear the field")
    return value


def _response(result: ScoreResult) -> dict[str, Any]:
    return {"model_version": result.model_version, "model_dir": result.model_dir,
            "scores": {dim: dataclasses.asdict(s) for dim, s in result.scores.items()}}


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside a Serve replica (tests of the ASGI app)
        return ""


class Ingress:
    """The ingress's logic, without Serve: auth, checks, decoding, and awaiting the scorer.

    `scorer` is anything with `score.remote(items)` and `info.remote()` returning awaitables (a DeploymentHandle
    in the service; a stand-in in tests of `create_api(Ingress(...))`). `rubric`: the served checkpoint's (the
    dimensions requests may name, their default, and `/v1/model`'s list)."""

    def __init__(self, scorer: Any, cfg: ServeConfig, auth_token: str | None = None,
                 rubric: Rubric = BUILTIN_RUBRIC) -> None:
        ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated image must fail to decode (validation.decode_image)
        self.scorer = scorer
        self.cfg = cfg
        self.dimensions = rubric.dimensions
        self.limits = RequestLimits(max_image_pixels=cfg.max_image_pixels, min_image_side=cfg.min_image_side,
                                    max_prompt_chars=cfg.max_prompt_chars)
        self.token = resolve_token(cfg.auth_token_env, auth_token)
        self.rejected = metrics.Counter("zray_reward_rejected_requests", tag_keys=("reason",),
                                        description="requests refused with a 4xx, by reason")

    def __serve_build_asgi_app__(self) -> FastAPI:  # Serve calls it in the replica, after __init__
        return create_api(self)

    def reject(self, error: RequestError) -> JSONResponse:
        self.rejected.inc(tags={"reason": error.reason})
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    def authorize(self, credentials: HTTPAuthorizationCredentials | None) -> None:
        if not self.token:
            return
        if credentials is None:
            raise RequestError(401, "Authorization", "auth_missing", "Authorization: missing: expected the header "
                               "'Authorization: Bearer <token>'")
        if not hmac.compare_digest(credentials.credentials.encode(), self.token.encode()):
            raise RequestError(403, "Authorization", "auth_wrong", "Authorization: the bearer token is not valid")

    def item(self, body: ScoreBody, prefix: str = "") -> ScoreItem:
        prompt = check_prompt_text(body.prompt, field=f"{prefix}prompt", limits=self.limits)
        dims = check_dimensions(body.dimensions, field=f"{prefix}dimensions", allowed=self.dimensions)
        image = decode_image(body.image, field=f"{prefix}image", limits=self.limits)
        return ScoreItem(prompt=prompt, image=image, dimensions=dims)

    def batch_items(self, body: ScoreBatchBody) -> list[ScoreItem]:
        if not body.items:
            raise RequestError(422, "items", "no_items", "items: empty: expected at least one item")
        if len(body.items) > self.cfg.max_batch_items:
            raise RequestError(413, "items", "too_many_items", f"items: {len(body.items)} items: expected at most "
                               f"{self.cfg.max_batch_items} per request")
        return [self.item(it, prefix=f"items[{i}].") for i, it in enumerate(body.items)]

    async def score(self, items: list[ScoreItem]) -> list[ScoreResult] | JSONResponse:
        try:
            return await asyncio.wait_for(self.scorer.score.remote(items), timeout=self.cfg.request_timeout_s)
        except asyncio.TimeoutError:
            return JSONResponse({"detail": f"scoring took longer than {self.cfg.request_timeout_s} s", "field": None,
                                 "reason": "timeout"}, status_code=504)

    async def model_info(self) -> dict[str, Any]:
        info = await self.scorer.info.remote()
        return {"model_dir": info["model_dir"], "model_version": info["model_version"],
                "load_error": info["load_error"],
                "dimensions": list(self.dimensions), "score_bins": list(SCORE_BINS),
                "max_batch_size": info["max_batch_size"], "batch_wait_timeout_s": info["batch_wait_timeout_s"],
                "max_batch_items": self.cfg.max_batch_items, "max_body_bytes": self.cfg.max_body_bytes,
                "max_image_pixels": self.cfg.max_image_pixels, "min_image_side": self.cfg.min_image_side,
                "max_prompt_chars": self.cfg.max_prompt_chars,
                "replicas": {"scorer": {"replica_id": info["replica_id"], "pid": info["pid"]},
                             "ingress": {"replica_id": _replica_id(), "pid": os.getpid()}}}

    async def health(self) -> JSONResponse | dict[str, str]:
        try:
            info = await asyncio.wait_for(self.scorer.info.remote(), timeout=5.0)
        except Exception:  # noqa: BLE001 - any failure to reach the scorer is "not ready"
            info = {}
        if not info.get("model_version"):
            return JSONResponse({"status": "unavailable", "model_version": ""}, status_code=503)
        return {"status": "ok", "model_version": info["model_version"]}


class BodyLimit:
    """ASGI middleware: a body over `limit` bytes gets a 413 (from `reject`) before anything parses it. The
    Content-Length is checked first; a chunked body is read up to the limit, then replayed to the app."""

    def __init__(self, app: Any, *, limit: int, reject: Any) -> None:
        self.app, self.limit, self.reject = app, limit, reject

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        too_large = RequestError(413, "body", "body_too_large", f"body: larger than {self.limit} bytes: send fewer "
                                 "or smaller images")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self.reject(too_large)(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.limit:
                return await self.reject(too_large)(scope, receive, send)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def create_api(ingress: Ingress) -> FastAPI:
    """The FastAPI app of one ingress: routes, auth, the body limit and error handlers (one app per replica)."""
    api = FastAPI(title="zray reward service", version="1",
                  description="Z-Reward student scores: a nine-bin distribution per rubric dimension.")
    bearer = HTTPBearer(auto_error=False, description="the service token, when one is configured")
    api.add_middleware(BodyLimit, limit=ingress.cfg.max_body_bytes, reject=ingress.reject)

    async def authorized(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        ingress.authorize(credentials)

    @api.exception_handler(RequestError)
    async def request_error(request: Request, error: RequestError) -> JSONResponse:
        return ingress.reject(error)

    @api.exception_handler(RequestValidationError)
    async def schema_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return ingress.reject(validation_error(list(error.errors())))

    @api.post("/v1/score", response_model=ScoreResponse, responses=_ERRORS, dependencies=[Depends(authorized)],
              summary="score one image on the rubric dimensions")
    async def score(body: ScoreBody) -> Any:
        results = await ingress.score([await asyncio.to_thread(ingress.item, body)])  # decoding off the loop
        return results if isinstance(results, JSONResponse) else _response(results[0])

    @api.post("/v1/score/batch", response_model=ScoreBatchResponse, responses=_ERRORS,
              dependencies=[Depends(authorized)], summary="score several images (each item as /v1/score)")
    async def score_batch(body: ScoreBatchBody) -> Any:
        results = await ingress.score(await asyncio.to_thread(ingress.batch_items, body))
        return results if isinstance(results, JSONResponse) else {"results": [_response(r) for r in results]}

    @api.get("/v1/model", dependencies=[Depends(authorized)], summary="the served checkpoint and limits")
    async def model() -> dict[str, Any]:
        return await ingress.model_info()

    @api.get("/healthz", summary="liveness and readiness (no auth)")
    async def healthz() -> Any:
        return await ingress.health()

    return api


RewardIngress = serve.deployment(name="RewardIngress", ray_actor_options={"num_cpus": 0.5})(serve.ingress()(Ingress))


def serve_config_from_args(args: dict[str, Any]) -> ServeConfig:
    """A validated ServeConfig from app-builder args (ServeConfig field names); unknown keys are a ConfigError."""
    names = [f.name for f in dataclasses.fields(ServeConfig)]
    unknown = sorted(set(args) - set(names))
    if unknown:
        raise ConfigError(f"reward app args {unknown} are not allowed: expected ServeConfig fields {names} "
                          "(and auth_token)")
    return ServeConfig(**args)


def build_app(args: dict[str, Any]) -> serve.Application:
    """The reward application from `args`: ServeConfig fields (host and port are Serve's http_options, unused
    here), plus an optional literal `auth_token` (local tests; prefer auth_token_env).

    `model` becomes the scorer's default user_config; a deployment-level `user_config` in a Serve config file
    overrides it, and changing only that user_config later swaps the checkpoint in place (see scorer.py).
    The served dimensions are the rubric `model` records (`zray_rubric.json`; the built-in four without one or
    without `model`): a swapped-in checkpoint must record the same rubric."""
    from zray.models.vlm import read_rubric_file

    args = dict(args or {})
    auth_token = args.pop("auth_token", None)
    cfg = serve_config_from_args(args)
    user_config = ({"model": cfg.model, "max_batch_size": cfg.max_batch_size,
                    "batch_wait_timeout_s": cfg.batch_wait_timeout_s} if cfg.model else None)
    scorer = RewardScorer.options(num_replicas=cfg.num_replicas, max_ongoing_requests=cfg.max_ongoing_requests,
                                  health_check_period_s=cfg.health_check_period_s,
                                  ray_actor_options=scorer_actor_options(cfg), user_config=user_config)
    torch_threads = max(1, int(cfg.cpus_per_replica))  # one torch thread per CPU the replica holds
    rubric = read_rubric_file(cfg.model) if cfg.model else BUILTIN_RUBRIC
    return RewardIngress.options(max_ongoing_requests=cfg.max_ongoing_requests).bind(
        scorer.bind(torch_threads=torch_threads, rubric=rubric), cfg, auth_token, rubric)
