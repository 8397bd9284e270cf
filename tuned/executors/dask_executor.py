"""The Dask executor: trials as tasks on a Dask cluster, the daemon the one state of record.

`Cluster` is the daemon's connection to a Dask scheduler (one `distributed.Client`), shared
by its Dask experiments; `DaskExecutor` runs one experiment's trials there (the Executor
protocol, `tuned.engine.executor`). What runs on the workers is `tuned.executors.dask_worker`.

A launch is one Dask task (`dask_worker.run_trial`) with a key of its own (trial, attempt, a
nonce), ``resources={"GPU": n}`` for a trial that needs GPUs, and a run id and secret of its
own: the store keeps the run as the trial's current run (the secret hashed) before the task
is submitted. The task is published (``publish_dataset``) so that it outlives the daemon's
client (a restarted daemon finds it again), and unpublished once the trial's end is stored.

The trial talks to the daemon directly over TCP (the report listener, `tuned.daemon.listener`),
the same JSON lines as a local trial's channel. Its first line is said for it by the task
(over TLS, `Cluster.tls`, by the trial itself, which holds the TLS session): its run,
secret, host, worker, pid, start time and GPUs; the daemon checks that this run is the
trial's current one and that no other copy took it (`Store.place_trial`: a Dask rerun of a
task whose worker died is refused, "superseded", and exits), stores that claim, and only
then sends the trial its order. A channel may be an `ssl.SSLSocket`: reads and writes that
cannot go on now raise SSLWantReadError or SSLWantWriteError (as BlockingIOError on a plain
socket), and the bytes TLS holds decrypted (`pending()`) are read before waiting again.

A run ends (`Exited`) once its task is done and its channel closed, in that order or the
other. A task that ended without a result (its worker died, the scheduler was lost), or a
run refused because another copy of it was placed, is `lost`: the engine runs the trial
again (its attempt counted) from its checkpoint, which lives on storage every worker shares.

Everything that talks to the scheduler and may block (submits, signals through `Client.run`,
the cluster's description) runs on one control thread, and publishing (batched: about 10 ms
a round trip, whatever the batch) on another, never on the daemon's loop; what comes back
(a task done) is queued and wakes the loop through a socket pair.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import hmac
import logging
import secrets
import selectors
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tuned.engine.executor import RunRef, TrialOrder
from tuned.engine.resources import Grant, ResourcePool
from tuned.protocol.channel import (
    ADOPT_SOCKET_ENV,
    DAEMON_ADDRESS_ENV,
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
    RUN_ENV,
    RUN_TOKEN_ENV,
    Exited,
    Message,
    answer_line,
    compact_json,
    split_lines,
)
from tuned.protocol.tcp import NOT_NOW, TlsFiles, buffered
from tuned.trial.checkpoints import TrialCheckpoints

log = logging.getLogger("tuned.dask")

_READ_SIZE = 1 << 16
#: Seconds a run's channel may stay open after its task is done (its last lines in flight).
EOF_WAIT = 5.0
#: Seconds between refreshes of the cluster's description (workers, capacity).
REFRESH_SECONDS = 2.0
CONNECT_TIMEOUT = 10.0


def token_hash(token: str) -> str:
    """The stored form of a run's secret: its SHA-256, in hex."""
    return hashlib.sha256(token.encode()).hexdigest()


class ClusterUnavailable(RuntimeError):
    """The daemon is not connected to a Dask scheduler."""


# -- capacity ---------------------------------------------------------------------------------


class ClusterPool(ResourcePool):
    """The cluster's capacity, as the engines of Dask experiments take from it: its worker
    threads (a trial's task holds one, whatever its `num_cpus`: size the workers' threads
    to the trials) and its GPU resource (``dask worker --resources GPU=n``), counted, not
    named: which GPUs a trial gets is decided on its host. `resize` follows the workers
    as they come and go (0 while the scheduler is unreachable); what runs beyond a smaller
    capacity keeps running and frees as it ends. The sharing rule is the local pool's."""

    def __init__(self) -> None:
        super().__init__(0)
        self.gpus_total = 0
        self.gpus_free = 0

    def resize(self, threads: float, gpus: int) -> None:
        used_cpus = self.cpus_total - self.cpus_free
        used_gpus = self.gpus_total - self.gpus_free
        self.cpus_total, self.gpus_total = float(threads), int(gpus)
        self.cpus_free, self.gpus_free = self.cpus_total - used_cpus, self.gpus_total - used_gpus

    def fits_ever(self, cpus: float, gpus: int) -> str | None:
        if gpus > self.gpus_total:
            return (f"num_gpus: {gpus} per trial, but the Dask cluster has {self.gpus_total} "
                    "GPU(s) (dask worker --resources GPU=n)")
        return None

    def can_take(self, cpus: float, gpus: int) -> bool:
        return self.cpus_free >= 1 - 1e-9 and gpus <= self.gpus_free

    def _lendable(self, owner: Any, cpus: float, gpus: int) -> bool:
        head = self.head()
        if head is None or head == owner:
            return True
        want = self._queue[head]
        return (self.cpus_free - 1 >= 1 - 1e-9
                and gpus <= self.gpus_free - min(self.gpus_free, want.gpus))

    def take(self, cpus: float, gpus: int, owner: Any = None) -> Grant | None:
        if not self.admit(owner, cpus, gpus):
            return None
        self.cpus_free -= 1
        self.gpus_free -= gpus
        if owner is not None:
            self._queue.pop(owner, None)
        return Grant(1, ["cluster"] * gpus)

    def hold(self, cpus: float, gpus: Any) -> Grant:
        count = len(list(gpus))
        self.cpus_free -= 1
        self.gpus_free -= count
        return Grant(1, ["cluster"] * count)

    def give(self, grant: Grant) -> None:
        self.cpus_free = min(self.cpus_total, self.cpus_free + grant.cpus)
        self.gpus_free = min(self.gpus_total, self.gpus_free + len(grant.gpus))

    def wait_reason(self, owner: Any, name_of: Callable[[Any], str]) -> str | None:
        want = self._queue.get(owner)
        if want is None:
            return None
        if self.cpus_total == 0:
            return "waiting: the Dask cluster has no worker (or is unreachable)"
        needs = []
        if self.cpus_free < 1 - 1e-9:
            needs.append(f"every one of the Dask cluster's {self.cpus_total:g} worker "
                         "thread(s) runs a trial")
        if want.gpus > self.gpus_free:
            needs.append(f"needs {want.gpus} GPU(s), the Dask cluster has {self.gpus_free} "
                         "free")
        return self._waiting(owner, needs, name_of)

    @property
    def gpus_in_use(self) -> list[str]:
        return ["cluster"] * (self.gpus_total - self.gpus_free)


# -- the connection ---------------------------------------------------------------------------


class Cluster:
    """The daemon's connection to a Dask scheduler (`address`, or a `scheduler_file`).

    `advertise` is the report listener's address as the workers reach it (``HOST:PORT``);
    `tls`: the listener speaks TLS (the trials connect themselves, with their worker's TLS
    files). `prefix` names this daemon's tasks and published runs (two daemons may share a
    cluster). Connecting, and reconnecting after the scheduler was lost, happen on the
    control thread: the daemon serves meanwhile, and `describe()` says the cluster is
    unreachable. Raises nothing at construction."""

    def __init__(self, address: str | None, scheduler_file: str | None, advertise: str,
                 prefix: str, patience: float, tls: bool = False):
        if (address is None) == (scheduler_file is None):
            raise ValueError("give a Dask scheduler's address or its scheduler file")
        self.address = address
        self.scheduler_file = scheduler_file
        self.advertise = advertise
        self.tls = tls
        self.prefix = prefix
        self.patience = patience
        self.pool = ClusterPool()
        self.client: Any = None
        self.reachable = False
        self.problem: str | None = "connecting"
        self.workers: list[dict[str, Any]] = []
        self._control = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tuned-dask")
        # Publishing waits about 10 ms a round trip (the client's batched stream): on a
        # thread of its own, so that launches (a submit, 0.3 ms) do not queue behind it.
        self._publisher = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="tuned-dask-publish")
        self._lock = threading.Lock()
        self._closed = False
        self._refreshed = 0.0
        self._refreshing = False
        self._capacity: tuple[int, int] = (0, 0)
        self._scheduler_id: str | None = None
        self._to_publish: dict[str, Any] = {}
        self._to_unpublish: list[str] = []
        self._flush_due = False
        self.submit(self._connect)

    # -- the control thread ---------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        """Run `fn(*args)` on the control thread (in order); its future."""
        return self._control.submit(fn, *args)

    def _connect(self) -> None:
        from distributed import Client

        from tuned.executors.dask_worker import TunedWorkerPlugin

        client = None
        try:
            if self.scheduler_file is not None:
                client = Client(scheduler_file=self.scheduler_file, timeout=CONNECT_TIMEOUT,
                                set_as_default=False)
            else:
                client = Client(self.address, timeout=CONNECT_TIMEOUT, set_as_default=False)
            client.register_plugin(TunedWorkerPlugin(), name="tuned")
        except Exception as exc:  # OSError, TimeoutError, distributed's own
            with self._lock:
                self.reachable, self.problem = False, f"{type(exc).__name__}: {exc}"
                self._capacity = (0, 0)
            log.warning("Dask scheduler %s unreachable: %s", self.where, self.problem)
            if client is not None:
                try:
                    client.close(timeout=2)
                except Exception:
                    pass
            return
        self.client = client
        self._describe()
        log.info("connected to the Dask scheduler %s (%d worker(s))", self.where,
                 len(self.workers))

    @property
    def where(self) -> str:
        return self.address or f"(scheduler file {self.scheduler_file})"

    def _describe(self) -> None:
        """Refresh `workers`, `reachable` and the pool's capacity (control thread)."""
        client = self.client
        if client is not None and client.status in ("closed", "closing", "failed"):
            self.client = client = None  # it gave up reconnecting: a new one
        if client is None:
            self._connect()
            return
        try:
            if client.status != "running":
                raise OSError(f"the scheduler connection is {client.status}")
            info = client.scheduler_info(n_workers=-1)
            if info.get("id") != self._scheduler_id:  # a new scheduler: it has no plugin
                from tuned.executors.dask_worker import TunedWorkerPlugin

                client.register_plugin(TunedWorkerPlugin(), name="tuned")
                self._scheduler_id = info.get("id")
            held = client.run(_runs_here, on_error="return")
        except Exception as exc:
            with self._lock:
                self.reachable, self.problem = False, f"{type(exc).__name__}: {exc}"
                self._capacity = (0, 0)  # nothing launches until it is back
            return
        workers, threads, gpus = [], 0, 0
        for address, w in sorted(info.get("workers", {}).items()):
            resources = w.get("resources") or {}
            mine = held.get(address) if isinstance(held.get(address), dict) else {}
            workers.append({"address": address, "name": str(w.get("name", address)),
                            "host": w.get("host"), "nthreads": w.get("nthreads", 0),
                            "gpus": resources.get("GPU", 0), "gpu_uuids": mine.get("gpus", []),
                            "runs": mine.get("runs", [])})
            threads += w.get("nthreads", 0)
            gpus += int(resources.get("GPU", 0))
        with self._lock:
            self.workers = workers
            self.reachable, self.problem = True, None
            self._capacity = (threads, gpus)

    def refresh(self, now: float) -> None:
        """From the daemon's loop, now and then: describe the cluster again (in the
        background), and resize the pool to what was last seen."""
        with self._lock:
            self.pool.resize(*(self._capacity if self.connected else (0, 0)))
        if now - self._refreshed < REFRESH_SECONDS or self._refreshing or self._closed:
            return
        self._refreshed = now
        self._refreshing = True

        def describe() -> None:
            try:
                self._describe()
            finally:
                self._refreshing = False

        self.submit(describe)

    @property
    def connected(self) -> bool:
        """Whether the client is connected to the scheduler now (read without asking it)."""
        client = self.client
        return client is not None and client.status == "running"

    def describe(self) -> dict[str, Any]:
        """What `tunectl status` shows of the cluster: its address, whether it is reachable
        (and why not), the listener (and whether it speaks TLS), its workers (address, name,
        host, threads, GPUs, the runs of ours on each)."""
        client = self.client
        with self._lock:
            reachable, problem = self.reachable, self.problem
            if reachable and not self.connected:
                reachable = False
                problem = f"the connection to the scheduler is {getattr(client, 'status', None)}"
            return {"scheduler": self.where, "reachable": reachable, "problem": problem,
                    "listener": self.advertise, "tls": self.tls,
                    "workers": [dict(w) for w in self.workers] if reachable else []}

    def close(self) -> None:
        """Let go of the scheduler (the tasks it runs go on: they are published)."""
        self._closed = True
        self._control.shutdown(wait=False, cancel_futures=True)
        self._publisher.shutdown(wait=False, cancel_futures=True)
        client = self.client
        if client is not None:
            try:
                client.close(timeout=5)
            except Exception:  # closing a client of a dead scheduler may fail any way
                pass

    def publish(self, name: str, future: Any) -> None:
        """Publish a run's task under `name`, with the others of the next flush (one round
        trip to the scheduler, about 10 ms, for them all: its batched stream's interval)."""
        with self._lock:
            self._to_publish[name] = future
            self._flush_soon()

    def unpublish(self, names: list[str]) -> None:
        """Unpublish ended runs' tasks, with the others of the next flush."""
        with self._lock:
            self._to_unpublish += names
            self._flush_soon()

    def _flush_soon(self) -> None:
        if not self._flush_due:  # the caller holds the lock
            self._flush_due = True
            self._publisher.submit(self._flush)

    def _flush(self) -> None:
        """Publish and unpublish what waits (control thread): those published and ended
        since the last flush are never published."""
        with self._lock:
            publish, self._to_publish = self._to_publish, {}
            unpublish, self._to_unpublish = self._to_unpublish, []
            self._flush_due = False
        for name in unpublish:
            publish.pop(name, None)
        client = self.client
        if client is None:
            return
        try:
            if publish:
                client.publish_dataset(override=True, **publish)
            if unpublish:
                self._unpublish_all(client, unpublish)
        except Exception as exc:  # the scheduler is gone: it forgot them anyway
            log.info("could not publish/unpublish %d/%d run(s): %s", len(publish),
                     len(unpublish), exc)

    @staticmethod
    def _unpublish_all(client: Any, names: list[str]) -> None:
        """Unpublish `names` in one call (recent distributed takes a list), else one
        by one; a name that is gone already is no error."""
        try:
            client.unpublish_dataset(names)
            return
        except Exception:  # an older distributed, or one of them gone
            pass
        for name in names:
            try:
                client.unpublish_dataset(name)
            except KeyError:
                pass

    def forget_others(self, current: set[str]) -> None:
        """Unpublish this daemon's published runs that are not among the `current` runs (a
        daemon stopped before it unpublished the runs that ended under it), in the
        background."""
        def sweep() -> None:
            client = self.client
            if client is None:
                return
            try:
                names = [n for n in client.list_datasets()
                         if isinstance(n, str) and n.startswith(self.dataset(""))]
                stale = [n for n in names if n[len(self.dataset("")):] not in current]
                if stale:
                    self._unpublish_all(client, stale)
                    log.info("unpublished %d run(s) that had ended", len(stale))
            except Exception as exc:  # unreachable: the next start sweeps again
                log.info("published runs not swept: %s", exc)

        self._publisher.submit(sweep)

    def dataset(self, run: str) -> str:
        """The name run `run`'s task is published under."""
        return f"tuned-{self.prefix}-{run}"

    def terminate(self, run: str) -> None:
        """SIGKILL to run `run`'s process group on whichever worker runs it, its task
        cancelled (one still queued never starts; one that starts is refused at its hello,
        no longer being its trial's run) and unpublished, in the background; a run that is
        gone is left alone."""
        def end() -> None:
            from tuned.executors.dask_worker import signal_run

            client = self.client
            if client is None:
                return
            try:
                client.run(signal_run, run, signal.SIGKILL, on_error="ignore")
                client.cancel([client.get_dataset(self.dataset(run))])  # queued: never runs
                client.unpublish_dataset(self.dataset(run))
            except Exception as exc:  # unreachable, or the dataset is gone already
                log.info("run %s not ended on the cluster: %s", run, exc)

        self.submit(end)

    def executor(self, experiment: dict[str, Any], num_gpus: int,
                 selector: selectors.BaseSelector, log_path: Callable[[int], str],
                 clock: Callable[[], float] = time.monotonic) -> DaskExecutor:
        """A DaskExecutor for one experiment (`experiment`: what the workers' template
        loads: entry or command, workdir, constants, start_method, name)."""
        return DaskExecutor(self, experiment, num_gpus, selector, log_path, clock)


def _runs_here(dask_worker: Any = None) -> dict[str, Any]:
    from tuned.executors.dask_worker import runs_here

    return runs_here(dask_worker)


# -- one experiment's runs --------------------------------------------------------------------


@dataclass
class _Run:
    trial_id: int
    run: str
    token: str | None  # None for a run adopted after a restart (only its hash is known)
    hashed: str
    order: TrialOrder | None = None
    future: Any = None
    sock: socket.socket | None = None
    buffer: bytearray = field(default_factory=bytearray)
    connected: bool = False  # its channel is open
    placed: bool = False  # it said hello (here, or to the engine that adopted it)
    worker: str | None = None
    result: Any = None  # the task's result (a dict) or its exception, once done
    done: bool = False
    done_at: float | None = None
    kill_at: float | None = None
    ending: bool = False  # stopped or killed: a hello that comes now is refused
    logs: list[socket.socket] = field(default_factory=list)
    log_path: str | None = None


class DaskExecutor:
    """Runs one experiment's trials on the cluster (see the module docstring). Called from
    the daemon's loop only; its events come from `handle` for its keys of the shared
    selector (`owns`), and from `reap_unwatched`."""

    spares = 0
    prepared = 0

    def __init__(self, cluster: Cluster, experiment: dict[str, Any], num_gpus: int,
                 selector: selectors.BaseSelector, log_path: Callable[[int], str],
                 clock: Callable[[], float] = time.monotonic):
        self.cluster = cluster
        self.experiment = experiment
        self.num_gpus = num_gpus
        self._sel = selector
        self._log_path = log_path
        self.clock = clock
        self._runs: dict[int, _Run] = {}
        self._finished: deque[tuple[str, Any]] = deque()  # (run, result) from Dask's thread
        self._unpublish: list[str] = []
        self._found: dict[str, Any] = {}  # runs' tasks found by `alive`, for `adopt`
        self.ctl, self._wake_w = socket.socketpair()
        self.ctl.setblocking(False)
        self._wake_w.setblocking(False)
        self.ready = False
        self.entry_space: dict[str, Any] | None = None
        self.entry_constants: dict[str, Any] = {}
        self._check: concurrent.futures.Future | None = None
        self._registered = False

    # -- the entry, checked on a worker ----------------------------------------------------

    def check_entry(self) -> None:
        """Have one worker load the entry (its template starts, and stays for the trials);
        `poll_ready` says how it went, `ctl` becomes readable when it has."""
        self._check = self.cluster.submit(self._describe_on_a_worker)
        self._check.add_done_callback(lambda _: self._wake())

    def _describe_on_a_worker(self) -> dict[str, Any]:
        from tuned.executors.dask_worker import describe

        client = self.cluster.client
        if client is None or not self.cluster.reachable:
            return {"error": f"the Dask cluster is unreachable ({self.cluster.problem})"}
        workers = sorted(client.scheduler_info(n_workers=-1).get("workers", {}))
        if not workers:
            return {"error": "the Dask cluster has no worker"}
        answers = client.run(describe, self.experiment, workers=workers[:1])
        return answers[workers[0]]

    def poll_ready(self) -> bool:
        """True once a worker loaded the entry; False while it loads; TemplateError when it
        could not (the message says why)."""
        from tuned.executors.template import TemplateError

        if self.ready:
            return True
        self._drain()
        if self._check is None or not self._check.done():
            return False
        try:
            answer = self._check.result()
        except Exception as exc:
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        if "error" in answer:
            raise TemplateError(f"on a Dask worker: {answer['error']}")
        self.entry_space = answer.get("space")
        self.entry_constants = answer.get("constants") or {}
        self._mark_ready()
        return True

    def _mark_ready(self) -> None:
        self.ready = True
        if not self._registered:
            self._sel.register(self.ctl, selectors.EVENT_READ, (self, "wake", None))
            self._registered = True

    def close_template(self) -> None:
        """Nothing to end here (the workers' templates live with them); the loop's wake-up
        socket is closed."""
        self.close()

    # -- launching ---------------------------------------------------------------------

    def reserve(self, trial_id: int) -> RunRef:
        """A new run of trial `trial_id`: its id and secret (hashed in the RunRef, for the
        store). Nothing runs until `start`."""
        if trial_id in self._runs:
            raise RuntimeError(f"trial {trial_id} is running already")
        self._mark_ready()
        run = f"{trial_id}-{secrets.token_hex(6)}"
        token = secrets.token_urlsafe(24)
        self._runs[trial_id] = _Run(trial_id, run, token, token_hash(token))
        return RunRef(0, None, run, token_hash(token))

    def start(self, order: TrialOrder) -> None:
        """Submit the run's task (and publish it) on the control thread."""
        r = self._runs.get(order.trial_id)
        if r is None or r.ending:
            return
        r.order = order
        r.log_path = order.log_path
        job = {"run": r.run, "token": r.token, "address": self.cluster.advertise,
               "experiment": self.experiment, "num_gpus": self.num_gpus,
               "patience": self.cluster.patience, "tls": self.cluster.tls}
        key = (f"tuned-{self.cluster.prefix}-t{order.trial_id}-a{order.attempt}-"
               f"{r.run.rsplit('-', 1)[1]}")
        self.cluster.submit(self._submit, r, key, job)

    def _submit(self, r: _Run, key: str, job: dict[str, Any]) -> None:
        from tuned.executors.dask_worker import run_trial

        client = self.cluster.client
        try:
            if client is None:
                raise ClusterUnavailable(f"no Dask scheduler ({self.cluster.problem})")
            resources = {"GPU": self.num_gpus} if self.num_gpus else None
            future = client.submit(run_trial, job, key=key, resources=resources, pure=False)
        except Exception as exc:
            self._task_done(r.run, exc)
            return
        r.future = future
        future.add_done_callback(lambda f, run=r.run: self._on_future(run, f))
        self.cluster.publish(self._dataset(r.run), future)

    def _on_future(self, run: str, future: Any) -> None:
        """From Dask's callback thread: fetch a done task's result (or its exception) there,
        not on the daemon's loop."""
        try:
            result = future.result(timeout=CONNECT_TIMEOUT)
        except BaseException as exc:  # CancelledError, KilledWorker, a lost scheduler
            result = exc
        self._task_done(run, result)

    def _dataset(self, run: str) -> str:
        return self.cluster.dataset(run)

    def _task_done(self, run: str, result: Any) -> None:
        """From Dask's thread (or the control thread): a run's task is done."""
        self._finished.append((run, result))
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    # -- the listener's side -------------------------------------------------------------

    def run_of(self, trial_id: int) -> str | None:
        """The current run of trial `trial_id` here, or None."""
        r = self._runs.get(trial_id)
        return None if r is None else r.run

    def token_ok(self, trial_id: int, run: str, token: str) -> bool:
        """Whether `token` is the secret of run `run`, the current run of `trial_id`."""
        r = self._runs.get(trial_id)
        return (r is not None and r.run == run
                and hmac.compare_digest(r.hashed, token_hash(token)))

    def refuses(self, trial_id: int) -> bool:
        """Whether a hello for this trial's run must be refused now: it is being ended."""
        r = self._runs.get(trial_id)
        return r is None or r.ending

    def placed(self, trial_id: int, sock: socket.socket, hello: dict[str, Any],
               rest: bytes = b"") -> list[Message]:
        """The run said hello and its claim is stored: send it its order on `sock` (its
        GPUs those its host gave it; over TLS, the TLS files its hello named, for its
        `resume`) and make `sock` its channel."""
        r = self._runs[trial_id]
        r.placed = True
        r.worker = hello.get("worker")
        order = r.order
        assert order is not None and r.token is not None, "a run placed before its start"
        env = {k: v for k, v in order.env.items()
               if k not in ("CUDA_VISIBLE_DEVICES", ADOPT_SOCKET_ENV)}
        if hello.get("gpus"):
            env["CUDA_VISIBLE_DEVICES"] = ",".join(hello["gpus"])
        env.update({DAEMON_ADDRESS_ENV: self.cluster.advertise, RUN_ENV: r.run,
                    RUN_TOKEN_ENV: r.token, "TUNED_WORKER": str(r.worker)})
        if self.cluster.tls and hello.get("tls"):
            env.update(TlsFiles.from_dict(hello["tls"]).env())
        payload = {**order.payload(), "env": env}
        sock.setblocking(True)
        sock.settimeout(5.0)
        try:
            sock.sendall((compact_json({"payload": payload, "log": None}) + "\n").encode())
        except OSError:
            sock.close()
            return []
        return self.attach(trial_id, sock, rest)

    def attach(self, trial_id: int, sock: Any, rest: bytes = b"") -> list[Message]:
        """Make `sock` the channel of trial `trial_id`'s run (first, or again after it lost
        its channel); the Messages in `rest`. KeyError when the trial is not running here."""
        r = self._runs[trial_id]
        self._close_channel(r)
        sock.setblocking(False)
        r.sock, r.connected, r.placed = sock, True, True
        r.buffer = bytearray(rest)
        self._sel.register(sock, selectors.EVENT_READ, (self, "msg", r))
        events: list[Message | Exited] = []
        self._split(r, events)
        return [e for e in events if isinstance(e, Message)]

    def attach_log(self, trial_id: int, sock: socket.socket, rest: bytes = b"") -> None:
        """A log connection of the trial's run: what comes on it is appended to its log."""
        r = self._runs[trial_id]
        if r.log_path is None:
            r.log_path = self._log_path(trial_id)
        sock.setblocking(False)
        r.logs.append(sock)
        if rest:
            self._append_log(r, rest)
        self._sel.register(sock, selectors.EVENT_READ, (self, "log", r))

    # -- talking and stopping -------------------------------------------------------------

    def send(self, trial_id: int, *bodies: dict[str, Any]) -> bool:
        """Answers on the run's channel, without blocking. A run without a channel (not
        placed yet, or reconnecting) drops them: it sends its unanswered reports again when
        it is back, and gets the stored decisions."""
        r = self._runs.get(trial_id)
        if r is None or not r.connected or r.sock is None:
            return True
        data = "".join(map(answer_line, bodies)).encode()
        try:
            sent = r.sock.send(data)
        except NOT_NOW:  # its buffer is full: it stopped reading
            return False
        except OSError:
            return True
        return sent == len(data)

    def stop(self, trial_id: int, grace: float = 5.0) -> None:
        """SIGTERM to the run's process group on its host, SIGKILL after `grace`; a task
        not started yet is cancelled, a hello that comes now is refused."""
        r = self._runs.get(trial_id)
        if r is None:
            return
        self._signal(r, signal.SIGTERM)
        deadline = self.clock() + grace
        r.kill_at = deadline if r.kill_at is None else min(r.kill_at, deadline)

    def kill(self, trial_id: int) -> None:
        """SIGKILL to the run's process group on its host (see `stop`)."""
        r = self._runs.get(trial_id)
        if r is not None:
            self._signal(r, signal.SIGKILL)

    def _signal(self, r: _Run, signum: int) -> None:
        r.ending = True
        run, worker, future = r.run, r.worker, r.future
        self.cluster.submit(self._signal_remote, run, worker, signum, future, r.placed)

    def _signal_remote(self, run: str, worker: str | None, signum: int, future: Any,
                       placed: bool) -> None:
        from tuned.executors.dask_worker import signal_run

        client = self.cluster.client
        if client is None:
            return
        try:
            if not placed and future is not None:
                client.cancel([future])  # queued: it never starts (started: it is refused)
            client.run(signal_run, run, signum, workers=[worker] if worker else None,
                       on_error="ignore")
        except Exception as exc:
            log.warning("could not signal run %s on %s: %s", run, worker or "its worker", exc)

    # -- events -------------------------------------------------------------------------

    def owns(self, key: selectors.SelectorKey) -> bool:
        return isinstance(key.data, tuple) and key.data[0] is self

    def handle(self, key: selectors.SelectorKey) -> list[Message | Exited]:
        _, kind, r = key.data
        events: list[Message | Exited] = []
        if kind == "wake":
            self._drain()
        elif kind == "msg" and self._runs.get(r.trial_id) is r:
            self._read(r, events)
        elif kind == "log":
            self._read_log(r, key.fileobj)
        return events + self.reap_unwatched()

    def poll(self, timeout: float | None) -> list[Message | Exited]:
        timeout = self._escalate(timeout)
        events: list[Message | Exited] = []
        for key, _ in self._sel.select(timeout):
            if self.owns(key):
                events += self.handle(key)
        return events + self.reap_unwatched()

    def next_deadline(self) -> float | None:
        return self._escalate(None)

    def reap_unwatched(self) -> list[Message | Exited]:
        """The runs that ended: task done and channel closed (or closed `EOF_WAIT` seconds
        after the task was done)."""
        self._drain()
        self._unpublish_ended()
        events: list[Message | Exited] = []
        now = self.clock()
        for r in list(self._runs.values()):
            if not r.done:
                continue
            if r.connected and isinstance(r.result, BaseException):
                continue  # the task was lost, not the trial: it goes on while it talks
            if (r.connected or r.logs) and r.done_at is not None \
                    and now - r.done_at < EOF_WAIT:
                continue  # its last lines, and its output, are on their way
            if r.connected:
                self._read(r, events)
                self._close_channel(r)
            events += self._exit_events(r)
            self._end_run(r)
        return events

    def _drain(self) -> None:
        try:
            while self.ctl.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass
        while self._finished:
            run, result = self._finished.popleft()
            r = next((r for r in self._runs.values() if r.run == run), None)
            if r is None or r.done:
                continue
            r.result = result
            r.done, r.done_at = True, self.clock()

    def _exit_events(self, r: _Run) -> list[Message | Exited]:
        """How a run whose task is done and whose channel is closed ended."""
        result = r.result
        if isinstance(result, BaseException):
            why = f"its Dask task was lost ({type(result).__name__}: {result})"
            return [Exited(r.trial_id, None, lost=not r.ending, why=why)]
        code = result.get("code") if isinstance(result, dict) else None
        where = f" on {result.get('worker')}" if isinstance(result, dict) else ""
        if isinstance(result, dict) and result.get("error"):
            error = str(result["error"])
            if error.startswith("entry"):
                return [Message(r.trial_id, {"op": "error", "message": f"{error}{where}"}),
                        Exited(r.trial_id, None)]
            return [Exited(r.trial_id, None, lost=not r.ending, why=f"{error}{where}")]
        if code == EXIT_UNREACHABLE and not r.placed and not r.ending:
            # A trial that connects itself (TLS) and never got its order: no fault of its own.
            return [Exited(r.trial_id, None, lost=True,
                           why=f"it could not reach the daemon's report listener{where} "
                               "(a refused TLS handshake is in the daemon's log)")]
        if code == EXIT_REFUSED and not r.ending:
            # Refused: another copy of this run was placed first, so this is a Dask rerun
            # of a task whose worker died, and the copy that ran died with it.
            return [Exited(r.trial_id, None, lost=True,
                           why=f"its worker {r.worker or ''} was lost".replace("  ", " "))]
        return [Exited(r.trial_id, code)]

    def _end_run(self, r: _Run) -> None:
        for sock in r.logs:
            self._read_log(r, sock)
        for sock in list(r.logs):
            self._close_log(r, sock)
        self._runs.pop(r.trial_id, None)
        self._unpublish.append(r.run)

    def _unpublish_ended(self) -> None:
        """Unpublish the runs whose end the engine has stored since (it stores an Exited
        in the step that handles it, before the next poll)."""
        if not self._unpublish:
            return
        names, self._unpublish = [self._dataset(run) for run in self._unpublish], []
        self.cluster.unpublish(names)

    def _escalate(self, timeout: float | None) -> float | None:
        now = self.clock()
        for r in self._runs.values():
            if r.kill_at is not None:
                if r.kill_at <= now:
                    self._signal(r, signal.SIGKILL)
                    r.kill_at = now + 2.0
                wait = max(0.0, r.kill_at - now)
                timeout = wait if timeout is None else min(timeout, wait)
            if r.done and (r.connected or r.logs) and r.done_at is not None \
                    and not isinstance(r.result, BaseException):
                wait = max(0.0, r.done_at + EOF_WAIT - now)
                timeout = wait if timeout is None else min(timeout, wait)
        return timeout

    def _read(self, r: _Run, events: list[Message | Exited]) -> None:
        while r.connected and r.sock is not None:
            try:
                chunk = r.sock.recv(_READ_SIZE)
            except NOT_NOW:
                break
            except OSError:
                chunk = b""
            if not chunk:
                self._close_channel(r)
                break
            r.buffer += chunk
            self._split(r, events)
            if len(chunk) < _READ_SIZE and not buffered(r.sock):
                break

    @staticmethod
    def _split(r: _Run, events: list[Message | Exited]) -> None:
        events += split_lines(r.trial_id, r.buffer)

    def _close_channel(self, r: _Run) -> None:
        if r.connected and r.sock is not None:
            r.connected = False
            self._sel.unregister(r.sock)
            r.sock.close()
            r.sock = None

    def _read_log(self, r: _Run, sock: Any) -> None:
        """Append what came on a log connection (until it would block: all TLS holds
        decrypted too) to the run's log; close it at its end."""
        while True:
            try:
                data = sock.recv(_READ_SIZE)
            except NOT_NOW:
                return
            except OSError:
                data = b""
            if not data:
                self._close_log(r, sock)
                return
            self._append_log(r, data)

    def _append_log(self, r: _Run, data: bytes) -> None:
        if r.log_path is None:
            return
        try:
            with open(r.log_path, "ab") as f:
                f.write(data)
        except OSError as exc:
            log.warning("cannot write %s: %s", r.log_path, exc)

    def _close_log(self, r: _Run, sock: Any) -> None:
        if sock in r.logs:
            r.logs.remove(sock)
            self._sel.unregister(sock)
            sock.close()

    # -- restarts -------------------------------------------------------------------------

    def alive(self, ref: RunRef) -> bool:
        """Whether run `ref.run` is still a task of the cluster that has not ended (asked
        of the scheduler: blocks up to a few seconds). An unreachable cluster counts as
        not: the trial runs again, and the old run, if it lives, is refused when it
        comes back."""
        return self._published(ref) is not None

    def _published(self, ref: RunRef) -> Any:
        """The task of run `ref.run` if it is published and not done, else None. Found once
        and kept for `adopt`: a second Future of the same key, made after the first was
        dropped, can be cancelled by the release of the first."""
        if ref.run in self._found:
            future = self._found[ref.run]
            return None if future.done() else future
        client = self.cluster.client
        if ref.run is None or client is None:
            return None
        try:
            future = self.cluster.submit(client.get_dataset, self._dataset(ref.run)).result(
                timeout=CONNECT_TIMEOUT)
        except Exception as exc:  # KeyError: not published (any more)
            log.info("run %s is not a task of the cluster: %s", ref.run, exc)
            return None
        self._found[ref.run] = future
        if future.done():
            log.info("run %s: its task is %s", ref.run, future.status)
            return None
        return future

    def adopt(self, trial_id: int, ref: RunRef) -> bool:
        """Follow a run a dead daemon launched: its task (found again by name) says when it
        ends, its channel comes back with `attach` when the trial reconnects."""
        future = self._published(ref)
        self._found.pop(ref.run or "", None)
        if future is None or ref.run is None or ref.token_hash is None:
            return False
        if ref.host is None:
            return False  # never said hello, so it never got its order: it runs anew
        self._mark_ready()
        r = _Run(trial_id, ref.run, None, ref.token_hash, future=future, placed=True,
                 log_path=self._log_path(trial_id))
        self._runs[trial_id] = r
        future.add_done_callback(lambda f, run=r.run: self._on_future(run, f))
        return True

    def terminate(self, ref: RunRef) -> None:
        """End run `ref.run` wherever it runs (`Cluster.terminate`)."""
        if ref.run is not None:
            self.cluster.terminate(ref.run)

    def pid_of(self, trial_id: int) -> int | None:
        """None: a remote run's pid is another host's (the control socket's `adopt`, which
        knows trials by a local peer's pid, must never match it)."""
        return None

    def clone_checkpoint(self, source_id: int, source_dir: str, trial_id: int,
                         trial_dir: str) -> int | None:
        copied = TrialCheckpoints(source_dir).copy_latest_to(TrialCheckpoints(trial_dir))
        return None if copied is None else copied.seq

    def discard_checkpoints(self, trial_dir: str) -> None:
        TrialCheckpoints(trial_dir).remove()

    def prepare(self) -> bool:
        return False

    def release(self) -> None:
        pass

    def pids(self) -> list[int]:
        return []

    @property
    def running(self) -> int:
        return len(self._runs)

    def shutdown(self, grace: float = 2.0) -> list[Exited]:
        """Stop every run and wait for their ends (or, past `grace` and a little more, give
        them up as lost: their trials run again)."""
        for trial_id in list(self._runs):
            self.stop(trial_id, grace)
        exits: list[Exited] = []
        deadline = self.clock() + grace + 10.0
        while self._runs and self.clock() < deadline:
            exits += [e for e in self.poll(0.05) if isinstance(e, Exited)]
        for r in list(self._runs.values()):
            exits.append(Exited(r.trial_id, None, lost=True, why="did not end in time"))
            self._close_channel(r)
            self._end_run(r)
        return exits

    def detach(self) -> None:
        """Let go of every run (they go on, published, and come back to the next daemon)."""
        for r in self._runs.values():
            self._close_channel(r)
            for sock in list(r.logs):
                self._close_log(r, sock)
        self._runs.clear()

    def close(self) -> None:
        if self._registered:
            self._sel.unregister(self.ctl)
            self._registered = False
        self.ctl.close()
        self._wake_w.close()


__all__ = ["Cluster", "ClusterPool", "ClusterUnavailable", "DaskExecutor", "token_hash"]
