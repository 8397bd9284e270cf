"""The engine: runs one experiment with its searcher, its trial scheduler, the store and an
executor. The in-process API and the daemon both drive experiments through it.

Guarantees (docs/architecture.md, "The invariants"):
- a suggestion is stored with the searcher state that produced it before its trial starts;
- a report is stored with its decision (and rung entries) before the trial hears the decision,
  and a report resent with a sequence number already stored gets the stored decision back;
- a trial ends in exactly one finished state, stored together with the searcher state that
  learnt from it;
- `recover()` leaves no trial RUNNING without a live process: with `adopt`, a trial whose
  process still lives (same pid, same start time) is adopted, holding the same CPUs and
  GPUs, and goes on once its reporter reconnects; otherwise (or once that process ends
  without reconnecting) a trial whose last stored decision ended it is finished, a paused
  one waits, any other goes back to PENDING (attempt counted) and runs again.
"""

from __future__ import annotations

import logging
import os
import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tuned.core.decisions import Decision, TrialState
from tuned.core.factory import make_scheduler
from tuned.core.lifecycle import (
    EXPERIMENT_FAILED,
    KILLED_BY_USER,
    NOT_FAILURES,
    STOPPED_BY_USER,
    ExperimentState,
    failed_early,
    failure_reason,
    final_state,
)
from tuned.core.schedulers.base import Clone, Outcome
from tuned.core.searchers import Searcher, make_searcher
from tuned.engine import intake
from tuned.engine.executor import Executor, RunRef, TrialOrder
from tuned.engine.groupcommit import HOLD_MAX, hold_time
from tuned.engine.resources import Grant, ResourcePool
from tuned.experiment.spec import ExperimentSpec
from tuned.protocol.channel import (
    REPORT_LAG_ENV,
    Event,
    Exited,
    Message,
    exit_failure,
    flat_json,
    is_report,
)
from tuned.runtime import failpoints
from tuned.runtime.interrupts import sigint_guard
from tuned.store.database import Experiment, NewReport, Store, StoreError, Trial

log = logging.getLogger("tuned.engine")


#: The states of a trial that waits to run (again).
WAITING = (TrialState.PENDING.value, TrialState.PAUSED.value)

#: A run lost with the machine that ran it (`Exited.lost`: a Dask worker died) is no fault of
#: the trial: it runs again, its attempt counted, up to this many times beyond `max_retries`
#: (a trial that kills every machine it runs on must end some time).
LOST_RUN_RETRIES = 3


def trial_seed(experiment_seed: int, number: int) -> int:
    """The seed of trial `number`'s random streams: the same on every attempt."""
    return zlib.crc32(f"{experiment_seed}:{number}".encode())


@dataclass
class _Live:
    """What the engine knows about one running trial."""

    trial: Trial
    last_seq: int
    score: float | None = None
    stop: Outcome | None = None
    done: bool = False
    error: str | None = None
    failure: str | None = None
    grant: Grant | None = None
    last_seen: float = 0.0
    final: bool = False  # ended by the user: no retry
    adopted: bool = False  # a dead engine's trial, not reconnected yet
    # Group commit: when its last answer went out (monotonic; None once it spoke again).
    answered: float | None = None




class Engine:
    """Runs one stored experiment to its end.

    `fn(args, reporter)` is the training function; `slots` how many trials run at once.
    `on_trial_end(trial_number, state)` is called after each trial's end is stored.
    `constants` (default: the spec's) are the arguments every trial gets besides its config;
    the in-process API passes the live objects, which JSON may not be able to hold.
    `resources` is the pool of CPUs and GPUs the trials take from (shared by the experiments
    of a daemon); by default, `slots` trials' worth of CPUs and the GPUs NVML finds.
    `on_event(event)` hears each trial start, report and end once stored (a daemon's
    `watch`). `trial_env` is added to every trial's environment. `adopt`: on recovery,
    trials whose process still lives are adopted (the daemon, whose trials reconnect);
    without it such processes are killed and their trials run again. Each trial keeps its
    checkpoints in `checkpoint_dir`/trial-<number> (default: `log_dir`/checkpoints); once
    a trial ends, its checkpoints are removed unless it ranks among the spec's
    `keep_checkpoints` best (kept for every trial when that is None).

    `run()` drives the experiment to its end on its own. A daemon drives many instead:
    `start()`, then `step(events)` with the events of this experiment's trials, until
    `finished`; then `close()`.
    """

    def __init__(self, store: Store, experiment: Experiment, spec: ExperimentSpec,
                 executor: Executor, resources: ResourcePool, log_dir: str, slots: int,
                 on_trial_end: Callable[[int, str], None] | None = None,
                 on_event: Callable[[dict[str, Any]], None] | None = None,
                 trial_env: dict[str, str] | None = None, adopt: bool = False,
                 checkpoint_dir: str | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if spec.seed is None:
            raise ValueError("seed: the engine needs the experiment's seed (it is stored)")
        self.store = store
        self.experiment = experiment
        self.spec = spec
        self.log_dir = log_dir
        self.slots = max(1, slots)
        self.executor = executor
        self.on_trial_end = on_trial_end
        self.on_event = on_event
        self.trial_env = dict(trial_env or {})
        self.adopts = adopt
        self.checkpoint_dir = checkpoint_dir or os.path.join(log_dir, "checkpoints")
        self.clock = clock
        self.scheduler = make_scheduler(spec.scheduler, spec.scheduler_options,
                                        seed=spec.seed, space=spec.space)
        self.searcher: Searcher = make_searcher(
            spec.searcher, spec.space, seed=spec.seed,
            resource_max=getattr(self.scheduler, "max_t", None), **spec.searcher_options)
        searcher_state = store.searcher_state(experiment.id)
        if searcher_state is not None:
            self.searcher.load_state_dict(searcher_state)
        self.scheduler.load_rungs(store.rungs(experiment.id))
        if self.scheduler.needs_configs:
            for trial in store.trials(experiment.id):
                self.scheduler.on_trial_add(trial.id, trial.config)
                if TrialState(trial.state).finished:
                    self.scheduler.on_trial_end(trial.id)
        self.live: dict[int, _Live] = {}
        self.queue: deque[Trial] = deque()
        counts = store.count_trials(experiment.id)
        # Trial numbers are 0, 1, ... in order of creation: the next is the count so far.
        self.created = sum(counts.values())
        self.exhausted = False
        self.deadline: float | None = None
        self.resources = resources
        self.paused = False
        # How it ends: set by stop() and by giving up after too many failures; otherwise
        # decided when its budget is spent (`close`).
        self.ended: ExperimentState | None = None
        self.successes = sum(counts.get(state.value, 0)
                             for state in (TrialState.COMPLETED, TrialState.STOPPED))
        self.failures = store.count_failures(experiment.id)
        self._searcher_dirty = False
        self._outbox: list[tuple[int, dict[str, Any]]] = []
        self._to_start: list[TrialOrder] = []
        self._news: list[dict[str, Any]] = []
        self._new_reports: list[NewReport] = []  # handled, to be stored (`_store_reports`)
        self._commit_seconds = HOLD_MAX  # running average of a durable step's commit
        self._held_since: float | None = None  # when the first held report arrived
        os.makedirs(log_dir, exist_ok=True)

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> None:
        """Recover, then launch and follow trials until the experiment is done."""
        self.start()
        try:
            with sigint_guard() as interrupt:
                self.step([])
                while self.live:
                    events = self._gather(self._next_events())
                    interrupt.check()
                    self.step(events)
        except BaseException:
            try:
                self.abandon()
            except StoreError as exc:  # the store failed first: its error is the one to see
                log.error("could not requeue the running trials (%s); a resume will", exc)
            raise
        finally:
            self.executor.close()
        self.close()

    def start(self) -> None:
        """Recover the stored trials and set the `time_out` deadline: `time_out` seconds
        after the first trial was created (store clock), so that a restart does not count
        again from zero."""
        self.recover()
        self._set_deadline()

    def _set_deadline(self) -> None:
        """The `time_out` deadline on this engine's clock: `time_out` seconds after the
        first trial was created (store clock), or None without a time_out."""
        self.deadline = None
        if self.spec.time_out is not None:
            elapsed = self.store.seconds_since_first_trial(self.experiment.id)
            self.deadline = self.clock() + max(0.0, self.spec.time_out - elapsed)

    @property
    def wants_launch(self) -> bool:
        """Whether the experiment would start a trial if resources allowed."""
        return not self.paused and len(self.live) < self.slots and self._has_work()

    @property
    def may_launch_later(self) -> bool:
        """Whether a trial may still start (a spare process made now would be used)."""
        return not self.paused and self._has_work()

    def _has_work(self) -> bool:
        return bool(self.queue or self.scheduler.can_promote(self.live)
                    or self._may_create())

    @property
    def finished(self) -> bool:
        """Nothing runs and nothing more will start (a paused experiment is not finished)."""
        return not self.live and not self.paused and not self._has_work()

    def close(self) -> None:
        """End the spare processes; a finished experiment gets its final state: the one a
        stop or a failure gave it, else (its budget spent) FAILED if trials failed and none
        succeeded, COMPLETED otherwise (`tuned.core.lifecycle.final_state`)."""
        self.executor.release()
        self.resources.withdraw(self.experiment.id)
        if not self.finished or self.ended is not None:
            return
        self.ended = final_state(self.successes, self.failures)
        reason = None
        if self.ended is ExperimentState.FAILED:
            reason = failure_reason(self.failures, None,
                                    self.store.last_errors(self.experiment.id))
            log.warning("experiment %s FAILED: %s", self.experiment.name, reason)
        self.store.set_experiment_state(self.experiment.id, self.ended.value, reason)

    def _next_events(self) -> list[Event]:
        """The next batch of events; while none is waiting, fork spare trial processes for
        the launches to come (also while every slot is busy: a trial that ends is then
        replaced without a fork in between)."""
        if not self.may_launch_later or self.executor.prepared >= self.slots:
            return self.executor.poll(self.timeout())
        events = self.executor.poll(0)
        if events and self.wants_launch and self.executor.prepared == 0:
            self.executor.prepare()
        while not events and self.executor.prepare():
            events = self.executor.poll(0)
        return events or self.executor.poll(self.timeout())

    def _gather(self, events: list[Event]) -> list[Event]:
        """`events` and those that come while `hold_for` says to wait for them (group
        commit, for `run`; a daemon holds the batches of its engines in its own loop)."""
        self.arrived(events)
        while (wait := self.hold_for(events)) is not None:
            more = self.executor.poll(wait)
            self.arrived(more)
            events = events + more
        return events

    def arrived(self, events: list[Event]) -> None:
        """Note that the trials of `events` spoke since their last answer, and when the
        first report of the batch came (for `hold_for`). Call it once per event, as they
        come."""
        for event in events:
            live = self.live.get(event.trial_id)
            if live is None:
                continue
            if self._held_since is None and is_report(event):
                self._held_since = time.monotonic()
            live.answered = None

    def hold_for(self, events: list[Event]) -> float | None:
        """Group commit (`tuned.engine.groupcommit`): seconds to wait for more reports before
        handling `events` in one durable transaction, or None to handle them now. Awaited
        are the running trials answered since the batch began to wait, not told to stop."""
        if self._held_since is None or not self.store.durable:
            return None
        answered = [live.answered for live in self.live.values()
                    if live.answered is not None and live.stop is None]
        return hold_time(self._held_since, self._commit_seconds, answered, time.monotonic())

    def step(self, events: list[Event]) -> None:
        """Handle a batch of events and launch what the freed slots allow, in one transaction
        (group commit); the trials hear their decisions only once it is committed, durably.
        A batch without reports tells nobody anything, so it commits without waiting for the
        disk; the next durable commit carries it to the disk too."""
        self._outbox = []
        self._news = []
        self._to_start = []
        self._new_reports = []
        acknowledging = any(is_report(e) for e in events)
        self._held_since = None
        begun = time.monotonic()
        with self.store.transaction(durable=acknowledging):
            for event in events:
                self._handle(event)
            self._store_reports()
            self._launch_ready()
            self._save_searcher()
        if acknowledging:
            self._commit_seconds = (self._commit_seconds + time.monotonic() - begun) / 2
        failpoints.hit("claimed")
        for order in self._to_start:
            self.executor.start(order)
        self._flush_news()
        if self._outbox:
            failpoints.hit("reported")
        answered = time.monotonic()
        answers: dict[int, list[dict[str, Any]]] = {}
        for trial_id, body in self._outbox:
            answers.setdefault(trial_id, []).append(body)
        for trial_id, bodies in answers.items():
            live = self.live.get(trial_id)
            if not self.executor.send(trial_id, *bodies) and live is not None:
                self._fail(live, "stopped reading its report channel")
            elif live is not None:
                live.answered = answered

    def _store_reports(self) -> None:
        """Store the reports handled since the last call, in the open transaction, together
        (`Store.record_reports`): before anything else of the step reads or writes the
        store, and at its end."""
        if self._new_reports:
            reports, self._new_reports = self._new_reports, []
            self.store.record_reports(self.experiment.id, reports)

    def _save_searcher(self) -> None:
        """Store the searcher's state if it changed, inside the caller's transaction, so that
        it lands with the suggestions and trial ends that changed it."""
        if self._searcher_dirty:
            self.store.save_searcher_state(self.experiment.id, self.searcher.state_dict())
            self._searcher_dirty = False

    def _notify(self, news: dict[str, Any]) -> None:
        """Keep `news` for `on_event` until the transaction that stored it has committed."""
        self._news.append(news)

    def _flush_news(self) -> None:
        news, self._news = self._news, []
        if self.on_event is not None:
            for item in news:
                self.on_event(item)

    def _answer(self, trial_id: int, body: dict[str, Any]) -> None:
        self._outbox.append((trial_id, body))

    def timeout(self) -> float | None:
        """Seconds until the engine must look again without any event (the time_out
        deadline), or None."""
        if self.deadline is None or not self._may_create():
            return None
        return max(0.0, self.deadline - self.clock())

    def _may_create(self) -> bool:
        if self.exhausted:
            return False
        if self.spec.num_trials is not None and self.created >= self.spec.num_trials:
            return False
        return self.deadline is None or self.clock() < self.deadline

    def _launch_ready(self) -> None:
        """Launch what the freed resources allow (`ResourcePool.admit`: an experiment that
        cannot launch waits in the pool's queue, and leaves it once it wants nothing)."""
        owner = self.experiment.id
        while self.wants_launch and self.resources.admit(owner, self.spec.num_cpus,
                                                         self.spec.num_gpus):
            if self.queue:
                self._launch(self.queue.popleft())
            elif (promoted := self._promote()) is not None:
                self._launch(promoted)
            else:
                trial = self._create()
                if trial is None:
                    break
                self._launch(trial)
        if not self.wants_launch:
            self.resources.withdraw(owner)
        if not self.live and not self.paused and not self._has_work():
            self._retire_waiting()

    def _promote(self) -> Trial | None:
        """The paused trial the scheduler promotes, made PENDING (its rung entry updated in
        the same transaction), or None."""
        entry = self.scheduler.promote(self.live)
        if entry is None:
            return None
        self.store.update_rung(self.experiment.id, entry)
        if not self.store.unpause_trial(entry.trial_id):
            return None
        trial = self.store.trial(entry.trial_id)
        failpoints.hit("promoted")
        log.info("trial %d promoted at rung %g", trial.number, entry.level)
        return trial

    def _retire_waiting(self) -> None:
        """Nothing runs and nothing more will: trials still waiting for a promotion that can
        no longer come end STOPPED."""
        for trial_id in self.scheduler.waiting():
            trial = self.store.trial(trial_id)
            if trial.state == TrialState.PAUSED:
                self._end(trial, self._stopped_state(trial.last_time), None, trial.score)

    def _create(self) -> Trial | None:
        number = self.created
        config = self.searcher.suggest(number)
        if config is None:
            self.exhausted = True
            return None
        bracket = self.scheduler.assign_bracket(number)
        trial_id = self.store.add_trial(self.experiment.id, number, config, bracket)
        failpoints.hit("suggested")
        self.scheduler.on_trial_add(trial_id, config)
        self._searcher_dirty = True
        self.created += 1
        return self.store.trial(trial_id)

    def _clone(self, clone: Clone) -> None:
        """Start a trial from `clone.source`'s latest checkpoint with `clone.config` (its
        parent is the source), queued in this transaction."""
        self._store_reports()
        source = self.store.trial(clone.source)
        number = self.created
        trial_id = self.store.add_trial(self.experiment.id, number, clone.config, 0,
                                        parent=source.number)
        self.created += 1
        copied = self.executor.clone_checkpoint(
            source.id, self._trial_checkpoint_dir(source.number), trial_id,
            self._trial_checkpoint_dir(number))
        start = 0.0
        if copied is None:
            log.warning("trial %d has no checkpoint: its clone %d starts from scratch",
                        source.number, number)
        else:
            self.store.start_after(trial_id, copied)
            report = self.store.stored_report(source.id, copied)
            start = (report[1] or 0.0) if report is not None else 0.0
        self.scheduler.on_trial_add(trial_id, clone.config, time=start)
        self.queue.append(self.store.trial(trial_id))
        self._notify({"event": "clone", "trial": number, "parent": source.number,
                      "config": clone.config})

    def _launch(self, trial: Trial) -> None:
        grant = self.resources.take(self.spec.num_cpus, self.spec.num_gpus, self.experiment.id)
        assert grant is not None, "_launch_ready checked the resources"
        env = dict(self.trial_env)
        if grant.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(grant.gpus)
        if self.spec.report_lag:
            env[REPORT_LAG_ENV] = repr(self.spec.report_lag)
        order = TrialOrder(trial.id, trial.number, trial.attempt, trial.config,
                           trial_seed(self.spec.seed, trial.number), env,
                           self._trial_checkpoint_dir(trial.number),
                           os.path.join(self.log_dir, f"trial-{trial.number}.log"),
                           f"tuned: {self.experiment.name} trial {trial.number} "
                           f"attempt {trial.attempt}")
        ref = self.executor.reserve(trial.id)
        if not self.store.claim_trial(trial.id, ref.pid, ref.start, grant.gpus, ref.run,
                                      ref.token_hash):
            self.executor.kill(trial.id)
            self.resources.give(grant)
            raise RuntimeError(f"trial {trial.number} was claimed by someone else")
        # Started once the claim is committed: a trial never runs unknown to the store.
        self._to_start.append(order)
        self.live[trial.id] = _Live(trial, last_seq=trial.last_seq, grant=grant,
                                    last_seen=self.clock())
        if self.on_event is not None:
            self._notify({"event": "start", "trial": trial.number, "attempt": trial.attempt,
                           "pid": ref.pid, "config": trial.config, "gpus": grant.gpus})

    # -- events --------------------------------------------------------------------------

    def _handle(self, event: Event) -> None:
        live = self.live.get(event.trial_id)
        if live is None:
            return
        if not is_report(event):
            self._store_reports()
        if isinstance(event, Exited):
            self._finish(live, event.code, event)
        elif event.body is None:
            self._fail(live, f"bad message on the report channel: {event.error}")
        elif "seq" in event.body:
            self._report(live, event.body)
        elif event.body.get("op") == "error":
            live.error = str(event.body.get("message", "unknown error"))[:2000]
        elif event.body.get("op") == "done":
            live.done = True
        else:
            self._fail(live, f"unknown message on the report channel: {str(event.body)[:200]}")

    def _fail(self, live: _Live, reason: str) -> None:
        """Fail a misbehaving trial: remember why and kill its process group."""
        if live.failure is None:
            live.failure = reason
        self.executor.kill(live.trial.id)

    def _report(self, live: _Live, body: dict[str, Any]) -> None:
        trial = live.trial
        live.last_seen = self.clock()
        seq = body.get("seq")
        metrics = body.get("metrics")
        if live.failure is not None:
            return
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
            return self._fail(live, f"report without a valid sequence number: {seq!r}")
        if seq <= live.last_seq:
            self._store_reports()
            stored_report = self.store.stored_report(trial.id, seq)
            stored = None if stored_report is None else stored_report[0]
            try:
                resent_time = intake.time_value(metrics if isinstance(metrics, dict) else {},
                                                self.spec.time_attr, seq)
            except (TypeError, ValueError):
                resent_time = None
            if None not in (stored_report, resent_time) and stored_report[1] is not None \
                    and resent_time != stored_report[1]:
                return self._fail(live, (
                    f"report {seq} sent again with {self.spec.time_attr or 'time'} "
                    f"{resent_time:g}, stored with {stored_report[1]:g}: a checkpoint must be "
                    "saved after the report of the progress it holds"))
            if stored is not None:
                # A rerun trial resending a stored report: the stored decision, once more,
                # except a pause that a resume has lifted since.
                if stored == Decision.PAUSE.value and not self.paused \
                        and not self.scheduler.holds(trial.id):
                    stored = Decision.CONTINUE.value
                if stored == Decision.PAUSE.value:
                    live.stop = Outcome(Decision.PAUSE)
                elif stored != Decision.CONTINUE.value:
                    reached = intake.time_value(metrics or {}, self.spec.time_attr, seq)
                    state = self._stopped_state(reached)
                    live.stop = Outcome(Decision(stored),
                                        completed=state is TrialState.COMPLETED)
                self._answer(trial.id, {"seq": seq, "decision": stored})
                return None
        if live.stop is not None:
            # Sent before the trial heard its stop (under a report lag): it ends anyway, and
            # nothing past its stop is stored.
            self._answer(trial.id, {"seq": seq, "decision": live.stop.decision.value})
            return None
        if seq != live.last_seq + 1:
            return self._fail(live, f"report {seq} out of order (expected {live.last_seq + 1})")
        problem = intake.check_metrics(metrics, self.spec.reward_attr, self.spec.time_attr)
        if problem:
            self._answer(trial.id, {"seq": seq, "error": problem})
            return self._fail(live, problem)
        reward = float(metrics[self.spec.reward_attr])
        score = self.spec.sign(reward)
        time_value = intake.time_value(metrics, self.spec.time_attr, seq)
        outcome = self.scheduler.on_report(trial.id, trial.bracket, time_value, score)
        if self.paused and outcome.decision is Decision.CONTINUE:
            outcome = Outcome(Decision.PAUSE, "experiment paused", outcome.rungs)
        self._new_reports.append(NewReport(trial.id, seq, time_value, reward, score,
                                           flat_json(metrics), outcome.decision,
                                           outcome.rungs))
        decision = outcome.decision.value
        live.last_seq = seq
        live.score = score
        if self.searcher.wants_reports:
            self.searcher.observe(trial.number, trial.config, score, final=False,
                                  time=time_value)
            self._searcher_dirty = True
        if decision != Decision.CONTINUE.value:
            live.stop = outcome
        if outcome.clone is not None:
            self._clone(outcome.clone)
        self._answer(trial.id, {"seq": seq, "decision": decision})
        if self.on_event is not None:
            self._notify({"event": "report", "trial": trial.number, "seq": seq,
                           "time": time_value, "reward": reward, "decision": decision})
        return None

    def _finish(self, live: _Live, code: int | None, exited: Exited | None = None) -> None:
        trial = live.trial
        del self.live[trial.id]
        if live.grant is not None:
            self.resources.give(live.grant)
        if exited is not None and exited.lost and live.failure is None and not live.final \
                and not live.done:
            if live.stop is not None:
                code = 0  # it was told to end: losing it now loses nothing
            elif trial.attempt <= self.spec.max_retries + LOST_RUN_RETRIES \
                    and not live.adopted:
                log.warning("trial %d was lost (%s); it runs again", trial.number, exited.why)
                if self.store.requeue_trial(trial.id):
                    self.queue.append(self.store.trial(trial.id))
                    return
            elif not live.adopted:
                live.failure = exited.why or "lost with the machine that ran it"
        if live.adopted and live.failure is None:
            log.info("adopted trial %d ended before it reconnected", trial.number)
            self._settle(self.store.trial(trial.id))
            return
        if live.stop is not None and live.stop.decision is Decision.PAUSE and code in (0, None):
            self.store.pause_trial(trial.id)
            return
        state, error = self._verdict(live, code, program=self.spec.command is not None)
        if (state is TrialState.FAILED and not live.final
                and trial.attempt <= self.spec.max_retries):
            log.warning("trial %d failed (%s); retrying", trial.number, error)
            if self.store.requeue_trial(trial.id):
                self.queue.append(self.store.trial(trial.id))
                return
        self._end(trial, state, error, live.score)

    def _trial_checkpoint_dir(self, number: int) -> str:
        return os.path.join(self.checkpoint_dir, f"trial-{number}")

    def _end(self, trial: Trial, state: TrialState, error: str | None,
             score: float | None) -> None:
        observed = None if state is TrialState.FAILED else score
        self.searcher.observe(trial.number, trial.config, observed, final=True)
        self.scheduler.on_trial_end(trial.id)
        self.store.finish_trial(trial.id, state, error)
        self._searcher_dirty = True
        self._count_end(state, error)
        self._retain_checkpoints(trial)
        if self.on_trial_end is not None:
            self.on_trial_end(trial.number, state.value)
        if self.on_event is not None:
            self._notify({"event": "end", "trial": trial.number, "state": state.value,
                           "error": error, "reward": trial.last_reward if score is None
                           else self.spec.sign(score)})

    def _count_end(self, state: TrialState, error: str | None) -> None:
        """Count a trial's end as a success or a failure (`tuned.core.lifecycle`); give the
        experiment up once `max_failures` trials failed before any succeeded."""
        if state is TrialState.FAILED:
            if error in NOT_FAILURES:
                return
            self.failures += 1
        else:
            self.successes += 1
        if self.ended is None and failed_early(self.failures, self.successes,
                                               self.spec.max_failures):
            self._give_up()

    def _give_up(self) -> None:
        """End the experiment FAILED now: nothing more starts, running trials are stopped,
        waiting ones end FAILED; the reason names the last trials' errors."""
        reason = failure_reason(self.failures, self.spec.max_failures,
                                self.store.last_errors(self.experiment.id))
        log.warning("experiment %s FAILED: %s", self.experiment.name, reason)
        with self.store.transaction():
            self._halt(EXPERIMENT_FAILED, grace=5.0)
            self.store.set_experiment_state(self.experiment.id, ExperimentState.FAILED.value,
                                            reason)
        self.ended = ExperimentState.FAILED

    def _halt(self, why: str, grace: float) -> None:
        """Start nothing more; stop the running trials (SIGTERM, SIGKILL after `grace`; they
        end FAILED with `why`, never retried) and end the waiting ones FAILED with `why`."""
        self.exhausted = True
        self.queue.clear()
        self.resources.withdraw(self.experiment.id)
        for trial_id, live in self.live.items():
            live.failure = live.failure or why
            live.final = True
            self.executor.stop(trial_id, grace)
        with self.store.transaction():
            for trial in self.store.trials(self.experiment.id, WAITING):
                self.store.finish_trial(trial.id, TrialState.FAILED, why)
                self.scheduler.on_trial_end(trial.id)

    def _retain_checkpoints(self, ended: Trial) -> None:
        """Apply `keep_checkpoints` after `ended` finished: its checkpoints go unless it is
        among the N best finished trials; a trial it pushed out of them loses its own."""
        keep = self.spec.keep_checkpoints
        if keep is None:
            return
        best = self.store.best_finished(self.experiment.id, keep + 1)
        kept = {t.number for t in best[:keep]}
        for number in {ended.number} | {t.number for t in best[keep:]}:
            if number not in kept:
                self.executor.discard_checkpoints(self._trial_checkpoint_dir(number))

    @staticmethod
    def _verdict(live: _Live, code: int | None,
                 program: bool = False) -> tuple[TrialState, str | None]:
        """How a trial ended, from what it said and its exit `code` (None: unknown, for a
        trial adopted after a restart). For a `program` (a command spec's) exit code 0
        after a report means it ran to its end."""
        if live.failure is not None:
            return TrialState.FAILED, live.failure
        if live.error is not None:
            return TrialState.FAILED, live.error
        failed = exit_failure(code)
        if failed is not None:
            return TrialState.FAILED, failed
        if live.stop is not None:
            return (TrialState.COMPLETED if live.stop.completed else TrialState.STOPPED), None
        if live.last_seq == 0:
            return TrialState.FAILED, "ended without a single report"
        if not live.done and not (program and code == 0):
            unknown = "" if code is not None else \
                " (adopted after a daemon restart, its exit status is unknown)"
            return TrialState.FAILED, f"exited before its function returned{unknown}"
        return TrialState.COMPLETED, None

    # -- recovery and interruption -------------------------------------------------------

    def recover(self) -> None:
        """Leave no trial RUNNING without a live process: adopt the live ones (with
        `adopt`), end those whose stored decision ended them, queue the rest."""
        with self.store.transaction():
            for trial in self.store.trials(self.experiment.id,
                                           (TrialState.RUNNING.value, *WAITING)):
                if not (trial.state == TrialState.RUNNING and self._adopt(trial)):
                    self._settle(trial)
            self._save_searcher()
        self._flush_news()

    def _adopt(self, trial: Trial) -> bool:
        """Adopt a RUNNING trial whose process still lives, with the same CPUs and GPUs; True
        if adopted. A live process that cannot be adopted is killed (its channel died with
        the engine that started it, so it could never report again)."""
        proc = self.store.trial_process(trial.id)
        if proc.run is None and (proc.pid is None or proc.start is None):
            return False
        ref = RunRef(proc.pid or 0, proc.start, proc.run, proc.token_hash, proc.host)
        if not self.executor.alive(ref):
            return False
        if self.adopts:
            try:
                grant = self.resources.hold(self.spec.num_cpus, proc.gpus)
            except ValueError as exc:
                log.error("trial %d cannot be adopted: %s", trial.number, exc)
            else:
                if self.executor.adopt(trial.id, ref):
                    self.live[trial.id] = _Live(trial, last_seq=trial.last_seq, grant=grant,
                                                last_seen=self.clock(), adopted=True)
                    log.info("trial %d (pid %d) lives on: adopted", trial.number, proc.pid)
                    return True
                self.resources.give(grant)
        self.executor.terminate(ref)
        return False

    def awaiting(self, pid: int) -> int | None:
        """The id of the adopted trial whose process is `pid` (not reconnected yet), or None."""
        for trial_id, live in self.live.items():
            if live.adopted and live.failure is None and \
                    self.executor.pid_of(trial_id) == pid:
                return trial_id
        return None

    def reconnected(self, trial_id: int, sock: Any, rest: bytes = b"") -> list[Message]:
        """An adopted trial's reporter is back on `sock`: it goes on like any running trial.
        Returns the messages in `rest` (for the next `step`)."""
        live = self.live[trial_id]
        live.adopted = False
        live.last_seen = self.clock()
        log.info("trial %d reconnected", live.trial.number)
        return self.executor.attach(trial_id, sock, rest)

    def _settle(self, trial: Trial) -> None:
        """Decide what becomes of an unfinished trial that has no live process."""
        stored = self.store.stored_decision(trial.id, trial.last_seq)
        if stored == Decision.STOP.value:
            self._end(trial, self._stopped_state(trial.last_time), None, trial.score)
        elif trial.state == TrialState.PAUSED or stored == Decision.PAUSE.value:
            if self.paused or self.scheduler.holds(trial.id):
                self.store.pause_trial(trial.id)
            elif self.store.unpause_trial(trial.id) or trial.state == TrialState.PENDING:
                self.queue.append(self.store.trial(trial.id))
        elif trial.state == TrialState.PENDING:
            self.queue.append(trial)
        elif self.store.requeue_trial(trial.id):
            log.info("trial %d was interrupted; it runs again", trial.number)
            self.queue.append(self.store.trial(trial.id))

    def _stopped_state(self, time_value: float | None) -> TrialState:
        """How a trial told to stop at `time_value` ended: COMPLETED if it had used its whole
        budget (max_t), else STOPPED."""
        max_t = getattr(self.scheduler, "max_t", None)
        if max_t is not None and time_value is not None and time_value >= max_t:
            return TrialState.COMPLETED
        return TrialState.STOPPED

    def detach(self) -> None:
        """Let go of the running trials without stopping them (the daemon leaves; they stay
        RUNNING and a restarted daemon adopts them)."""
        self.executor.detach()
        for live in self.live.values():
            if live.grant is not None:
                self.resources.give(live.grant)
        self.live.clear()

    def abandon(self) -> None:
        """On an interruption (Ctrl-C, an error in the engine): stop every trial and put it
        back to PENDING, so that a resumed run runs it again (also when stopping them
        fails: the trials of an engine that is gone die with it)."""
        try:
            self.executor.shutdown(grace=1.0)
        finally:
            for trial_id, live in self.live.items():
                self.store.requeue_trial(trial_id)
                if live.grant is not None:
                    self.resources.give(live.grant)
            self.live.clear()

    def pause(self) -> None:
        """Start nothing more; running trials are told to pause at their next report."""
        self.paused = True
        self.resources.withdraw(self.experiment.id)
        self.store.set_experiment_state(self.experiment.id, ExperimentState.PAUSED.value)

    def resume(self) -> None:
        """Undo `pause`: paused trials are queued again, new ones may start."""
        self.paused = False
        with self.store.transaction():
            for trial in self.store.trials(self.experiment.id, (TrialState.PAUSED.value,)):
                if not self.scheduler.holds(trial.id) and self.store.unpause_trial(trial.id):
                    self.queue.append(self.store.trial(trial.id))
            self.store.set_experiment_state(self.experiment.id, ExperimentState.RUNNING.value)

    def stop(self, grace: float = 5.0) -> None:
        """Stop the experiment: it is STOPPED at once (and stays so once its trials are
        gone, across restarts); nothing more starts, running trials get SIGTERM (then
        SIGKILL after `grace`) and end FAILED ("stopped by the user"), never retried;
        pending and paused ones end FAILED too. A resume may run its remaining budget."""
        self.paused = False
        with self.store.transaction():
            self._halt(STOPPED_BY_USER, grace)
            self.store.set_experiment_state(self.experiment.id, ExperimentState.STOPPED.value,
                                            STOPPED_BY_USER)
        self.ended = ExperimentState.STOPPED

    def extend(self, num_trials: int | None, time_out: float | None) -> None:
        """Give a running experiment a new budget: `num_trials` (the new total) and/or
        `time_out` (seconds from the first trial's creation, as in the spec)."""
        if num_trials is not None:
            self.spec.num_trials = num_trials
        if time_out is not None:
            self.spec.time_out = time_out
            self._set_deadline()

    def sweep_stale(self) -> list[int]:
        """Kill the trials silent for longer than the spec's `report_timeout` (since their
        start or their last report); they end FAILED, or run again while `max_retries`
        allows. Returns their numbers."""
        timeout = self.spec.report_timeout
        if timeout is None:
            return []
        now, stale = self.clock(), []
        for live in self.live.values():
            if live.failure is None and now - live.last_seen > timeout:
                self._fail(live, f"no report for {timeout:g} s (report_timeout)")
                stale.append(live.trial.number)
        return stale

    def kill_trial(self, number: int) -> bool:
        """SIGKILL one running trial (by number); it ends FAILED. False if it is not running."""
        for trial_id, live in self.live.items():
            if live.trial.number == number:
                live.failure = live.failure or KILLED_BY_USER
                live.final = True
                self.executor.kill(trial_id)
                return True
        return False
