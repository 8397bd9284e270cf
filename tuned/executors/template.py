"""The template executor: trials forked by a per-experiment template process.

The daemon never imports user code: `TemplateExecutor` starts ``python -m tuned.template``,
which imports the experiment's entry once and forks a child for each trial on request. The
daemon hands the template the child's end of the trial's report channel (SCM_RIGHTS) and
keeps its own end, so everything after the fork (orders, reports, answers, stopping process
groups) is the same as with `LocalExecutor`; only exits are learnt from the template's
messages, since the trials are the template's children.
"""

from __future__ import annotations

import json
import selectors
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from tuned.executors.local import Exited, LocalExecutor, Message, _Child

READY_TIMEOUT = 120.0
FORK_TIMEOUT = 30.0


class TemplateError(RuntimeError):
    """The template could not import the experiment's entry, or died."""


class TemplateExecutor(LocalExecutor):
    """A LocalExecutor whose children come from a template process.

    Raises TemplateError when the template cannot import the entry. `entry_space` and
    `entry_constants` describe the entry function (its @tuned.args space, JSON, or None).
    With `command` instead of `entry`, each trial execs that program (`tuned.command`).
    `spares`: children the template forks ahead (`prefork`), so that a launch only sends
    the order (about 1 ms, against 10 for a fork on demand).
    """

    _polls_exits = False

    def __init__(self, entry: str | None, workdir: str | None, constants: dict[str, Any],
                 log_path: str, start_method: str = "fork", command: list[str] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 selector: selectors.BaseSelector | None = None, wait: bool = True,
                 spares: int = 0):
        super().__init__(runner=_no_runner, kill_with_parent=False, spares=spares, clock=clock,
                         selector=selector)
        self._pending: list[dict[str, Any]] = []
        self._by_pid: dict[int, _Child] = {}
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tuned.template", str(theirs.fileno())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True)
        theirs.close()
        self.ctl = ours
        self._send(entry=entry, command=command, workdir=workdir, constants=constants,
                   start_method=start_method)
        self.ready = False
        self.entry_space: dict[str, Any] | None = None
        self.entry_constants: dict[str, Any] = {}
        if wait:
            self._loaded(self._wait_for(("ready", "error"), READY_TIMEOUT))

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

    def _fork(self) -> _Child:
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._send(fds=[child_end.fileno()], op="fork")
        child_end.close()
        pid = self._wait_for(("forked",), FORK_TIMEOUT)["pid"]
        parent_end.setblocking(False)
        child = _Child(-1, pid, parent_end, None)
        self._by_pid[pid] = child
        return child

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


def _no_runner(payload: dict[str, Any], channel: socket.socket) -> int:  # pragma: no cover
    raise RuntimeError("a template executor's trials run in the template")


__all__ = ["TemplateError", "TemplateExecutor"]
