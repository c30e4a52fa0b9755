"""Placement on a local multi-node Ray cluster: custom resources stand in for node roles, each role is placed through
zray's own code path and reports the node it runs on; unsatisfiable recipes fail at once.

Run by tests/actors/test_placement.py in a subprocess (the test session runs its own Ray instance in-process, and a
`ray.cluster_utils.Cluster` needs a driver of its own): `python tests/actors/placement_scenario.py OUT_DIR`. Prints
one JSON object on its last line. The nodes (all on this machine, 2 logical CPUs each):

    head        {"serve_node": 2}      the reward scorer replicas (ServeConfig.resources)
    engine_a    {"engine_node": 2}     vLLM engines (VLLMConfig.resources)
    engine_b    {"engine_node": 2}
    learner     {"learner_node": 2}    Ray Train workers (LearnerConfig.resources)

Engines are light stand-in actors started by `actors.engine_pool.start_engines` itself (`engine_class=`): the same
placement group, bundles and options a vLLM engine gets, without a vLLM start (~15 s and ~2 GB each here). The
learner is a real TorchTrainer with `actors.learner.trainer.scaling_config` (what `fit` passes) and a loop that only
records each worker's node. The scorer is a plain actor with `scorer_actor_options` (what build_app gives Serve).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import ray
from ray.cluster_utils import Cluster


@ray.remote
class StandInEngine:
    """TeacherEngine's constructor and the methods start_engines / EnginePool call, plus where it runs."""

    def __init__(self, model_dir, cfg, *, seed=0, dtype=None):
        self.seed = seed

    def version(self):
        return 0

    def node(self):
        return ray.get_runtime_context().get_node_id()

    def shutdown(self):
        return None


@ray.remote
class StandInScorer:
    def node(self):
        return ray.get_runtime_context().get_node_id()


def record_node(config):
    """A Ray Train worker loop: write this worker's node id to <dir>/rank<r>.txt."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    Path(config["dir"], f"rank{rank}.txt").write_text(ray.get_runtime_context().get_node_id())


def timed_error(fn):
    """(message, seconds) of the PlacementError `fn` raises; an AssertionError if it raises nothing."""
    from actors.placement import PlacementError

    start = time.perf_counter()
    try:
        fn()
    except PlacementError as err:
        return {"message": str(err), "seconds": time.perf_counter() - start}
    raise AssertionError(f"{fn} placed what it should have refused")


def wait_back(actor, timeout_s=60.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            return ray.get(actor.node.remote(), timeout=5)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            time.sleep(0.2)
    raise AssertionError("a killed stand-in engine did not come back")


def main(out_dir: Path) -> dict:
    from ray.train import RunConfig
    from ray.train.torch import TorchTrainer
    from ray.util import placement_group_table

    from actors.engine_pool import EnginePool, start_engines
    from actors.learner.trainer import scaling_config
    from actors.placement import check_feasible, engine_placement_group, scorer_actor_options, scorer_bundles
    from zray.config import LearnerConfig, ServeConfig, VLLMConfig

    clock = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"serve_node": 2},
                                                            "include_dashboard": False})
    names = {"head": cluster.head_node.node_id}
    for name, resources in [("engine_a", {"engine_node": 2}), ("engine_b", {"engine_node": 2}),
                            ("learner", {"learner_node": 2})]:
        names[name] = cluster.add_node(num_cpus=2, resources=resources).node_id
    ray.init(address=cluster.address, log_to_driver=False)
    out: dict = {"nodes": names, "cluster_start_s": time.perf_counter() - clock}
    engines_cfg = VLLMConfig(num_engines=2, cpus_per_engine=0.5, resources={"engine_node": 1},
                             max_engine_restarts=1, placement_timeout_s=30.0)
    try:
        # engines, one per node; engine 0 killed comes back in its bundle, on its node
        spread = start_engines("unused", replace(engines_cfg, placement_strategy="STRICT_SPREAD"),
                               role="teacher engines", engine_class=StandInEngine)
        out["spread"] = ray.get([e.node.remote() for e in spread])
        ray.kill(spread[0], no_restart=False)
        time.sleep(0.5)
        out["spread_restarted"] = wait_back(spread[0])
        pool = EnginePool(spread)
        pool.shutdown()
        out["spread_group_after_shutdown"] = placement_group_table(spread.placement_group)["state"]

        # engines, all on one node
        pack = start_engines("unused", replace(engines_cfg, placement_strategy="STRICT_PACK"),
                             role="student engines", engine_class=StandInEngine)
        out["pack"] = ray.get([e.node.remote() for e in pack])
        EnginePool(pack).shutdown()

        # the learner: a real TorchTrainer with fit's ScalingConfig
        learner_cfg = LearnerConfig(num_workers=2, cpus_per_worker=1, resources={"learner_node": 1})
        start = time.perf_counter()
        trainer = TorchTrainer(record_node, train_loop_config={"dir": str(out_dir)},
                               scaling_config=scaling_config(learner_cfg, "scenario"),
                               run_config=RunConfig(name="placement", storage_path=str(out_dir / "train")))
        trainer.fit()
        out["learner_fit_s"] = time.perf_counter() - start
        out["learner"] = [(out_dir / f"rank{r}.txt").read_text() for r in range(learner_cfg.num_workers)]

        # the reward scorer replicas' options (as build_app gives them to Serve), checked as deploy checks them
        serve_cfg = ServeConfig(num_replicas=2, cpus_per_replica=0.5, resources={"serve_node": 1})
        check_feasible("reward scorer", scorer_bundles(serve_cfg), "SPREAD")
        scorers = [StandInScorer.options(**scorer_actor_options(serve_cfg)).remote() for _ in range(2)]
        out["scorer"] = ray.get([s.node.remote() for s in scorers])
        for s in scorers:
            ray.kill(s)

        # recipes the cluster can never hold: refused at once, nothing created
        groups_before = len(placement_group_table())
        out["errors"] = {
            "spread_3_on_2": timed_error(lambda: start_engines(
                "unused", replace(engines_cfg, placement_strategy="STRICT_SPREAD"),
                num_engines=3, role="teacher engines", engine_class=StandInEngine)),
            "no_such_resource": timed_error(lambda: start_engines(
                "unused", replace(engines_cfg, resources={"tpu_node": 1}),
                role="teacher engines", engine_class=StandInEngine)),
            "learner_too_big": timed_error(lambda: scaling_config(
                LearnerConfig(num_workers=3, resources={"learner_node": 1}), "teacher_gdso")),
            "scorer_gpu": timed_error(lambda: check_feasible(
                "reward scorer", scorer_bundles(ServeConfig(gpus_per_replica=1.0)), "SPREAD")),
        }
        out["groups_created_by_errors"] = len(placement_group_table()) - groups_before

        # feasible but busy: the bounded wait ends in an error naming the role, and the group is removed
        hog = ray.util.placement_group([{"engine_node": 2}, {"engine_node": 2}], strategy="STRICT_SPREAD")
        ray.get(hog.ready(), timeout=30)
        busy = replace(engines_cfg, placement_timeout_s=1.0)
        out["errors"]["busy_timeout"] = timed_error(lambda: engine_placement_group(busy, 2, role="teacher engines"))
        states = [g["state"] for g in placement_group_table().values()]
        out["pending_groups_after_timeout"] = states.count("PENDING")
        ray.util.remove_placement_group(hog)
    finally:
        ray.shutdown()
        cluster.shutdown()
    out["total_s"] = time.perf_counter() - clock
    return out


if __name__ == "__main__":
    result = main(Path(sys.argv[1]))
    print(json.dumps(result))
