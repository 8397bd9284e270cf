"""The template executor: trials forked by a per-experiment template process.

The daemon never imports user code: `TemplateExecutor` starts ``python -m tuned.trial.template``,
which imports the experiment's entry once and forks a child for each trial on request. The
daemon hands the template the child's end of the trial's report channel (SCM_RIGHTS) and
keeps its own end, so everything after the fork (orders, reports, answers, stopping process
groups) is the same as with `LocalExecutor`; only exits are learnt from the template's
messages, since the trials are the template's children.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from tuned.executors.local import LocalExecutor, _Child
from tuned.protocol.channel import Exited, Message
from tuned.runtime import failpoints
from tuned.runtime.interrupts import uninterrupted

READY_TIMEOUT = 120.0
FORK_TIMEOUT = 30.0


class TemplateError(RuntimeError):
    """The template could not import the experiment's entry, or died."""


class TemplateExecutor(LocalExecutor):
    """A LocalExecutor whose children come from a template process.

    Raises TemplateError when the template cannot import the entry. `entry_space` and
    `entry_constants` describe the entry function (its @tuned.args space, JSON, or None).
    With `command` instead of `entry`, each trial execs that program (`tuned.trial.command`).
    `spares`: children the template forks ahead (`prepare`, which asks for one and does not
    wait: the child becomes a spare when the template says it forked), so that a launch only
    sends the order (about 1 ms, against 10 for a fork on demand).
    """

    _polls_exits = False

    def __init__(self, entry: str | None, workdir: str | None, constants: dict[str, Any],
                 log_path: str, start_method: str = "fork", command: list[str] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 selector: selectors.BaseSelector | None = None, wait: bool = True,
                 spares: int = 0, name: str | None = None):
        super().__init__(runner=_no_runner, kill_with_parent=False, spares=spares, clock=clock,
                         selector=selector)
        self._forget_template()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tuned.trial.template", str(theirs.fileno())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True)
        theirs.close()
        self.ctl = ours
        self._send(entry=entry, command=command, workdir=workdir, constants=constants,
                   start_method=start_method, name=name)
        if wait:
            self._loaded(self._wait_for(("ready", "error"), READY_TIMEOUT))

    def _forget_template(self) -> None:
        """What the executor knows of a template: nothing yet (a new one, or none)."""
        self._pending: list[dict[str, Any]] = []  # its messages not acted on yet
        self._by_pid: dict[int, _Child] = {}
        self._forking: deque[socket.socket] = deque()  # our ends of children asked for
        self._unwanted = 0  # children asked for, then given up (their channels closed)
        self.ready = False
        self.entry_space: dict[str, Any] | None = None
        self.entry_constants: dict[str, Any] = {}

    def poll_ready(self) -> bool:
        """For an executor made with ``wait=False``: True once the template has loaded the
        entry, False while it is loading (never blocks); TemplateError (the template
        closed) when it failed. Until it is ready, `ctl` is the caller's to watch."""
        if self.ready:
            return True
        try:
            data = self.ctl.recv(1 << 20, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            self.close_template()
            raise TemplateError("the template process died (see its template.log)")
        body = json.loads(data)
        if body.get("op") not in ("ready", "error"):
            self._pending.append(body)
            return False
        self._loaded(body)
        return True

    def _loaded(self, answer: dict[str, Any]) -> None:
        """The template's answer to the experiment: ready (its entry described) or error."""
        if answer["op"] == "error":
            self.close_template()
            raise TemplateError(answer["message"])
        self.entry_space = answer.get("space")
        self.entry_constants = answer.get("constants", {})
        self.ready = True
        self._sel.register(self.ctl, selectors.EVENT_READ, (self, "template", None))

    def _send(self, fds: list[int] | None = None, **body: Any) -> None:
        data = json.dumps(body, separators=(",", ":")).encode()
        socket.send_fds(self.ctl, [data], fds or [])

    def _wait_for(self, ops: tuple[str, ...], timeout: float) -> dict[str, Any]:
        """Block until the template sends one of `ops` (keeping other messages for later)."""
        deadline = self.clock() + timeout
        while True:
            remaining = deadline - self.clock()
            if remaining <= 0:
                raise TemplateError(f"the template did not answer within {timeout:g} s")
            self.ctl.settimeout(remaining)
            try:
                data = self.ctl.recv(1 << 20)
            except TimeoutError:
                continue
            finally:
                self.ctl.settimeout(None)
            if not data:
                raise TemplateError("the template process died (see its template.log)")
            body = json.loads(data)
            if body.get("op") in ops:
                return body
            self._pending.append(body)

    @property
    def prepared(self) -> int:
        """Spares waiting, and those asked for and on their way."""
        return len(self._spare) + len(self._forking)

    def prepare(self) -> bool:
        """Ask the template for one spare if fewer than `spares` wait or are on their way;
        True if it asked. Never waits."""
        if self.prepared >= self.spares:
            return False
        self._ask_fork()
        return True

    def _ask_fork(self) -> None:
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        parent_end.setblocking(False)
        with uninterrupted():  # the template forks in the order asked: keep the same order
            self._send(fds=[child_end.fileno()], op="fork")
            failpoints.hit("fork_asked")
            self._forking.append(parent_end)
        child_end.close()

    def _fork(self) -> _Child:
        """A child now: the next the template forks (one asked for already, or a new one)."""
        self._take_forked()
        if self._spare:
            return self._spare.pop(0)
        if not self._forking:
            self._ask_fork()
        while True:
            child = self._forked(self._wait_for(("forked",), FORK_TIMEOUT)["pid"])
            if child is not None:
                return child

    def _forked(self, pid: int) -> _Child | None:
        """The child the template says it forked: the oldest asked for (it forks in order);
        None for one given up."""
        if self._unwanted:
            self._unwanted -= 1
            return None
        child = _Child(-1, pid, self._forking.popleft(), None)
        self._by_pid[pid] = child
        return child

    def _take_forked(self) -> None:
        """Make spares of the children the template said it forked."""
        kept = []
        for body in self._pending:
            if body.get("op") != "forked":
                kept.append(body)
            elif (child := self._forked(body["pid"])) is not None:
                self._spare.append(child)
        self._pending = kept

    def release(self) -> None:
        """End the spares, and give up the children asked for and not forked yet (their
        channels closed, they leave as soon as they start)."""
        self._take_forked()
        super().release()
        self._unwanted += len(self._forking)
        while self._forking:
            self._forking.popleft().close()

    def handle(self, key: selectors.SelectorKey) -> list[Message | Exited]:
        if key.data[1] != "template":
            return super().handle(key)
        try:
            data = self.ctl.recv(1 << 20, socket.MSG_DONTWAIT)
        except BlockingIOError:
            data = None
        if data == b"":
            raise TemplateError("the template process died (see its template.log)")
        if data:
            self._pending.append(json.loads(data))
        return self._exits()

    def reap_unwatched(self) -> list[Message | Exited]:
        return self._exits()

    def _exits(self) -> list[Message | Exited]:
        self._take_forked()
        events: list[Message | Exited] = []
        kept = []
        for body in self._pending:
            child = self._by_pid.get(body.get("pid")) if body.get("op") == "exited" else None
            if child is None:
                kept.append(body)
                continue
            del self._by_pid[child.pid]
            if child.trial_id in self._children:
                self._exited(child, int(body["code"]), events)
        self._pending = [b for b in kept if b.get("op") != "exited"]
        return events

    def poll(self, timeout: float | None) -> list[Message | Exited]:
        events = self._exits()
        if events:
            return events
        return super().poll(timeout)

    def close(self) -> None:
        """End the spares and the template (its running trials live on in their own
        sessions; a fork server's die with it)."""
        self.release()
        self.close_template()

    def close_template(self) -> None:
        """End the template (its running trials live on in their own sessions)."""
        try:
            self._sel.unregister(self.ctl)
        except (KeyError, ValueError):
            pass
        self.ctl.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class ForkServerExecutor(TemplateExecutor):
    """The in-process engine's executor: a TemplateExecutor whose template is a fork of this
    process, made by `start_server` or at the first launch, that holds `runner` (the
    training function, closures and all) as this process does. It forks every trial, so the
    engine's process never forks: it pays neither the fork nor the copy-on-write faults
    that each fork costs the parent afterwards (about 600 a trial here), and the server,
    which touches nothing between forks, copies few pages for its children. Its trials die
    with it, and it dies with this process (SIGKILL), as `LocalExecutor(kill_with_parent=
    True)`'s do.
    `close_template` ends it (after its trials); the next launch forks a new one.
    """

    def __init__(self, runner: Callable[[dict[str, Any], socket.socket], int],
                 spares: int = 1, clock: Callable[[], float] = time.monotonic,
                 selector: selectors.BaseSelector | None = None):
        LocalExecutor.__init__(self, runner=runner, kill_with_parent=True, spares=spares,
                               clock=clock, selector=selector)
        self._forget_template()
        self.process: _Forked | None = None  # type: ignore[assignment]

    def _ask_fork(self) -> None:
        self.start_server()
        super()._ask_fork()

    def start_server(self) -> None:
        """Fork the server now, if it does not run (the first launch does otherwise)."""
        if self.process is not None:
            return
        from tuned.trial.template import serve_forks

        pid, ours = self._fork_running(
            socket.SOCK_SEQPACKET, lambda ctl, engine: serve_forks(ctl, self.runner, engine))
        self.process = _Forked(pid)
        self.ctl = ours
        self._loaded({"op": "ready"})

    def close_template(self) -> None:
        """End the server, and with it any trial still running (call `release` first)."""
        if self.process is None:
            return
        super().close_template()
        self.process = None
        self._forget_template()


class _Forked:
    """A forked child as `subprocess.Popen` shows one to `close_template`: wait, kill."""

    def __init__(self, pid: int):
        self.pid = pid

    def wait(self, timeout: float | None = None) -> int:
        """Reap it; subprocess.TimeoutExpired if it lives on past `timeout` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            pid, status = os.waitpid(self.pid, os.WNOHANG if deadline is not None else 0)
            if pid:
                return os.waitstatus_to_exitcode(status)
            if time.monotonic() >= deadline:  # type: ignore[operator]
                raise subprocess.TimeoutExpired(["fork server"], timeout or 0)
            time.sleep(0.005)

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)


def _no_runner(payload: dict[str, Any], channel: socket.socket) -> int:  # pragma: no cover
    raise RuntimeError("a template executor's trials run in the template")


__all__ = ["ForkServerExecutor", "TemplateError", "TemplateExecutor"]
