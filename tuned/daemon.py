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
adopt them, see `tuned.reporter.Reconnect`), unless it was told `stop_trials`: then they are
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

from tuned import __version__
from tuned.control import ControlServer, Deferred, Handoff, Subscribe
from tuned.curves import curve_points
from tuned.engine import Engine
from tuned.executors.local import Exited, Message, process_start_time
from tuned.executors.template import READY_TIMEOUT, TemplateError, TemplateExecutor
from tuned.gpus import make_provider
from tuned.notify import Notifier
from tuned.reporter import ADOPT_SOCKET_ENV, ADOPT_TIMEOUT_ENV, DEFAULT_ADOPT_TIMEOUT
from tuned.resources import ResourcePool
from tuned.scheduler import available_cpus
from tuned.spec import ExperimentSpec, SpecError, json_safe
from tuned.spool import Later, Spool
from tuned.store import NameTaken, NotFound, Store

log = logging.getLogger("tuned.daemon")

FINISHED_EXPERIMENT_STATES = ("COMPLETED", "STOPPED", "FAILED")
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
    """A submitted experiment whose template is loading its entry; `finish` hears the
    submit's answer (or its OpError) once it is known."""

    spec: ExperimentSpec
    executor: TemplateExecutor
    finish: Callable[[dict[str, Any] | OpError], None]
    deadline: float


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

        Raises AlreadyServing when another daemon holds the state directory (the store is
        not touched then).
        """
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
        from tuned.specfile import load_spec_file

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
            runner.executor.close_spares()
            runner.executor.close_template()
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
            fresh = events.get(exp_id, [])
            runner.engine.arrived(fresh)
            batch = self._held.pop(exp_id, []) + fresh
            if batch and runner.engine.hold_for(batch) is not None:
                self._held[exp_id] = batch  # group commit: more reports are due
                continue
            if batch or runner.engine.wants_launch:
                runner.engine.step(batch)
            if runner.executor.spare_count < runner.executor.spares and \
                    runner.engine.may_launch_later:
                runner.executor.prefork()
            if runner.engine.finished:
                runner.engine.close()
                runner.executor.close_template()
                del self.runners[exp_id]
                log.info("experiment %s finished", runner.engine.experiment.name)

    # -- experiments ---------------------------------------------------------------------

    def _recover(self) -> None:
        assert self.store is not None
        for exp in self.store.experiments():
            if exp.state in FINISHED_EXPERIMENT_STATES or exp.state == "SCHEDULED":
                continue
            try:
                self._start_runner(exp.id)
            except (SpecError, ValueError) as exc:
                log.error("experiment %s cannot resume: %s", exp.name, exc)
                self._fail_experiment(exp.id, f"the experiment cannot resume: {exc}")

    def _fail_experiment(self, experiment_id: int, reason: str) -> None:
        """End an experiment that cannot run: its unfinished trials FAILED with `reason`,
        the processes of those left RUNNING killed (only the very processes that ran them: a
        pid reused since is left alone)."""
        from tuned.decisions import TrialState

        assert self.store is not None
        with self.store.transaction():
            for trial in self.store.trials(experiment_id, ("RUNNING", "PENDING", "PAUSED")):
                proc = self.store.trial_process(trial.id)
                if proc.pid and proc.start is not None and \
                        process_start_time(proc.pid) == proc.start:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
                self.store.finish_trial(trial.id, TrialState.FAILED, reason)
            self.store.set_experiment_state(experiment_id, "FAILED")

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
        engine = Engine(self.store, exp, spec, _never_called, log_dir, slots,
                        executor=executor, resources=self.resources, clock=self.clock,
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
                                    spares=1)
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
        try:
            executor = self._template(spec, os.path.join(self.state_dir, "logs", spec.name),
                                      wait=False)
        except SpecError as exc:
            raise OpError("invalid", str(exc)) from None
        self._loading[spec.name] = _Loading(spec, executor, finish,
                                            self.clock() + READY_TIMEOUT)
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
            result = self._store_submitted(loading.spec, executor)
        except OpError as exc:
            loading.finish(exc)
            return
        loading.finish(result)

    def _store_submitted(self, spec: ExperimentSpec,
                         executor: TemplateExecutor) -> dict[str, Any]:
        """Complete a spec with its loaded entry, store it and start it (or schedule it);
        OpError `invalid` or `conflict` (the template closed then)."""
        from tuned.specfile import complete_spec

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
        name = args.get("experiment")
        if not isinstance(name, str) or not _is_text(name):
            raise OpError("bad_request", "this op needs an 'experiment' name (valid Unicode)")
        try:
            return self.store.experiment(name)
        except NotFound:
            raise OpError("not_found", f"no experiment {name!r}") from None

    def _runner(self, args: dict[str, Any]) -> Runner:
        exp = self._experiment(args)
        runner = self.runners.get(exp.id)
        if runner is None:
            raise OpError("conflict", f"experiment {exp.name!r} is {exp.state}, not running")
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
        assert self.store is not None
        best = self.store.best_trial(exp.id)
        return {"experiment": exp.name, "state": exp.state,
                "trials": self.store.count_trials(exp.id),
                "best": None if best is None else {"trial": best.number,
                                                   "reward": best.last_reward,
                                                   "config": best.config}}

    def op_best(self, args: dict[str, Any]) -> dict[str, Any]:
        assert self.store is not None
        exp = self._experiment(args)
        best = self.store.best_trial(exp.id)
        if best is None:
            raise OpError("not_found", f"experiment {exp.name!r} has no reported trial yet")
        return {"experiment": exp.name, "trial": best.number, "config": best.config,
                "reward": best.last_reward}

    def op_trials(self, args: dict[str, Any]) -> dict[str, Any]:
        """A page of the experiment's trials by number: `limit` (default all) from `offset`
        (default 0; negative: counted from the end, -50 the last 50). The answer's `offset`
        is the position of its first trial, `total` the experiment's number of trials."""
        assert self.store is not None
        exp = self._experiment(args)
        limit, offset = _count(args, "limit"), _integer(args, "offset") or 0
        rows = self.store.trials(exp.id, limit=limit, offset=offset)
        total = sum(self.store.count_trials(exp.id).values())
        self._trim_due = self.clock() + 2.0
        return {"experiment": exp.name, "total": total,
                "offset": offset if offset >= 0 else max(0, total + offset), "trials": [
                    {"trial": t.number, "state": t.state, "attempt": t.attempt,
                     "reports": t.last_seq, "reward": t.last_reward, "config": t.config,
                     "error": t.error, "pid": t.pid, "parent": t.parent} for t in rows]}

    def op_curves(self, args: dict[str, Any]) -> dict[str, Any]:
        """Learning curves of `metric` (default the reward): of every trial, or with `top`
        of the `top` trials of highest score. `total`: the experiment's number of trials."""
        assert self.store is not None
        exp = self._experiment(args)
        reward_attr = exp.spec.get("reward_attr", "accuracy")
        metric = args.get("metric") or reward_attr
        if not isinstance(metric, str):
            raise OpError("bad_request", f"metric must be a metric name, got {metric!r}")
        time_attr = exp.spec.get("time_attr")
        top = _count(args, "top")
        self._trim_due = self.clock() + 2.0
        if metric == reward_attr:
            curves = {str(n): c for n, c in self.store.reward_curves(exp.id, top).items()}
        else:
            curves = {}
            for number, reports in self.store.history(exp.id, top).items():
                xs, ys = curve_points(reports, metric, time_attr)
                if xs:
                    curves[str(number)] = [xs, ys]
        return {"experiment": exp.name, "metric": metric, "time_attr": time_attr,
                "total": sum(self.store.count_trials(exp.id).values()), "curves": curves}

    def op_submit(self, args: dict[str, Any]) -> Deferred:
        """Answered once the experiment's template has loaded its entry."""
        from tuned.specfile import parse_spec_text

        text, filename = args.get("text"), args.get("filename", "spec.toml")
        workdir = args.get("workdir")
        if not isinstance(text, str) or not _is_text(text):
            raise OpError("bad_request", "submit needs the spec's 'text'")
        if not isinstance(filename, str) or not _is_text(filename) or \
                (workdir is not None and (not isinstance(workdir, str) or not _is_text(workdir))):
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
            self.store.set_experiment_state(exp.id, "STOPPED")
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

    def op_resume(self, args: dict[str, Any]) -> dict[str, Any]:
        runner = self._runner(args)
        runner.engine.resume()
        return {"experiment": runner.engine.experiment.name, "state": "RUNNING"}

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


def _is_text(value: str) -> bool:
    """Whether `value` is valid Unicode (JSON's \\ud800 escapes decode to lone surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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


def _never_called(args: Any, reporter: Any) -> None:  # pragma: no cover
    raise RuntimeError("the daemon's trials run the function their template imported")


def _described_by(executor: TemplateExecutor | None):
    """A resolver for complete_spec that reads the entry's description off its template."""

    def resolve(entry: str, workdir: str | None):
        from tuned.space import Space

        assert executor is not None
        space = executor.entry_space
        return None, (Space.from_json(space) if space is not None else None), \
            dict(executor.entry_constants)

    return resolve


OPS = ("hello", "status", "experiments", "trials", "best", "curves", "submit", "stop", "pause",
       "resume", "kill", "logs", "watch", "adopt")
