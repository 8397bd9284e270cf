"""`tuned serve`: many experiments, one store, one control socket, one loop.

The daemon owns a state directory: ``tuned.db`` (the store), ``daemon.lock`` (one daemon per
state directory), ``logs/<experiment>/trial-<n>.log`` and the spool (``inbox/``,
``accepted/``, ``rejected/``). Its single-threaded loop waits on one selector for the
control socket and every trial's channel and exit, then lets each experiment's engine handle
its events and launch what the shared CPU slots and GPUs allow.

On start it recovers: every experiment not finished goes on. A trial left RUNNING whose
process still lives (same pid, same start time) is adopted: it keeps its CPUs and GPUs, and
its reporter, which lost its channel with the old daemon, reconnects to the control socket
(op ``adopt``; the trial is known by the peer's pid) and resends its unanswered report. A
trial whose process is gone runs again, its attempt counted (docs/architecture.md, invariant 3).

On SIGTERM or SIGINT the daemon leaves its trials running (they wait for the next daemon to
adopt them, see `tuned.trial.reporter.Reconnect`), unless it was told `stop_trials`: then they are
stopped and run again on the next start.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import selectors
import signal
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tuned.core.lifecycle import (
    EXPERIMENT_FAILED,
    FINISHED_EXPERIMENT_STATES,
    STOPPED_BY_USER,
)
from tuned.daemon.control import ControlServer, check_socket_path
from tuned.daemon.jobs import Jobs
from tuned.daemon.notify import Notifier
from tuned.daemon.ops import OPS, OpError, Ops
from tuned.daemon.spool import Later, Spool
from tuned.engine.engine import Engine
from tuned.engine.executor import RunRef
from tuned.engine.resources import ResourcePool
from tuned.executors.gpus import make_provider
from tuned.executors.host import available_cpus
from tuned.executors.local import terminate
from tuned.executors.template import READY_TIMEOUT, TemplateError, TemplateExecutor
from tuned.experiment.spec import ExperimentSpec, SpecError, json_safe
from tuned.protocol.channel import (
    ADOPT_SOCKET_ENV,
    ADOPT_TIMEOUT_ENV,
    DEFAULT_ADOPT_TIMEOUT,
    Exited,
    Message,
)
from tuned.store.database import NameTaken, NotFound, Store

log = logging.getLogger("tuned.daemon")

# Seconds between the loop's chores: watchdog ping, idle-client sweep, status line.
CHORE_INTERVAL = 1.0
GPU_POLL_SECONDS = 5.0


class AlreadyServing(RuntimeError):
    """Another daemon holds this state directory."""


class ListenError(RuntimeError):
    """The report listener's address cannot be had (`--listen`)."""


@dataclass
class Runner:
    """One experiment running in the daemon."""

    engine: Engine
    executor: Any  # a TemplateExecutor, or a DaskExecutor for `executor = "dask"`


@dataclass
class ClusterOptions:
    """How the daemon reaches a Dask cluster (`tuned serve --dask ...`): the scheduler's
    `address` or its `scheduler_file`; `listen` (``HOST:PORT``, port 0: a free one, kept
    across restarts) for the report listener, `advertise` the host name the workers reach
    it by (default: the listen host); `shared_dir` the folder every worker shares, for
    checkpoints (default: the state directory). `tls_cert` and `tls_key` (both or neither):
    the listener speaks TLS only, with this certificate; `tls_ca` (with them): it requires
    client certificates signed by this CA (`tuned.protocol.tcp`)."""

    address: str | None = None
    scheduler_file: str | None = None
    listen: str = "127.0.0.1:0"
    advertise: str | None = None
    shared_dir: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None

    @property
    def tls(self) -> bool:
        """Whether the listener speaks TLS."""
        return self.tls_cert is not None

    def ssl_context(self) -> Any:
        """The listener's `ssl.SSLContext`, or None without TLS. ValueError naming the flag
        (``--tls-cert``, ``--tls-ca``) whose file cannot be loaded, or the one missing."""
        problem = tls_flags_problem(self.tls_cert, self.tls_key, self.tls_ca)
        if problem is not None:
            raise ValueError(problem)
        if self.tls_cert is None or self.tls_key is None:
            return None
        from tuned.protocol.tcp import server_context

        try:  # ssl.SSLError is an OSError
            context = server_context(self.tls_cert, self.tls_key)
        except OSError as exc:
            raise ValueError(f"--tls-cert {self.tls_cert} / --tls-key {self.tls_key}: "
                             f"{exc}") from None
        if self.tls_ca is not None:
            try:
                return server_context(self.tls_cert, self.tls_key, self.tls_ca)
            except OSError as exc:
                raise ValueError(f"--tls-ca {self.tls_ca}: {exc}") from None
        return context


def tls_flags_problem(cert: str | None, key: str | None, ca: str | None) -> str | None:
    """What is wrong with a set of ``--tls-cert``, ``--tls-key`` and ``--tls-ca`` (None
    when nothing): the certificate and its key go together, and a CA needs them."""
    if cert is not None and key is None:
        return "--tls-cert needs --tls-key"
    if key is not None and cert is None:
        return "--tls-key needs --tls-cert"
    if ca is not None and cert is None:
        return "--tls-ca needs --tls-cert and --tls-key"
    return None


@dataclass
class _Loading:
    """An experiment whose template is loading its entry (a submit, or a resume of a
    finished experiment): once loaded, `complete(executor)` stores and starts it and gives
    the answer (or raises OpError); `finish` hears that answer (or the OpError)."""

    spec: ExperimentSpec
    executor: Any
    finish: Callable[[dict[str, Any] | OpError], None]
    deadline: float
    complete: Callable[[Any], dict[str, Any]]


class Daemon:
    """The daemon; `serve()` runs it until SIGTERM or SIGINT (or `request_stop()`).
    `stop_trials`: stop the running trials when it leaves, rather than leave them to the
    next daemon."""

    def __init__(self, state_dir: str, socket_path: str,
                 clock: Callable[[], float] = time.monotonic, stop_trials: bool = False,
                 cluster: ClusterOptions | None = None):
        self.cluster_options = cluster
        self.cluster: Any = None  # tuned.executors.dask_executor.Cluster, once connected
        self.listener: Any = None  # tuned.daemon.listener.ReportListener
        self.state_dir = os.path.abspath(state_dir)
        self.socket_path = os.path.abspath(socket_path)
        self.stop_trials = stop_trials
        self.clock = clock
        # Reports that reconnecting trials sent with their adopt request, for the next step.
        self.adopted_events: dict[int, list[Message | Exited]] = {}
        # Group commit: batches an engine holds back for a moment (`Engine.hold_for`).
        self._held: dict[int, list[Message | Exited]] = {}
        # Submits waiting for their template, by experiment name.
        self.loading: dict[str, _Loading] = {}
        self.selector = selectors.DefaultSelector()
        self.runners: dict[int, Runner] = {}
        self.gpu_provider = make_provider()
        self.resources = ResourcePool(available_cpus(),
                                      [g.uuid for g in self.gpu_provider.gpus()])
        self._next_gpu_poll = 0.0
        self._stopping = False
        self._lock_fd: int | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.store: Store | None = None
        self.server: Any = None
        self.spool: Any = None
        self.notifier = Notifier(unset_environment=True)
        self.ops = Ops(self)
        self.jobs = Jobs(self._post)
        self._tasks: deque[Any] = deque()
        self._next_chores = 0.0
        # When to give memory back to the system after a large answer (trials, curves).
        self._trim_due: float | None = None
        # systemd wants a ping every half of WatchdogSec at the least.
        self._chore_interval = min(CHORE_INTERVAL,
                                   self.notifier.watchdog_interval() or CHORE_INTERVAL)

    # -- life ----------------------------------------------------------------------------

    def serve(self) -> None:
        """Lock the state directory, recover, bind the socket, then loop until stopped.

        Raises AlreadyServing when another daemon holds the state directory, AlreadyRunning
        when another daemon listens at the socket, InsecureDirectory for an unsafe socket
        folder: all found before anything is created or written.
        """
        self._check_lock()
        check_socket_path(self.socket_path)
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        self._lock()
        self.store = Store(os.path.join(self.state_dir, "tuned.db"))
        self._install_signals()
        if self.resources.gpus.order:
            self._poll_gpus()
        if self.cluster_options is not None:
            self._connect_cluster(self.cluster_options)
        self._recover()
        if self.cluster is not None:
            self.cluster.forget_others({
                r.executor.run_of(t) for r in self.runners.values()
                if hasattr(r.executor, "run_of") for t in r.engine.live} - {None})
        self.server = ControlServer(self.socket_path, self.ops.dispatch, ops=OPS)
        self.server.open()
        self.server.register(self.selector)
        if self.listener is not None:
            self.listener.register(self.selector)
        self.selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self.spool = Spool(self.state_dir, self._submit_file)
        self.selector.register(self.spool.fileno(), selectors.EVENT_READ, "spool")
        self.spool.start()
        self.spool.scan()
        self._start_jobs()
        log.info("serving %s on %s (%d experiment(s) resumed, %g CPUs, %d GPU(s))",
                 self.state_dir, self.socket_path, len(self.runners),
                 self.resources.cpus_total, len(self.resources.gpus.order))
        self.notifier.ready(self._status_line())
        try:
            while not self._stopping:
                self.tick(self._timeout())
                self._housekeeping()
        finally:
            self.notifier.stopping()
            self._shutdown()

    # -- the Dask cluster ------------------------------------------------------------------

    def _connect_cluster(self, options: ClusterOptions) -> None:
        """Open the report listener (bound, not accepting until the experiments are
        recovered) and connect to the Dask scheduler, waiting for the first try (so that
        the runs a dead daemon left are found again); an unreachable scheduler is logged
        and tried again in the background."""
        from tuned.daemon.listener import ReportListener, parse_address
        from tuned.executors.dask_executor import Cluster

        host, port = parse_address(options.listen)
        kept = os.path.join(self.state_dir, "listen.port")
        if port == 0:
            port = _read_port(kept)
        try:
            context = options.ssl_context()
        except ValueError as exc:
            raise ListenError(str(exc)) from None
        self.listener = ReportListener(host, port, self._on_hello, clock=self.clock,
                                       ssl_context=context)
        try:
            try:
                self.listener.open()
            except OSError:
                if not (port == _read_port(kept) and port):
                    raise
                self.listener.port = 0  # the port kept from the last start is taken
                self.listener.open()
        except OSError as exc:
            raise ListenError(f"--listen {options.listen}: {exc}") from None
        if parse_address(options.listen)[1] == 0:
            with open(kept, "w") as f:
                f.write(f"{self.listener.port}\n")
        advertise = f"{options.advertise or host}:{self.listener.port}"
        prefix = hashlib.sha256(self.state_dir.encode()).hexdigest()[:8]
        adopt_wait = DEFAULT_ADOPT_TIMEOUT
        self.cluster = Cluster(options.address, options.scheduler_file, advertise, prefix,
                               patience=adopt_wait, tls=options.tls)
        self.cluster.submit(lambda: None).result()  # the first connection tried
        log.info("report listener on %s:%d (advertised as %s)%s", host, self.listener.port,
                 advertise, ", TLS" + (", client certificates required" if options.tls_ca
                                       else "") if options.tls else "")

    def _on_hello(self, sock: socket.socket, hello: dict[str, Any], rest: bytes) -> str | None:
        """A remote trial's first line on the report listener (see `tuned.daemon.listener`):
        None once its socket is taken (a new run placed and sent its order, a run resumed,
        a log connection), else why it is refused."""
        from tuned.daemon.listener import check_hello

        problem = check_hello(hello)
        if problem is not None:
            return problem
        run, op = hello["run"], hello["op"]
        trial_id = int(run.split("-", 1)[0])
        owner = next(((exp_id, r) for exp_id, r in self.runners.items()
                      if getattr(r.executor, "run_of", None) is not None
                      and r.executor.run_of(trial_id) == run), None)
        if owner is None:
            return f"run {run} is not a current run of this daemon (superseded or ended)"
        exp_id, runner = owner
        executor = runner.executor
        if not executor.token_ok(trial_id, run, hello["token"]):
            return f"run {run}: wrong token"
        if op == "log":
            executor.attach_log(trial_id, sock, rest)
            return None
        assert self.store is not None
        if op == "hello":
            if executor.refuses(trial_id):
                return f"run {run}: its trial is being ended"
            placed = self.store.place_trial(trial_id, run, str(hello["host"]),
                                            str(hello["worker"]), hello["pid"],
                                            hello.get("start"), list(hello.get("gpus") or []))
            if placed != "placed":
                return f"run {run} is taken by another copy of it (superseded)"
            messages = executor.placed(trial_id, sock, hello, rest)
        else:
            proc = self.store.trial_process(trial_id)
            if (proc.run, proc.pid, proc.start) != (run, hello["pid"], hello.get("start")):
                return f"run {run}: not the process that said hello (superseded)"
            try:  # blocking for a line (a TLS socket too), but not for long
                sock.settimeout(5.0)
                sock.sendall(b'{"v":1,"ok":true}\n')
            except OSError:
                sock.close()
                return None
            if trial_id in runner.engine.live and runner.engine.live[trial_id].adopted:
                messages = runner.engine.reconnected(trial_id, sock, rest)
            else:
                messages = executor.attach(trial_id, sock, rest)
        self.adopted_events.setdefault(exp_id, []).extend(messages)
        return None

    # -- jobs ------------------------------------------------------------------------------

    def _start_jobs(self) -> None:
        """The timed jobs (`tuned.daemon.jobs`), cron starts of SCHEDULED experiments too."""
        assert self.store is not None
        self.jobs.start([(e.id, e.name, e.spec["schedule"], e.created)
                         for e in self.store.experiments() if e.state == "SCHEDULED"])

    def _post(self, task: Any) -> None:
        """From any thread: hand a task to the loop and wake it."""
        self._tasks.append(task)
        try:
            self._wake_w.send(b"t")
        except OSError:
            pass

    def _run_tasks(self) -> None:
        while self._tasks:
            task = self._tasks.popleft()
            try:
                self._run_task(task)
            except Exception:
                log.exception("job %r failed; the daemon goes on", task)

    def _run_task(self, task: Any) -> None:
        if task == "sweep":
            for runner in self.runners.values():
                for number in runner.engine.sweep_stale():
                    log.warning("trial %d of %s sent no report within report_timeout; "
                                "killed", number, runner.engine.experiment.name)
        elif task == "wal_checkpoint" and self.store is not None:
            self.store.conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        elif isinstance(task, tuple) and task[0] == "start":
            self._start_scheduled(task[1])

    def _start_scheduled(self, experiment_id: int) -> None:
        assert self.store is not None
        exp = self.store.experiment(experiment_id)
        if exp.state != "SCHEDULED" or experiment_id in self.runners:
            return
        self.store.set_experiment_state(experiment_id, "RUNNING")
        self.start_runner(experiment_id)
        self.jobs.cancel(experiment_id)
        log.info("experiment %s started by its schedule %r", exp.name, exp.spec["schedule"])

    def _housekeeping(self) -> None:
        """The periodic chores of the loop: posted tasks, watchdog ping, idle clients, spool
        scan."""
        self._run_tasks()
        now = self.clock()
        if self.spool.pending() or self.spool.due():
            self.spool.poll()
        if now >= self._next_gpu_poll and self.resources.gpus.order:
            self._next_gpu_poll = now + GPU_POLL_SECONDS
            self._poll_gpus()
        if self._trim_due is not None and now >= self._trim_due:
            self._trim_due = None
            _release_memory()
        if now >= self._next_chores:
            self._next_chores = now + self._chore_interval
            for name in [n for n, lo in self.loading.items() if now >= lo.deadline]:
                self._loaded(name, timed_out=True)
            self.server.sweep()
            if self.listener is not None:
                self.listener.sweep()
            if self.cluster is not None:
                self.cluster.refresh(now)
                self._serve_cluster()
            self.notifier.watchdog()
            self.notifier.status(self._status_line())

    def _poll_gpus(self) -> None:
        """Mark GPUs busy or free by the foreign processes on them (ours don't count)."""
        ours = {pid for r in self.runners.values() if isinstance(r.executor, TemplateExecutor)
                for pid in [r.executor.process.pid, *r.executor.pids()]}
        if self.resources.gpus.refresh(self.gpu_provider.usage(ours), ours):
            self._step_all({})

    def _status_line(self) -> str:
        running = sum(len(r.engine.live) for r in self.runners.values())
        return f"{len(self.runners)} experiment(s) active, {running} trial(s) running"

    def _submit_file(self, path) -> Later:
        """The spool's submit: ValueError (with the reason) rejects the file at once; an
        entry that fails to load rejects it later, through `Spool.settle`."""
        from tuned.experiment.files import load_spec_file

        later = Later()

        def finish(result: dict[str, Any] | OpError) -> None:
            self.spool.settle(later, result.message if isinstance(result, OpError) else None)

        try:
            self.submit(load_spec_file(path), finish)
        except OpError as exc:
            raise ValueError(exc.message) from None
        return later

    def trim_soon(self) -> None:
        """Hand memory back to the system a little after a large answer (`_release_memory`)."""
        self._trim_due = self.clock() + 2.0

    def request_stop(self) -> None:
        """Ask the loop to end (safe from a signal handler)."""
        self._stopping = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def _install_signals(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: self.request_stop())

    def _check_lock(self) -> None:
        """AlreadyServing if a daemon holds the state directory's lock; creates nothing."""
        try:
            fd = os.open(os.path.join(self.state_dir, "daemon.lock"),
                         os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise AlreadyServing(f"another tuned daemon (pid {holder}) serves "
                                 f"{self.state_dir}") from None
        finally:
            os.close(fd)

    def _lock(self) -> None:
        path = os.path.join(self.state_dir, "daemon.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise AlreadyServing(f"another tuned daemon (pid {holder}) serves "
                                 f"{self.state_dir}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _shutdown(self) -> None:
        """Leave the trials to the next daemon (or, with `stop_trials`, stop them: they run
        again on the next start) and close everything."""
        for loading in self.loading.values():
            loading.executor.close_template()
        self.loading.clear()
        for runner in self.runners.values():
            if self.stop_trials:
                runner.engine.abandon()
            else:
                runner.engine.detach()
            runner.executor.close()
        self.runners.clear()
        if self.listener is not None:
            self.listener.close()
        if self.cluster is not None:
            self.cluster.close()
        self.jobs.shutdown()
        self.gpu_provider.close()
        if self.spool is not None:
            self.spool.close()
        if self.server is not None:
            self.server.close()
        if self.store is not None:
            self.store.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
        log.info("stopped")

    # -- the loop ------------------------------------------------------------------------

    def _timeout(self) -> float:
        deadlines = [d for r in self.runners.values()
                     if (d := r.executor.next_deadline()) is not None]
        deadlines += [d for r in self.runners.values()
                      if (d := r.engine.timeout()) is not None]
        deadlines.append(max(0.0, self._next_chores - self.clock()))
        for exp_id, batch in self._held.items():
            if exp_id in self.runners:
                deadlines.append(self.runners[exp_id].engine.hold_for(batch) or 0.0)
        return min(deadlines)

    def tick(self, timeout: float | None) -> None:
        """Wait up to `timeout` for readiness, then let everyone handle what came."""
        events: dict[int, list[Message | Exited]] = {}
        for key, mask in self.selector.select(timeout):
            if key.data == "wake":
                self._drain_wake()
                continue
            if key.data == "spool":
                continue
            if isinstance(key.data, tuple) and key.data[0] == "loading":
                self._loaded(key.data[1])
                continue
            if self.server is not None and self.server.handle(key, mask):
                continue
            if self.listener is not None and self.listener.handle(key):
                continue
            for exp_id, runner in self.runners.items():
                if runner.executor.owns(key):
                    events.setdefault(exp_id, []).extend(runner.executor.handle(key))
                    break
        for exp_id, runner in self.runners.items():
            events.setdefault(exp_id, []).extend(runner.executor.reap_unwatched())
        for exp_id, adopted in self.adopted_events.items():
            events.setdefault(exp_id, []).extend(adopted)
        self.adopted_events = {}
        self._step_all(events)

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _step_all(self, events: dict[int, list[Message | Exited]]) -> None:
        for exp_id in [e for e in self._held if e not in self.runners]:
            del self._held[exp_id]
        for exp_id in list(self.runners):
            runner = self.runners[exp_id]
            fresh = events.get(exp_id, [])
            runner.engine.arrived(fresh)
            batch = self._held.pop(exp_id, []) + fresh
            if batch and runner.engine.hold_for(batch) is not None:
                self._held[exp_id] = batch  # group commit: more reports are due
                continue
            if batch or runner.engine.wants_launch:
                runner.engine.step(batch)
            if runner.executor.prepared < runner.executor.spares and \
                    runner.engine.may_launch_later:
                runner.executor.prepare()
            if runner.engine.finished:
                runner.engine.close()
                runner.executor.close()
                del self.runners[exp_id]
                log.info("experiment %s ended %s", runner.engine.experiment.name,
                         runner.engine.ended.value if runner.engine.ended else "?")
        self._serve_waiting()

    def _serve_waiting(self) -> None:
        """Let the experiment that has waited longest for resources launch as soon as they
        are free (resources freed in another experiment's step are held for it: see
        `tuned.engine.resources`); then the next, while each can be served."""
        served: set[Any] = set()
        while (head := self.resources.head()) is not None and head not in served:
            served.add(head)
            runner = self.runners.get(head)
            if runner is None or not runner.engine.wants_launch:
                self.resources.withdraw(head)
                continue
            spec = runner.engine.spec
            if not self.resources.can_take(spec.num_cpus, spec.num_gpus):
                return
            runner.engine.step([])

    # -- experiments ---------------------------------------------------------------------

    def _recover(self) -> None:
        """Go on with what the store holds: finish the deletes cut short, end the trials a
        finished experiment left unfinished (a daemon killed while a stop was under way),
        and start every RUNNING or PAUSED experiment (SCHEDULED ones wait for their jobs)."""
        assert self.store is not None
        self._empty_trash()
        for exp in self.store.experiments():
            if exp.state == "DELETING":
                self.delete(exp)
            elif exp.state in FINISHED_EXPERIMENT_STATES:
                why = STOPPED_BY_USER if exp.state == "STOPPED" else EXPERIMENT_FAILED
                self._end_unfinished(exp.id, why)
            elif exp.state != "SCHEDULED" and exp.spec.get("executor") == "dask" \
                    and self.cluster is None:
                # Not failed: a daemon started with --dask takes it up where it is.
                log.error("experiment %s waits: %s", exp.name, NO_CLUSTER)
            elif exp.state != "SCHEDULED":
                try:
                    self.start_runner(exp.id)
                except (SpecError, ValueError) as exc:
                    log.error("experiment %s cannot resume: %s", exp.name, exc)
                    reason = f"the experiment cannot resume: {exc}"
                    with self.store.transaction():
                        self._end_unfinished(exp.id, reason)
                        self.store.set_experiment_state(exp.id, "FAILED", reason)

    def _end_unfinished(self, experiment_id: int, reason: str) -> None:
        """End every unfinished trial of an experiment that will not run them: FAILED with
        `reason`, the processes of those left RUNNING killed (only the very processes that
        ran them: a pid reused since is left alone)."""
        from tuned.core.decisions import TrialState

        assert self.store is not None
        counts = self.store.count_trials(experiment_id)
        if not any(counts.get(s) for s in ("RUNNING", "PENDING", "PAUSED")):
            return
        with self.store.transaction():
            for trial in self.store.trials(experiment_id, ("RUNNING", "PENDING", "PAUSED")):
                proc = self.store.trial_process(trial.id)
                if proc.run is not None:
                    if self.cluster is not None:
                        self.cluster.terminate(proc.run)
                elif proc.pid and proc.start is not None:
                    terminate(RunRef(proc.pid, proc.start))
                self.store.finish_trial(trial.id, TrialState.FAILED, reason)

    def delete(self, exp: Any) -> None:
        """Delete a finished (or scheduled) experiment: marked DELETING first, so that a
        daemon killed half-way finishes the delete at its next start; its logs and
        checkpoints moved to ``trash/`` (one rename each), its rows removed in one
        transaction, then the trash emptied. Its name is free again."""
        assert self.store is not None
        self.store.set_experiment_state(exp.id, "DELETING")
        self.jobs.cancel(exp.id)
        trash = os.path.join(self.state_dir, "trash")
        os.makedirs(trash, mode=0o700, exist_ok=True)
        for part in ("logs", "checkpoints"):
            folder = os.path.join(self.state_dir, part, exp.name)
            if os.path.lexists(folder):
                os.rename(folder, os.path.join(trash, f"{part}-{os.urandom(8).hex()}"))
        self.store.delete_experiment(exp.id)
        self._empty_trash()
        log.info("experiment %s deleted", exp.name)

    def _empty_trash(self) -> None:
        """Remove ``trash/``: what a delete moved there (at its end), or what a delete cut
        short left there (at a start: its rows are gone, or its experiment is DELETING and
        is deleted next)."""
        import shutil

        shutil.rmtree(os.path.join(self.state_dir, "trash"), ignore_errors=True)

    def start_runner(self, experiment_id: int,
                      executor: TemplateExecutor | None = None) -> Runner:
        """Run a stored experiment: its template (unless given), its engine, recovered."""
        assert self.store is not None
        exp = self.store.experiment(experiment_id)
        spec = ExperimentSpec.from_dict(exp.spec)
        log_dir = os.path.join(self.state_dir, "logs", exp.name)
        remote = spec.executor == "dask"
        if remote and self.cluster is None:
            raise SpecError([NO_CLUSTER])
        if executor is None:
            executor = self.dask_executor(spec, exp.id) if remote else \
                self.template(spec, log_dir)
        slots = spec.max_concurrent or 1 << 30
        topic = f"exp/{exp.name}"
        adopt_wait = spec.report_timeout or DEFAULT_ADOPT_TIMEOUT
        shared = self.state_dir
        if remote and self.cluster_options is not None and self.cluster_options.shared_dir:
            shared = self.cluster_options.shared_dir
        engine = Engine(self.store, exp, spec, executor,
                        self.cluster.pool if remote else self.resources, log_dir, slots,
                        clock=self.clock,
                        on_event=lambda event: self._publish(topic, exp.name, event),
                        trial_env={ADOPT_SOCKET_ENV: self.socket_path,
                                   ADOPT_TIMEOUT_ENV: f"{adopt_wait:g}"},
                        adopt=True,
                        checkpoint_dir=os.path.join(shared, "checkpoints", exp.name))
        engine.paused = exp.state == "PAUSED"
        engine.start()
        runner = Runner(engine, executor)
        self.runners[exp.id] = runner
        return runner

    def dask_executor(self, spec: ExperimentSpec, experiment_id: int | None = None) -> Any:
        """A DaskExecutor for `spec` (its workers' templates load the entry)."""
        assert self.cluster is not None
        log_dir = os.path.join(self.state_dir, "logs", spec.name)
        os.makedirs(log_dir, exist_ok=True)
        store = self.store

        def log_path(trial_id: int) -> str:
            assert store is not None
            return os.path.join(log_dir, f"trial-{store.trial(trial_id).number}.log")

        experiment = {"entry": spec.entry, "command": spec.command, "workdir": spec.workdir,
                      "constants": json_safe(spec.constants), "start_method": spec.start_method,
                      "name": spec.name}
        return self.cluster.executor(experiment, spec.num_gpus, self.selector, log_path,
                                     clock=self.clock)

    def _serve_cluster(self) -> None:
        """Let the Dask experiments launch what the cluster's capacity (refreshed now and
        then) allows."""
        for runner in list(self.runners.values()):
            if runner.engine.resources is not self.resources and runner.engine.wants_launch:
                self._step_all({})
                return

    def template(self, spec: ExperimentSpec, log_dir: str,
                  wait: bool = True) -> TemplateExecutor:
        """Start the experiment's template process; SpecError when it cannot load the entry
        (with `wait`; without, see `TemplateExecutor.poll_ready`)."""
        os.makedirs(log_dir, exist_ok=True)
        try:
            return TemplateExecutor(spec.entry, spec.workdir, spec.constants,
                                    os.path.join(log_dir, "template.log"),
                                    start_method=spec.start_method, command=spec.command,
                                    clock=self.clock, selector=self.selector, wait=wait,
                                    spares=1, name=spec.name)
        except TemplateError as exc:
            raise _entry_error(exc) from None

    def submit(self, spec: ExperimentSpec,
               finish: Callable[[dict[str, Any] | OpError], None]) -> None:
        """Start a new experiment's template; once it has loaded the entry (the loop goes on
        meanwhile: the daemon never imports user code), store the experiment, start it, and
        call `finish` with the answer. OpError now if the name is taken; `finish` gets an
        OpError `invalid` if the spec is wrong or the entry cannot be loaded."""
        if spec.seed is None:
            # Chosen once and stored, so that a restart goes on with the same streams.
            spec.seed = int.from_bytes(os.urandom(4), "little")
        if self.store_has(spec.name) or spec.name in self.loading:
            raise OpError("conflict", f"an experiment named {spec.name!r} exists already")
        if spec.executor == "dask":
            if self.cluster is None:
                raise OpError("invalid", str(SpecError([NO_CLUSTER])))
            too_large = self.cluster.pool.fits_ever(spec.num_cpus, spec.num_gpus) \
                if self.cluster.reachable else None
            if too_large is not None:
                raise OpError("invalid", str(SpecError([too_large])))
            executor = self.dask_executor(spec)
            executor.check_entry()
            self.load(spec, executor, finish, lambda ex: self._store_submitted(spec, ex))
            return
        too_large = self.resources.fits_ever(spec.num_cpus, spec.num_gpus)
        if too_large is not None:
            raise OpError("invalid", str(SpecError([too_large])))
        try:
            executor = self.template(spec, os.path.join(self.state_dir, "logs", spec.name),
                                      wait=False)
        except SpecError as exc:
            raise OpError("invalid", str(exc)) from None
        self.load(spec, executor, finish, lambda ex: self._store_submitted(spec, ex))

    def load(self, spec: ExperimentSpec, executor: TemplateExecutor,
              finish: Callable[[dict[str, Any] | OpError], None],
              complete: Callable[[TemplateExecutor], dict[str, Any]]) -> None:
        """Wait (in the loop) for `executor`'s template to load `spec`'s entry, then
        `complete` and `finish` (see `_Loading`)."""
        self.loading[spec.name] = _Loading(spec, executor, finish,
                                            self.clock() + READY_TIMEOUT, complete)
        self.selector.register(executor.ctl, selectors.EVENT_READ, ("loading", spec.name))

    def _loaded(self, name: str, timed_out: bool = False) -> None:
        """The template of a submitted experiment spoke (or timed out): finish the submit."""
        loading = self.loading[name]
        executor = loading.executor
        self.selector.unregister(executor.ctl)
        try:
            if timed_out:
                executor.close_template()
                raise TemplateError(f"the template did not load the entry within "
                                    f"{READY_TIMEOUT:g} s")
            if not executor.poll_ready():
                self.selector.register(executor.ctl, selectors.EVENT_READ, ("loading", name))
                return
        except TemplateError as exc:
            del self.loading[name]
            loading.finish(OpError("invalid", str(_entry_error(exc))))
            return
        del self.loading[name]
        try:
            result = loading.complete(executor)
        except OpError as exc:
            loading.finish(exc)
            return
        loading.finish(result)

    def _store_submitted(self, spec: ExperimentSpec,
                         executor: TemplateExecutor) -> dict[str, Any]:
        """Complete a spec with its loaded entry, store it and start it (or schedule it);
        OpError `invalid` or `conflict` (the template closed then)."""
        from tuned.experiment.files import complete_spec

        assert self.store is not None
        try:
            spec, _ = complete_spec(spec, resolve=_described_by(executor))
            record = spec.to_dict()
            record["constants"] = json_safe(record["constants"])
            state = "SCHEDULED" if spec.schedule else "RUNNING"
            exp = self.store.create_experiment(spec.name, record, state=state)
        except (SpecError, NameTaken) as exc:
            executor.close_template()
            code = "conflict" if isinstance(exc, NameTaken) else "invalid"
            raise OpError(code, str(exc)) from None
        if spec.schedule:
            executor.close_template()
            self.jobs.schedule(exp.id, spec.schedule)
            log.info("experiment %s submitted; starts on %r (UTC)", spec.name, spec.schedule)
        else:
            self.start_runner(exp.id, executor)
            log.info("experiment %s submitted", spec.name)
        return {"experiment": spec.name, "id": exp.id, "state": state}

    def store_has(self, name: str) -> bool:
        assert self.store is not None
        try:
            self.store.experiment(name)
        except NotFound:
            return False
        return True

    def _publish(self, topic: str, experiment: str, event: dict[str, Any]) -> None:
        if self.server is not None:
            self.server.broadcast({"experiment": experiment, **event}, topic)


NO_CLUSTER = ("executor: 'dask' needs a daemon connected to a Dask cluster "
              "(tuned serve --dask ADDRESS or --dask-scheduler-file FILE)")


def _read_port(path: str) -> int:
    """The listener port kept in `path` by an earlier start, or 0."""
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 0


def _release_memory() -> None:
    """Collect garbage and hand the freed heap back to the system (glibc's malloc_trim):
    a large answer would otherwise leave the daemon's RSS high for good."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _entry_error(exc: TemplateError) -> SpecError:
    message = str(exc)
    return SpecError([message if message.startswith("entry") else f"entry: {message}"])


def _described_by(executor: TemplateExecutor | None):
    """A resolver for complete_spec that reads the entry's description off its template."""

    def resolve(entry: str, workdir: str | None):
        from tuned.core.space import Space

        assert executor is not None
        space = executor.entry_space
        return None, (Space.from_json(space) if space is not None else None), \
            dict(executor.entry_constants)

    return resolve
