"""The simulated executor: trials as Python step functions, on a virtual clock.

It implements the engine's `Executor` protocol (`tuned.engine.executor`), so the real
`Engine`, with its real searcher, scheduler and store, runs an experiment on it
deterministically and in accelerated time: nothing sleeps, no process is forked, no signal
is sent. Pass ``clock=executor.clock`` to the Engine and to the Store, so that every time
they keep is virtual too.

A trial is a *step function*::

    steps(config: dict, seed: int, start: int) -> Iterator[tuple[float, dict]]

yielding, for each report after report number `start`, ``(seconds, metrics)``: the virtual
seconds the step took and the metrics it reports (``{"epoch": 3, "accuracy": 0.8}``). It must
be a pure function of its arguments for a simulation to be deterministic. `function_steps`
turns an ordinary ``fn(args, reporter)`` training function into one.

The life of a trial, in virtual time:

- `launch` (or `reserve`, then `start` once the engine has stored the pid) starts the step
  function; its first report becomes a
  ``Message(trial_id, {"seq": start + 1, "metrics": ...})`` at ``now + launch_seconds +
  seconds``. Metrics go through the report channel's wire encoding
  (`tuned.trial.reporter.encode_report`): numpy scalars arrive as Python numbers, and a value JSON
  cannot carry fails the trial as it would fail a real one.
- The trial then waits for the engine's answer, ``send(trial_id, {"seq", "decision"})``:
  "continue" schedules the next report at ``now + seconds``; "stop" or "pause" ends the trial
  (``Exited(trial_id, 0)`` at once). An answer ``{"seq", "error"}`` (a rejected report) ends
  it as the real worker does: ``{"op": "error", ...}`` then ``Exited(trial_id, 1)``.
- A step function that returns sends ``{"op": "done"}`` then ``Exited(trial_id, 0)``; one that
  raises (or yields something that is not ``(seconds >= 0, dict)``) sends
  ``{"op": "error", "message": "Type: text"}`` then ``Exited(trial_id, 1)``.
- `stop` and `kill` end a trial at the current virtual time with ``Exited`` code -15 (SIGTERM)
  and -9 (SIGKILL): the report it was computing is never sent.

Where a launched trial starts (`start`): the order's `resume_seq` when it has one (an int
>= 0: the number of reports the resumed trial has already made, so its next report is
``seq + 1``); otherwise its latest *virtual checkpoint*; otherwise 0. Virtual
checkpoints live in this executor's memory, by trial id, and model a training loop that
saves a checkpoint right after every report whose sequence number is a multiple of
`checkpoint_every` (None: it never saves). As `tuned.trial.reporter.Reporter` does, a trial that
keeps checkpoints (it saved one in this attempt, or resumed from one) hears a stop or pause
and still saves the checkpoint of that report when one is due, then ends; when none is due,
it computes its next step and ends at that step's end without reporting it (its next
reporter call raises). A trial without checkpoints ends at once. A trial launched again
with the same id (paused and resumed, promoted, retried) resumes from its checkpoint; one
without starts from report 0 and resends the reports the store already has (the engine
answers them with their stored decisions).

Time advances only in `poll`: it pops the earliest pending events (all those due at that one
virtual instant, in the order they were scheduled: ties are broken by a counter, never by
the wall clock) and moves the clock there. With a `timeout` it moves at most that far, and
returns nothing when no event is due by then.

Fake pids start at `FAKE_PID_BASE` (2**30), above Linux's largest possible pid (2**22), so
`/proc/<pid>` never exists for one: `process_start_time` gives None, nothing can be adopted,
and no signal ever reaches a real process.
"""

from __future__ import annotations

import heapq
import itertools
import json
import math
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from tuned.core.args import Args
from tuned.engine.executor import RunRef, TrialOrder
from tuned.protocol.channel import Exited, Message
from tuned.trial.reporter import ReportRejected, TrialStopped, encode_report

__all__ = ["FAKE_PID_BASE", "SimulatedExecutor", "StepFunction", "function_steps"]

#: A step function: ``steps(config, seed, start)`` yields ``(virtual seconds, metrics)``.
StepFunction = Callable[[dict[str, Any], int, int], Iterator[tuple[float, dict[str, Any]]]]

#: The first fake pid: above PID_MAX_LIMIT (2**22 on 64-bit Linux), so never a real process.
FAKE_PID_BASE = 1 << 30

_SIGTERM_CODE = -15
_SIGKILL_CODE = -9


class SimulationStalled(RuntimeError):
    """Trials are running but no event will ever come (they all wait for answers)."""


@dataclass
class _SimTrial:
    """One running simulated trial."""

    trial_id: int
    pid: int
    steps: Iterator[tuple[float, dict[str, Any]]]
    seq: int  # the last report it sent
    awaiting: int | None = None  # the report whose answer it waits for
    ending: bool = False  # its end (Exited) is scheduled
    keeps_checkpoints: bool = False  # saved one in this attempt, or resumed from one
    stop_pending: bool = False  # told to stop or pause; ends at its next step's end


class SimulatedExecutor:
    """Runs step functions in virtual time (see the module docstring for the contract).

    `steps` is the step function every trial runs (fixed for the executor's life, as the
    local executor's runner is). `launch_seconds`: virtual seconds between a launch and the
    start of the trial's first step. `checkpoint_every`: how often a trial saves its virtual
    checkpoint (None: never). `start_time`: the clock's value before the first event.
    """

    def __init__(self, steps: StepFunction, launch_seconds: float = 0.0,
                 checkpoint_every: int | None = 1, start_time: float = 0.0):
        if launch_seconds < 0 or not math.isfinite(launch_seconds):
            raise ValueError(f"launch_seconds must be a finite number >= 0, got "
                             f"{launch_seconds!r}")
        if checkpoint_every is not None and checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1 or None, got {checkpoint_every!r}")
        self.steps = steps
        self.launch_seconds = float(launch_seconds)
        self.checkpoint_every = checkpoint_every
        self.now = float(start_time)
        self._trials: dict[int, _SimTrial] = {}
        self._checkpoints: dict[int, int] = {}  # trial id -> reports its checkpoint covers
        # (time, order, event, incarnation) with incarnation = the _SimTrial it belongs to:
        # an event of a trial that has ended (stopped, killed) since is dropped when popped.
        self._events: list[tuple[float, int, Message | Exited, _SimTrial]] = []
        self._order = itertools.count()
        self._pids = itertools.count(FAKE_PID_BASE)
        self.launches = 0
        self.reports = 0

    def clock(self) -> float:
        """The virtual time, in seconds: what the Engine and the Store must use."""
        return self.now

    # -- launching -----------------------------------------------------------------------

    def launch(self, order: TrialOrder) -> RunRef:
        """`reserve` then `start`, in one go; returns where the trial runs (a fake pid)."""
        ref = self.reserve(order.trial_id)
        self.start(order)
        return ref

    def reserve(self, trial_id: int) -> RunRef:
        """Give trial `trial_id` a fake pid (and no start time: nothing names a real
        process); it waits for `start` (a `kill` or `stop` before then ends it, as it ends a
        reserved process)."""
        if trial_id in self._trials:
            raise RuntimeError(f"trial {trial_id} is running already")
        pid = next(self._pids)
        self._trials[trial_id] = _SimTrial(trial_id, pid, iter(()), seq=0)
        return RunRef(pid, None)

    def start(self, order: TrialOrder) -> None:
        """Start reserved trial `order.trial_id` with its config and seed (see the module
        docstring for where it starts). Its log is not written: a simulated trial has no
        output. A trial ended since its reservation stays ended."""
        sim = self._trials.get(order.trial_id)
        if sim is None or sim.ending:
            return
        sim.seq = self._start_of(order)
        sim.keeps_checkpoints = sim.seq > 0
        self.launches += 1
        try:
            sim.steps = iter(self.steps(dict(order.config), int(order.seed), sim.seq))
        except Exception as exc:  # noqa: BLE001 - the user's code: its failure is the trial's
            self._fail(sim, exc)
            return
        self._advance(sim, self.launch_seconds)

    def clone_checkpoint(self, source_id: int, source_dir: str, trial_id: int,
                         trial_dir: str) -> int | None:
        """Give trial `trial_id` a copy of trial `source_id`'s virtual checkpoint (PBT's
        exploit); the number of reports it covers, or None when the source has none. The
        directories are not used. The clone then runs ``steps(its own config, its seed,
        start=that number)``: a step function models what training on from another
        trial's checkpoint with a new configuration gives."""
        seq = self._checkpoints.get(source_id)
        if seq is None:
            return None
        self._checkpoints[trial_id] = seq
        return seq

    def discard_checkpoints(self, trial_dir: str) -> None:
        """Virtual checkpoints are kept by trial id, not in folders: nothing to remove."""

    def _start_of(self, order: TrialOrder) -> int:
        """The number of reports a launched trial has made already (see the module
        docstring): the order's `resume_seq`, else its virtual checkpoint, else 0."""
        seq = order.resume_seq
        if seq is not None:
            if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
                raise ValueError(f"resume_seq must be an integer >= 0, got {seq!r}")
            return seq
        return self._checkpoints.get(order.trial_id, 0)

    def alive(self, ref: RunRef) -> bool:
        """Nothing outlives a simulation: no stored process is ever alive."""
        return False

    def adopt(self, trial_id: int, ref: RunRef) -> bool:
        """Nothing outlives a simulation: there is never a process to adopt."""
        return False

    def terminate(self, ref: RunRef) -> None:
        """Nothing outlives a simulation: nothing to end."""

    def attach(self, trial_id: int, sock: Any, rest: bytes = b"") -> list[Message]:
        """No simulated trial ever reconnects; KeyError, as for a trial not running here."""
        raise KeyError(trial_id)

    def detach(self) -> None:
        """Let go of every trial (they vanish: a simulation has nothing that runs on)."""
        self._trials.clear()
        self._events.clear()

    @property
    def prepared(self) -> int:
        """Launching costs nothing here, so nothing is made ready ahead."""
        return 0

    def prepare(self) -> bool:
        return False

    def release(self) -> None:
        """Nothing to release."""

    def close(self) -> None:
        """Nothing to close."""

    # -- talking and stopping ------------------------------------------------------------

    @property
    def running(self) -> int:
        return len(self._trials)

    def pid_of(self, trial_id: int) -> int | None:
        """The fake pid of running trial `trial_id`, or None."""
        sim = self._trials.get(trial_id)
        return None if sim is None else sim.pid

    def pids(self) -> list[int]:
        """The fake pids of the running trials."""
        return [sim.pid for sim in self._trials.values()]

    def send(self, trial_id: int, *bodies: dict[str, Any]) -> bool:
        """The engine's answers, each as `_answer` takes it; always True (a simulated channel
        never fills)."""
        for body in bodies:
            self._answer(trial_id, body)
        return True

    def _answer(self, trial_id: int, body: dict[str, Any]) -> None:
        """The engine's answer to the report the trial waits for. An answer to another
        report, or to a trial that has ended or is ending, changes nothing."""
        sim = self._trials.get(trial_id)
        if sim is None or sim.ending or sim.awaiting is None or body.get("seq") != sim.awaiting:
            return
        sim.awaiting = None
        if "error" in body:
            self._fail(sim, ReportRejected(str(body["error"])))
        elif body.get("decision", "continue") == "continue":
            self._checkpoint(sim)
            self._advance(sim, 0.0)
        elif self._checkpoint(sim) or not sim.keeps_checkpoints:
            self._close_steps(sim)
            self._end(sim, 0)
        else:
            sim.stop_pending = True
            self._advance(sim, 0.0)

    def stop(self, trial_id: int, grace: float = 5.0) -> None:
        """End the trial now, as SIGTERM ends a trial that does not catch it (code -15)."""
        self._signal(trial_id, _SIGTERM_CODE)

    def kill(self, trial_id: int) -> None:
        """End the trial now (code -9)."""
        self._signal(trial_id, _SIGKILL_CODE)

    def shutdown(self, grace: float = 2.0) -> list[Exited]:
        """End every trial now; returns their exits (code -15), which `poll` will not give."""
        exits = [Exited(tid, _SIGTERM_CODE) for tid in self._trials]
        for sim in list(self._trials.values()):
            self._close_steps(sim)
        self._trials.clear()
        self._events.clear()
        return exits

    def _signal(self, trial_id: int, code: int) -> None:
        sim = self._trials.get(trial_id)
        if sim is None or sim.ending:
            return
        self._close_steps(sim)
        self._cancel(sim)
        self._end(sim, code)

    # -- events --------------------------------------------------------------------------

    def poll(self, timeout: float | None) -> list[Message | Exited]:
        """The events due at the earliest pending virtual instant, in scheduling order, with
        the clock moved to that instant. With `timeout`, an instant more than `timeout`
        virtual seconds away is not reached: the clock moves by `timeout` and nothing is
        returned. Never sleeps. SimulationStalled when trials run but none will ever send
        anything (each waits for an answer) and no timeout was given."""
        self._drop_stale()
        if not self._events:
            if timeout is not None:
                self.now += max(0.0, timeout)
                return []
            if self._trials:
                raise SimulationStalled(
                    f"trials {sorted(self._trials)} wait for answers that never came")
            return []
        due = self._events[0][0]
        if timeout is not None and due > self.now + timeout:
            self.now += max(0.0, timeout)
            return []
        self.now = max(self.now, due)
        events: list[Message | Exited] = []
        while self._events and self._events[0][0] <= self.now:
            _, _, event, sim = heapq.heappop(self._events)
            if self._trials.get(sim.trial_id) is not sim:
                continue
            events.append(event)
            if isinstance(event, Exited):
                del self._trials[sim.trial_id]
        return events

    def next_deadline(self) -> float | None:
        """Virtual seconds until the next pending event, or None when there is none."""
        self._drop_stale()
        return max(0.0, self._events[0][0] - self.now) if self._events else None

    def _drop_stale(self) -> None:
        while self._events and self._trials.get(self._events[0][3].trial_id) \
                is not self._events[0][3]:
            heapq.heappop(self._events)

    # -- a trial's steps -----------------------------------------------------------------

    def _schedule(self, sim: _SimTrial, delay: float, event: Message | Exited) -> None:
        heapq.heappush(self._events, (self.now + delay, next(self._order), event, sim))

    def _advance(self, sim: _SimTrial, delay: float) -> None:
        """Run the trial's next step: its report after `delay` plus the step's seconds, or
        its end (done, or an error); with a stop pending, its end after that step."""
        try:
            item = next(sim.steps)
            seconds, metrics = _check_step(item)
            if sim.stop_pending:
                self._close_steps(sim)
                self._end(sim, 0, delay + seconds)
                return
            line = encode_report(sim.seq + 1, metrics)
        except StopIteration:
            self._schedule(sim, delay, Message(sim.trial_id, {"op": "done"}))
            self._end(sim, 0, delay)
            return
        except Exception as exc:  # noqa: BLE001 - the user's code: its failure is the trial's
            self._fail(sim, exc, delay)
            return
        sim.seq += 1
        sim.awaiting = sim.seq
        self.reports += 1
        self._schedule(sim, delay + seconds, Message(sim.trial_id, json.loads(line)))

    def _checkpoint(self, sim: _SimTrial) -> bool:
        """After a report is answered: save the virtual checkpoint if one is due (its
        sequence number is a multiple of `checkpoint_every`); True if saved."""
        if self.checkpoint_every is None or sim.seq % self.checkpoint_every:
            return False
        self._checkpoints[sim.trial_id] = sim.seq
        sim.keeps_checkpoints = True
        return True

    def _fail(self, sim: _SimTrial, exc: BaseException, delay: float = 0.0) -> None:
        """The trial's code raised: the worker's error message, then exit code 1."""
        self._close_steps(sim)
        message = f"{type(exc).__name__}: {exc}"
        self._schedule(sim, delay, Message(sim.trial_id, {"op": "error", "message": message}))
        self._end(sim, 1, delay)

    def _end(self, sim: _SimTrial, code: int, delay: float = 0.0) -> None:
        sim.ending = True
        sim.awaiting = None
        self._schedule(sim, delay, Exited(sim.trial_id, code))

    def _cancel(self, sim: _SimTrial) -> None:
        """Forget the trial's events not yet due (a report it had not finished)."""
        kept = [e for e in self._events if e[3] is not sim or e[0] <= self.now]
        if len(kept) != len(self._events):
            self._events = kept
            heapq.heapify(self._events)

    @staticmethod
    def _close_steps(sim: _SimTrial) -> None:
        close = getattr(sim.steps, "close", None)
        if close is not None:
            try:
                close()
            except Exception:  # noqa: BLE001 - a step function failing to clean up
                pass


def _check_step(item: Any) -> tuple[float, dict[str, Any]]:
    """``(seconds, metrics)`` from what a step function yielded; TypeError or ValueError
    saying what is wrong otherwise."""
    if not isinstance(item, tuple) or len(item) != 2:
        raise TypeError(f"a step function must yield (seconds, metrics), got {item!r}")
    seconds, metrics = item
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) \
            or not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"a step's seconds must be a finite number >= 0, got {seconds!r}")
    if not isinstance(metrics, dict):
        raise TypeError(f"a step's metrics must be a dict, got {metrics!r}")
    return float(seconds), metrics


# -- ordinary training functions ---------------------------------------------------------


class _Reporter:
    """The reporter a training function gets under `function_steps`: each call hands its
    metrics to the simulation and blocks until the engine's decision."""

    def __init__(self, handoff: _Handoff, start: int):
        self._handoff = handoff
        self._seq = 0
        self._start = start
        self.last_decision = "continue"

    @property
    def seq(self) -> int:
        return self._seq

    def __call__(self, **metrics: Any) -> None:
        self._seq += 1
        if self._seq <= self._start:
            return  # covered by the checkpoint it resumed from: replayed, not reported
        if not self._handoff.report(metrics):
            self.last_decision = "stop"
            raise TrialStopped("stop")


class _Handoff:
    """Runs a training function in a thread of its own, one report at a time: the thread and
    the simulation never run at once, so the simulation stays deterministic."""

    def __init__(self, fn: Callable[[Args, Any], Any], args: Args, start: int):
        self._to_trial: queue.Queue[bool] = queue.Queue(maxsize=1)
        self._to_sim: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=1)
        self._thread = threading.Thread(target=self._main, args=(fn, args, start),
                                        daemon=True, name="tuned-simulated-trial")
        self._started = False
        self._finished = False

    def _main(self, fn: Callable[[Args, Any], Any], args: Args, start: int) -> None:
        if not self._to_trial.get():
            return
        try:
            fn(args, _Reporter(self, start))
        except TrialStopped:
            self._to_sim.put(("stopped", None))
        except BaseException as exc:  # noqa: BLE001 - handed to the simulation
            self._to_sim.put(("error", exc))
        else:
            self._to_sim.put(("done", None))

    def report(self, metrics: dict[str, Any]) -> bool:
        """In the trial's thread: hand `metrics` over; True to go on, False to stop."""
        self._to_sim.put(("report", metrics))
        return self._to_trial.get()

    def next(self) -> tuple[str, Any]:
        """In the simulation: let the trial run to its next report or its end."""
        if not self._started:
            self._started = True
            self._thread.start()
        self._to_trial.put(True)
        kind, value = self._to_sim.get()
        self._finished = kind != "report"
        return kind, value

    def close(self) -> None:
        """In the simulation: stop the trial at the report it waits in; join its thread."""
        if self._started and not self._finished:
            self._to_trial.put(False)
            self._to_sim.get()
            self._finished = True
        if self._started:
            self._thread.join()


def function_steps(fn: Callable[[Args, Any], Any],
                   seconds: float | Callable[[dict[str, Any]], float] = 1.0,
                   constants: dict[str, Any] | None = None) -> StepFunction:
    """A step function running the ordinary training function ``fn(args, reporter)`` (with
    ``args = Args(constants + config)``): each ``reporter(**metrics)`` call is one step of
    `seconds` virtual seconds (or ``seconds(metrics)``). A resumed trial (start > 0) runs
    `fn` from its beginning and replays its first `start` reports silently, in no virtual
    time, as if restored from a checkpoint. `fn` runs in a thread, but only while the
    simulation waits for it. The trial's seed is not applied: `fn` should draw from
    ``np.random.default_rng(args.seed)`` if it needs randomness (``seed`` joins `constants`
    unless the config has one)."""
    constants = dict(constants or {})
    takes_seed = "seed" not in constants

    def steps(config: dict[str, Any], seed: int, start: int
              ) -> Iterator[tuple[float, dict[str, Any]]]:
        values = {**constants, **config}
        if takes_seed:
            values.setdefault("seed", seed)
        handoff = _Handoff(fn, Args(values), start)
        try:
            while True:
                kind, value = handoff.next()
                if kind == "report":
                    duration = seconds(value) if callable(seconds) else seconds
                    yield duration, value
                elif kind == "error":
                    raise value
                else:
                    return
        finally:
            handoff.close()

    return steps

