"""The scorer deployment: the Z-Reward student (a Qwen-VL that answers the score in one token) behind Serve's
dynamic batching, with versioned checkpoints swapped in place.

In-cluster callers use it through a `DeploymentHandle`, with typed objects and no HTTP:

    scorer = serve.get_deployment_handle("RewardScorer", app_name="reward")
    results = await scorer.score.remote([ScoreItem(prompt="a red circle", image=pil_image)])   # or .result()
    results[0].model_version, results[0].scores["alignment"].expected_score

- `ScoreItem` -> `ScoreResult` (`zray.client`'s result type: the HTTP client and the handle return the same; one
  per item, in order): per dimension (default: every dimension of the checkpoint's rubric, `zray_rubric.json`
  written by `zray train-student`, else the four built-in ones) the nine-bin distribution q, the expected
  score mu and its standard deviation, and the version of the weights that scored the item. All dimensions of an
  item are scored by the same weights.
- Batching: `@serve.batch` gathers concurrent items (from any number of callers) into one forward pass of at most
  `max_batch_size` items (each 1-4 rows, one per dimension), waiting at most `batch_wait_timeout_s` for more.
- Checkpoints: the deployment's `user_config` is `{"model": dir, "max_batch_size": n, "batch_wait_timeout_s": t}`.
  A new user_config (`serve deploy` of a changed config, or `actors.reward_app.deploy.roll_out`) calls
  `reconfigure` on the running replicas: the new model is loaded beside the old one, then one reference is swapped;
  a batch reads the reference once, so batches in flight finish on the old weights and none is dropped. The same
  dir is not reloaded: write each checkpoint to its own dir (a learner's checkpoint_<step>/hf/ or final/). A
  checkpoint that fails to load leaves the old one serving and is reported in `info()["load_error"]`
  (`deploy.roll_out` raises on it and re-deploys the previous config); at replica start it fails the replica.
  A checkpoint of another rubric than the one the app was built with (`build_app`: the rubric of its `model`)
  is such a failure: the ingress validates requests against that rubric, so a new rubric is a new deployment.
- Version: the first 16 hex digits of `zray.checksum.weights_checksum` of the loaded state dict (what the learner
  computes), plus the checkpoint dir.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import serve
from ray.util import metrics

from zray.client import DimensionScore, ScoreResult
from zray.rubric import DIMENSION_NAME, SCORE_BINS, Rubric, ScoreRequest, check_prompt

VERSION_CHARS = 16
logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class ScoreItem:
    """One item to score: a prompt, its image (PIL, RGB), and the rubric dimensions (None, the default: every
    dimension of the served checkpoint's rubric; names outside it fail when the item is scored)."""

    prompt: str
    image: Any
    dimensions: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        check_prompt(self.prompt)
        if self.dimensions is not None:
            dims = tuple(self.dimensions)
            if (not dims or len(set(dims)) != len(dims)
                    or not all(isinstance(d, str) and DIMENSION_NAME.match(d) for d in dims)):
                raise ValueError(f"dimensions={self.dimensions!r} are not allowed: expected distinct dimension "
                                 "names of the served rubric (or None for all)")
            object.__setattr__(self, "dimensions", dims)
        if not hasattr(self.image, "size") or not hasattr(self.image, "convert"):
            raise ValueError(f"image={type(self.image).__name__} is not allowed: expected a PIL image")


@dataclass(frozen=True)
class LoadedModel:
    """A student checkpoint in memory: what one batch reads, once, at its start."""

    model: Any
    processor: Any
    version: str
    model_dir: str
    rubric: Rubric  # the dimensions it scores, with their anchors (`zray.models.vlm.read_rubric_file`)

    def dimensions_of(self, item: ScoreItem) -> tuple[str, ...]:
        """The item's dimensions (all of the rubric's for None); ValueError naming the unknown ones."""
        if item.dimensions is None:
            return self.rubric.dimensions
        unknown = [d for d in item.dimensions if d not in self.rubric.dimensions]
        if unknown:
            raise ValueError(f"dimensions {unknown} are not allowed: the served model ({self.model_dir}) scores "
                             f"{list(self.rubric.dimensions)}")
        return item.dimensions


def load_student(model_dir: str | Path) -> LoadedModel:
    """The student of `model_dir` in float32 on CPU, with its version; a clear error for a missing dir or a
    checkpoint recorded as a reasoning (teacher) scorer."""
    import torch

    from zray.checksum import weights_checksum
    from zray.models.vlm import SCORING_FILE, load_vlm, read_rubric_file

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model={str(model_dir)!r} is not a Hugging Face model dir (no config.json): "
                                "expected a student checkpoint, e.g. <out_dir>/train_student/risd/final")
    scoring = path / SCORING_FILE
    if scoring.is_file() and json.loads(scoring.read_text()).get("form") == "reasoning":
        raise ValueError(f"model={str(model_dir)!r} scores in the reasoning form ({SCORING_FILE}): the reward "
                         "service serves a direct-form (student) model")
    model, processor = load_vlm(path, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        version = weights_checksum(model.state_dict())[:VERSION_CHARS]
    return LoadedModel(model=model, processor=processor, version=version, model_dir=str(path.resolve()),
                       rubric=read_rubric_file(path))


def check_same_rubric(current: Rubric, new: Rubric, model_dir: str) -> None:
    """A checkpoint swapped in must score the rubric the app serves (its ingress validates against it)."""
    if new.to_dict() != current.to_dict():
        raise ValueError(f"model={model_dir!r} records another rubric ({list(new.dimensions)}) than the served one "
                         f"({list(current.dimensions)}): deploy a new app for a new rubric")


def score_items(loaded: LoadedModel, items: Sequence[ScoreItem]) -> list[ScoreResult]:
    """Score every (item, dimension) in one forward pass of `loaded`; one ScoreResult per item, in order."""
    import torch

    from zray.models.vlm import score_distributions_hf
    from zray.scores import expected_score, score_bins

    dims = [loaded.dimensions_of(it) for it in items]
    requests = [ScoreRequest(prompt=it.prompt, image=it.image, dimension=d, anchors=loaded.rubric.anchors_for(d))
                for it, item_dims in zip(items, dims) for d in item_dims]
    with torch.inference_mode():
        q_BK = score_distributions_hf(loaded.model, loaded.processor, requests).double()
    mu_B = expected_score(q_BK)
    var_B = (q_BK * (score_bins(dtype=torch.float64)[None, :] - mu_B[:, None]) ** 2).sum(-1)
    out, row = [], 0
    for item_dims in dims:
        scores = {}
        for dim in item_dims:
            scores[dim] = DimensionScore(distribution=tuple(float(p) for p in q_BK[row]),
                                         expected_score=float(mu_B[row]), std=math.sqrt(max(float(var_B[row]), 0.0)))
            row += 1
        out.append(ScoreResult(model_version=loaded.version, model_dir=loaded.model_dir, scores=scores))
    return out


def parse_user_config(config: dict[str, Any]) -> tuple[str, int, float]:
    """(model, max_batch_size, batch_wait_timeout_s) from the scorer's user_config, checked."""
    if not isinstance(config, dict):
        raise ValueError(f"user_config={config!r} is not allowed: expected a mapping with 'model'")
    unknown = sorted(set(config) - {"model", "max_batch_size", "batch_wait_timeout_s"})
    if unknown:
        raise ValueError(f"user_config keys {unknown} are not allowed: expected model, max_batch_size, "
                         "batch_wait_timeout_s")
    model = config.get("model")
    size = config.get("max_batch_size", 8)
    wait = config.get("batch_wait_timeout_s", 0.01)
    if not isinstance(model, str) or not model:
        raise ValueError(f"user_config.model={model!r} is not allowed: expected a student checkpoint dir")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"user_config.max_batch_size={size!r} is not allowed: expected an integer >= 1")
    if not isinstance(wait, (int, float)) or isinstance(wait, bool) or not 0 <= wait <= 10:
        raise ValueError(f"user_config.batch_wait_timeout_s={wait!r} is not allowed: expected seconds in [0, 10]")
    return model, size, float(wait)


@serve.deployment(name="RewardScorer", ray_actor_options={"num_cpus": 1})
class RewardScorer:
    """The student behind `@serve.batch`; verbs: `score` (typed items), `info`; `reconfigure` swaps checkpoints."""

    def __init__(self, torch_threads: int = 1, rubric: Rubric | None = None) -> None:
        import torch

        self._rubric = rubric  # the app's (its ingress validates against it); None: whatever the checkpoint records
        torch.set_num_threads(torch_threads)
        self._loaded: LoadedModel | None = None
        self._max_batch_size = 8
        self._batch_wait_timeout_s = 0.01
        self._load_lock = threading.Lock()
        self._load_error = ""
        self._scores = metrics.Histogram(
            "zray_reward_expected_score", description="expected score mu of each scored dimension",
            boundaries=[b + 0.25 for b in SCORE_BINS[:-1]], tag_keys=("dimension",))
        self._scored = metrics.Counter("zray_reward_scored_items", description="items scored, by weights version",
                                       tag_keys=("model_version",))

    async def reconfigure(self, config: dict[str, Any]) -> None:
        """Apply a user_config: batching limits at once; a different checkpoint is loaded off the event loop (the
        old one keeps serving meanwhile), then swapped in with one assignment."""
        model_dir, size, wait = parse_user_config(config)
        self._max_batch_size, self._batch_wait_timeout_s = size, wait
        self._score_batch.set_max_batch_size(size)
        self._score_batch.set_batch_wait_timeout_s(wait)
        current = self._loaded
        if current is not None and str(Path(model_dir).resolve()) == current.model_dir:
            return
        try:
            loaded = await asyncio.to_thread(self._load, model_dir)
            served = self._rubric or (current.rubric if current is not None else None)
            if served is not None:
                check_same_rubric(served, loaded.rubric, model_dir)
        except Exception as err:
            if current is None:
                raise  # nothing to serve: the replica fails to start, with this error
            # A bad checkpoint in a roll-out: keep serving the old one; info() and roll_out report it.
            self._load_error = f"model={model_dir!r}: {type(err).__name__}: {err}"
            logger.error("keeping model %s (%s): loading the new checkpoint failed: %s", current.model_dir,
                         current.version, self._load_error)
            return
        self._loaded, self._load_error = loaded, ""  # atomic: a running batch holds its own reference

    def _load(self, model_dir: str) -> LoadedModel:
        with self._load_lock:
            return load_student(model_dir)

    async def score(self, items: Sequence[ScoreItem]) -> list[ScoreResult]:
        """Score `items` (each batched with concurrent callers' items); one ScoreResult per item, in order."""
        for i, it in enumerate(items):
            if not isinstance(it, ScoreItem):
                raise TypeError(f"items[{i}] is a {type(it).__name__}: expected actors.reward_app.scorer.ScoreItem")
        return list(await asyncio.gather(*(self._score_batch(it) for it in items)))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _score_batch(self, items: list[ScoreItem]) -> list[ScoreResult]:
        loaded = self._loaded  # read once: the whole batch is scored by these weights
        if loaded is None:
            raise RuntimeError("no model loaded: the RewardScorer deployment needs user_config={'model': DIR}")
        results = await asyncio.to_thread(score_items, loaded, items)
        for res in results:
            for dim, s in res.scores.items():
                self._scores.observe(s.expected_score, tags={"dimension": dim})
        self._scored.inc(len(items), tags={"model_version": loaded.version})
        return results

    def info(self) -> dict[str, Any]:
        """The served checkpoint and batching limits, and this replica's identity (for restart checks)."""
        loaded = self._loaded
        try:
            replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside a Serve replica (direct construction in tests)
            replica = ""
        return {"model_dir": loaded.model_dir if loaded else "", "model_version": loaded.version if loaded else "",
                "dimensions": list(loaded.rubric.dimensions) if loaded else [],
                "max_batch_size": self._max_batch_size, "batch_wait_timeout_s": self._batch_wait_timeout_s,
                "load_error": self._load_error, "replica_id": replica, "pid": os.getpid()}

    def check_health(self) -> None:
        if self._loaded is None:
            raise RuntimeError("no model loaded: the RewardScorer deployment needs user_config={'model': DIR}")
