"""Where each role runs: its resources as bundles, checked against the cluster before anything waits for them.

    check_feasible("teacher engines", engine_bundles(cfg.vllm, 4), "STRICT_SPREAD")   # PlacementError, at once
    pg = engine_placement_group(cfg.vllm, 4, role="teacher engines")  # one bundle per engine, ready (or an error)
    Actor.options(**in_bundle(pg, i), ...).remote(...)                 # actor i in bundle i
    remove_group(pg)                                                   # EnginePool.shutdown does it

The recipe says where roles go (zray.config): GPUs per role (`VLLMConfig.gpus_per_engine`, `LearnerConfig.use_gpu`,
`ServeConfig.gpus_per_replica`), custom resources that only some nodes advertise (`*.resources`, e.g.
{"engine_node": 1} on every engine and `ray start --resources='{"engine_node": 8}'` on the engine nodes), and
how engines share nodes (`VLLMConfig.placement_strategy`: STRICT_SPREAD one engine per node, STRICT_PACK all on
one node, PACK / SPREAD as Ray prefers). Who places what:

- engines: a placement group per engine set (`engine_placement_group`), each engine actor in its bundle; a
  restarted engine comes back in the same bundle (Ray keeps an actor's scheduling strategy across restarts).
- learners: Ray Train's own placement group (PACK) of `learner_bundles`; `fit` checks it first.
- reward scorer replicas: Serve places each replica with `ray_actor_options` from ServeConfig; `deploy` checks.

`check_feasible` compares the bundles with the nodes' total resources (`ray.nodes()`, plus the node types an
autoscaler may still start: Ray's cluster config when it reports one, `ray up`'s config on the head), so a recipe
the cluster can never hold fails at once with a `PlacementError` naming the role and the resource, instead of
waiting forever. It checks what is necessary (each bundle fits some node; STRICT_PACK: all fit one node;
STRICT_SPREAD: one distinct node each; PACK / SPREAD: the totals fit); a group that passes may still wait for busy
resources (bounded by `VLLMConfig.placement_timeout_s`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from zray.config import PLACEMENT_STRATEGIES, LearnerConfig, ServeConfig, VLLMConfig

Bundle = dict[str, float]
Node = dict[str, Any]  # {"name": str, "resources": {resource: total}}


class PlacementError(ValueError):
    """A role's resources cannot be placed: the message names the role, the resource, what is asked, what is there."""


# ------------------------------------------------------------------------------------------ bundles per role


def _bundle(cpus: float, gpus: float, resources: Mapping[str, float]) -> Bundle:
    """A bundle without zero amounts (Ray refuses them in placement groups)."""
    return {k: float(v) for k, v in {"CPU": cpus, "GPU": gpus, **resources}.items() if v}


def engine_bundles(cfg: VLLMConfig, num_engines: int) -> list[Bundle]:
    return [_bundle(cfg.cpus_per_engine, cfg.gpus_per_engine, cfg.resources) for _ in range(num_engines)]


def learner_bundles(cfg: LearnerConfig) -> list[Bundle]:
    """Ray Train's bundles for `cfg`: one per worker, its CPUs, one GPU with use_gpu, its custom resources."""
    return [_bundle(cfg.cpus_per_worker, 1.0 if cfg.use_gpu else 0.0, cfg.resources) for _ in range(cfg.num_workers)]


def scorer_actor_options(cfg: ServeConfig) -> dict[str, Any]:
    """The reward scorer replicas' `ray_actor_options`."""
    return {"num_cpus": cfg.cpus_per_replica, "num_gpus": cfg.gpus_per_replica, "resources": dict(cfg.resources)}


def scorer_bundles(cfg: ServeConfig, num_replicas: int | None = None) -> list[Bundle]:
    count = cfg.num_replicas if num_replicas is None else num_replicas
    return [_bundle(cfg.cpus_per_replica, cfg.gpus_per_replica, cfg.resources) for _ in range(count)]


# ------------------------------------------------------------------------------------------ the check


# Where `ray up` leaves the autoscaling config (cluster/cluster.yaml as launched) on the head node, which runs the
# drivers (`ray job submit`): its node types are the nodes a scale-from-zero cluster may still start.
LAUNCHER_CONFIG = "~/ray_bootstrap_config.yaml"
MAX_NODES_PER_TYPE = 64  # enough copies of a node type for any check here


def launcher_node_types(path: str | Path = LAUNCHER_CONFIG) -> list[Node]:
    """The worker node types of a cluster launcher config (`available_node_types`), each `max_workers` times (capped
    by the config's `max_workers`): the nodes its autoscaler may start. Empty if there is no such file."""
    path = Path(path).expanduser()
    if not path.is_file():
        return []
    import yaml  # a Ray dependency; the launcher writes JSON, which YAML reads too

    config = yaml.safe_load(path.read_text()) or {}
    cap = int(config.get("max_workers", MAX_NODES_PER_TYPE))
    return [{"name": f"node type {name}", "resources": dict(spec.get("resources") or {})}
            for name, spec in (config.get("available_node_types") or {}).items()
            for _ in range(min(int(spec.get("max_workers", 0)), cap, MAX_NODES_PER_TYPE))]


def cluster_nodes() -> list[Node]:
    """What a role could ever get: the live cluster's alive nodes with their total resources, plus the nodes an
    autoscaler may still start, from Ray's cluster config when Ray reports one (as Ray Data reads it) and from
    `ray up`'s autoscaling config on this (head) node (`launcher_node_types`)."""
    nodes = [{"name": f"node {n.get('NodeManagerAddress', '?')} ({str(n.get('NodeID', ''))[:8]})",
              "resources": dict(n.get("Resources") or {})} for n in ray.nodes() if n.get("Alive")]
    try:  # private API; None without an autoscaler that reports it
        config = ray._private.state.state.get_cluster_config()
    except Exception:  # noqa: BLE001 - no cluster config: the other sources are all there is
        config = None
    for group in getattr(config, "node_group_configs", []) or []:
        count = MAX_NODES_PER_TYPE if group.max_count < 0 else min(group.max_count, MAX_NODES_PER_TYPE)
        nodes += [{"name": f"node type {group.name}", "resources": dict(group.resources)}] * count
    return nodes + launcher_node_types()


def _fmt(amounts: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in amounts.items()) + "}"


def _fits(bundle: Mapping[str, float], resources: Mapping[str, float]) -> bool:
    return all(resources.get(k, 0.0) >= v - 1e-9 for k, v in bundle.items())


def _offer(nodes: Sequence[Node], keys: Sequence[str]) -> str:
    """What the nodes offer of `keys`, e.g. "node 10.0.0.2: GPU 1, engine_node 1; node 10.0.0.3: GPU 0, ..."."""
    shown = [f"{n['name']}: " + ", ".join(f"{k} {n['resources'].get(k, 0.0):g}" for k in keys) for n in nodes[:8]]
    return "; ".join(shown) + (f"; ... {len(nodes) - 8} more" if len(nodes) > 8 else "") if nodes else "no nodes"


def _spread_matches(bundles: Sequence[Bundle], nodes: Sequence[Node]) -> int:
    """How many bundles get a node of their own (bipartite matching, augmenting paths)."""
    owner: dict[int, int] = {}  # node index -> bundle index

    def assign(b: int, seen: set[int]) -> bool:
        for n, node in enumerate(nodes):
            if n not in seen and _fits(bundles[b], node["resources"]):
                seen.add(n)
                if n not in owner or assign(owner[n], seen):
                    owner[n] = b
                    return True
        return False

    return sum(assign(b, set()) for b in range(len(bundles)))


def check_feasible(role: str, bundles: Sequence[Mapping[str, float]], strategy: str = "PACK", *,
                   nodes: Sequence[Node] | None = None) -> None:
    """Raise PlacementError if `bundles` (one per actor of `role`) can never be placed with `strategy` on `nodes`
    (default: `cluster_nodes()`, the live cluster). Only necessary conditions are checked, so nothing is refused
    that Ray could place; a failure names the role, the resource, the amounts asked and what the nodes offer."""
    if strategy not in PLACEMENT_STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is not allowed: expected one of {', '.join(PLACEMENT_STRATEGIES)}")
    bundles = [{k: float(v) for k, v in b.items() if v} for b in bundles]
    if not bundles:
        return
    nodes = cluster_nodes() if nodes is None else list(nodes)
    count = len(bundles)
    same = all(b == bundles[0] for b in bundles)
    asked = f"{count} x {_fmt(bundles[0])}" if same else " + ".join(_fmt(b) for b in bundles)
    head = f"{role}: {asked} with {strategy}"

    for bundle in bundles:  # every bundle needs one node that holds all of it
        fitting = [n for n in nodes if _fits(bundle, n["resources"])]
        if fitting:
            continue
        short = [k for k, v in bundle.items() if max((n["resources"].get(k, 0.0) for n in nodes), default=0.0) < v]
        keys = short or list(bundle)
        what = (f"no node has {' and '.join(f'{k} >= {bundle[k]:g}' for k in short)}" if short else
                f"no node has {' and '.join(f'{k} >= {v:g}' for k, v in bundle.items())} together")
        raise PlacementError(f"{head}: {what} ({_offer(nodes, keys)})")

    keys = sorted({k for b in bundles for k in b})
    if strategy == "STRICT_PACK":
        total = {k: sum(b.get(k, 0.0) for b in bundles) for k in keys}
        if not any(_fits(total, n["resources"]) for n in nodes):
            need = " and ".join(f"{k} >= {v:g}" for k, v in total.items())
            raise PlacementError(f"{head} need one node with {need}; none has ({_offer(nodes, keys)})")
    elif strategy == "STRICT_SPREAD":
        placed = _spread_matches(bundles, nodes)
        if placed < count:
            fitting = [n for n in nodes if any(_fits(b, n["resources"]) for b in bundles)]
            need = " and ".join(f"{k} >= {v:g}" for k, v in bundles[0].items())
            raise PlacementError(f"{head} need {count} distinct nodes with {need}; the cluster has {placed} "
                                 f"({_offer(fitting or nodes, keys)})")
    else:  # PACK / SPREAD: soft, any split over nodes; the totals must be there
        for k in keys:
            want = sum(b.get(k, 0.0) for b in bundles)
            have = sum(n["resources"].get(k, 0.0) for n in nodes)
            if have < want - 1e-9:
                raise PlacementError(f"{head} need {k} {want:g} in all; the cluster has {have:g} "
                                     f"({_offer(nodes, [k])})")


# ------------------------------------------------------------------------------------------ placement groups


def engine_placement_group(cfg: VLLMConfig, num_engines: int, *, role: str = "engines",
                           timeout_s: float | None = None) -> PlacementGroup:
    """A ready placement group with one bundle per engine (`cfg.placement_strategy`), checked first; waits at most
    `timeout_s` (default `cfg.placement_timeout_s`), then removes the group and raises PlacementError naming the
    role, what it asked and what the cluster has free."""
    bundles = engine_bundles(cfg, num_engines)
    check_feasible(role, bundles, cfg.placement_strategy)
    pg = placement_group(bundles, strategy=cfg.placement_strategy, name="")
    wait_s = cfg.placement_timeout_s if timeout_s is None else timeout_s
    if not pg.wait(timeout_seconds=wait_s):
        remove_group(pg)
        available = ray.available_resources()
        free = {k: available.get(k, 0.0) for k in bundles[0]}
        raise PlacementError(
            f"{role}: {num_engines} x {_fmt(bundles[0])} with {cfg.placement_strategy} not placed within "
            f"{wait_s:g} s (VLLMConfig.placement_timeout_s); the cluster could hold them but they are in use "
            f"(free now: {_fmt(free)}) or nodes are still starting")
    return pg


def in_bundle(pg: PlacementGroup, index: int) -> dict[str, Any]:
    """`.options(...)` that put an actor in bundle `index` of `pg` (its child tasks are not captured)."""
    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=pg,
                                                                    placement_group_bundle_index=index)}


def remove_group(pg: PlacementGroup | None) -> None:
    """Remove a placement group (its actors are killed); nothing if it is None or already gone."""
    if pg is None:
        return
    try:
        remove_placement_group(pg)
    except Exception:  # noqa: BLE001 - already removed, or Ray is shut down: nothing left to free
        pass


__all__ = ["PlacementError", "check_feasible", "cluster_nodes", "engine_bundles", "engine_placement_group",
           "in_bundle", "launcher_node_types", "learner_bundles", "remove_group", "scorer_actor_options",
           "scorer_bundles"]

