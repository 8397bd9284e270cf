"""The local executor: trials as forked child processes, each in its own session.

Launching forks the engine's own process, which already holds the training function, so a
trial starts in about a millisecond rather than the hundreds an interpreter would take. The
child becomes a session leader (its own process group), sends its stdout and stderr to the
trial's log file, closes the executor's descriptors of other trials, and runs its target.

Events come from one `selectors` loop: each trial's report channel (a stream socket of JSON
lines) and its pidfd, which becomes readable when the process exits, even if a grandchild
still holds the channel open. Exited children are reaped with waitpid, so there are no
zombies.
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tuned.engine.executor import RunRef, TrialOrder
from tuned.protocol.channel import Exited, Message, answer_line, split_lines
from tuned.trial.checkpoints import TrialCheckpoints
from tuned.trial.child import spare_main
from tuned.trial.identity import process_start_time

__all__ = ["LocalExecutor", "alive", "process_start_time", "terminate"]

_READ_SIZE = 1 << 16  # bytes asked of a report channel per recv


@dataclass
class _Child:
    trial_id: int
    pid: int
    sock: socket.socket | None
    pidfd: int | None
    buffer: bytearray = field(default_factory=bytearray)
    sock_open: bool = True
    kill_at: float | None = None
    # Set for an adopted process (not our child): its start time, checked before a signal.
    adopted_start: int | None = None


class LocalExecutor:
    """Runs trials in forked children and turns their messages and exits into events.

    `runner(payload, channel)` is what every trial process runs (the engine's training
    function, fixed for the executor's life); `launch` hands a trial its JSON `payload`.
    To keep launches cheap, the executor keeps `spares` children forked ahead of time
    (`prepare`, called when the engine is idle): each spare has already become a session
    leader and waits on its channel; `launch` only sends it the payload and its log path.
    Without a spare, `launch` forks one on the spot.

    `kill_with_parent`: children get SIGKILL when the engine's process dies (the in-process
    API, where nobody could ever collect their results); the daemon turns it off so that its
    trials outlive a restart and are adopted.
    """

    # Children without a pidfd (old kernels) are polled with waitpid.
    _polls_exits = True

    def __init__(self, runner: Callable[[dict[str, Any], socket.socket], int],
                 kill_with_parent: bool = True, spares: int = 1,
                 clock: Callable[[], float] = time.monotonic,
                 selector: selectors.BaseSelector | None = None):
        self.runner = runner
        self.kill_with_parent = kill_with_parent
        self.spares = spares
        self.clock = clock
        # A daemon shares one selector among its executors: each key's data starts with the
        # executor that owns it (see `owns` and `handle`).
        self._sel = selector or selectors.DefaultSelector()
        self._children: dict[int, _Child] = {}
        self._spare: list[_Child] = []

    # -- launching -----------------------------------------------------------------------

    def launch(self, order: TrialOrder) -> RunRef:
        """Start a trial: a spare (or a fresh fork) runs `runner(order.payload(), channel)`
        with stdout and stderr appended to `order.log_path`, and exits with its return
        value. (`reserve` then `start`, in one go.)"""
        ref = self.reserve(order.trial_id)
        self.start(order)
        return ref

    def reserve(self, trial_id: int) -> RunRef:
        """Give trial `trial_id` a process (a spare, or a fresh fork) that waits for its
        order; its pid and start time. The engine stores them before `start`, so that a
        trial never runs without the store knowing its process."""
        if trial_id in self._children:
            raise RuntimeError(f"trial {trial_id} is running already")
        child = self._spare.pop() if self._spare else self._fork()
        child.trial_id = trial_id
        self._children[trial_id] = child
        self._sel.register(child.sock, selectors.EVENT_READ, (self, "msg", child))
        if child.pidfd is not None:
            self._sel.register(child.pidfd, selectors.EVENT_READ, (self, "exit", child))
        return RunRef(child.pid, process_start_time(child.pid))

    def start(self, order: TrialOrder) -> None:
        """Send a reserved process its order: it runs `runner(order.payload(), channel)`."""
        if not self.send(order.trial_id, {"payload": order.payload(), "log": order.log_path}):
            self.kill(order.trial_id)

    def alive(self, ref: RunRef) -> bool:
        """Whether the process `ref` names runs (`alive`, the module function)."""
        return alive(ref)

    def terminate(self, ref: RunRef) -> None:
        """SIGKILL to the process group `ref` names, if that very process runs."""
        terminate(ref)

    def adopt(self, trial_id: int, ref: RunRef) -> bool:
        """Follow a trial process this executor did not start (a dead daemon's), identified
        by its pid and start time: its exit is watched through a pidfd, signals reach its
        group only while that very process lives, and its channel comes with `attach` when
        it reconnects. False (nothing changes) when that process is gone or cannot be
        watched (no pidfd on this kernel)."""
        pid, start = ref.pid, ref.start
        if start is None or process_start_time(pid) != start:
            return False
        pidfd = self._pidfd(pid)
        if pidfd is None:
            return False
        if process_start_time(pid) != start:  # the pid was reused in between
            os.close(pidfd)
            return False
        child = _Child(trial_id, pid, None, pidfd, sock_open=False, adopted_start=start)
        self._children[trial_id] = child
        self._sel.register(pidfd, selectors.EVENT_READ, (self, "exit", child))
        return True

    def attach(self, trial_id: int, sock: socket.socket, rest: bytes = b"") -> list[Message]:
        """Make `sock` the report channel of running trial `trial_id` (its reporter
        reconnected), replacing any channel it had; returns the messages in `rest` (bytes
        it sent already). KeyError when the trial is not running here."""
        child = self._children[trial_id]
        if child.sock_open:
            self._close_channel(child)
        sock.setblocking(False)
        child.sock, child.sock_open = sock, True
        child.buffer = bytearray(rest)
        self._sel.register(sock, selectors.EVENT_READ, (self, "msg", child))
        events: list[Message | Exited] = []
        self._split(child, events)
        return [e for e in events if isinstance(e, Message)]

    def detach(self) -> None:
        """Let go of every trial without stopping it (the daemon leaves; the trials go on
        and reconnect to the next one): channels and pidfds closed, nothing reaped."""
        self.release()
        for child in self._children.values():
            self._close_channel(child)
            if child.pidfd is not None:
                self._sel.unregister(child.pidfd)
                os.close(child.pidfd)
        self._children.clear()

    @property
    def prepared(self) -> int:
        """Spares forked ahead and waiting."""
        return len(self._spare)

    def prepare(self) -> bool:
        """Fork one spare if fewer than `spares` wait; True if it forked."""
        if len(self._spare) >= self.spares:
            return False
        self._spare.append(self._fork())
        return True

    def _fork(self) -> _Child:
        pid, parent_end = self._fork_running(
            socket.SOCK_STREAM,
            lambda channel, parent: spare_main(self.runner, channel, parent,
                                               self.kill_with_parent))
        # Never blocks: an answer that does not fit in the socket buffer means the trial
        # stopped reading, and `send` says so rather than stall the engine.
        parent_end.setblocking(False)
        return _Child(-1, pid, parent_end, self._pidfd(pid))

    def _fork_running(self, kind: int,
                      main: Callable[[socket.socket, int], None]) -> tuple[int, socket.socket]:
        """Fork a child that runs `main(its end of a new socket pair of type `kind`, this
        process's pid)`, which must never return, with the executor's other descriptors
        closed; (its pid, our end)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, kind)
        sys.stdout.flush()
        sys.stderr.flush()
        parent_pid = os.getpid()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child, which leaves by os._exit
            ours.close()
            self._close_others()
            main(theirs, parent_pid)
        theirs.close()
        return pid, ours

    def _close_others(self) -> None:
        """In a forked child: close the executor's descriptors of other trials."""
        for other in [*self._children.values(), *self._spare]:
            if other.sock is not None:
                other.sock.close()
            if other.pidfd is not None:
                os.close(other.pidfd)
        self._sel = None

    @staticmethod
    def _pidfd(pid: int) -> int | None:
        opener = getattr(os, "pidfd_open", None)
        if opener is None:
            return None
        try:
            return opener(pid)
        except OSError:
            return None

    # -- talking and stopping ------------------------------------------------------------

    @property
    def running(self) -> int:
        return len(self._children)

    def clone_checkpoint(self, source_id: int, source_dir: str, trial_id: int,
                         trial_dir: str) -> int | None:
        """Give trial `trial_id` a copy of trial `source_id`'s latest checkpoint (files in
        `source_dir`, copied to `trial_dir`); the number of reports it covers, or None when
        the source has none."""
        copied = TrialCheckpoints(source_dir).copy_latest_to(TrialCheckpoints(trial_dir))
        return None if copied is None else copied.seq

    def discard_checkpoints(self, trial_dir: str) -> None:
        """Remove the checkpoints in `trial_dir`."""
        TrialCheckpoints(trial_dir).remove()

    def pid_of(self, trial_id: int) -> int | None:
        """The pid of running trial `trial_id`, or None."""
        child = self._children.get(trial_id)
        return None if child is None else child.pid

    def pids(self) -> list[int]:
        """The pids of the running trials and the spares."""
        return [c.pid for c in self._children.values()] + [c.pid for c in self._spare]

    def send(self, trial_id: int, *bodies: dict[str, Any]) -> bool:
        """Send `bodies` to the trial, a JSON line each, in one write that does not block.
        False only when its channel is full (the trial stopped reading its answers); a trial
        already gone is not an error here, its exit tells the rest."""
        child = self._children.get(trial_id)
        if child is None or not child.sock_open or child.sock is None:
            return True
        data = "".join(map(answer_line, bodies)).encode()
        try:
            sent = child.sock.send(data)
        except BlockingIOError:
            return False
        except OSError:
            return True
        return sent == len(data)

    def stop(self, trial_id: int, grace: float = 5.0) -> None:
        """SIGTERM to the trial's process group now, SIGKILL to it after `grace` seconds."""
        child = self._children.get(trial_id)
        if child is None:
            return
        self._signal_group(child, signal.SIGTERM)
        deadline = self.clock() + grace
        child.kill_at = deadline if child.kill_at is None else min(child.kill_at, deadline)

    def kill(self, trial_id: int) -> None:
        """SIGKILL to the trial's process group now."""
        child = self._children.get(trial_id)
        if child is not None:
            self._signal_group(child, signal.SIGKILL)

    def release(self) -> None:
        """End the spares: closing its channel tells a spare to exit; reap it."""
        while self._spare:
            child = self._spare.pop()
            child.sock.close()
            if child.pidfd is not None:
                os.close(child.pidfd)
            try:
                os.waitpid(child.pid, 0)
            except ChildProcessError:  # a template's child: the template reaps it
                pass

    @staticmethod
    def _signal_group(child: _Child, sig: int) -> None:
        """`sig` to the child's process group; to the child alone when it has no group yet
        (just forked, before its setsid: a signal to the group would be lost, and a trial
        stopped or killed right after its fork would run on)."""
        if child.adopted_start is not None:
            if process_start_time(child.pid) != child.adopted_start:
                return  # not our child: once it is gone its pid may be someone else's
            _killpg(child.pid, sig)
            return
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            try:
                os.kill(child.pid, sig)  # not reaped yet, so the pid is still its own
            except ProcessLookupError:
                pass
        except PermissionError:
            pass

    def close(self) -> None:
        """End the spares (trials are left as they are: `shutdown` or `detach` first)."""
        self.release()

    def shutdown(self, grace: float = 2.0) -> list[Exited]:
        """Stop every trial (TERM, then KILL after `grace`) and reap them all, spares too."""
        self.release()
        for trial_id in list(self._children):
            self.stop(trial_id, grace)
        exits: list[Exited] = []
        while self._children:
            exits += [e for e in self.poll(0.05) if isinstance(e, Exited)]
        return exits

    # -- events --------------------------------------------------------------------------

    def poll(self, timeout: float | None) -> list[Message | Exited]:
        """Wait up to `timeout` seconds for messages and exits; returns them in order."""
        timeout = self._escalate(timeout)
        events: list[Message | Exited] = []
        if not self._children:
            if timeout:
                time.sleep(timeout)
            return events
        for key, _ in self._sel.select(timeout):
            if self.owns(key):
                events += self.handle(key)
        return events + self.reap_unwatched()

    def owns(self, key: selectors.SelectorKey) -> bool:
        """Whether a ready key of the (shared) selector belongs to this executor."""
        return isinstance(key.data, tuple) and key.data[0] is self

    def handle(self, key: selectors.SelectorKey) -> list[Message | Exited]:
        """The events behind one ready key of this executor."""
        _, kind, child = key.data
        events: list[Message | Exited] = []
        if child.trial_id in self._children:
            if kind == "msg":
                self._read(child, events)
            else:
                self._reap(child, events, block=True)
        return events

    def reap_unwatched(self) -> list[Message | Exited]:
        """Exits of children without a pidfd (kernels before 5.3), found by waitpid."""
        events: list[Message | Exited] = []
        for child in list(self._children.values()):
            if child.pidfd is None:
                self._reap(child, events, block=False)
        return events

    def next_deadline(self) -> float | None:
        """Seconds until this executor needs attention without any fd becoming ready (a
        SIGKILL escalation, or polling children without a pidfd); None when never."""
        return self._escalate(None)

    def _escalate(self, timeout: float | None) -> float | None:
        """SIGKILL the groups whose grace has run out; shorten `timeout` to the next one."""
        now = self.clock()
        for child in self._children.values():
            if child.kill_at is None:
                continue
            if child.kill_at <= now:
                self._signal_group(child, signal.SIGKILL)
                child.kill_at = now + 1.0
            wait = max(0.0, child.kill_at - now)
            timeout = wait if timeout is None else min(timeout, wait)
        if self._polls_exits and any(c.pidfd is None for c in self._children.values()):
            timeout = 0.01 if timeout is None else min(timeout, 0.01)
        return timeout

    def _read(self, child: _Child, events: list[Message | Exited]) -> None:
        """What the channel holds now. A read that does not fill the buffer took all there
        was; the selector reports the channel again if more comes (or it closes)."""
        while child.sock_open and child.sock is not None:
            try:
                chunk = child.sock.recv(_READ_SIZE)
            except BlockingIOError:
                break
            except OSError:
                chunk = b""
            if not chunk:
                self._close_channel(child)
                break
            child.buffer += chunk
            self._split(child, events)
            if len(chunk) < _READ_SIZE:
                break

    @staticmethod
    def _split(child: _Child, events: list[Message | Exited]) -> None:
        events += split_lines(child.trial_id, child.buffer)

    def _close_channel(self, child: _Child) -> None:
        if child.sock_open and child.sock is not None:
            child.sock_open = False
            self._sel.unregister(child.sock)
            child.sock.close()

    def _reap(self, child: _Child, events: list[Message | Exited], block: bool) -> None:
        if child.adopted_start is not None:  # its pidfd is readable: it has exited
            self._exited(child, None, events)
            return
        pid, status = os.waitpid(child.pid, 0 if block else os.WNOHANG)
        if pid == 0:
            return
        self._exited(child, os.waitstatus_to_exitcode(status), events)

    def _exited(self, child: _Child, code: int | None,
                events: list[Message | Exited]) -> None:
        """A trial's process ended with `code`: read what it left, clean up, emit Exited."""
        self._read(child, events)
        if child.sock_open:
            self._close_channel(child)
        if child.pidfd is not None:
            self._sel.unregister(child.pidfd)
            os.close(child.pidfd)
        # The leader is gone; anything it left in its group goes with it.
        _killpg(child.pid, signal.SIGKILL)
        del self._children[child.trial_id]
        events.append(Exited(child.trial_id, code))


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def alive(ref: RunRef) -> bool:
    """Whether the process `ref` names runs: its pid is there with the same start time."""
    return ref.start is not None and process_start_time(ref.pid) == ref.start


def terminate(ref: RunRef) -> None:
    """SIGKILL to the process group `ref` names, if that very process runs (a pid reused
    since names another process, which is left alone)."""
    if alive(ref):
        _killpg(ref.pid, signal.SIGKILL)
