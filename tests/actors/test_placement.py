"""Placement per role (actors/placement.py): the feasibility check on hand-made node lists (no Ray), the config
fields and their `--set` syntax, and a local multi-node cluster (tests/actors/placement_scenario.py, in a subprocess)
where engines, learner workers and scorer replicas land on the nodes the recipe names and unsatisfiable recipes fail
at once."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from actors.placement import (PlacementError, check_feasible, engine_bundles, learner_bundles, scorer_actor_options,
                              scorer_bundles)
from jobs.cli import resolve_config
from jobs.recipes import full
from zray.config import ConfigError, LearnerConfig, ServeConfig, VLLMConfig, to_dict

ROOT = Path(__file__).resolve().parents[2]
SCENARIO = Path(__file__).with_name("placement_scenario.py")


def node(ip: str, **resources: float) -> dict:
    return {"name": f"node {ip}", "resources": resources}


CPU_NODE = node("10.0.0.1", CPU=8)
GPU_NODE = node("10.0.0.2", CPU=8, GPU=1, engine_node=1)
ENGINE = {"GPU": 1, "engine_node": 1}

# ------------------------------------------------------------------------------------------ check_feasible


def test_strict_spread_needs_one_node_per_bundle():
    with pytest.raises(PlacementError) as err:
        check_feasible("teacher engines", [ENGINE, ENGINE], "STRICT_SPREAD", nodes=[CPU_NODE, GPU_NODE])
    assert str(err.value) == ("teacher engines: 2 x {GPU: 1, engine_node: 1} with STRICT_SPREAD need 2 distinct nodes "
                              "with GPU >= 1 and engine_node >= 1; the cluster has 1 (node 10.0.0.2: GPU 1, "
                              "engine_node 1)")
    check_feasible("teacher engines", [ENGINE, ENGINE], "STRICT_SPREAD",
                   nodes=[CPU_NODE, GPU_NODE, node("10.0.0.3", GPU=2, engine_node=4)])


def test_spread_matches_bundles_to_nodes_without_greedy_dead_ends():
    # the CPU bundle first takes the only GPU node; the GPU bundle then needs it back
    nodes = [node("a", CPU=4, GPU=1), node("b", CPU=4)]
    check_feasible("mixed", [{"CPU": 4}, {"GPU": 1}], "STRICT_SPREAD", nodes=nodes)
    with pytest.raises(PlacementError, match="need 2 distinct nodes"):
        check_feasible("mixed", [{"GPU": 1}, {"GPU": 1}], "STRICT_SPREAD", nodes=nodes)


def test_a_resource_no_node_has_is_named():
    with pytest.raises(PlacementError) as err:
        check_feasible("learner gdso", [{"CPU": 1, "tpu_node": 1}] * 3, "PACK", nodes=[CPU_NODE, GPU_NODE])
    assert str(err.value) == ("learner gdso: 3 x {CPU: 1, tpu_node: 1} with PACK: no node has tpu_node >= 1 "
                              "(node 10.0.0.1: tpu_node 0; node 10.0.0.2: tpu_node 0)")
    with pytest.raises(PlacementError, match=r"engines: 1 x \{GPU: 2\} with PACK: no node has GPU >= 2"):
        check_feasible("engines", [{"GPU": 2}], "PACK", nodes=[GPU_NODE])
    with pytest.raises(PlacementError, match="no node has GPU >= 1 and engine_node >= 1 together"):
        check_feasible("engines", [ENGINE], "SPREAD", nodes=[node("a", GPU=1), node("b", engine_node=1)])


def test_strict_pack_needs_one_node_for_all():
    nodes = [node("a", GPU=1), node("b", GPU=1)]
    check_feasible("engines", [{"GPU": 1}, {"GPU": 1}], "PACK", nodes=nodes)  # soft: one per node is fine
    with pytest.raises(PlacementError) as err:
        check_feasible("engines", [{"GPU": 1}, {"GPU": 1}], "STRICT_PACK", nodes=nodes)
    assert str(err.value) == ("engines: 2 x {GPU: 1} with STRICT_PACK need one node with GPU >= 2; none has "
                              "(node a: GPU 1; node b: GPU 1)")


def test_soft_strategies_need_the_totals():
    with pytest.raises(PlacementError, match=r"engines: 2 x \{GPU: 1, engine_node: 1\} with SPREAD need GPU 2 in all; "
                                             r"the cluster has 1 \(node 10.0.0.1: GPU 0; node 10.0.0.2: GPU 1\)"):
        check_feasible("engines", [ENGINE, ENGINE], "SPREAD", nodes=[CPU_NODE, GPU_NODE])
    check_feasible("nothing", [], "PACK", nodes=[])
    with pytest.raises(ValueError, match="strategy='BALANCED' is not allowed"):
        check_feasible("engines", [ENGINE], "BALANCED", nodes=[GPU_NODE])


def test_a_scale_from_zero_cluster_counts_the_node_types_its_autoscaler_may_start(tmp_path):
    from actors.placement import launcher_node_types

    nodes = launcher_node_types(ROOT / "cluster" / "cluster.yaml")  # as `ray up` leaves it on the head
    assert [(n["name"], n["resources"]) for n in nodes] == [
        ("node type ray.worker.h100x8.learner", {"CPU": 192, "GPU": 8, "learner_node": 8}),
        ("node type ray.worker.h100x8.engines", {"CPU": 192, "GPU": 8, "engine_node": 8})]
    cfg = full()  # no GPU node is up yet: the full recipe's teacher stage is still placeable
    check_feasible("learner", learner_bundles(cfg.train_teacher.learner), "PACK", nodes=nodes)
    check_feasible("engines", engine_bundles(cfg.vllm, cfg.vllm.num_engines), cfg.vllm.placement_strategy, nodes=nodes)
    assert launcher_node_types(tmp_path / "none.yaml") == []


def test_bundles_per_role():
    vllm = VLLMConfig(num_engines=3, cpus_per_engine=2, gpus_per_engine=0.5, resources={"engine_node": 1})
    assert engine_bundles(vllm, 2) == [{"CPU": 2, "GPU": 0.5, "engine_node": 1}] * 2
    assert engine_bundles(VLLMConfig(), 1) == [{"CPU": 1}]  # no zero amounts: Ray refuses them in bundles
    learner = LearnerConfig(num_workers=2, cpus_per_worker=4, use_gpu=True, resources={"learner_node": 1})
    assert learner_bundles(learner) == [{"CPU": 4, "GPU": 1, "learner_node": 1}] * 2
    serve = ServeConfig(num_replicas=2, cpus_per_replica=0.5, gpus_per_replica=1, resources={"serve_node": 1})
    assert scorer_actor_options(serve) == {"num_cpus": 0.5, "num_gpus": 1, "resources": {"serve_node": 1}}
    assert scorer_bundles(serve, 3) == [{"CPU": 0.5, "GPU": 1, "serve_node": 1}] * 3


# ------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("make, fragment", [
    (lambda: VLLMConfig(resources={"CPU": 1}), "VLLMConfig.resources={'CPU': 1} is not allowed: expected custom "
                                               "resources only: 'CPU' is set by cpus_per_engine / gpus_per_engine"),
    (lambda: LearnerConfig(resources={"GPU": 1}), "'GPU' is set by cpus_per_worker / use_gpu"),
    (lambda: ServeConfig(resources={"memory": 1}), "custom resources only, not 'memory'"),
    (lambda: VLLMConfig(resources={"engine_node": 1.5}), "VLLMConfig.resources['engine_node']=1.5 is not allowed: "
                                                         "expected a number in (0, 1] or a whole number"),
    (lambda: VLLMConfig(resources={"engine_node": 0}), "VLLMConfig.resources['engine_node']=0"),
    (lambda: VLLMConfig(resources="engine_node"), "expected a dict of custom Ray resource names to amounts"),
    (lambda: VLLMConfig(placement_strategy="BALANCED"), "VLLMConfig.placement_strategy='BALANCED' is not allowed: "
                                                        "expected one of 'PACK', 'SPREAD', 'STRICT_PACK'"),
    (lambda: VLLMConfig(placement_timeout_s=0), "VLLMConfig.placement_timeout_s=0"),
    (lambda: ServeConfig(gpus_per_replica=-1), "ServeConfig.gpus_per_replica=-1 is not allowed"),
], ids=["cpu", "gpu", "memory", "fraction-above-1", "zero", "not-a-dict", "strategy", "timeout", "serve-gpus"])
def test_placement_fields_are_validated(make, fragment):
    with pytest.raises(ConfigError) as err:
        make()
    assert fragment in str(err.value)


def test_placement_fields_from_the_command_line():
    cfg = resolve_config("tiny_cpu", ["vllm.resources=engine_node=1,accelerator_type:H100=0.001",
                                      "vllm.placement_strategy=STRICT_SPREAD",
                                      "train_teacher.learner.resources=learner_node=1",
                                      "serve.gpus_per_replica=1", "serve.resources="])
    assert cfg.vllm.resources == {"engine_node": 1.0, "accelerator_type:H100": 0.001}
    assert cfg.vllm.placement_strategy == "STRICT_SPREAD"
    assert cfg.train_teacher.learner.resources == {"learner_node": 1.0}
    assert (cfg.serve.gpus_per_replica, cfg.serve.resources) == (1.0, {})
    json.dumps(to_dict(cfg))  # run records and fingerprints stay JSON
    for bad, fragment in [("vllm.resources=engine_node", "expected comma-separated name=amount pairs"),
                          ("vllm.resources=engine_node=many", "expected comma-separated name=amount pairs"),
                          ("vllm.resources=GPU=1", "'GPU' is set by cpus_per_engine / gpus_per_engine"),
                          ("vllm.placement_strategy=spread", "one of 'PACK', 'SPREAD'")]:
        with pytest.raises(ConfigError, match=fragment):
            resolve_config("tiny_cpu", [bad])


def test_a_config_keeps_its_own_copy_of_resources():
    given = {"engine_node": 1}
    cfg = VLLMConfig(resources=given)
    given["engine_node"] = 2
    assert cfg.resources == {"engine_node": 1.0}


def test_the_full_recipe_puts_learners_and_engines_on_their_own_nodes():
    cfg = full()
    learners = [cfg.pretrain_vlm.learner, cfg.pretrain_vlm.vision, cfg.pretrain_vlm.instruct_learner,
                cfg.pretrain_generator.vae, cfg.pretrain_generator.flow, cfg.train_teacher.learner,
                cfg.train_student.learner, cfg.distill_generator.learner, cfg.reward_finetune.learner]
    assert all(lc.resources == {"learner_node": 1.0} and lc.use_gpu for lc in learners)
    assert cfg.vllm.resources == {"engine_node": 1.0} and cfg.vllm.gpus_per_engine == 1.0


# ------------------------------------------------------------------------------------------ pools and deploys


def test_a_pool_frees_the_group_of_whole_engine_sets_only():
    from actors.engine_pool import EnginePool, Engines

    engines = Engines(["engine-0", "engine-1"])
    engines.placement_group = "pg"
    assert EnginePool(engines).placement_group == "pg"
    assert EnginePool(engines[:1]).placement_group is None  # a slice's pool leaves the group to the owner
    assert pickle.loads(pickle.dumps(EnginePool(engines))).placement_group is None  # nor does a shipped copy


def test_deploy_checks_the_scorer_replicas_first(monkeypatch):
    import actors.placement
    from actors.reward_app.deploy import check_placement, deploy_config
    from ray.serve.schema import ServeDeploySchema

    monkeypatch.setattr(actors.placement, "cluster_nodes", lambda: [node("10.0.0.1", CPU=4)])
    config = deploy_config(ServeConfig(num_replicas=2, gpus_per_replica=1), model="/ckpt/a")
    with pytest.raises(PlacementError, match=r"reward scorer of 'reward': 2 x \{CPU: 1, GPU: 1\} with SPREAD: no node "
                                             r"has GPU >= 1 \(node 10.0.0.1: GPU 0\)"):
        check_placement(ServeDeploySchema.model_validate(config))
    config["applications"][0]["deployments"][0]["num_replicas"] = 5  # the deployment entry's count wins
    config["applications"][0]["args"]["gpus_per_replica"] = 0.0
    with pytest.raises(PlacementError, match=r"5 x \{CPU: 1\} with SPREAD need CPU 5 in all; the cluster has 4"):
        check_placement(ServeDeploySchema.model_validate(config))


# ------------------------------------------------------------------------------------------ a multi-node cluster


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    """The scenario's JSON result; its own Ray cluster in a subprocess, with its own Ray temp dir (sessions,
    sockets, the address file) so that nothing of it touches the test session's Ray."""
    out = tmp_path_factory.mktemp("placement")
    ray_tmp = tempfile.mkdtemp(prefix="zrp", dir="/tmp")  # short: Ray's socket paths must stay under 108 bytes
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(ROOT), RAY_TMPDIR=ray_tmp, RAY_USAGE_STATS_ENABLED="0")
    try:
        proc = subprocess.run([sys.executable, str(SCENARIO), str(out)], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print({k: round(v, 2) for k, v in result.items() if k.endswith("_s")})
    return result


@pytest.mark.slow
def test_each_role_lands_where_the_recipe_says(scenario):
    nodes = scenario["nodes"]
    assert len(set(nodes.values())) == 4
    engine_nodes = {nodes["engine_a"], nodes["engine_b"]}
    assert set(scenario["spread"]) == engine_nodes  # STRICT_SPREAD: one engine per engine node
    assert scenario["spread_restarted"] == scenario["spread"][0]  # a restarted engine stays in its bundle
    assert scenario["spread_group_after_shutdown"] == "REMOVED"  # EnginePool.shutdown frees the group
    assert len(set(scenario["pack"])) == 1 and scenario["pack"][0] in engine_nodes  # STRICT_PACK: one node
    assert scenario["learner"] == [nodes["learner"]] * 2  # Ray Train workers with LearnerConfig.resources
    assert scenario["scorer"] == [nodes["head"]] * 2  # scorer replicas with ServeConfig.resources


@pytest.mark.slow
def test_an_unsatisfiable_recipe_fails_at_once_naming_role_and_resource(scenario):
    errors = scenario["errors"]
    expected = {
        "spread_3_on_2": "teacher engines: 3 x {CPU: 0.5, engine_node: 1} with STRICT_SPREAD need 3 distinct nodes "
                         "with CPU >= 0.5 and engine_node >= 1; the cluster has 2",
        "no_such_resource": "teacher engines: 2 x {CPU: 0.5, tpu_node: 1} with PACK: no node has tpu_node >= 1",
        "learner_too_big": "learner teacher_gdso: 3 x {CPU: 1, learner_node: 1} with PACK need learner_node 3 in "
                           "all; the cluster has 2",
        "scorer_gpu": "reward scorer: 1 x {CPU: 1, GPU: 1} with SPREAD: no node has GPU >= 1",
    }
    for name, text in expected.items():
        assert errors[name]["message"].startswith(text), (name, errors[name]["message"])
        assert errors[name]["seconds"] < 1.0, (name, errors[name]["seconds"])  # checked, not waited for
    assert scenario["groups_created_by_errors"] == 0
    busy = errors["busy_timeout"]  # the cluster could hold it, but another group holds the engine nodes
    assert busy["message"].startswith("teacher engines: 2 x {CPU: 0.5, engine_node: 1} with PACK not placed within "
                                      "1 s (VLLMConfig.placement_timeout_s)"), busy["message"]
    assert busy["seconds"] < 10 and scenario["pending_groups_after_timeout"] == 0  # the timed-out group is removed
