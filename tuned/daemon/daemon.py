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
trial whose process is gone runs again, its attempt counted (DESIGN.md, invariant 3).

On SIGTERM or SIGINT the daemon leaves its trials running (they wait for the next daemon to
adopt them, see `tuned.trial.reporter.Reconnect`), unless it was told `stop_trials`: then they are
stopped and run again on the next start.
"""

from __future__ import annotations

import fcntl
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

from tuned._version import __version__
from tuned.core.lifecycle import (
    EXPERIMENT_FAILED,
    FINISHED_EXPERIMENT_STATES,
    STOPPED_BY_USER,
    BadTransition,
)
from tuned.daemon.control import ControlServer, Deferred, Handoff, Subscribe, check_socket_path
from tuned.daemon.notify import Notifier
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
from tuned.protocol.control import is_text
from tuned.store import views
from tuned.store.database import NameTaken, NotFound, Store

log = logging.getLogger("tuned.daemon")

# Seconds between the loop's chores: watchdog ping, idle-client sweep, status line.
CHORE_INTERVAL = 1.0
STALE_SWEEP_SECONDS = 1.0
WAL_CHECKPOINT_SECONDS = 60.0
GPU_POLL_SECONDS = 5.0
# A cron start may happen this late (seconds), e.g. after the daemon was down at the time.
START_MISFIRE_GRACE = 3600


class AlreadyServing(RuntimeError):
    """Another daemon holds this state directory."""


class OpError(Exception):
    """An op that cannot be done: `code` from the protocol's error table."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Runner:
    """One experiment running in the daemon."""

    engine: Engine
    executor: TemplateExecutor


@dataclass
class _Loading:
    """An experiment whose template is loading its entry (a submit, or a resume of a
    finished experiment): once loaded, `complete(executor)` stores and starts it and gives
    the answer (or raises OpError); `finish` hears that answer (or the OpError)."""

    spec: ExperimentSpec
    executor: TemplateExecutor
    finish: Callable[[dict[str, Any] | OpError], None]
    deadline: float
    complete: Callable[[TemplateExecutor], dict[str, Any]]


class Daemon:
    """The daemon; `serve()` runs it until SIGTERM or SIGINT (or `request_stop()`).
    `stop_trials`: stop the running trials when it leaves, rather than leave them to the
    next daemon."""

    def __init__(self, state_dir: str, socket_path: str,
                 clock: Callable[[], float] = time.monotonic, stop_trials: bool = False):
        self.state_dir = os.path.abspath(state_dir)
        self.socket_path = os.path.abspath(socket_path)
        self.stop_trials = stop_trials
        self.clock = clock
        # Reports that reconnecting trials sent with their adopt request, for the next step.
        self._adopted_events: dict[int, list[Message | Exited]] = {}
        # Group commit: batches an engine holds back for a moment (`Engine.hold_for`).
        self._held: dict[int, list[Message | Exited]] = {}
        # Submits waiting for their template, by experiment name.
        self._loading: dict[str, _Loading] = {}
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
        self.jobs: Any = None
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
        self._recover()
        self.server = ControlServer(self.socket_path, self.dispatch, ops=OPS)
        self.server.open()
        self.server.register(self.selector)
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

    # -- jobs (APScheduler) ---------------------------------------------------------------

    def _start_jobs(self) -> None:
        """Periodic and cron jobs. APScheduler runs them in its own thread, so each job only
        posts a task to the loop (`_post`); the loop does the work.

        coalesce: a job that missed several runs (the machine slept, the loop was busy) runs
        once, not once per miss. misfire_grace_time: periodic chores may run late by up to
        their period; a cron start may run up to an hour late (a daemon restarted at 03:20
        still starts the 03:00 experiment), not later.
        """
        from apscheduler.schedulers.background import BackgroundScheduler

        # Its INFO lines (one per job run) would drown the daemon's own.
        logging.getLogger("apscheduler").setLevel(logging.WARNING)

        self.jobs = BackgroundScheduler(timezone="UTC", daemon=True, job_defaults={
            "coalesce": True, "max_instances": 1, "misfire_grace_time": 30})
        self.jobs.add_job(self._post, "interval", seconds=STALE_SWEEP_SECONDS,
                          args=["sweep"], id="stale-trial-sweep")
        self.jobs.add_job(self._post, "interval", seconds=WAL_CHECKPOINT_SECONDS,
                          args=["wal_checkpoint"], id="wal-checkpoint")
        self.jobs.start()
        assert self.store is not None
        for exp in self.store.experiments():
            if exp.state == "SCHEDULED":
                if self._missed_start(exp.spec["schedule"], exp.created):
                    log.info("experiment %s missed its start while no daemon ran; starting",
                             exp.name)
                    self._post(("start", exp.id))
                self._schedule(exp.id, exp.spec["schedule"])

    @staticmethod
    def _missed_start(cron: str, created: float) -> bool:
        """Whether the cron fired between the experiment's submission and now, at most
        START_MISFIRE_GRACE seconds ago (the daemon was down then)."""
        from datetime import datetime, timezone

        from apscheduler.triggers.cron import CronTrigger

        trigger = CronTrigger.from_crontab(cron, timezone="UTC")
        fire = trigger.get_next_fire_time(None, datetime.fromtimestamp(created, timezone.utc))
        now = datetime.now(timezone.utc)
        return fire is not None and fire <= now and \
            (now - fire).total_seconds() <= START_MISFIRE_GRACE

    def _schedule(self, experiment_id: int, cron: str) -> None:
        from apscheduler.triggers.cron import CronTrigger

        self.jobs.add_job(self._post, CronTrigger.from_crontab(cron, timezone="UTC"),
                          args=[("start", experiment_id)], id=f"start-{experiment_id}",
                          misfire_grace_time=START_MISFIRE_GRACE, replace_existing=True)

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
        self._start_runner(experiment_id)
        self.jobs.remove_job(f"start-{experiment_id}")
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
            for name in [n for n, lo in self._loading.items() if now >= lo.deadline]:
                self._loaded(name, timed_out=True)
            self.server.sweep()
            self.notifier.watchdog()
            self.notifier.status(self._status_line())

    def _poll_gpus(self) -> None:
        """Mark GPUs busy or free by the foreign processes on them (ours don't count)."""
        ours = {pid for r in self.runners.values()
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
        for loading in self._loading.values():
            loading.executor.close_template()
        self._loading.clear()
        for runner in self.runners.values():
            if self.stop_trials:
                runner.engine.abandon()
            else:
                runner.engine.detach()
            runner.executor.close()
        self.runners.clear()
        if self.jobs is not None:
            self.jobs.shutdown(wait=False)
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
            for exp_id, runner in self.runners.items():
                if runner.executor.owns(key):
                    events.setdefault(exp_id, []).extend(runner.executor.handle(key))
                    break
        for exp_id, runner in self.runners.items():
            events.setdefault(exp_id, []).extend(runner.executor.reap_unwatched())
        for exp_id, adopted in self._adopted_events.items():
            events.setdefault(exp_id, []).extend(adopted)
        self._adopted_events = {}
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
            if not runner.engine.wants_launch:
                self.resources.withdraw(exp_id)
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
                self._delete(exp)
            elif exp.state in FINISHED_EXPERIMENT_STATES:
                why = STOPPED_BY_USER if exp.state == "STOPPED" else EXPERIMENT_FAILED
                self._end_unfinished(exp.id, why)
            elif exp.state != "SCHEDULED":
                try:
                    self._start_runner(exp.id)
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
                if proc.pid and proc.start is not None:
                    terminate(RunRef(proc.pid, proc.start))
                self.store.finish_trial(trial.id, TrialState.FAILED, reason)

    def _delete(self, exp: Any) -> None:
        """Delete a finished (or scheduled) experiment: marked DELETING first, so that a
        daemon killed half-way finishes the delete at its next start; its logs and
        checkpoints moved to ``trash/`` (one rename each), its rows removed in one
        transaction, then the trash emptied. Its name is free again."""
        import shutil

        assert self.store is not None
        self.store.set_experiment_state(exp.id, "DELETING")
        if self.jobs is not None and self.jobs.get_job(f"start-{exp.id}") is not None:
            self.jobs.remove_job(f"start-{exp.id}")
        trash = os.path.join(self.state_dir, "trash")
        os.makedirs(trash, mode=0o700, exist_ok=True)
        for part in ("logs", "checkpoints"):
            folder = os.path.join(self.state_dir, part, exp.name)
            if os.path.lexists(folder):
                os.rename(folder, os.path.join(trash, f"{part}-{os.urandom(8).hex()}"))
        self.store.delete_experiment(exp.id)
        shutil.rmtree(trash, ignore_errors=True)
        log.info("experiment %s deleted", exp.name)

    def _empty_trash(self) -> None:
        """Remove what a delete cut short left in ``trash/`` (its rows are gone, or its
        experiment is DELETING and is deleted next)."""
        import shutil

        shutil.rmtree(os.path.join(self.state_dir, "trash"), ignore_errors=True)

    def _start_runner(self, experiment_id: int,
                      executor: TemplateExecutor | None = None) -> Runner:
        """Run a stored experiment: its template (unless given), its engine, recovered."""
        assert self.store is not None
        exp = self.store.experiment(experiment_id)
        spec = ExperimentSpec.from_dict(exp.spec)
        log_dir = os.path.join(self.state_dir, "logs", exp.name)
        if executor is None:
            executor = self._template(spec, log_dir)
        slots = spec.max_concurrent or 1 << 30
        topic = f"exp/{exp.name}"
        adopt_wait = spec.report_timeout or DEFAULT_ADOPT_TIMEOUT
        engine = Engine(self.store, exp, spec, executor, self.resources, log_dir, slots,
                        clock=self.clock,
                        on_event=lambda event: self._publish(topic, exp.name, event),
                        trial_env={ADOPT_SOCKET_ENV: self.socket_path,
                                   ADOPT_TIMEOUT_ENV: f"{adopt_wait:g}"},
                        adopt=True,
                        checkpoint_dir=os.path.join(self.state_dir, "checkpoints", exp.name))
        engine.paused = exp.state == "PAUSED"
        engine.start()
        runner = Runner(engine, executor)
        self.runners[exp.id] = runner
        return runner

    def _template(self, spec: ExperimentSpec, log_dir: str,
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
        if self.store_has(spec.name) or spec.name in self._loading:
            raise OpError("conflict", f"an experiment named {spec.name!r} exists already")
        too_large = self.resources.fits_ever(spec.num_cpus, spec.num_gpus)
        if too_large is not None:
            raise OpError("invalid", str(SpecError([too_large])))
        try:
            executor = self._template(spec, os.path.join(self.state_dir, "logs", spec.name),
                                      wait=False)
        except SpecError as exc:
            raise OpError("invalid", str(exc)) from None
        self._load(spec, executor, finish, lambda ex: self._store_submitted(spec, ex))

    def _load(self, spec: ExperimentSpec, executor: TemplateExecutor,
              finish: Callable[[dict[str, Any] | OpError], None],
              complete: Callable[[TemplateExecutor], dict[str, Any]]) -> None:
        """Wait (in the loop) for `executor`'s template to load `spec`'s entry, then
        `complete` and `finish` (see `_Loading`)."""
        self._loading[spec.name] = _Loading(spec, executor, finish,
                                            self.clock() + READY_TIMEOUT, complete)
        self.selector.register(executor.ctl, selectors.EVENT_READ, ("loading", spec.name))

    def _loaded(self, name: str, timed_out: bool = False) -> None:
        """The template of a submitted experiment spoke (or timed out): finish the submit."""
        loading = self._loading[name]
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
            del self._loading[name]
            loading.finish(OpError("invalid", str(_entry_error(exc))))
            return
        del self._loading[name]
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
            self._schedule(exp.id, spec.schedule)
            log.info("experiment %s submitted; starts on %r (UTC)", spec.name, spec.schedule)
        else:
            self._start_runner(exp.id, executor)
            log.info("experiment %s submitted", spec.name)
        return {"experiment": spec.name, "id": exp.id, "state": state}

    def store_has(self, name: str) -> bool:
        assert self.store is not None
        try:
            self.store.experiment(name)
        except NotFound:
            return False
        return True

    # -- ops -----------------------------------------------------------------------------

    def dispatch(self, op: str, args: dict[str, Any], conn: Any = None) -> dict[str, Any]:
        """Answer one control request: a dict of fields (the server adds "v" and "ok"), or
        OpError."""
        if op == "adopt":
            return self.op_adopt(conn)
        handler = getattr(self, f"op_{op}", None)
        if handler is None:
            raise OpError("unknown_op", f"unknown op {op!r}; ops: {', '.join(OPS)}")
        return handler(args)

    def op_adopt(self, conn: Any) -> Handoff:
        """A trial of a dead daemon reconnects: the connection becomes its report channel.
        The trial is the one whose process is the peer (pid from SO_PEERCRED; the pid and
        start time were checked when it was adopted)."""
        for exp_id, runner in self.runners.items():
            trial_id = runner.engine.awaiting(conn.pid)
            if trial_id is not None:
                number = runner.engine.live[trial_id].trial.number

                def take(sock: socket.socket, rest: bytes, exp_id: int = exp_id,
                         engine: Engine = runner.engine, trial_id: int = trial_id) -> None:
                    events = engine.reconnected(trial_id, sock, rest)
                    self._adopted_events.setdefault(exp_id, []).extend(events)

                return Handoff({"experiment": runner.engine.experiment.name,
                                "trial": number}, take)
        raise OpError("not_found", f"no trial of process {conn.pid} waits to be adopted")

    def _experiment(self, args: dict[str, Any]):
        assert self.store is not None
        return views.experiment(self.store, args.get("experiment"))

    def _runner(self, args: dict[str, Any]) -> Runner:
        exp = self._experiment(args)
        runner = self.runners.get(exp.id)
        if runner is None or runner.engine.ended is not None:
            ending = "" if runner is None else " (its last trials are ending)"
            raise OpError("conflict", f"experiment {exp.name!r} is {exp.state}, not "
                                      f"running{ending}")
        return runner

    def op_hello(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"server": "tuned", "version": __version__, "pid": os.getpid(),
                "state_dir": self.state_dir, "ops": list(OPS)}

    def op_status(self, args: dict[str, Any]) -> dict[str, Any]:
        assert self.store is not None
        exps = [self._experiment(args)] if args.get("experiment") else self.store.experiments()
        return {"experiments": [self._summary(e) for e in exps],
                "gpus_in_use": self.resources.gpus_in_use,
                "gpus_busy_foreign": self.resources.gpus.busy_foreign(),
                "cpus_free": self.resources.cpus_free, "cpus": self.resources.cpus_total}

    op_experiments = op_status

    def _summary(self, exp) -> dict[str, Any]:
        """One experiment in `status` (`views.summary`), with why it waits, if it does."""
        assert self.store is not None
        waiting = self.resources.wait_reason(exp.id, self._name_of) \
            if exp.id in self.runners else None
        return views.summary(self.store, exp, waiting)

    def _name_of(self, experiment_id: Any) -> str:
        runner = self.runners.get(experiment_id)
        return repr(runner.engine.experiment.name) if runner else f"experiment {experiment_id}"

    def op_best(self, args: dict[str, Any]) -> dict[str, Any]:
        assert self.store is not None
        return views.best(self.store, self._experiment(args))

    def op_trials(self, args: dict[str, Any]) -> dict[str, Any]:
        """A page of the experiment's trials (`views.trials_page`): `limit` (default all)
        from `offset` (default 0; negative: counted from the end)."""
        assert self.store is not None
        exp = self._experiment(args)
        limit, offset = _count(args, "limit"), _integer(args, "offset") or 0
        self._trim_due = self.clock() + 2.0
        return views.trials_page(self.store, exp, limit, offset)

    def op_curves(self, args: dict[str, Any]) -> dict[str, Any]:
        """Learning curves of `metric` (`views.curves`), of every trial or the `top`."""
        assert self.store is not None
        exp = self._experiment(args)
        top = _count(args, "top")
        self._trim_due = self.clock() + 2.0
        return views.curves(self.store, exp, args.get("metric"), top)

    def op_progress(self, args: dict[str, Any]) -> dict[str, Any]:
        """The best reward so far against trials and against time (`views.progress`)."""
        assert self.store is not None
        return views.progress(self.store, self._experiment(args))

    def op_export(self, args: dict[str, Any]) -> dict[str, Any]:
        """A page of the export (`views.export_page`): trials, or with `reports` reports."""
        assert self.store is not None
        exp = self._experiment(args)
        self._trim_due = self.clock() + 2.0
        return views.export_page(self.store, exp, bool(args.get("reports")),
                                 _count(args, "limit"), _count(args, "offset"),
                                 args.get("after"), args.get("columns"))

    def op_submit(self, args: dict[str, Any]) -> Deferred:
        """Answered once the experiment's template has loaded its entry."""
        from tuned.experiment.files import parse_spec_text

        text, filename = args.get("text"), args.get("filename", "spec.toml")
        workdir = args.get("workdir")
        if not isinstance(text, str) or not is_text(text):
            raise OpError("bad_request", "submit needs the spec's 'text'")
        if not isinstance(filename, str) or not is_text(filename) or \
                (workdir is not None and (not isinstance(workdir, str) or not is_text(workdir))):
            raise OpError("bad_request", "submit: 'filename' and 'workdir' must be strings")
        try:
            spec = parse_spec_text(text, filename, workdir)
        except SpecError as exc:
            raise OpError("invalid", str(exc)) from None
        deferred = Deferred()
        self.submit(spec, lambda result: self.server.resolve(deferred, result))
        return deferred

    def op_stop(self, args: dict[str, Any]) -> dict[str, Any]:
        """Stop a running experiment, or cancel a scheduled one."""
        exp = self._experiment(args)
        if exp.state == "SCHEDULED" and exp.id not in self.runners:
            assert self.store is not None
            self.store.set_experiment_state(exp.id, "STOPPED",
                                            "cancelled by the user before it started")
            if self.jobs is not None and self.jobs.get_job(f"start-{exp.id}") is not None:
                self.jobs.remove_job(f"start-{exp.id}")
            log.info("scheduled experiment %s cancelled", exp.name)
            return {"experiment": exp.name, "state": "STOPPED"}
        runner = self._runner(args)
        runner.engine.stop()
        return {"experiment": runner.engine.experiment.name, "state": "STOPPED"}

    def op_pause(self, args: dict[str, Any]) -> dict[str, Any]:
        runner = self._runner(args)
        runner.engine.pause()
        return {"experiment": runner.engine.experiment.name, "state": "PAUSED"}

    def op_resume(self, args: dict[str, Any]) -> dict[str, Any] | Deferred:
        """Resume a paused experiment, or run a STOPPED or COMPLETED one again with its
        remaining or a larger budget: `num_trials` (the new total), `time_out` (seconds
        from now). Its searcher and scheduler go on from their stored state; no finished
        trial runs again. Also extends a running experiment's budget."""
        exp = self._experiment(args)
        num_trials = _count(args, "num_trials")
        time_out = _seconds(args, "time_out")
        runner = self.runners.get(exp.id)
        if runner is not None and runner.engine.ended is not None:
            raise OpError("conflict", f"experiment {exp.name!r} is {exp.state} and its last "
                                      "trials are ending; resume it once they have")
        if exp.name in self._loading:
            raise OpError("conflict", f"experiment {exp.name!r} is loading its entry already")
        if runner is None and exp.state not in ("STOPPED", "COMPLETED"):
            hint = {"FAILED": "; fix the cause, then delete it and submit it again",
                    "SCHEDULED": "; it starts at its scheduled time"}.get(exp.state, "")
            raise OpError("conflict", f"experiment {exp.name!r} is {exp.state}: it cannot "
                                      f"be resumed{hint}")
        spec = self._extended(exp, num_trials, time_out, running=runner is not None)
        if runner is not None:
            runner.engine.extend(spec.get("num_trials"), spec.get("time_out"))
            if runner.engine.paused:
                runner.engine.resume()
            return self._resumed(exp.name, spec)
        executor = self._template(ExperimentSpec.from_dict(spec),
                                  os.path.join(self.state_dir, "logs", exp.name), wait=False)
        deferred = Deferred()
        self._load(ExperimentSpec.from_dict(spec), executor,
                   lambda result: self.server.resolve(deferred, result),
                   lambda ex: self._restart(exp.id, spec, ex))
        return deferred

    def _extended(self, exp: Any, num_trials: int | None, time_out: float | None,
                  running: bool) -> dict[str, Any]:
        """The experiment's spec with its new budget, stored; OpError `invalid` for a total
        below the trials made, `conflict` when a finished experiment would have nothing
        left to run."""
        assert self.store is not None
        spec = dict(exp.spec)
        made = sum(self.store.count_trials(exp.id).values())
        first = self.store.first_trial_created(exp.id)
        elapsed = 0.0 if first is None else max(0.0, self.store.clock() - first)
        if num_trials is not None:
            if num_trials < made or num_trials == 0:
                raise OpError("invalid", f"num_trials: {num_trials} is below the {made} "
                                         f"trial(s) {exp.name!r} has made (it is the new total)")
            spec["num_trials"] = num_trials
        if time_out is not None:
            spec["time_out"] = elapsed + time_out  # counted from the first trial, as stored
        left_trials = spec.get("num_trials") is None or made < spec["num_trials"]
        left_time = spec.get("time_out") is None or elapsed < spec["time_out"]
        if not running and not (left_trials and left_time):
            raise OpError("conflict", f"experiment {exp.name!r} is {exp.state} and its budget "
                                      f"is spent ({made} trial(s) made): give a larger "
                                      "num_trials (--num-trials N, the new total) or a "
                                      "time_out (--time-out S, seconds from now)")
        if spec != exp.spec:
            self.store.update_spec(exp.id, spec)
        return spec

    def _restart(self, experiment_id: int, spec: dict[str, Any],
                 executor: TemplateExecutor) -> dict[str, Any]:
        """Run a STOPPED or COMPLETED experiment again, its template loaded."""
        assert self.store is not None
        exp = self.store.experiment(experiment_id)
        try:
            self.store.set_experiment_state(experiment_id, "RUNNING")
        except BadTransition as exc:  # it changed while the template loaded
            executor.close_template()
            raise OpError("conflict", str(exc)) from None
        self._start_runner(experiment_id, executor)
        log.info("experiment %s resumed (num_trials %s, time_out %s)", exp.name,
                 spec.get("num_trials"), spec.get("time_out"))
        return self._resumed(exp.name, spec)

    @staticmethod
    def _resumed(name: str, spec: dict[str, Any]) -> dict[str, Any]:
        return {"experiment": name, "state": "RUNNING", "num_trials": spec.get("num_trials"),
                "time_out": spec.get("time_out")}

    def op_delete(self, args: dict[str, Any]) -> dict[str, Any]:
        """Delete a finished or scheduled experiment: its rows, logs and checkpoints; the
        name is free again. `conflict` while it runs (or is paused, or loading)."""
        exp = self._experiment(args)
        if exp.id in self.runners or exp.name in self._loading or \
                exp.state in ("RUNNING", "PAUSED"):
            raise OpError("conflict", f"experiment {exp.name!r} is {exp.state}: stop it "
                                      f"first (tunectl stop {exp.name})")
        self._delete(exp)
        return {"experiment": exp.name, "deleted": True}

    def op_kill(self, args: dict[str, Any]) -> dict[str, Any]:
        runner = self._runner(args)
        number = args.get("trial")
        if not isinstance(number, int) or not runner.engine.kill_trial(number):
            raise OpError("not_found", f"no running trial {number!r} in "
                                       f"{runner.engine.experiment.name!r}")
        return {"experiment": runner.engine.experiment.name, "trial": number, "killed": True}

    def _publish(self, topic: str, experiment: str, event: dict[str, Any]) -> None:
        if self.server is not None:
            self.server.broadcast({"experiment": experiment, **event}, topic)

    def op_watch(self, args: dict[str, Any]) -> Subscribe:
        """Stream events: trial starts, reports and ends (of EXPERIMENT, or of all)."""
        if args.get("experiment"):
            exp = self._experiment(args)
            return Subscribe(f"exp/{exp.name}", first={"ok": True, **self.op_status(args)})
        return Subscribe(None, first={"ok": True, **self.op_status({})})

    def op_logs(self, args: dict[str, Any]) -> dict[str, Any]:
        exp = self._experiment(args)
        number = args.get("trial")
        if not isinstance(number, int):
            raise OpError("bad_request", "logs needs a trial number")
        path = os.path.join(self.state_dir, "logs", exp.name, f"trial-{number}.log")
        offset = _integer(args, "offset") or 0
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if offset < 0:
                    offset = max(0, size + offset)
                f.seek(offset)
                data = f.read(256 * 1024)
        except FileNotFoundError:
            raise OpError("not_found", f"no log for trial {number} of {exp.name!r}") from None
        return {"experiment": exp.name, "trial": number, "offset": offset + len(data),
                "text": data.decode(errors="replace")}


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


_INT_MAX = (1 << 63) - 1  # SQLite's integers are 64-bit


def _count(args: dict[str, Any], key: str) -> int | None:
    """An optional non-negative integer argument; OpError `bad_request` if it is not one."""
    value = args.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _INT_MAX:
        raise OpError("bad_request", f"{key} must be an integer >= 0, got {value!r}")
    return value


def _integer(args: dict[str, Any], key: str) -> int | None:
    """An optional integer argument (negative allowed); OpError `bad_request` otherwise."""
    value = args.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or abs(value) > _INT_MAX:
        raise OpError("bad_request", f"{key} must be an integer, got {value!r}")
    return value


def _seconds(args: dict[str, Any], key: str) -> float | None:
    """An optional number of seconds > 0; OpError `bad_request` otherwise."""
    value = args.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not 0 < value < 1e12:
        raise OpError("bad_request", f"{key} must be a number of seconds > 0, got {value!r}")
    return float(value)


def _described_by(executor: TemplateExecutor | None):
    """A resolver for complete_spec that reads the entry's description off its template."""

    def resolve(entry: str, workdir: str | None):
        from tuned.core.space import Space

        assert executor is not None
        space = executor.entry_space
        return None, (Space.from_json(space) if space is not None else None), \
            dict(executor.entry_constants)

    return resolve


OPS = ("hello", "status", "experiments", "trials", "best", "curves", "submit", "stop", "pause",
       "resume", "kill", "logs", "watch", "delete", "progress", "export", "adopt")
