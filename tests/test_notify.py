"""sd_notify: messages reach a datagram socket of our own, named by NOTIFY_SOCKET."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tuned.daemon.notify import Notifier, parse_address, parse_watchdog_usec


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket and its path (the NOTIFY_SOCKET value)."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2.0)
    yield sock, path
    sock.close()


def receive(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def test_messages_reach_the_socket(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready()
    assert receive(sock) == "READY=1"
    assert notifier.ready(status="serving 2 experiments")
    assert receive(sock) == "READY=1\nSTATUS=serving 2 experiments"
    assert notifier.status("recovering\n3 trials")
    assert receive(sock) == "STATUS=recovering 3 trials"
    assert notifier.watchdog()
    assert receive(sock) == "WATCHDOG=1"
    assert notifier.extend_timeout(1.5)
    assert receive(sock) == "EXTEND_TIMEOUT_USEC=1500000"
    assert notifier.stopping()
    assert receive(sock) == "STOPPING=1"
    notifier.close()


def test_abstract_namespace_socket() -> None:
    name = f"tuned-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2.0)
    try:
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready()
        assert receive(sock) == "READY=1"
    finally:
        sock.close()


def test_watchdog_interval_is_half_of_watchdog_usec(listener: tuple[socket.socket, str]) -> None:
    _, path = listener
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000"}
    assert Notifier(env).watchdog_interval() == 15.0
    env["WATCHDOG_PID"] = str(os.getpid())
    assert Notifier(env).watchdog_interval() == 15.0


@pytest.mark.parametrize("extra", [
    {},                                                         # no WatchdogSec=
    {"WATCHDOG_USEC": "0"},
    {"WATCHDOG_USEC": "soon"},
    {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"},         # meant for another process
    {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"},
])
def test_no_watchdog_interval(listener: tuple[socket.socket, str],
                              extra: dict[str, str]) -> None:
    _, path = listener
    assert Notifier({"NOTIFY_SOCKET": path, **extra}).watchdog_interval() is None


def test_noop_without_notify_socket() -> None:
    notifier = Notifier({"WATCHDOG_USEC": "30000000"})
    assert not notifier.enabled
    assert notifier.watchdog_interval() is None
    assert notifier.ready("x") is False
    assert notifier.watchdog() is False
    assert notifier.status("x") is False
    assert notifier.stopping() is False


def test_send_errors_never_raise_and_warn_once(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens.sock")})
    with caplog.at_level(logging.DEBUG, logger="tuned.daemon.notify"):
        assert notifier.ready() is False
        assert notifier.watchdog() is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1


def test_unset_environment_clears_the_variables(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid()),
           "OTHER": "kept"}
    notifier = Notifier(env, unset_environment=True)
    assert env == {"OTHER": "kept"}
    assert notifier.watchdog_interval() == 1.0
    assert notifier.watchdog()
    assert receive(sock) == "WATCHDOG=1"


def test_parse_address() -> None:
    assert parse_address("/run/systemd/notify") == "/run/systemd/notify"
    assert parse_address("@abc") == "\0abc"
    assert parse_address("@") is None
    assert parse_address("") is None
    assert parse_address(None) is None
    assert parse_address("relative/path") is None
    assert parse_watchdog_usec({"WATCHDOG_USEC": "-5"}, os.getpid()) is None
