"""The cluster files (cluster/) stay true to the code: every YAML parses; each KubeRay RayJob has the fields KubeRay
needs, runs a `zray` command line that the CLI accepts with a recipe that exists, names its images, mounts shared
storage for its out_dir and has the GPUs, CPUs and custom resources that the recipe's roles of that stage ask for,
on nodes where each role can be placed (actors.placement.check_feasible on the pods as nodes); the RayService
serves cluster/serve.yaml's application; the cluster launcher config passes Ray's own schema and can grow to the
GPUs the largest stage needs; the working dir that `ray job submit` uploads stays small.

The checkers return a list of problems (empty = fine) so that the planted violations at the bottom can show that
each one reports what it should. No Ray instance is started.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import io
import json
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from actors.placement import (PlacementError, check_feasible, engine_bundles, launcher_node_types,
                              learner_bundles)
from jobs.cli import build_parser, resolve_config
from jobs.recipes import RECIPES
from zray.config import ConfigError, LearnerConfig, RunConfig

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
# One RayJob per training stage and one for the whole pipeline: cluster/kuberay/rayjob-<stage>.yaml.
STAGES = ("pretrain-vlm", "pretrain-generator", "train-teacher", "train-student", "distill-generator",
          "reward-finetune", "run")
RAY_VERSION = importlib.metadata.version("ray")
UPLOAD_LIMIT_MIB = 50  # Ray refuses 512 MiB; zray's code is about 2 MiB, so anything near this is a leak


def load_yaml(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


# ------------------------------------------------------------------------------------- what a stage asks for

# Per stage, the phases that run one after another; in each phase, the learners and the number of vLLM engine sets
# (`vllm.num_engines` engines each) that run at the same time. Mirrors each job's `init_ray(...)` CPU sum in jobs/.
Phase = tuple[tuple[LearnerConfig, ...], int]


def _stage_phases(stage: str, cfg: RunConfig) -> list[Phase]:
    phases = {
        "pretrain-vlm": [((cfg.pretrain_vlm.vision,), 0), ((cfg.pretrain_vlm.learner,), 0),
                         ((cfg.pretrain_vlm.instruct_learner,), 0)],
        "pretrain-generator": [((cfg.pretrain_generator.vae,), 0), ((cfg.pretrain_generator.flow,), 0)],
        "train-teacher": [((cfg.train_teacher.learner,), 1)],  # GDSO / GRPO: learner + rollout engines
        "train-student": [((cfg.train_student.learner,), 2)],  # OPD: learner + teacher and student engines
        "distill-generator": [((cfg.distill_generator.learner,), 0)],
        "reward-finetune": [((cfg.reward_finetune.learner,), 0)],
    }
    if stage == "run":  # every stage, one after the other, on one cluster
        return [phase for name in STAGES[:-1] for phase in phases[name]]
    return phases[stage]


def stage_needs(stage: str, cfg: RunConfig) -> dict[str, Any]:
    """The most GPUs, CPUs and custom resources (Ray's logical resources) that `stage` holds at once under `cfg`,
    and the GPUs of the largest single actor (an engine or a learner worker must fit on one node)."""
    vllm = cfg.vllm
    gpus = cpus = largest = 0.0
    custom: dict[str, float] = {}
    for learners, engine_sets in _stage_phases(stage, cfg):
        engines = engine_sets * vllm.num_engines
        gpus = max(gpus, sum(lc.num_workers for lc in learners if lc.use_gpu) + engines * vllm.gpus_per_engine)
        cpus = max(cpus, sum(lc.num_workers * lc.cpus_per_worker for lc in learners) + engines * vllm.cpus_per_engine)
        largest = max([largest] + [1.0 for lc in learners if lc.use_gpu]
                      + ([vllm.gpus_per_engine] if engine_sets else []))
        held: dict[str, float] = {}
        for amounts, count in [(lc.resources, lc.num_workers) for lc in learners] + [(vllm.resources, engines)]:
            for name, amount in amounts.items():
                held[name] = held.get(name, 0.0) + amount * count
        custom = {k: max(custom.get(k, 0.0), held.get(k, 0.0)) for k in {*custom, *held}}
    if stage == "run":  # the pipeline's serve stage: the reward service's scorer replicas
        cpus = max(cpus, cfg.serve.num_replicas * cfg.serve.cpus_per_replica)
    return {"GPU": gpus, "CPU": cpus, "custom": custom, "largest_gpu_actor": largest}


def stage_roles(stage: str, cfg: RunConfig) -> list[tuple[str, list[dict[str, float]], str]]:
    """(role, bundles, strategy) of every role that `stage` places: its learners, its engine sets."""
    roles = []
    for learners, engine_sets in _stage_phases(stage, cfg):
        roles += [("learner", learner_bundles(lc), "PACK") for lc in learners]
        if engine_sets:
            roles.append(("engines", engine_bundles(cfg.vllm, cfg.vllm.num_engines), cfg.vllm.placement_strategy))
    return roles


# ------------------------------------------------------------------------------------------------- checkers


def _quantity(value: Any) -> float:
    """A Kubernetes CPU / GPU quantity ("8", 8, "500m") as a number."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _containers(template: Any, where: str, problems: list[str]) -> list[dict[str, Any]]:
    containers = (template or {}).get("spec", {}).get("containers") if isinstance(template, dict) else None
    if not isinstance(containers, list) or not containers:
        problems.append(f"{where}.template.spec.containers: expected a non-empty list")
        return []
    for i, c in enumerate(containers):
        image = c.get("image") if isinstance(c, dict) else None
        if not isinstance(c, dict) or not isinstance(c.get("name"), str) or not c["name"]:
            problems.append(f"{where}.template.spec.containers[{i}].name: expected a non-empty string")
        if not isinstance(image, str) or ":" not in image.rsplit("/", 1)[-1]:
            problems.append(f"{where}.template.spec.containers[{i}].image: expected a named image with a tag, "
                            f"got {image!r}")
    return [c for c in containers if isinstance(c, dict)]


def _mounts(containers: list[dict[str, Any]]) -> set[str]:
    return {m.get("mountPath", "") for c in containers for m in c.get("volumeMounts") or []}


def _start_params(params: Any, where: str, problems: list[str], required: bool) -> dict[str, str]:
    if params is None and not required:
        return {}
    if not isinstance(params, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in params.items()):
        problems.append(f"{where}.rayStartParams: expected a map of strings to strings (quote numbers), "
                        f"got {params!r}")
        return {}
    return params


def _custom_resources(params: dict[str, str], where: str, problems: list[str]) -> dict[str, float]:
    """rayStartParams `resources` in KubeRay's quoting ('"{\\"learner_node\\": 8}"': a JSON object inside double
    quotes, for the shell) as {name: amount}."""
    text = params.get("resources")
    if text is None:
        return {}
    inner = text[1:-1].replace('\\"', '"') if len(text) > 1 and text[0] == text[-1] == '"' else None
    try:
        value = json.loads(inner) if inner is not None else None
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict) or not all(isinstance(v, (int, float)) for v in value.values()):
        problems.append(f"{where}.rayStartParams.resources: expected KubeRay's quoted JSON object, e.g. "
                        f"'\"{{\\\"learner_node\\\": 8}}\"', got {text!r}")
        return {}
    return {str(k): float(v) for k, v in value.items()}


def ray_cluster_problems(spec: Any, where: str) -> tuple[list[str], dict[str, Any]]:
    """Problems of a RayCluster spec (a RayJob's rayClusterSpec, a RayService's rayClusterConfig), and what it
    offers: {"GPU", "CPU", "custom" (totals of custom resources), "nodes" (each pod as a node for
    actors.placement.check_feasible), "max_gpus_per_pod", "shared_mounts", "images"}."""
    problems: list[str] = []
    offer: dict[str, Any] = {"GPU": 0.0, "CPU": 0.0, "custom": {}, "nodes": [], "max_gpus_per_pod": 0.0,
                             "shared_mounts": set(), "images": set()}
    if not isinstance(spec, dict):
        return [f"{where}: expected a mapping"], offer
    if spec.get("rayVersion") != RAY_VERSION:
        problems.append(f"{where}.rayVersion: expected {RAY_VERSION!r} (the installed Ray), got "
                        f"{spec.get('rayVersion')!r}")
    if (spec.get("authOptions") or {}).get("mode") != "token":  # else anyone on the pod network may submit jobs
        problems.append(f"{where}.authOptions.mode: expected 'token', got {spec.get('authOptions')!r}")
    head = spec.get("headGroupSpec")
    if not isinstance(head, dict):
        return problems + [f"{where}.headGroupSpec: expected a mapping"], offer
    params = _start_params(head.get("rayStartParams"), f"{where}.headGroupSpec", problems, required=True)
    head_containers = _containers(head.get("template"), f"{where}.headGroupSpec", problems)
    if head_containers:
        limits = (head_containers[0].get("resources") or {}).get("limits") or {}
        head_node = {"CPU": _quantity(params.get("num-cpus", limits.get("cpu", 0))),
                     "GPU": _quantity(params.get("num-gpus", limits.get("nvidia.com/gpu", 0))),
                     **_custom_resources(params, f"{where}.headGroupSpec", problems)}
        offer["nodes"].append({"name": "head", "resources": head_node})
    offer["images"] |= {c.get("image") for c in head_containers}
    shared = _mounts(head_containers)
    groups = spec.get("workerGroupSpecs")
    if not isinstance(groups, list) or not groups:
        return problems + [f"{where}.workerGroupSpecs: expected a non-empty list"], offer
    autoscaling = bool(spec.get("enableInTreeAutoscaling", False))
    for i, group in enumerate(groups):
        gw = f"{where}.workerGroupSpecs[{i}]"
        if not isinstance(group, dict):
            problems.append(f"{gw}: expected a mapping")
            continue
        if not isinstance(group.get("groupName"), str) or not group["groupName"]:
            problems.append(f"{gw}.groupName: expected a non-empty string")
        counts = {k: group.get(k) for k in ("replicas", "minReplicas", "maxReplicas")}
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts.values()):
            problems.append(f"{gw}: replicas, minReplicas, maxReplicas: expected integers >= 0, got {counts}")
            continue
        if not counts["minReplicas"] <= counts["replicas"] <= counts["maxReplicas"]:
            problems.append(f"{gw}: expected minReplicas <= replicas <= maxReplicas, got {counts}")
        wparams = _start_params(group.get("rayStartParams"), gw, problems, required=False)
        containers = _containers(group.get("template"), gw, problems)
        if not containers:
            continue
        limits = (containers[0].get("resources") or {}).get("limits") or {}
        pods = counts["maxReplicas"] if autoscaling else counts["replicas"]
        gpus = _quantity(wparams.get("num-gpus", limits.get("nvidia.com/gpu", 0)))
        pod = {"CPU": _quantity(wparams.get("num-cpus", limits.get("cpu", 0))), "GPU": gpus,
               **_custom_resources(wparams, gw, problems)}
        offer["nodes"] += [{"name": f"{group.get('groupName')} pod {p}", "resources": pod} for p in range(pods)]
        offer["max_gpus_per_pod"] = max(offer["max_gpus_per_pod"], gpus)
        offer["images"] |= {c.get("image") for c in containers}
        shared &= _mounts(containers)
    offer["shared_mounts"] = shared
    for node in offer["nodes"]:
        for name, amount in node["resources"].items():
            if name in ("CPU", "GPU"):
                offer[name] += amount
            else:
                offer["custom"][name] = offer["custom"].get(name, 0.0) + amount
    if len(offer["images"]) > 1:
        problems.append(f"{where}: head and workers run different images {sorted(map(str, offer['images']))}; "
                        "Ray needs the same Ray and Python on every node")
    return problems, offer


def parse_entrypoint(entrypoint: str) -> tuple[Any, str]:
    """(argparse namespace, "") for a `zray ...` command line, or (None, the reason it is refused)."""
    words = shlex.split(entrypoint)
    if not words or words[0] != "zray":
        return None, f"expected a command line starting with 'zray', got {entrypoint!r}"
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return build_parser().parse_args(words[1:]), ""
    except SystemExit:
        return None, f"`zray` refuses {entrypoint!r}: {err.getvalue().strip()}"


def rayjob_problems(doc: Any) -> list[str]:
    """Everything wrong with one RayJob manifest (an empty list when it is fine)."""
    if not isinstance(doc, dict):
        return ["expected a mapping"]
    problems: list[str] = []
    if doc.get("apiVersion") != "ray.io/v1" or doc.get("kind") != "RayJob":
        problems.append(f"expected apiVersion ray.io/v1, kind RayJob; got {doc.get('apiVersion')!r}, "
                        f"{doc.get('kind')!r}")
    name = (doc.get("metadata") or {}).get("name")
    if not isinstance(name, str) or not name or name != name.lower() or len(name) > 63:
        problems.append(f"metadata.name: expected a lower-case DNS name, got {name!r}")
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        return problems + ["spec: expected a mapping"]
    if not isinstance(spec.get("shutdownAfterJobFinishes"), bool):
        problems.append(f"spec.shutdownAfterJobFinishes: expected a boolean, got "
                        f"{spec.get('shutdownAfterJobFinishes')!r}")
    ttl = spec.get("ttlSecondsAfterFinished")
    if not isinstance(ttl, int) or isinstance(ttl, bool) or ttl < 0:
        problems.append(f"spec.ttlSecondsAfterFinished: expected an integer >= 0, got {ttl!r}")
    runtime_env = spec.get("runtimeEnvYAML")
    env = yaml.safe_load(runtime_env) if isinstance(runtime_env, str) else None
    if not isinstance(env, dict):
        problems.append(f"spec.runtimeEnvYAML: expected a string holding a YAML mapping, got {runtime_env!r}")
    elif not all(isinstance(k, str) and isinstance(v, str) for k, v in (env.get("env_vars") or {}).items()):
        problems.append(f"spec.runtimeEnvYAML env_vars: expected strings (quote numbers), got {env['env_vars']}")
    cluster_problems, offer = ray_cluster_problems(spec.get("rayClusterSpec"), "spec.rayClusterSpec")
    problems += cluster_problems
    entrypoint = spec.get("entrypoint")
    if not isinstance(entrypoint, str):
        return problems + [f"spec.entrypoint: expected a string, got {entrypoint!r}"]
    args, refused = parse_entrypoint(entrypoint)
    if args is None:
        return problems + [f"spec.entrypoint: {refused}"]
    if args.recipe not in RECIPES:  # the parser takes any name; the recipe table decides
        return problems + [f"spec.entrypoint: --recipe {args.recipe!r} is not in jobs/recipes.py RECIPES "
                           f"{sorted(RECIPES)}"]
    try:
        cfg = resolve_config(args.recipe, args.overrides)
    except ConfigError as err:
        return problems + [f"spec.entrypoint: {err}"]
    if args.command not in STAGES:
        return problems + [f"spec.entrypoint: stage {args.command!r} is not one of {STAGES}"]
    need = stage_needs(args.command, cfg)
    for resource in ("GPU", "CPU"):
        if offer[resource] < need[resource]:
            problems.append(f"{args.command} with recipe {args.recipe!r} needs {need[resource]:g} {resource}s at "
                            f"once, the cluster offers {offer[resource]:g}")
    for resource, amount in sorted(need["custom"].items()):
        if offer["custom"].get(resource, 0.0) < amount:
            problems.append(f"{args.command} with recipe {args.recipe!r} needs {amount:g} of the custom resource "
                            f"{resource!r} at once, the cluster offers {offer['custom'].get(resource, 0.0):g} "
                            "(rayStartParams resources)")
    for role, bundles, strategy in stage_roles(args.command, cfg):
        try:
            check_feasible(role, bundles, strategy, nodes=offer["nodes"])
        except PlacementError as err:
            problems.append(f"{args.command} with recipe {args.recipe!r}: {err}")
    if need["largest_gpu_actor"] > offer["max_gpus_per_pod"]:
        problems.append(f"an actor of {args.command} needs {need['largest_gpu_actor']:g} GPUs on one node, the "
                        f"largest worker pod has {offer['max_gpus_per_pod']:g}")
    out_dir = Path(cfg.out_dir)
    if not out_dir.is_absolute() or not any(m and out_dir.is_relative_to(m) for m in offer["shared_mounts"]):
        problems.append(f"out_dir {cfg.out_dir!r} is not on a volume mounted in every pod "
                        f"({sorted(offer['shared_mounts'])}): Ray Train's checkpoints need shared storage")
    return problems


def launcher_problems(cfg: Any, need_gpus: float) -> list[str]:
    """Everything wrong with a cluster-launcher config (`ray up`), beyond Ray's JSON schema."""
    if not isinstance(cfg, dict):
        return ["expected a mapping"]
    problems = [f"{key}: missing" for key in ("cluster_name", "provider", "available_node_types", "head_node_type",
                                              "max_workers") if key not in cfg]
    types = cfg.get("available_node_types") or {}
    if cfg.get("head_node_type") not in types:
        problems.append(f"head_node_type {cfg.get('head_node_type')!r} is not one of available_node_types "
                        f"{sorted(types)}")
    cap = cfg.get("max_workers", 0)
    gpus = sum(min(t.get("max_workers", 0), cap) * t.get("resources", {}).get("GPU", 0)
               for name, t in types.items() if name != cfg.get("head_node_type"))
    if gpus < need_gpus:
        problems.append(f"the worker node types reach {gpus} GPUs; the largest stage needs {need_gpus:g}")
    return problems


def rayjobs() -> dict[str, dict[str, Any]]:
    return {p.name: load_yaml(p) for p in sorted(KUBERAY.glob("rayjob-*.yaml"))}


# ----------------------------------------------------------------------------------------------------- tests


def test_every_yaml_under_cluster_parses():
    paths = sorted(CLUSTER.rglob("*.yaml"))
    assert len(paths) >= 12, paths
    for path in paths:
        doc = load_yaml(path)
        assert isinstance(doc, dict) and doc, path


def test_one_rayjob_per_stage_running_that_stage_of_the_full_recipe():
    jobs = rayjobs()
    assert sorted(jobs) == sorted(f"rayjob-{stage}.yaml" for stage in STAGES)
    for name, doc in jobs.items():
        args, refused = parse_entrypoint(doc["spec"]["entrypoint"])
        assert args is not None, refused
        assert f"rayjob-{args.command}.yaml" == name
        assert args.recipe == "full", name


@pytest.mark.parametrize("name", [f"rayjob-{stage}.yaml" for stage in STAGES])
def test_rayjob_is_complete_and_consistent_with_the_recipe(name):
    assert rayjob_problems(load_yaml(KUBERAY / name)) == []


def test_rayjobs_carry_the_runtime_env_of_ray_job_submit():
    """The env vars of cluster/runtime_env.yaml reach KubeRay jobs too (with the same values); KubeRay jobs take
    their code from the image, so they upload no working dir."""
    submit_env = load_yaml(CLUSTER / "runtime_env.yaml")
    assert set(submit_env) <= {"excludes", "env_vars", "working_dir"}, submit_env
    for name, doc in rayjobs().items():
        env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
        assert "working_dir" not in env, name
        assert env["env_vars"].items() >= submit_env["env_vars"].items(), name


def test_rayservice_serves_the_serve_yaml_application():
    doc = load_yaml(KUBERAY / "rayservice-reward.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayService")
    assert isinstance(doc["spec"]["serveConfigV2"], str)  # KubeRay takes the Serve config as a YAML string
    served = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]
    assert served == load_yaml(CLUSTER / "serve.yaml")["applications"]
    assert [app["import_path"] for app in served] == ["actors.reward_app.app:build_app"]
    problems, offer = ray_cluster_problems(doc["spec"]["rayClusterConfig"], "spec.rayClusterConfig")
    assert problems == []
    args = served[0]["args"]
    assert offer["CPU"] >= args["num_replicas"] * args["cpus_per_replica"]
    model = served[0]["deployments"][0]["user_config"]["model"]
    assert any(Path(model).is_relative_to(m) for m in offer["shared_mounts"]), (model, offer["shared_mounts"])
    if args.get("auth_token_env"):  # the ingress replica refuses to start without its token variable
        head = doc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
        workers = [g["template"]["spec"]["containers"][0] for g in doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]]
        for container in [head, *workers]:
            assert args["auth_token_env"] in {e["name"] for e in container.get("env", [])}, container["name"]


def test_cluster_launcher_config():
    cfg = load_yaml(CLUSTER / "cluster.yaml")
    schema_path = Path(importlib.util.find_spec("ray").origin).parent / "autoscaler" / "ray-schema.json"
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(cfg, json.loads(schema_path.read_text()))  # what `ray up` checks first
    full = RECIPES["full"]()
    need = max(stage_needs(stage, full)["GPU"] for stage in STAGES)
    assert launcher_problems(cfg, need) == []
    assert RAY_VERSION in cfg["docker"]["image"]
    assert any("cluster/install.sh gpu" in cmd for cmd in cfg["setup_commands"])
    workers = [t for name, t in cfg["available_node_types"].items() if name != cfg["head_node_type"]]
    assert any(t["resources"].get("GPU", 0) > 0 for t in workers)
    # every role of every stage has node types it can be placed on (what the autoscaler may start, from zero)
    nodes = launcher_node_types(CLUSTER / "cluster.yaml")
    for stage in STAGES:
        for role, bundles, strategy in stage_roles(stage, full):
            check_feasible(f"{stage} {role}", bundles, strategy, nodes=nodes)


def test_working_dir_upload_is_small_and_holds_the_code(tmp_path):
    """Packs the repo as `ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml` does (Ray's own
    packaging: its default excludes, .gitignore, our excludes) and checks what goes and how big it is."""
    import zipfile

    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import create_package

    env = load_yaml(CLUSTER / "runtime_env.yaml")
    excludes = ray_constants.get_runtime_env_default_excludes() + env["excludes"]
    package = tmp_path / "working_dir.zip"
    create_package(str(ROOT), package, include_gitignore=True, excludes=excludes)
    size_mib = package.stat().st_size / 2**20
    names = set(zipfile.ZipFile(package).namelist())
    assert size_mib < UPLOAD_LIMIT_MIB, f"the working dir upload is {size_mib:.1f} MiB"
    for needed in ("jobs/cli.py", "jobs/recipes.py", "zray/config.py", "zray/data/build.py", "actors/engine_pool.py",
                   "pyproject.toml", "cluster/runtime_env.yaml"):
        assert needed in names, needed
    for name in names:
        top = name.split("/")[0]
        assert top not in (".git", ".venv", "runs", ".pytest_cache") and "__pycache__" not in name, name
    print(f"working dir upload: {size_mib:.2f} MiB, {len(names)} entries")


# ------------------------------------------------------------------------------------- planted violations


def _teacher_job() -> dict[str, Any]:
    return load_yaml(KUBERAY / "rayjob-train-teacher.yaml")


def _with_entrypoint(doc: dict[str, Any], entrypoint: str) -> dict[str, Any]:
    doc["spec"]["entrypoint"] = entrypoint
    return doc


@pytest.mark.parametrize("entrypoint, expected", [
    ("zray train-teachr --recipe full --set out_dir=/mnt/zray/runs/full", "invalid choice: 'train-teachr'"),
    ("zray train-teacher --recipe full --methd gdso --set out_dir=/mnt/zray/runs/full", "unrecognized arguments"),
    ("zray train-teacher --recipe fulll --set out_dir=/mnt/zray/runs/full", "not in jobs/recipes.py RECIPES"),
    ("zray train-teacher --recipe full --set train_teacher.lr=1 --set out_dir=/mnt/zray/runs/full",
     "unknown config key"),
    ("python -m jobs.cli train-teacher --recipe full", "starting with 'zray'"),
    ("zray train-teacher --recipe full", "is not on a volume mounted in every pod"),
    ("zray train-teacher --recipe full --set out_dir=/mnt/zray/runs/full --set train_teacher.learner.use_gpu=true "
     "--set train_teacher.learner.num_workers=24", "needs 28 GPUs at once, the cluster offers 16"),
    ("zray train-teacher --recipe full --set out_dir=/mnt/zray/runs/full --set vllm.gpus_per_engine=16",
     "needs 16 GPUs on one node"),
    ("zray train-teacher --recipe full --set out_dir=/mnt/zray/runs/full --set vllm.resources=tpu_node=1",
     "engines: 4 x {CPU: 1, GPU: 1, tpu_node: 1} with PACK: no node has tpu_node >= 1"),
    ("zray train-teacher --recipe full --set out_dir=/mnt/zray/runs/full --set vllm.placement_strategy=STRICT_SPREAD",
     "need 4 distinct nodes with CPU >= 1 and GPU >= 1 and engine_node >= 1; the cluster has 1"),
], ids=["stage-typo", "flag-typo", "recipe-typo", "unknown-key", "not-zray", "out-dir-not-shared", "too-few-gpus",
        "engine-larger-than-a-node", "resource-no-node-has", "spread-over-too-few-engine-nodes"])
def test_planted_entrypoint_violations_are_reported(entrypoint, expected):
    problems = rayjob_problems(_with_entrypoint(_teacher_job(), entrypoint))
    assert any(expected in p for p in problems), problems


def test_planted_structure_violations_are_reported():
    doc = _teacher_job()
    del doc["spec"]["shutdownAfterJobFinishes"]
    doc["spec"]["ttlSecondsAfterFinished"] = "3600"
    group = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    group["minReplicas"] = 3
    group["template"]["spec"]["containers"][0]["image"] = "zray"
    doc["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    del doc["spec"]["rayClusterSpec"]["authOptions"]
    problems = "\n".join(rayjob_problems(doc))
    for expected in ("shutdownAfterJobFinishes", "ttlSecondsAfterFinished", "minReplicas <= replicas",
                     "image: expected a named image with a tag", "rayStartParams: expected a map of strings",
                     "different images", "authOptions.mode: expected 'token'"):
        assert expected in problems, (expected, problems)


def test_planted_custom_resource_violations_are_reported():
    """Without the engine node's `engine_node` the teacher stage cannot place its engines; a resources string
    without KubeRay's quoting is refused."""
    doc = _teacher_job()
    groups = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert [g["groupName"] for g in groups] == ["learner", "engines"]
    groups[1]["rayStartParams"] = {}
    problems = "\n".join(rayjob_problems(doc))
    assert "needs 4 of the custom resource 'engine_node' at once, the cluster offers 0" in problems, problems
    assert "engines: 4 x {CPU: 1, GPU: 1, engine_node: 1} with PACK: no node has engine_node >= 1" in problems
    groups[1]["rayStartParams"] = {"resources": '{"engine_node": 8}'}  # unquoted: the shell would eat the quotes
    assert any("rayStartParams.resources: expected KubeRay's quoted JSON" in p for p in rayjob_problems(doc))


def test_planted_launcher_violations_are_reported():
    cfg = load_yaml(CLUSTER / "cluster.yaml")
    cfg["head_node_type"] = "ray.head.gpu"
    del cfg["cluster_name"]
    problems = "\n".join(launcher_problems(cfg, need_gpus=64))
    for expected in ("cluster_name: missing", "is not one of available_node_types", "the largest stage needs 64"):
        assert expected in problems, (expected, problems)
