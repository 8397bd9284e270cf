"""The template process: imports an experiment's training function once, forks its trials.

    python -m tuned.trial.template FD

FD is a SOCK_SEQPACKET socket to the daemon. The first message is the experiment:
``{"entry", "workdir", "constants", "start_method"}`` (or ``"command"`` instead of
``"entry"``: each child execs that program, see `tuned.trial.command`); the template imports the
entry and answers ``{"op": "ready"}`` or ``{"op": "error", "message"}`` (and exits). Then, for each
``{"op": "fork"}`` message carrying one file descriptor (the trial's report channel), it
forks a child that waits on that channel for its order, exactly as the daemon's own spare
children do (`tuned.trial.child.spare_main`), and answers ``{"op": "forked", "pid"}``. A
second descriptor, if any, is the child's output (a Dask worker's trial). A fork request with
``"connect": {...}`` (a Dask worker's trial over TLS, which cannot be handed a TLS session)
carries only the output's descriptor: the child connects to the daemon itself and says its
own hello (`spare_main`'s `connect`).
When a child exits it sends ``{"op": "exited", "pid", "code"}``. When the daemon goes away
(end of file) the template exits, leaving its trials running: they are in their own
sessions, and a restarted daemon deals with them.

With ``start_method = "spawn"`` a child does not run the function it inherited: it execs a
fresh interpreter (``python -m tuned.trial.template --trial``) that imports the entry itself.
A TLS channel cannot cross that exec: the fresh interpreter gets ``-1`` for it and resumes
over TCP (`tuned.trial.reporter.resume_channel`).
"""

from __future__ import annotations

import gc
import json
import os
import selectors
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

from tuned.protocol.channel import is_tls
from tuned.trial.proctitle import set_title

MAX_MESSAGE = 1 << 20


def _send(ctl: socket.socket, **body: Any) -> None:
    ctl.send(json.dumps(body, separators=(",", ":")).encode())


def load_runner(entry: str, workdir: str | None,
                constants: dict[str, Any]) -> Callable[[dict[str, Any], socket.socket], int]:
    """The runner of an entry: its function with the spec's constants over its own (a
    stored constant that JSON could not hold, ``{"repr": ...}``, keeps the live value)."""
    from tuned.experiment.files import resolve_entry
    from tuned.trial.worker import make_runner

    fn, _, own = resolve_entry(entry, workdir)
    given = {k: v for k, v in constants.items() if not _is_placeholder(v)}
    return make_runner(fn, {**own, **given})


def _is_placeholder(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"repr"}


def describe_entry(entry: str, workdir: str | None) -> dict[str, Any]:
    """What the daemon needs to know of an entry without importing it: its space (JSON) and
    its constants (JSON-safe)."""
    from tuned.experiment.files import resolve_entry
    from tuned.experiment.spec import json_safe

    _, space, own = resolve_entry(entry, workdir)
    return {"space": None if space is None else space.to_json(), "constants": json_safe(own)}


def spawn_runner(entry: str, workdir: str | None,
                 constants: dict[str, Any]) -> Callable[[dict[str, Any], socket.socket], int]:
    """A runner that execs a fresh interpreter for the trial (start_method = "spawn")."""

    def runner(payload: dict[str, Any], channel: socket.socket) -> int:
        if is_tls(channel):  # a TLS session cannot cross exec: the new program resumes
            fd = -1
        else:
            fd = channel.fileno()
            os.set_inheritable(fd, True)
        os.environ["TUNED_TRIAL_ORDER"] = json.dumps(
            {"entry": entry, "workdir": workdir, "constants": constants, "payload": payload})
        os.execv(sys.executable, [sys.executable, "-m", "tuned.trial.template", "--trial",
                                  str(fd)])
        return 70  # pragma: no cover - execv does not return

    return runner


def trial_main(fd: int) -> int:
    """A spawned trial: import the entry in this fresh interpreter and run the payload on
    channel `fd` (-1: none could be inherited, a TLS one: it resumes over TCP first)."""
    order = json.loads(os.environ.pop("TUNED_TRIAL_ORDER"))
    set_title(order["payload"].get("title"))
    runner = load_runner(order["entry"], order["workdir"], order["constants"])
    if fd >= 0:
        return runner(order["payload"], socket.socket(fileno=fd))
    from tuned.trial.reporter import ChannelClosed, resume_channel
    from tuned.trial.worker import EXIT_ENGINE_GONE

    os.environ.update(order["payload"].get("env", {}))
    try:
        channel = resume_channel()
    except ChannelClosed as exc:
        print(f"tuned: {exc}", file=sys.stderr)
        return EXIT_ENGINE_GONE
    return runner(order["payload"], channel)


class Template:
    """The template's loop: fork on request, report exits, leave when the daemon does.
    `kill_with_parent`: its children get SIGKILL when it dies (a fork server's)."""

    def __init__(self, ctl: socket.socket, runner: Callable[[dict[str, Any], socket.socket], int],
                 kill_with_parent: bool = False, watch_parent: bool = False):
        self.ctl = ctl
        self.runner = runner
        self.kill_with_parent = kill_with_parent
        self.children: set[int] = set()
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        # `watch_parent`: a pidfd of the process that started the template (a Dask worker),
        # readable once it is gone; then the template ends its trials and leaves.
        self.parent_fd = os.pidfd_open(os.getppid()) if watch_parent else None

    def run(self) -> None:
        signal.set_wakeup_fd(self.wake_w.fileno())
        signal.signal(signal.SIGCHLD, lambda *_: None)
        sel = selectors.DefaultSelector()
        sel.register(self.ctl, selectors.EVENT_READ, "ctl")
        sel.register(self.wake_r, selectors.EVENT_READ, "wake")
        if self.parent_fd is not None:
            sel.register(self.parent_fd, selectors.EVENT_READ, "parent")
        while True:
            for key, _ in sel.select(timeout=1.0):
                if key.data == "ctl" and not self._command():
                    return
                if key.data == "wake":
                    self._drain()
                if key.data == "parent":
                    self._end_children()
                    return
            self._reap()

    def _command(self) -> bool:
        """Handle one message from the daemon; False when the daemon is gone."""
        try:
            data, fds, _, _ = socket.recv_fds(self.ctl, MAX_MESSAGE, 2)
        except OSError:
            return False
        if not data:
            return False
        body = json.loads(data)
        connect = body.get("connect")
        if body.get("op") == "fork" and connect is not None:
            import tuned.protocol.tcp  # noqa: F401 - TLS loaded here once, not in each child

            output = fds[0] if fds else None
            pid = self._fork(None, output, connect)
            if output is not None:
                os.close(output)
            _send(self.ctl, op="forked", pid=pid)
        elif body.get("op") == "fork" and fds:
            channel = socket.socket(fileno=fds[0])
            output = fds[1] if len(fds) > 1 else None
            pid = self._fork(channel, output)
            channel.close()
            if output is not None:
                os.close(output)
            _send(self.ctl, op="forked", pid=pid)
        else:
            for fd in fds:
                os.close(fd)
        return True

    def _fork(self, channel: socket.socket | None, output: int | None = None,
              connect: dict[str, Any] | None = None) -> int:
        """Fork a child that waits on `channel` for its order (or, with `connect`, connects
        for it itself: `spare_main`), its output on `output` if given; its pid."""
        from tuned.trial.child import spare_main

        sys.stdout.flush()
        sys.stderr.flush()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child leaves by os._exit
            signal.set_wakeup_fd(-1)
            self.ctl.close()
            self.wake_r.close()
            self.wake_w.close()
            if self.parent_fd is not None:
                os.close(self.parent_fd)
            spare_main(self.runner, channel, parent, self.kill_with_parent, output, connect)
        self.children.add(pid)
        return pid

    def _end_children(self) -> None:
        """SIGKILL every child's process group (each child leads its own)."""
        for pid in self.children:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def _drain(self) -> None:
        try:
            while self.wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            self.children.discard(pid)
            try:
                _send(self.ctl, op="exited", pid=pid, code=os.waitstatus_to_exitcode(status))
            except OSError:
                pass


def serve_forks(ctl: socket.socket, runner: Callable[[dict[str, Any], socket.socket], int],
                engine_pid: int) -> None:  # pragma: no cover - runs in the fork server
    """In a fork of the engine's process: be its fork server (`Template`) until it goes
    away, then exit (never returns). The server has its own session, dies with the engine
    (SIGKILL), and its trials die with it; the garbage collector leaves the objects it
    inherited alone, so that trials forked from it copy fewer pages."""
    from tuned.trial.child import die_with_parent

    code = 0
    try:
        os.setsid()
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        die_with_parent(engine_pid)
        set_title("tuned: fork server")
        gc.freeze()
        Template(ctl, runner, kill_with_parent=True).run()
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        os._exit(code)


def _runner_of(experiment: dict[str, Any]) -> tuple[Callable[..., int], dict[str, Any]]:
    """The runner of the experiment's trials, and what the daemon learns of its entry."""
    workdir, constants = experiment.get("workdir"), experiment.get("constants", {})
    if experiment.get("command"):
        from tuned.trial.command import command_runner

        return command_runner(experiment["command"], workdir, constants), \
            {"space": None, "constants": {}}
    entry = experiment["entry"]
    described = describe_entry(entry, workdir)
    make = spawn_runner if experiment.get("start_method") == "spawn" else load_runner
    return make(entry, workdir, constants), described


def template_title(experiment: dict[str, Any]) -> str:
    """The template's title in `ps`: ``tuned: template <what>``, `what` being the
    experiment's name if the daemon sent one, else its entry, else its command line."""
    command = experiment.get("command")
    what = (experiment.get("name") or experiment.get("entry")
            or (" ".join(map(str, command)) if isinstance(command, list) else command)
            or "?")
    return f"tuned: template {what}"


def main(argv: list[str]) -> int:
    """``FD`` (a daemon's template), ``FD --worker`` (a Dask worker's: it ends its trials and
    leaves when the worker is gone, and its trials die with it), ``--trial FD``."""
    if argv[:1] == ["--trial"]:
        return trial_main(int(argv[1]))
    on_worker = argv[1:2] == ["--worker"]
    ctl = socket.socket(fileno=int(argv[0]))
    experiment = json.loads(ctl.recv(MAX_MESSAGE))
    set_title(template_title(experiment))
    try:
        runner, described = _runner_of(experiment)
    except Exception as exc:  # the user's module failed to import: say so, then leave
        problems = getattr(exc, "problems", None)
        _send(ctl, op="error", message="; ".join(problems) if problems
              else f"entry: {type(exc).__name__}: {exc}")
        return 1
    _send(ctl, op="ready", pid=os.getpid(), **described)
    gc.freeze()  # what the entry loaded stays out of the trials' collections: fewer pages copied
    Template(ctl, runner, kill_with_parent=on_worker, watch_parent=on_worker).run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
