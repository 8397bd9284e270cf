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

import ctypes
import faulthandler
import json
import os
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tuned.reporter import MAX_LINE

_PR_SET_PDEATHSIG = 1


@dataclass
class Message:
    """A line from a trial's channel: `body` is the parsed JSON object, or None with `error`."""

    trial_id: int
    body: dict[str, Any] | None
    error: str | None = None


@dataclass
class Exited:
    """A trial's process ended; `code` as os.waitstatus_to_exitcode gives it (< 0: signal)."""

    trial_id: int
    code: int


@dataclass
class _Child:
    trial_id: int
    pid: int
    sock: socket.socket
    pidfd: int | None
    buffer: bytearray = field(default_factory=bytearray)
    sock_open: bool = True
    kill_at: float | None = None


class LocalExecutor:
    """Runs trial targets in forked children and turns their messages and exits into events.

    `kill_with_parent`: children get SIGKILL when the engine's process dies (the in-process
    API, where nobody could ever collect their results); the daemon turns it off so that its
    trials outlive a restart and are adopted.
    """

    def __init__(self, kill_with_parent: bool = True,
                 clock: Callable[[], float] = time.monotonic):
        self.kill_with_parent = kill_with_parent
        self.clock = clock
        self._sel = selectors.DefaultSelector()
        self._children: dict[int, _Child] = {}
        self._libc = ctypes.CDLL(None, use_errno=True) if kill_with_parent else None

    # -- launching -----------------------------------------------------------------------

    def launch(self, trial_id: int, target: Callable[[socket.socket], int],
               log_path: str) -> int:
        """Fork a child that runs `target(channel)` and exits with its return value.

        Returns the child's pid. The child's stdout and stderr append to `log_path`.
        """
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        sys.stdout.flush()
        sys.stderr.flush()
        parent_pid = os.getpid()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child, which leaves by os._exit
            code = 70
            try:
                parent_end.close()
                self._become_trial(log_fd, parent_pid)
                code = target(child_end)
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code if isinstance(code, int) else 1)
        os.close(log_fd)
        child_end.close()
        parent_end.setblocking(False)
        pidfd = self._pidfd(pid)
        child = _Child(trial_id, pid, parent_end, pidfd)
        self._children[trial_id] = child
        self._sel.register(parent_end, selectors.EVENT_READ, ("msg", child))
        if pidfd is not None:
            self._sel.register(pidfd, selectors.EVENT_READ, ("exit", child))
        return pid

    def _become_trial(self, log_fd: int, parent_pid: int) -> None:
        """In the child: own session, logs, no descriptors of other trials."""
        os.setsid()
        for other in self._children.values():
            other.sock.close()
            if other.pidfd is not None:
                os.close(other.pidfd)
        self._sel = None
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        # The parent's sys.stdout may not be fd 1 (pytest, Jupyter): write to the log anyway.
        sys.stdout = sys.__stdout__ = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = sys.__stderr__ = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        faulthandler.enable(file=sys.stderr)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if self._libc is not None:
            self._libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != parent_pid:
                os._exit(70)

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

    def pid(self, trial_id: int) -> int:
        return self._children[trial_id].pid

    def send(self, trial_id: int, body: dict[str, Any]) -> bool:
        """Send one JSON line to the trial; False when its channel is gone."""
        child = self._children.get(trial_id)
        if child is None or not child.sock_open:
            return False
        data = (json.dumps(body, separators=(",", ":")) + "\n").encode()
        try:
            child.sock.setblocking(True)
            child.sock.settimeout(5.0)
            child.sock.sendall(data)
        except OSError:
            return False
        finally:
            child.sock.setblocking(False)
        return True

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

    @staticmethod
    def _signal_group(child: _Child, sig: int) -> None:
        try:
            os.killpg(child.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def shutdown(self, grace: float = 2.0) -> list[Exited]:
        """Stop every trial (TERM, then KILL after `grace`) and reap them all."""
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
            kind, child = key.data
            if child.trial_id not in self._children:
                continue
            if kind == "msg":
                self._read(child, events)
            else:
                self._reap(child, events, block=True)
        if any(c.pidfd is None for c in self._children.values()):
            for child in list(self._children.values()):
                if child.pidfd is None:
                    self._reap(child, events, block=False)
        return events

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
        if any(c.pidfd is None for c in self._children.values()):
            timeout = 0.01 if timeout is None else min(timeout, 0.01)
        return timeout

    def _read(self, child: _Child, events: list[Message | Exited]) -> None:
        while child.sock_open:
            try:
                chunk = child.sock.recv(65536)
            except BlockingIOError:
                break
            except OSError:
                chunk = b""
            if not chunk:
                self._close_channel(child)
                break
            child.buffer += chunk
            self._split(child, events)

    def _split(self, child: _Child, events: list[Message | Exited]) -> None:
        while True:
            end = child.buffer.find(b"\n")
            if end < 0:
                if len(child.buffer) > MAX_LINE:
                    events.append(Message(child.trial_id, None,
                                          f"report line over {MAX_LINE} bytes"))
                    child.buffer.clear()
                return
            line = bytes(child.buffer[:end])
            del child.buffer[:end + 1]
            events.append(_parse(child.trial_id, line))

    def _close_channel(self, child: _Child) -> None:
        if child.sock_open:
            child.sock_open = False
            self._sel.unregister(child.sock)
            child.sock.close()

    def _reap(self, child: _Child, events: list[Message | Exited], block: bool) -> None:
        pid, status = os.waitpid(child.pid, 0 if block else os.WNOHANG)
        if pid == 0:
            return
        self._read(child, events)
        if child.sock_open:
            self._close_channel(child)
        if child.pidfd is not None:
            self._sel.unregister(child.pidfd)
            os.close(child.pidfd)
        # The leader is gone; anything it left in its group goes with it.
        self._signal_group(child, signal.SIGKILL)
        del self._children[child.trial_id]
        events.append(Exited(child.trial_id, os.waitstatus_to_exitcode(status)))


def _parse(trial_id: int, line: bytes) -> Message:
    try:
        body = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return Message(trial_id, None, f"not JSON: {line[:80]!r}")
    if not isinstance(body, dict):
        return Message(trial_id, None, f"not a JSON object: {line[:80]!r}")
    return Message(trial_id, body)
