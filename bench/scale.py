"""Rollout throughput with 1 vs 2 teacher engine actors on this machine, and the scaling efficiency (CPU).

    .venv/bin/python bench/scale.py                          # 1 engine x 1 and x 2 threads, 2 engines x 1 thread
    .venv/bin/python bench/scale.py --quick                  # short: mostly the 4 engine start-ups
    .venv/bin/python bench/scale.py --threads-per-engine 1   # 1 engine x 1 vs 2 engines x 1 thread only
    .venv/bin/python bench/scale.py --out-of-process         # engines with vLLM's own worker process (and binding)
    .venv/bin/python bench/scale.py --pipeline runs/tiny_cpu  # the stage timings of a `zray run` directory
    .venv/bin/python bench/scale.py --run-pipeline           # run `zray run --recipe tiny_cpu` afresh, then time it

The teacher is the tiny Qwen2.5-VL of the `tiny_cpu` recipe (random weights, built locally into a temporary
folder; `--model DIR` uses a Hugging Face format dir instead); the requests are bench/rollout.py's
(`make_requests`: 64x64 images, a prompt, a rubric dimension). For every engine count N in `--engines` the
script starts N `TeacherEngine` actors (`actors.engine_pool.start_engines`, the recipe's VLLMConfig with
`cpus_per_engine` = the threads per engine), warms them up with one small call (one request per engine), then
times `EnginePool(engines).generate(requests, group_size=G, max_reasoning_tokens=T, seed=1000 + round)` for
`--rounds` rounds (the same requests and seeds for every N: a batch samples the same tokens whatever the engine
count, so every configuration does the same work), and shuts the engines down before the next configuration.
Throughput = reasoning tokens sampled / wall seconds of the pool call (sampling plus the score pass, ray.get
included); the median round is printed.

Threads per engine (`--threads-per-engine`): `auto` divides the cores this process may run on among the
engines (cores // N, at least 1: on 2 cores, 1 engine x 2 threads and 2 engines x 1 thread); `K` gives every
engine K. For every N > 1 the script also runs 1 engine with the same threads per engine (the reference of
"speed-up vs 1 engine"), so with `auto` on 2 cores the table has 1 x 1, 1 x 2 and 2 x 1. How the count
reaches the engine: `cpus_per_engine` is the actor's Ray `num_cpus`, and Ray sets OMP_NUM_THREADS to it in
the actor's process (unless OMP_NUM_THREADS is already set: the script removes it from its own environment
before starting Ray), and torch sizes its intra-op pool from it. Our engine sets no thread variable itself
(actors/teacher_engine/engine.py sets only VLLM_CPU_KVCACHE_SPACE, VLLM_ENABLE_V1_MULTIPROCESSING and, out of
process, VLLM_ALLOW_INSECURE_SERIALIZATION). VLLM_CPU_OMP_THREADS_BIND (unset = vLLM's default "auto") is only
read by vLLM's multiprocess executor: the recipes' in-process engine (`in_process=True`, the "uni" executor)
binds no threads, and its OpenMP threads float over the actor's cores. With `--out-of-process` the worker is a
separate process that vLLM binds; by vllm/utils/ompmultiprocessing.py (read, not yet measured here), "auto"
reserves one core for the scheduler and pins the worker's OpenMP threads to the rest of NUMA node 0, the same
cores for every engine (on 2 cores: core 0 for all of them); `--omp-bind` sets the variable for all engines
alike (Ray gives every actor the driver's environment), so per-engine core lists need a change in the engine.
The table's thread lines show what each engine process (and, out of process, its worker) actually got.

Printed: one row per configuration: tokens per round, tokens/s (median), speed-up vs 1 engine with the same
threads, scaling efficiency = speed-up / N (1.0 = each engine as fast as a lone one), tokens/s vs 1 engine with
all the cores (the same hardware used either way: above 1 means more engines use the machine better), the cores
the engine processes kept busy (their CPU seconds / wall seconds) and the cores busy on the whole machine (other
jobs, Ray, this driver included). Then the thread settings of every engine, and the ratios in words.

What limits the efficiency here, and where the table measures it: (1) threads inside one engine: the tiny model's
steps are little arithmetic and much single-threaded Python (vLLM's scheduler, input processing, the score pass'
assembly), so a second thread can only speed up the matrix work (the 1 x 2 vs 1 x 1 ratio); (2) a second
engine runs that Python in parallel, but only on a free core: other jobs, Ray's own processes and this driver
compete for the 2 cores. "eng cores" well below N x threads while "mach cores" is at the core count means the
engines were starved, and then the ratios measure the neighbours, not the engines. (3) The configurations run
one after the other (each restarts its engines), so a change of load between them shows up as a ratio: the
load average is printed for each; rerun when it moved. Compare the ratios of one run, never figures across runs.
No recorded runs yet; record them in docs/experiments.md (section 5).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.rollout import make_requests  # noqa: E402


def threads_arg(value: str) -> int | None:
    """`auto` -> None; otherwise an integer >= 1."""
    if value == "auto":
        return None
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not allowed: expected 'auto' or an integer >= 1")
    return int(value)


def engines_arg(value: str) -> list[int]:
    counts = [int(v) for v in value.split(",") if v.strip().isdigit()]
    if not counts or len(counts) != len(value.split(",")) or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not allowed: expected engine counts >= 1 like '1,2'")
    return sorted(set(counts))


def plan(engine_counts: list[int], threads: int | None, cores: int) -> list[tuple[int, int]]:
    """(engines, threads per engine) to run: each count with `threads` (auto: cores // N, at least 1), and for
    each a single engine with the same threads per engine (the reference of its speed-up)."""
    runs = {(n, threads or max(1, cores // n)) for n in engine_counts}
    runs |= {(1, t) for _, t in runs}
    return sorted(runs)


# ---------------------------------------------------------------------------------------------- thread probes
def process_threads() -> dict[str, Any]:
    """What this process runs with: torch's intra-op threads, the OpenMP / vLLM binding variables, the process
    affinity and the affinity of each of its OS threads (cores list -> how many threads)."""
    import collections

    import torch

    per_thread: collections.Counter = collections.Counter()
    for tid in os.listdir("/proc/self/task"):
        try:
            status = Path(f"/proc/self/task/{tid}/status").read_text()
        except OSError:
            continue
        per_thread.update(line.split(":", 1)[1].strip() for line in status.splitlines()
                          if line.startswith("Cpus_allowed_list"))
    env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "VLLM_CPU_OMP_THREADS_BIND", "OMP_PLACES",
                                          "OMP_PROC_BIND")}
    return {"pid": os.getpid(), "torch_threads": torch.get_num_threads(), "env": env,
            "affinity": sorted(os.sched_getaffinity(0)), "thread_affinity": dict(per_thread)}


def worker_threads(worker: Any) -> dict[str, Any]:
    return process_threads()


def engine_threads(engine: Any) -> dict[str, Any]:
    """Run inside a TeacherEngine actor (`__ray_call__`): its process, its vLLM executor and, out of process,
    vLLM's worker process."""
    info = process_threads()
    info["executor"] = engine.llm.llm_engine.vllm_config.parallel_config.distributed_executor_backend
    if not engine.cfg.in_process:
        info["worker"] = engine.llm.collective_rpc(worker_threads)[0]
    return info


def describe(info: dict[str, Any]) -> str:
    env = info["env"]
    bind = env["VLLM_CPU_OMP_THREADS_BIND"] or "unset (vLLM default 'auto')"
    places = f", OMP_PLACES={env['OMP_PLACES']}, OMP_PROC_BIND={env['OMP_PROC_BIND']}" if env["OMP_PLACES"] else ""
    threads = ", ".join(f"{n} on cores {cores}" for cores, n in sorted(info["thread_affinity"].items()))
    return (f"pid {info['pid']}: torch threads {info['torch_threads']}, OMP_NUM_THREADS={env['OMP_NUM_THREADS']}, "
            f"VLLM_CPU_OMP_THREADS_BIND={bind}{places}; OS threads: {threads}")


# ---------------------------------------------------------------------------------------------- CPU accounting
def engine_cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds of the engine processes and their children (vLLM's worker, out of process)."""
    import psutil

    total = 0.0
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            for p in [proc, *proc.children(recursive=True)]:
                t = p.cpu_times()
                total += t.user + t.system
        except psutil.Error:
            pass
    return total


def machine_busy_s() -> float:
    import psutil

    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def wait_exited(pids: list[int], timeout_s: float = 30.0) -> None:
    import psutil

    deadline = time.monotonic() + timeout_s
    while any(psutil.pid_exists(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)


# ---------------------------------------------------------------------------------------------- one configuration
def run_config(model_dir: str, base: Any, engines: int, threads: int, requests: list, args: argparse.Namespace
               ) -> dict[str, Any]:
    import ray

    from actors.engine_pool import EnginePool, start_engines

    cfg = dataclasses.replace(base, num_engines=engines, cpus_per_engine=float(threads))
    load = os.getloadavg()[0]
    start = time.perf_counter()
    pool = EnginePool(start_engines(model_dir, cfg, num_engines=engines))
    start_s = time.perf_counter() - start
    try:
        pool.generate(requests[:engines], group_size=2, max_reasoning_tokens=4, seed=0)  # warm-up, every engine
        infos = ray.get([e.__ray_call__.remote(engine_threads) for e in pool.engines])
        pids = [i["pid"] for i in infos]
        rounds = []
        for r in range(args.rounds):
            cpu0, busy0, t0 = engine_cpu_s(pids), machine_busy_s(), time.perf_counter()
            batch = pool.generate(requests, group_size=args.group, max_reasoning_tokens=args.tokens, seed=1000 + r)
            wall = time.perf_counter() - t0
            tokens = int(batch.num_reasoning_NG.sum())
            rounds.append({"tokens": tokens, "tps": tokens / wall, "wall": wall,
                           "engine_cores": (engine_cpu_s(pids) - cpu0) / wall,
                           "machine_cores": (machine_busy_s() - busy0) / wall})
            print(f"  {engines} x {threads}: round {r}: {tokens} tokens in {wall:.2f} s = {tokens / wall:,.0f} "
                  f"tokens/s", flush=True)
    finally:
        pool.shutdown()
    wait_exited(pids)
    med = {k: statistics.median(x[k] for x in rounds) for k in rounds[0]}
    return {"engines": engines, "threads": threads, "start_s": start_s, "load": load, "infos": infos,
            "round_tokens": [x["tokens"] for x in rounds], **med}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", type=engines_arg, default=[1, 2], help="engine counts, e.g. 1,2")
    parser.add_argument("--threads-per-engine", type=threads_arg, default=None, metavar="auto|K",
                        help="auto (default): the cores divided among the engines; K: K threads each")
    parser.add_argument("--inputs", type=int, default=32)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64, help="max reasoning tokens per sample")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a short run: 8 inputs, G=4, 16 tokens, 3 rounds")
    parser.add_argument("--model", default="", help="a Hugging Face format teacher dir (default: build tiny)")
    parser.add_argument("--out-of-process", action="store_true",
                        help="VLLMConfig.in_process=False: vLLM's worker in its own process, bound by vLLM")
    parser.add_argument("--omp-bind", default="",
                        help="VLLM_CPU_OMP_THREADS_BIND for every engine (read out of process only)")
    parser.add_argument("--pipeline", default="", metavar="DIR",
                        help="print the stage timings of a `zray run` directory instead (e.g. runs/tiny_cpu)")
    parser.add_argument("--run-pipeline", action="store_true",
                        help="run `zray run --recipe tiny_cpu` into a fresh temporary dir, then print its stage timings")
    args = parser.parse_args()
    if args.pipeline or args.run_pipeline:
        pipeline_timings(args.pipeline or run_tiny_pipeline())
        return
    if args.quick:
        args.inputs, args.group, args.tokens, args.rounds = 8, 4, 16, 3
    if args.inputs < max(args.engines):
        parser.error(f"--inputs={args.inputs} is fewer than the {max(args.engines)} engines: nothing for some")

    cores = len(os.sched_getaffinity(0))
    runs = plan(args.engines, args.threads_per_engine, cores)
    if "OMP_NUM_THREADS" in os.environ:  # Ray sets it from num_cpus only where it is unset
        print(f"note: removed OMP_NUM_THREADS={os.environ.pop('OMP_NUM_THREADS')} from the environment so that "
              f"every engine gets its own thread count")
    if args.omp_bind:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = args.omp_bind

    from actors.learner import init_ray
    from jobs.recipes import tiny_cpu
    from zray.models.tiny import build_tiny_vlm

    recipe = tiny_cpu()
    tmp = tempfile.TemporaryDirectory()
    model_dir = args.model or str(build_tiny_vlm(recipe.teacher, os.path.join(tmp.name, "teacher")))
    base = dataclasses.replace(recipe.vllm, max_model_len=max(recipe.vllm.max_model_len, 512 + args.tokens),
                               in_process=not args.out_of_process)
    requests = make_requests(args.inputs)
    init_ray(max(n * t for n, t in runs) + 1)
    print(f"teacher {model_dir}; {args.inputs} inputs x G={args.group} x {args.tokens} tokens, {args.rounds} "
          f"rounds; {cores} cores; engines {'out of' if args.out_of_process else 'in'} process; runs (engines x "
          f"threads): {', '.join(f'{n} x {t}' for n, t in runs)}", flush=True)

    results = {}
    for n, t in runs:
        results[(n, t)] = run_config(model_dir, base, n, t, requests, args)

    full = results.get((1, cores))
    print(f"\n{'engines':>7} {'thr/eng':>7} {'tokens/round':>12} {'tokens/s':>9} {'speed-up':>8} {'effic.':>6} "
          f"{f'vs 1x{cores}':>7} {'eng cores':>9} {'mach cores':>10} {'load':>5} {'start s':>7}")
    for (n, t), res in results.items():
        ref = results[(1, t)]
        speedup = res["tps"] / ref["tps"]
        vs_full = f"{res['tps'] / full['tps']:.2f}" if full else "-"
        counts = f"{statistics.median(res['round_tokens']):.0f}"
        print(f"{n:>7} {t:>7} {counts:>12} {res['tps']:>9,.0f} {speedup:>8.2f} {speedup / n:>6.2f} {vs_full:>7} "
              f"{res['engine_cores']:>9.2f} {res['machine_cores']:>10.2f} {res['load']:>5.2f} {res['start_s']:>7.1f}")

    print("\nthread settings (measured inside each engine after warm-up):")
    for (n, t), res in results.items():
        for i, info in enumerate(res["infos"]):
            print(f"  {n} x {t} engine {i} ({info['executor']} executor): {describe(info)}")
            if "worker" in info:
                print(f"  {n} x {t} engine {i} vLLM worker: {describe(info['worker'])}")

    print()
    if (1, 1) in results and (1, 2) in results:
        print(f"threads inside one engine: 1 x 2 / 1 x 1 = {results[(1, 2)]['tps'] / results[(1, 1)]['tps']:.2f}x")
    for (n, t), res in results.items():
        if n > 1:
            speedup = res["tps"] / results[(1, t)]["tps"]
            print(f"{n} engines x {t} vs 1 engine x {t}: speed-up {speedup:.2f}x, efficiency {speedup / n:.2f}")
            if full and n * t == cores:
                print(f"{n} engines x {t} vs 1 engine x {cores} (the same {cores} cores): "
                      f"{res['tps'] / full['tps']:.2f}x")
    if len({tuple(r["round_tokens"]) for r in results.values()}) > 1:  # the same seeds: the same samples expected
        print("note: the tokens sampled per round differ between configurations: "
              + "; ".join(f"{n} x {t}: {r['round_tokens']}" for (n, t), r in results.items()))


def run_tiny_pipeline() -> str:
    """`zray run --recipe tiny_cpu` into a fresh temporary dir (kept, printed), as the README's first command runs it."""
    import subprocess

    out = tempfile.mkdtemp(prefix="zray-tiny-run-")
    zray = os.path.join(os.path.dirname(sys.executable), "zray")
    print(f"running {zray} run --recipe tiny_cpu --set out_dir={out}", flush=True)
    subprocess.run([zray, "run", "--recipe", "tiny_cpu", "--set", f"out_dir={out}"], check=True,
                   stdout=subprocess.DEVNULL)
    return out


def pipeline_timings(run_dir: str) -> None:
    """The wall time of every stage of a `zray run` directory (its `pipeline/<stage>.json` records), and the total."""
    from zray.pipeline.plan import STAGES, read_record

    total = 0.0
    print(f"stage timings of {run_dir} (load average now {os.getloadavg()[0]:.2f}):")
    print(f"{'stage':<20} {'status':<8} {'wall s':>8} {'attempts':>8}")
    for stage in STAGES:
        record = read_record(run_dir, stage.name)
        if record is None:
            print(f"{stage.name:<20} {'not run':<8}")
            continue
        wall = float(record.get("wall_s", 0.0))
        total += wall if record["status"] == "done" else 0.0
        print(f"{stage.name:<20} {record['status']:<8} {wall:>8.1f} {record.get('attempts', 1):>8}")
    print(f"{'total (done)':<20} {'':<8} {total:>8.1f}")


if __name__ == "__main__":
    main()
