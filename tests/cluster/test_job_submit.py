"""`ray job submit` end to end, as on a cluster: a private Ray head on 127.0.0.1 (its own temp dir and ports), the
repo uploaded as the job's working dir with cluster/runtime_env.yaml, a tiny stage run as the job's driver, its
status and its output read back, then exactly that head's processes stopped.

`ray stop` would stop every Ray instance on the machine (other jobs, the test session's own `ray_session`), so the
head runs as `ray start --block` in a session of its own and is stopped by signalling its process tree only.
This test never calls ray.init and does not use the `ray_session` fixture.

Ray 2.60 turns token authentication on for a new head when a token exists (~/.ray/auth_token): the head and the CLI
here get their own token (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN), as a cluster's head and its submitters would, and
the Jobs API is checked to refuse a request without it. Ray replaces --node-ip-address 127.0.0.1 by the machine's
own address for its internal services; the dashboard (the Jobs API) listens on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from jobs.recipes import get_recipe

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent  # the venv whose `ray` and `zray` the head and the job's driver use
RAY = str(VENV_BIN / "ray")
PORTS = ("port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
         "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port", "node-manager-port",
         "object-manager-port")

pytestmark = pytest.mark.slow


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free on 127.0.0.1 right now (held open together, then released)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def process_tree(root: psutil.Process) -> list[psutil.Process]:
    """`root`, everything below it, and anything left in its process group (a daemon reparented to init)."""
    found = {root.pid: root}
    with contextlib.suppress(psutil.Error):
        found.update((p.pid, p) for p in root.children(recursive=True))
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(p.pid) == root.pid:
                found.setdefault(p.pid, p)
    return list(found.values())


def stop_tree(root: psutil.Process, grace_s: float = 5.0) -> list[psutil.Process]:
    """SIGTERM the head's tree (as `ray stop` does, but only ours), SIGKILL what is left after `grace_s`; returns the
    processes still alive after that (none expected). `ray start --block`, the autoscaler monitor and the raylet
    sometimes outlive a SIGTERM by minutes here (so would they under `ray stop`, which waits 16 s, then kills)."""
    procs = process_tree(root)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive + [q for q in process_tree(root) if q not in procs]:  # and any started meanwhile
        with contextlib.suppress(psutil.Error):
            p.kill()
    _, alive = psutil.wait_procs(alive, timeout=5)
    return alive


@contextlib.contextmanager
def private_ray_head(temp_dir: Path, env: dict[str, str], start_timeout_s: float = 120.0) -> Iterator[str]:
    """A local Ray head with its own temp dir and ports; yields the Jobs API address (http://127.0.0.1:PORT)."""
    ports = dict(zip(PORTS, free_ports(len(PORTS))))
    cmd = [RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
           "--include-dashboard", "true", "--num-cpus", "2", "--object-store-memory", str(200 * 2**20),
           "--disable-usage-stats", "--temp-dir", str(temp_dir)]
    cmd += [arg for name, port in ports.items() for arg in (f"--{name}", str(port))]
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    log_path = temp_dir / "ray_start.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    root = psutil.Process(proc.pid)
    try:
        deadline = time.monotonic() + start_timeout_s
        # Ready = the Jobs API answers and the head's dashboard agent, which runs the submitted jobs, is up: the Jobs
        # API waits only 10 s for the agent before refusing a job ("No available agent to submit job"), and on a
        # loaded machine the agent can start later than that.
        for url in (f"{address}/api/version",
                    f"http://127.0.0.1:{ports['dashboard-agent-listen-port']}/api/local_raylet_healthz"):
            request = urllib.request.Request(url, headers={"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"})
            last = None
            while True:
                assert proc.poll() is None, f"ray start exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}"
                try:
                    with urllib.request.urlopen(request, timeout=2) as response:
                        if response.status == 200:
                            break
                except OSError as err:  # not listening yet (or refusing the token: then `last` says so)
                    last = err
                assert time.monotonic() < deadline, f"no answer from {url} ({last}):\n{log_path.read_text()[-3000:]}"
                time.sleep(0.5)
        yield address
    finally:
        alive = stop_tree(root)
        proc.wait(timeout=5)
        assert not alive, f"Ray processes of the private head still alive: {[p.pid for p in alive]}"


def test_ray_job_submit_runs_a_stage_from_the_uploaded_working_dir(tmp_path):
    start = time.perf_counter()
    temp_dir = Path(tempfile.mkdtemp(prefix="zrj", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    out_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0",
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    submission_id = f"zray-test-{os.getpid()}-{int(time.time())}"
    # The stage, then where the driver imported zray's code from (`ray job submit` quotes each word it is given,
    # so the two commands go through one `sh -c`).
    entrypoint = ["sh", "-c", shlex.join(["zray", "data", "--recipe", "tiny_cpu", "--set", f"out_dir={out_dir}"])
                  + " && " + shlex.join(["python", "-c", "import jobs.cli; print('ZRAY_CODE=' + jobs.cli.__file__)"])]
    try:
        with private_ray_head(temp_dir, env) as address:
            started = time.perf_counter()
            with pytest.raises(urllib.error.HTTPError) as refused:  # no token, no jobs
                urllib.request.urlopen(f"{address}/api/jobs/", timeout=10)
            assert refused.value.code == 401
            submit = subprocess.run(
                [RAY, "job", "submit", "--address", address, "--submission-id", submission_id, "--log-color", "false",
                 "--working-dir", str(ROOT), "--runtime-env", str(ROOT / "cluster" / "runtime_env.yaml"), "--",
                 *entrypoint],
                env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
            submitted = time.perf_counter()
            log = submit.stdout + submit.stderr
            assert submit.returncode == 0, log[-5000:]
            status = subprocess.run([RAY, "job", "status", "--address", address, "--log-style", "record",
                                     "--log-color", "false", submission_id],
                                    env=env, capture_output=True, text=True, timeout=60)
            assert status.returncode == 0 and f"Job '{submission_id}' succeeded" in status.stdout, status
        stopped = time.perf_counter()
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)

    assert "Shapes world (tiny_cpu, seed 0) written to" in log, log[-5000:]
    code_from = [line.removeprefix("ZRAY_CODE=") for line in log.splitlines() if line.startswith("ZRAY_CODE=")]
    assert len(code_from) == 1 and Path(code_from[0]).is_relative_to(temp_dir), log[-3000:]  # the uploaded copy
    manifest = json.loads((out_dir / "data" / "manifest.json").read_text())
    world = get_recipe("tiny_cpu").world
    assert manifest["seed"] == world.seed
    rows = {name: entry["rows"] for name, entry in manifest["files"].items()}
    assert rows["candidates_train.parquet"] == world.num_train_prompts * world.candidates_per_prompt, rows
    assert rows["captions_train.parquet"] == world.num_caption_images, rows
    print(f"head up in {started - start:.1f} s, job submitted and finished in {submitted - started:.1f} s, head "
          f"stopped in {stopped - submitted:.1f} s")
