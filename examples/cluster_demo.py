"""The tutorial's Hyperband run on a local Dask cluster: what `make demo-cluster` runs.

    python examples/cluster_demo.py [--out DIR]

Starts a `dask scheduler` and two `dask worker` processes (w0 and w1, one thread and the
resource GPU=1 each, a fake GPU of its own through TUNED_FAKE_GPUS), then `tuned serve
--dask-scheduler-file` on a temporary state directory, submits examples/specs/
cluster_hyperband.toml (`executor = "dask"`) with `tunectl submit`, waits for it, prints
`tunectl status`, `tunectl best` and `tunectl trials` (which host and worker ran each
trial), saves the curves as DIR/cluster_hyperband.png and the daemon's log as
DIR/daemon.log (default DIR: demo-output/cluster), and stops the daemon and the cluster,
whatever happened. Exits non-zero unless the experiment ended COMPLETED.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import IO

HERE = os.path.dirname(os.path.abspath(__file__))
SPEC = os.path.join(HERE, "specs", "cluster_hyperband.toml")
BIN = os.path.dirname(sys.executable)
DASK = os.path.join(BIN, "dask")
WORKERS = ["w0", "w1"]


def tunectl(sock: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([os.path.join(BIN, "tunectl"), "--socket", sock, *args],
                         capture_output=True, text=True)
    if check and out.returncode != 0:
        raise SystemExit(f"tunectl {' '.join(args)} failed ({out.returncode}): "
                         f"{out.stderr or out.stdout}")
    return out


def spawn(argv: list[str], log: IO[bytes], env: dict[str, str] | None = None
          ) -> subprocess.Popen:
    """A process in a session of its own (its group is what `stop` kills)."""
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                            start_new_session=True)


def wait_for(what: str, ready: Callable[[], bool], procs: list[subprocess.Popen],
             timeout: float = 60) -> None:
    """Poll `ready()` until true; SystemExit if one of `procs` exits or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while not ready():
        if any(p.poll() is not None for p in procs):
            raise SystemExit(f"{what}: a process exited first (see its log)")
        if time.monotonic() > deadline:
            raise SystemExit(f"{what}: not within {timeout:g} s")
        time.sleep(0.1)


def scheduler_file_written(path: str) -> bool:
    try:
        with open(path) as f:
            return "address" in json.load(f)
    except (OSError, ValueError):  # not there yet, or being written
        return False


def start_cluster(root: str, procs: list[subprocess.Popen]) -> str:
    """The scheduler and the workers (appended to `procs`), once both workers are
    registered; the scheduler file's path."""
    from distributed import Client

    sched_file = os.path.join(root, "scheduler.json")
    with open(os.path.join(root, "scheduler.log"), "wb") as log:
        procs.append(spawn([DASK, "scheduler", "--host", "127.0.0.1", "--port", "0",
                            "--no-dashboard", "--scheduler-file", sched_file], log))
    wait_for("the scheduler file", lambda: scheduler_file_written(sched_file), procs)
    for name in WORKERS:
        # A fake GPU of its own per worker (tuned.executors.gpus): the workers' env only.
        env = {**os.environ, "TUNED_FAKE_GPUS": f"GPU-fake-{name}-0"}
        with open(os.path.join(root, f"{name}.log"), "wb") as log:
            procs.append(spawn([DASK, "worker", "--scheduler-file", sched_file,
                                "--nthreads", "1", "--resources", "GPU=1", "--name", name,
                                "--no-nanny", "--local-directory", os.path.join(root, name)],
                               log, env))
    with Client(scheduler_file=sched_file, timeout=30) as client:
        client.wait_for_workers(len(WORKERS), timeout=60)
    return sched_file


def wait_for_experiment(sock: str, name: str, timeout: float = 300) -> str:
    """The experiment's state once it ended (COMPLETED, STOPPED or FAILED)."""
    deadline = time.monotonic() + timeout
    while True:
        status = json.loads(tunectl(sock, "--json", "status").stdout)
        state = {e["experiment"]: e["state"] for e in status["experiments"]}.get(name)
        if state in ("COMPLETED", "STOPPED", "FAILED"):
            return state
        if time.monotonic() > deadline:
            raise SystemExit(f"{name} still {state} after {timeout:g} s")
        time.sleep(0.5)


def print_trials(sock: str, name: str) -> None:
    """`tunectl trials` (with host and worker columns from its JSON if the table has none),
    then how many trials each worker ran, and its GPUs."""
    table = tunectl(sock, "trials", name, "--all").stdout
    print(table)
    trials = json.loads(tunectl(sock, "--json", "trials", name, "--all").stdout)["trials"]
    if "worker" not in table:
        print("trial  state      host / worker")
        for t in trials:
            print(f"{t['trial']:>5}  {t['state']:<9}  {t.get('host')} / {t.get('worker')}")
    ran = collections.Counter(t.get("worker") for t in trials)
    cluster = json.loads(tunectl(sock, "--json", "status").stdout).get("cluster") or {}
    for w in cluster.get("workers", []):
        print(f"{w['name']}  {w['address']}  GPUs {', '.join(w.get('gpu_uuids') or []) or '-'}"
              f"  ran {ran.pop(w['address'], 0)} trial(s)")
    for worker, count in ran.items():  # a worker gone since (None: a trial never placed)
        if worker is not None:
            print(f"{worker}  ran {count} trial(s)")


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGKILL each process's group (its session) and reap it."""
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo-output/cluster",
                        help="folder for the curves PNG and the daemon's log")
    cli = parser.parse_args()
    os.makedirs(cli.out, exist_ok=True)
    root = tempfile.mkdtemp(prefix="tuned-cluster-", dir="/tmp")  # short socket paths
    state, sock = os.path.join(root, "state"), os.path.join(root, "run", "control.sock")
    cluster: list[subprocess.Popen] = []
    daemon: subprocess.Popen | None = None
    ended = None
    try:
        print(f"== starting a Dask scheduler and workers {', '.join(WORKERS)} (logs in {root})",
              flush=True)
        sched_file = start_cluster(root, cluster)
        print(f"== starting tuned serve --dask-scheduler-file {sched_file}", flush=True)
        env = {k: v for k, v in os.environ.items() if k != "TUNED_FAKE_GPUS"}
        with open(os.path.join(cli.out, "daemon.log"), "wb") as log:
            daemon = spawn([os.path.join(BIN, "tuned"), "serve", "--state-dir", state,
                            "--socket", sock, "--dask-scheduler-file", sched_file], log, env)
        wait_for("tuned serve", lambda: tunectl(sock, "status", check=False).returncode == 0,
                 [daemon])
        started = time.perf_counter()
        name = json.loads(tunectl(sock, "--json", "submit", SPEC).stdout)["experiment"]
        print(f"submitted {os.path.relpath(SPEC)} as {name}")
        ended = wait_for_experiment(sock, name)
        print(f"\n== {name} {ended} in {time.perf_counter() - started:.1f} s")
        print("\n== tunectl status")
        print(tunectl(sock, "status").stdout)
        print(f"== tunectl best {name}")
        best = tunectl(sock, "best", name, check=False)
        print(best.stdout or best.stderr)
        print(f"== tunectl trials {name}")
        print_trials(sock, name)
        png = os.path.join(cli.out, f"{name}.png")
        if tunectl(sock, "curves", name, "--all", "--png", png, check=False).returncode == 0:
            print(f"\n== curves: {os.path.abspath(png)}")
    finally:
        if daemon is not None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
            print("== daemon stopped")
        stop(cluster)
        print("== cluster stopped")
        if ended != "COMPLETED":  # keep the cluster's logs to look at
            print(f"logs kept in {root}; the daemon's in {os.path.abspath(cli.out)}/daemon.log")
        else:
            shutil.rmtree(root, ignore_errors=True)
    if ended != "COMPLETED":
        print(f"the experiment ended {ended}, not COMPLETED", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
