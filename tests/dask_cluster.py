"""A real local Dask cluster for the tests (`DaskCluster`): one `dask scheduler` and N
`dask worker` processes, each in its own session with its log in a temporary directory, all
SIGKILLed and reaped by `close()`. Nothing here needs a GPU: `GPU=<g>` is only a resource
label the scheduler counts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
from distributed import Client

DASK = os.path.join(os.path.dirname(sys.executable), "dask")


class DaskCluster:
    """A scheduler and its workers as processes under `root`; a context manager that closes
    them on exit. The scheduler listens on 127.0.0.1 at a port chosen at the first start and
    kept by `restart_scheduler()`."""

    def __init__(self, root: str | os.PathLike[str], timeout: float = 60.0):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.timeout = timeout
        self.scheduler: subprocess.Popen | None = None
        self.workers: dict[str, subprocess.Popen] = {}
        self._all: list[subprocess.Popen] = []
        self._logs: list[Path] = []
        self._group_killed: set[subprocess.Popen] = set()
        self._port = 0
        self._worker_args: list[str] = []
        self._env: dict[str, str] = dict(os.environ)

    @property
    def scheduler_file(self) -> str:
        """The scheduler file's path (`<root>/scheduler.json`), for `Client(scheduler_file=)`."""
        return str(self.root / "scheduler.json")

    @property
    def address(self) -> str:
        """The scheduler's address as its scheduler file gives it (`tcp://127.0.0.1:PORT`)."""
        return json.loads(Path(self.scheduler_file).read_text())["address"]

    def _address_if_written(self) -> str | None:
        try:  # the scheduler writes the file in place: it may be there but not whole yet
            return self.address
        except (OSError, ValueError, KeyError):
            return None

    def start(self, workers: int = 2, gpus_per_worker: int = 1, nthreads: int = 1,
              env: dict[str, str] | None = None, nanny: bool = False) -> None:
        """Start the scheduler and `workers` workers named w0, w1, ... (each with `nthreads`
        threads and the resource GPU=`gpus_per_worker`; behind a nanny if `nanny`; `env` added
        to this process's environment), and return once the scheduler counts them all; a
        RuntimeError with the logs' tails if that takes over `timeout` seconds."""
        self._env = {**os.environ, **(env or {})}
        self._worker_args = ["--nthreads", str(nthreads), "--resources", f"GPU={gpus_per_worker}",
                             "--nanny" if nanny else "--no-nanny"]
        self._start_scheduler()
        names = [f"w{i}" for i in range(workers)]
        for name in names:
            self._spawn_worker(name)
        self._wait_workers(names)

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = self.root / f"{name}-{len(self._all)}.log"
        self._logs.append(log)
        with open(log, "wb") as out:
            proc = subprocess.Popen([DASK, *args], stdout=out, stderr=out, env=self._env,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self._all.append(proc)
        return proc

    def _start_scheduler(self) -> None:
        Path(self.scheduler_file).unlink(missing_ok=True)
        self.scheduler = proc = self._spawn("scheduler", [
            "scheduler", "--host", "127.0.0.1", "--port", str(self._port), "--no-dashboard",
            "--scheduler-file", self.scheduler_file])
        self._until(self._address_if_written, "the scheduler file", [proc])
        self._port = int(self.address.rsplit(":", 1)[1])

    def _spawn_worker(self, name: str) -> None:
        self.workers[name] = self._spawn(name, [
            "worker", "--scheduler-file", self.scheduler_file, *self._worker_args,
            "--name", name, "--local-directory", str(self.root / name)])

    def _until(self, predicate: Callable[[], object], what: str,
               procs: list[subprocess.Popen]) -> None:
        """Poll `predicate` until true; a RuntimeError with the logs' tails after `timeout`
        seconds, or at once if one of `procs` exits."""
        deadline = time.monotonic() + self.timeout
        while not predicate():
            if any(p.poll() is not None for p in procs):
                raise RuntimeError(f"{what}: a process exited first\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what}: not within {self.timeout:g} s\n{self.log_tail()}")
            time.sleep(0.05)

    def _wait_workers(self, names: list[str]) -> None:
        """Return once the scheduler counts the workers `names`, as `_until` does."""
        try:
            with Client(scheduler_file=self.scheduler_file, timeout=self.timeout) as client:
                self._until(lambda: set(names) <= {w["name"] for w in client.scheduler_info(
                    n_workers=-1)["workers"].values()}, f"workers {names}",
                    [self.workers[n] for n in names])
        except (OSError, TimeoutError) as e:
            raise RuntimeError(f"the cluster did not come up: {e!r}\n{self.log_tail()}") from e

    @property
    def worker_pids(self) -> dict[str, int]:
        """Worker name -> the pid of the process running the worker itself (behind a nanny,
        the nanny's child), for the workers whose process runs now."""
        pids = {}
        for name, proc in self.workers.items():
            if proc.poll() is not None:
                continue
            if "--nanny" not in self._worker_args:
                pids[name] = proc.pid
                continue
            for child in psutil.Process(proc.pid).children():
                try:
                    title = " ".join(child.cmdline())  # setproctitle's, or the spawn's
                    if "dask worker" in title or "spawn_main" in title:
                        pids[name] = child.pid
                except psutil.NoSuchProcess:
                    pass
        return pids

    def kill_worker(self, name: str) -> None:
        """SIGKILL worker `name`'s worker process and return once it is gone (behind a nanny,
        the nanny lives on and starts a new worker process under the same name)."""
        pid = self.worker_pids[name]
        if pid == self.workers[name].pid:
            self.workers[name].kill()
            self.workers[name].wait()
        else:  # the nanny's child: the nanny reaps it
            process = psutil.Process(pid)
            process.kill()
            process.wait()

    def kill_scheduler(self) -> None:
        """SIGKILL the scheduler and reap it; the workers are left alone."""
        assert self.scheduler is not None
        self._kill_group(self.scheduler)

    def restart_scheduler(self) -> None:
        """Start a new scheduler at the same address (SIGKILLing the old one first if it still
        runs) with its scheduler file rewritten, and new workers under the old names, and
        return once they are all registered with it. A client keeps its connection across
        this (it retries for its `timeout`), but workers never do: a worker leaves once its
        scheduler's connection breaks (at once when idle, after its running task otherwise),
        so the old ones are SIGKILLed here and replaced."""
        self.kill_scheduler()
        for proc in self.workers.values():
            self._kill_group(proc)
        self._start_scheduler()
        for name in self.workers:
            self._spawn_worker(name)
        self._wait_workers(list(self.workers))

    def add_worker(self, name: str) -> None:
        """Start one more worker named `name`, like those of `start`, and wait for it."""
        self._spawn_worker(name)
        self._wait_workers([name])

    def log_tail(self, n: int = 20) -> str:
        """The last `n` lines of every log, each under its file's name."""
        parts = []
        for log in self._logs:
            lines = log.read_text(errors="replace").splitlines() if log.exists() else []
            parts.append(f"--- {log.name}\n" + "\n".join(lines[-n:]))
        return "\n".join(parts)

    def close(self) -> None:
        """SIGKILL the process group of every process started here and reap them all;
        idempotent."""
        for proc in self._all:
            self._kill_group(proc)

    def _kill_group(self, proc: subprocess.Popen) -> None:
        """SIGKILL `proc`'s process group (its session), once, and reap `proc`."""
        if proc in self._group_killed:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        self._group_killed.add(proc)

    def __enter__(self) -> DaskCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

