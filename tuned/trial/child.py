"""A trial process's own side of its start: forked from an engine, a template or a fork
server, it becomes a spare (its own session, default signals, batch scheduling, output on
fds 1 and 2, optionally bound to die with its parent), waits for its order, then runs it with
its output in the trial's log (`spare_main`). A Dask worker's trial over TLS first connects
to the daemon's report listener itself and says its own hello (`connect_for_order`)."""

from __future__ import annotations

import ctypes
import faulthandler
import functools
import json
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

from tuned.protocol.channel import EXIT_REFUSED, EXIT_UNREACHABLE
from tuned.trial.proctitle import set_title

_PR_SET_PDEATHSIG = 1


def spare_main(runner: Callable[[dict[str, Any], socket.socket], int],
               channel: socket.socket | None, parent_pid: int, kill_with_parent: bool,
               output_fd: int | None = None,
               connect: dict[str, Any] | None = None) -> None:  # pragma: no cover - child
    """A freshly forked child's life: become a session leader, wait on `channel` for the
    trial's order (payload and log path), run `runner(payload, channel)` with its output in
    the log (or in `output_fd`, given one: a remote trial's, which its worker forwards), and
    leave with its exit code (never returns). An order without a payload is a refusal (a
    remote run the daemon fenced): it is printed and the child leaves with EXIT_REFUSED.
    With `connect` (and no `channel`), the channel is its own connection to the daemon
    (`connect_for_order`); when it cannot have one, or its order, it says why and leaves
    with EXIT_UNREACHABLE."""
    code = 70
    try:
        become_spare(parent_pid, kill_with_parent, output_fd)
        if connect is not None:
            channel, order = connect_for_order(connect)
        else:
            order = None if channel is None else _read_order(channel)
        if channel is None:
            code = EXIT_UNREACHABLE
        elif order is not None and "payload" not in order:
            print(f"tuned: the daemon refused this run: {order.get('error', order)}",
                  file=sys.stderr)
            code = EXIT_REFUSED
        elif order is not None:
            set_title(order["payload"].get("title"))
            if order.get("log"):
                _redirect_output(order["log"])
            code = runner(order["payload"], channel)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code if isinstance(code, int) else 1)


def become_spare(parent_pid: int, kill_with_parent: bool, output_fd: int | None = None) -> None:
    """In a forked child: own session, default signals, batch scheduling, output bound to
    fds 1 and 2 (and sent to `output_fd` if given); with `kill_with_parent`, SIGKILL when
    the parent dies."""
    os.setsid()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    _batch_scheduling()
    if output_fd is not None:
        os.dup2(output_fd, 1)
        os.dup2(output_fd, 2)
        os.close(output_fd)
    _prepare_output()
    if kill_with_parent:
        die_with_parent(parent_pid)


def die_with_parent(parent_pid: int) -> None:
    """In a forked child: SIGKILL when the parent dies; exit now if it died already."""
    _libc().prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(70)


@functools.cache
def _libc() -> ctypes.CDLL:
    """The C library, loaded once (a fork server's children inherit it loaded)."""
    return ctypes.CDLL(None, use_errno=True)


def connect_for_order(connect: dict[str, Any]) -> tuple[Any, dict[str, Any] | None]:
    """In a Dask worker's trial over TLS: connect to the report listener at
    ``connect["address"]`` (for up to ``connect["patience"]`` seconds), over TLS with the
    files ``connect["tls"]`` (`tuned.protocol.tcp.client_context`: the daemon's certificate
    verified against the CA, not its host name), send the hello ``connect["hello"]`` with
    this process's pid and start time, and read the order (or a refusal) that answers it.
    The channel (blocking) and the order; (None, None), the reason printed, when there is
    no connection, the handshake failed, or the connection closed before the order."""
    from tuned.protocol.channel import hello_line
    from tuned.protocol.tcp import TlsFiles, client_context
    from tuned.protocol.tcp import connect as connect_to
    from tuned.trial.identity import process_identity

    address = connect.get("address")
    sock = None
    try:
        context = client_context(TlsFiles.from_dict(connect.get("tls")))
        sock = connect_to(str(address), float(connect.get("patience", 60.0)), context)
        pid, start = process_identity()
        sock.sendall(hello_line(**connect["hello"], pid=pid, start=start))
        sock.settimeout(None)  # the trial's channel blocks, as a local trial's does
        order = _read_order(sock)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"tuned: cannot reach the daemon at {address}: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        if sock is not None:
            sock.close()
        return None, None
    if order is None:
        print(f"tuned: the daemon at {address} closed the connection before the trial's "
              "order", file=sys.stderr)
        sock.close()
        return None, None
    return sock, order


def _read_order(sock: socket.socket) -> dict[str, Any] | None:
    """In a spare: block until the engine sends the trial's order line; None if it left."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk
    return json.loads(data)


def _batch_scheduling() -> None:
    """Trials are batch work: under SCHED_BATCH a trial woken by its answer does not preempt
    the engine that sent it, which keeps the engine's loop (and so every trial) moving. Same
    priority otherwise; needs no privilege."""
    policy = getattr(os, "SCHED_BATCH", None)
    if policy is not None:
        try:
            os.sched_setscheduler(0, policy, os.sched_param(0))
        except OSError:
            pass


def _prepare_output() -> None:
    """In a spare: stdin from /dev/null; sys.stdout, sys.stderr and faulthandler bound to
    fds 1 and 2, which `_redirect_output` points at the trial's log later. (The parent's
    sys.stdout may not be fd 1 at all: pytest, Jupyter.)"""
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    sys.stdout = sys.__stdout__ = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = sys.__stderr__ = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    faulthandler.enable(file=sys.stderr)


def _redirect_output(log_path: str) -> None:
    """In a trial: stdout and stderr appended to the trial's log."""
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
