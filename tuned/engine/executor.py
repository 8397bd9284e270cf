"""The seam between the engine and where trials run: the `Executor` protocol, and the
`TrialOrder` the engine hands it.

The engine decides (which trial, when, with what) and keeps the state of record; an executor
only runs trials and reports what they do, as the events of the report channel
(`tuned.protocol.channel`: a `Message` per line a trial sends, `Exited` when it is gone).
Everything about processes (forking, signals, process groups, /proc start times, pidfds) or
remote workers lives behind it. Implementations: `tuned.executors.local`,
`tuned.executors.template` (the daemon's template process, the in-process fork server),
`tuned.executors.simulated` (a virtual clock), on which `tests/test_executors.py` runs one
conformance suite; and `tuned.executors.dask_executor` (tasks on a Dask cluster; a `RunRef`
then names a run, see below), tested with real processes in `tests/test_dask.py`.

The life of a trial in an executor: `reserve` gives it somewhere to run (a process) and says
where (`RunRef`), which the engine stores before it tells it to `start` with its order, so
that no trial ever runs unknown to the store. Its reports come from `poll` as Messages, each
answered with `send` once the engine has stored it; it ends with one `Exited`, after every
Message it sent. `stop` and `kill` end it early. After a restart, a trial whose `RunRef`
the store holds may still run: `alive` says so, `adopt` follows it again (its channel comes
back with `attach` when it reconnects), `terminate` ends one that cannot be adopted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from tuned.protocol.channel import Event, Exited, Message


@dataclass(frozen=True)
class RunRef:
    """Where a claimed trial runs, as the store keeps it: its process id and that process's
    start time (clock ticks since boot), which together name one process for good (a pid
    alone may be reused). `start` is None when it cannot be known.

    A remote run (a Dask task) is named by `run`, an id of its own that the store keeps as
    the trial's current run, with `token_hash` (the SHA-256 of the run's secret, in hex);
    its process (`pid`, `start`, on `host`) is known only once the trial says hello."""

    pid: int
    start: int | None
    run: str | None = None
    token_hash: str | None = None
    host: str | None = None


@dataclass(frozen=True)
class TrialOrder:
    """Everything a trial needs to run: which trial (`trial_id`, its `number` and `attempt`
    in its experiment), its `config`, the `seed` of its random streams (the same on every
    attempt), what to add to its environment (`env`, e.g. its GPUs), where it keeps its
    checkpoints and its output, and its process title. `resume_seq`: how many reports it
    has made already, for an executor that cannot find out from the trial's checkpoints
    (the simulated one); None otherwise."""

    trial_id: int
    number: int
    attempt: int
    config: dict[str, Any]
    seed: int
    env: dict[str, str] = field(default_factory=dict)
    checkpoint_dir: str | None = None
    log_path: str = ""
    title: str = ""
    resume_seq: int | None = None

    def payload(self) -> dict[str, Any]:
        """The JSON object a trial process is given (`tuned.trial.worker.make_runner` and
        `tuned.trial.command.command_runner` read it)."""
        return {"config": self.config, "seed": self.seed, "number": self.number,
                "env": dict(self.env), "checkpoint_dir": self.checkpoint_dir,
                "title": self.title}


@runtime_checkable
class Executor(Protocol):
    """Runs trials and turns what they do into events. Called from one thread (the engine's
    loop). The contract of each method:"""

    def reserve(self, trial_id: int) -> RunRef:
        """Give trial `trial_id` somewhere to run that waits for its order, and say where
        (the engine stores it before `start`). RuntimeError if the trial runs already."""
        ...

    def start(self, order: TrialOrder) -> None:
        """Tell the reserved trial `order.trial_id` to run. A trial that cannot start ends
        with an `Exited` (and, where it can say why, an error Message) from `poll`; a trial
        stopped or killed since its reservation stays ended."""
        ...

    def send(self, trial_id: int, *answers: dict[str, Any]) -> bool:
        """Send answers to the trial, each one line of the report channel, without blocking.
        False only when the trial stopped reading its channel (its answers do not fit);
        True for a trial that is gone (its `Exited` tells the rest)."""
        ...

    def stop(self, trial_id: int, grace: float = 5.0) -> None:
        """End the trial: asked to end now (SIGTERM), made to (SIGKILL) after `grace`
        seconds. A trial not running here is ignored."""
        ...

    def kill(self, trial_id: int) -> None:
        """End the trial now, whatever it is doing. A trial not running here is ignored."""
        ...

    def poll(self, timeout: float | None) -> list[Event]:
        """The events that came, waiting up to `timeout` seconds (None: until one comes) for
        the first: Messages in the order each trial sent them, a trial's `Exited` after its
        last Message."""
        ...

    def prepare(self) -> bool:
        """Make one more launch ready ahead of time (a spare process), if fewer than the
        executor keeps are; True when it did some work."""
        ...

    @property
    def prepared(self) -> int:
        """How many launches are ready ahead of time."""
        ...

    def release(self) -> None:
        """End what `prepare` made ready and no trial uses."""
        ...

    def alive(self, ref: RunRef) -> bool:
        """Whether the very process `ref` names still runs (a reused pid does not count)."""
        ...

    def adopt(self, trial_id: int, ref: RunRef) -> bool:
        """Follow a trial this executor did not start (a dead engine's), which runs where
        `ref` says: its end comes from `poll` (code None: its exit status cannot be known),
        its channel with `attach` when it reconnects. False, nothing changed, when it is gone
        or cannot be followed."""
        ...

    def terminate(self, ref: RunRef) -> None:
        """End the trial `ref` names, with everything it started, if that very process still
        runs (one that is gone, or whose pid was reused, is left alone)."""
        ...

    def attach(self, trial_id: int, channel: Any, rest: bytes = b"") -> list[Message]:
        """Make `channel` (a connected socket) the report channel of adopted trial
        `trial_id`; returns the Messages in `rest`, the bytes it sent already. KeyError when
        the trial is not running here."""
        ...

    def pid_of(self, trial_id: int) -> int | None:
        """The process id of running trial `trial_id`, or None."""
        ...

    def clone_checkpoint(self, source_id: int, source_dir: str, trial_id: int,
                         trial_dir: str) -> int | None:
        """Give trial `trial_id` a copy of trial `source_id`'s latest checkpoint (kept in
        `source_dir`, copied to `trial_dir`); the number of reports it covers, or None when
        the source has none."""
        ...

    def discard_checkpoints(self, trial_dir: str) -> None:
        """Remove the checkpoints kept in `trial_dir` (a trial that ended and is not among
        the ones whose checkpoints are kept)."""
        ...

    def shutdown(self, grace: float = 2.0) -> list[Exited]:
        """Stop every trial (as `stop` does) and wait until all have ended; their exits."""
        ...

    def detach(self) -> None:
        """Let go of every trial without stopping it (they go on, and reconnect to the next
        engine); nothing of them is followed any more."""
        ...

    def close(self) -> None:
        """Release what the executor holds (spares; a template or fork server it owns).
        Trials it runs are not stopped: `shutdown` or `detach` first."""
        ...


#: An executor's runner: what a trial process runs, `runner(payload, channel) -> exit code`.
Runner = Callable[[dict[str, Any], Any], int]
