"""The reward service's dynamic batching: requests/s and latency with batching on vs off, same run, same service.

    .venv/bin/python bench/serve.py                        # concurrency 1, 8, 32; 10 s per cell
    .venv/bin/python bench/serve.py --smoke                # a few seconds in all: the machinery only
    .venv/bin/python bench/serve.py --path handle          # through the DeploymentHandle: no HTTP in the way

Starts a local Ray (`--cpus` logical CPUs) and deploys the reward app (actors/reward_app/) on 127.0.0.1 as a Serve
config, as `zray serve` does, over the `tiny_cpu` recipe's student, built with `zray.models.tiny.build_zoo` into
a temporary folder (`--models DIR` keeps and reuses it). One scorer replica (`--replicas`), one CPU and one torch
thread per replica. Each request is one 64x64 PNG with a prompt, scored on all four rubric dimensions (4 rows of
the student's forward pass); `--dimensions 1` scores one.

- baseline, batching off: the scorer's user_config with max_batch_size 1 and batch_wait_timeout_s 0 (one forward
  pass per request).
- candidate, batching on: max_batch_size `--max-batch-size`, batch_wait_timeout_s `--batch-wait-s`.

The two differ only in the scorer's user_config, so switching is a reconfigure of the running replica (no
restart, no reload: the same checkpoint). Cells interleave: for each concurrency, off then on. A cell is
`--warmup-s` seconds of load not counted, then `--seconds` counted. Clients are threads in this process, each
with its own requests.Session (`--path http`), or awaiting the scorer's DeploymentHandle (`--path handle`, typed
ScoreItems: no HTTP proxy, no ingress, no JSON, no base64). Printed per cell: requests/s, p50 and p99 latency,
failures; per concurrency the ratio on / off of requests/s and the p99 / p50 of the batched service.

The clients share the machine's cores with the service: on a 2-core machine the figures are a floor for both,
and compare only within one run. No recorded runs yet; record them in docs/experiments.md (section 5).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import copy
import io
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

APP = "reward_bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_images(num: int, side: int = 64) -> list:
    """`num` seeded PIL images of a few coloured discs on grey (what the Shapes world looks like)."""
    import random

    from PIL import Image, ImageDraw

    images = []
    for seed in range(num):
        rng = random.Random(seed)
        image = Image.new("RGB", (side, side), (200, 200, 200))
        draw = ImageDraw.Draw(image)
        for _ in range(2):
            x, y = rng.randrange(side - 20), rng.randrange(side - 20)
            draw.ellipse((x, y, x + 18, y + 18), fill=tuple(rng.randrange(256) for _ in range(3)))
        images.append(image)
    return images


def with_batching(config: dict, max_batch_size: int, batch_wait_s: float) -> dict:
    """A copy of the deploy config whose scorer batches at most `max_batch_size` items, waiting `batch_wait_s`
    (only the scorer's user_config changes: the running replicas reconfigure in place)."""
    out = copy.deepcopy(config)
    [scorer] = [d for d in out["applications"][0]["deployments"] if d["name"] == "RewardScorer"]
    scorer["user_config"].update(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_s)
    return out


class Cell:
    """Latencies and failures of one (concurrency, batching) measurement."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.failures = 0
        self.elapsed_s = 0.0
        self.lock = threading.Lock()

    def record(self, latency: float | None) -> None:
        with self.lock:
            if latency is None:
                self.failures += 1
            else:
                self.latencies.append(latency)

    def stats(self) -> dict[str, float]:
        lat = sorted(self.latencies)
        if not lat:
            return {"rps": 0.0, "p50_ms": float("nan"), "p99_ms": float("nan"), "failures": self.failures}
        return {"rps": len(lat) / self.elapsed_s, "p50_ms": 1e3 * statistics.median(lat),
                "p99_ms": 1e3 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], "failures": self.failures}


def http_load(url: str, bodies: list[bytes], concurrency: int, warmup_s: float, seconds: float) -> Cell:
    """`concurrency` threads POSTing /v1/score back to back; only requests sent after the warm-up count."""
    import requests

    cell, t0 = Cell(), time.perf_counter()
    count_from, stop_at = t0 + warmup_s, t0 + warmup_s + seconds

    def worker(k: int) -> None:
        with requests.Session() as session:
            i = k
            while True:
                start = time.perf_counter()
                if start >= stop_at:
                    return
                try:
                    r = session.post(url + "/v1/score", data=bodies[i % len(bodies)],
                                     headers={"Content-Type": "application/json"}, timeout=120)
                    ok = r.status_code == 200
                except requests.RequestException:
                    ok = False
                if start >= count_from:
                    cell.record(time.perf_counter() - start if ok else None)
                i += concurrency

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cell.elapsed_s = max(time.perf_counter(), stop_at) - count_from  # the last requests end after stop_at
    return cell


def handle_load(items: list, concurrency: int, warmup_s: float, seconds: float) -> Cell:
    """`concurrency` coroutines awaiting the scorer's DeploymentHandle back to back (one ScoreItem each)."""
    from ray import serve

    handle = serve.get_deployment_handle("RewardScorer", app_name=APP)
    cell = Cell()

    async def run() -> None:
        t0 = time.perf_counter()
        count_from, stop_at = t0 + warmup_s, t0 + warmup_s + seconds

        async def worker(k: int) -> None:
            i = k
            while (start := time.perf_counter()) < stop_at:
                try:
                    await handle.score.remote([items[i % len(items)]])
                    latency = time.perf_counter() - start
                except Exception:  # noqa: BLE001 - any failure is counted, none stops the bench
                    latency = None
                if start >= count_from:
                    cell.record(latency)
                i += concurrency

        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        cell.elapsed_s = max(time.perf_counter(), stop_at) - count_from

    asyncio.run(run())
    return cell


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated client concurrencies")
    parser.add_argument("--seconds", type=float, default=10.0, help="counted seconds per cell")
    parser.add_argument("--warmup-s", type=float, default=2.0, help="uncounted seconds of load before each cell")
    parser.add_argument("--max-batch-size", type=int, default=32, help="items per forward pass, batching on")
    parser.add_argument("--batch-wait-s", type=float, default=0.01, help="batch_wait_timeout_s, batching on")
    parser.add_argument("--replicas", type=int, default=1, help="scorer replicas")
    parser.add_argument("--dimensions", type=int, choices=(1, 2, 3, 4), default=4, help="dimensions per request")
    parser.add_argument("--path", choices=("http", "handle"), default="http")
    parser.add_argument("--cpus", type=int, default=4, help="logical CPUs of the local Ray")
    parser.add_argument("--models", default="", help="build (or reuse) the tiny zoo here; default a temp dir")
    parser.add_argument("--smoke", action="store_true", help="concurrency 1 and 4, 1 s per cell")
    args = parser.parse_args()
    if args.smoke:
        args.concurrency, args.seconds, args.warmup_s = "1,4", 1.0, 0.5
    try:
        concurrencies = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        raise SystemExit(f"--concurrency {args.concurrency!r}: expected comma-separated integers, e.g. 1,8,32")
    if min(concurrencies) < 1 or args.seconds <= 0 or args.max_batch_size < 1:
        raise SystemExit("--concurrency values, --seconds and --max-batch-size must be positive")

    import ray
    from ray import serve

    from actors.learner import ray_runtime_env
    from actors.reward_app.deploy import deploy, deploy_config
    from actors.reward_app.scorer import ScoreItem
    from jobs.recipes import tiny_cpu
    from zray.config import ServeConfig
    from zray.models.tiny import build_zoo
    from zray.rubric import DIMENSIONS

    recipe = tiny_cpu()
    tmp = tempfile.TemporaryDirectory()
    clock = time.perf_counter()
    student = build_zoo(recipe, args.models or tmp.name)["student"]
    print(f"student: {student['path']} ({student['num_params'] / 1e6:.2f}M parameters, "
          f"{'built' if student['built'] else 'reused'} in {time.perf_counter() - clock:.1f} s); "
          f"cores {os.cpu_count()}, Ray CPUs {args.cpus}")

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, runtime_env=ray_runtime_env())
    cfg = ServeConfig(app_name=APP, port=free_port(), num_replicas=args.replicas, cpus_per_replica=1.0,
                      max_ongoing_requests=max(64, 2 * max(concurrencies)), max_batch_size=args.max_batch_size,
                      batch_wait_timeout_s=args.batch_wait_s)
    on = deploy_config(cfg, model=student["path"])
    modes = {"off": with_batching(on, 1, 0.0), "on": on}
    url = f"http://127.0.0.1:{cfg.port}"
    dims = list(DIMENSIONS[:args.dimensions])
    images = make_images(8)
    pngs = []
    for image in images:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        pngs.append(buf.getvalue())
    bodies = [json.dumps({"prompt": f"{1 + i % 3} circles", "image": base64.b64encode(p).decode(),
                          "dimensions": dims}).encode() for i, p in enumerate(pngs)]
    items = [ScoreItem(prompt=f"{1 + i % 3} circles", image=im, dimensions=tuple(dims)) for i, im in enumerate(images)]
    print(f"path {args.path}; {args.replicas} scorer replica(s); {len(dims)} dimension(s) per request; "
          f"batching on = max_batch_size {args.max_batch_size}, batch_wait_timeout_s {args.batch_wait_s}; "
          f"off = 1, 0; {args.warmup_s:g} s warm-up + {args.seconds:g} s per cell")

    results: dict[tuple[int, str], dict[str, float]] = {}
    try:
        clock = time.perf_counter()
        deploy(modes["off"], timeout_s=300)
        current = "off"
        print(f"deployed in {time.perf_counter() - clock:.1f} s")
        for c in concurrencies:
            for mode, config in modes.items():
                if mode != current:  # a user_config change: the replica reconfigures in place
                    deploy(config, timeout_s=300)
                    current = mode
                cell = (http_load(url, bodies, c, args.warmup_s, args.seconds) if args.path == "http"
                        else handle_load(items, c, args.warmup_s, args.seconds))
                results[c, mode] = cell.stats()
                s = results[c, mode]
                print(f"  concurrency {c:3d} batching {mode:3s}: {s['rps']:7.1f} req/s  p50 {s['p50_ms']:7.1f} ms  "
                      f"p99 {s['p99_ms']:7.1f} ms  failures {s['failures']}", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
        tmp.cleanup()

    print(f"\n{'concurrency':>11} | {'off req/s':>9} {'p50 ms':>7} {'p99 ms':>7} | {'on req/s':>9} {'p50 ms':>7} "
          f"{'p99 ms':>7} | {'ratio on/off':>12} {'on p99/p50':>10}")
    for c in concurrencies:
        off, on_ = results[c, "off"], results[c, "on"]
        ratio = on_["rps"] / off["rps"] if off["rps"] else float("nan")
        print(f"{c:>11} | {off['rps']:9.1f} {off['p50_ms']:7.1f} {off['p99_ms']:7.1f} | {on_['rps']:9.1f} "
              f"{on_['p50_ms']:7.1f} {on_['p99_ms']:7.1f} | {ratio:11.2f}x {on_['p99_ms'] / on_['p50_ms']:10.2f}")
    failed = sum(r["failures"] for r in results.values())
    if failed:
        print(f"WARNING: {failed} requests failed")


if __name__ == "__main__":
    main()
