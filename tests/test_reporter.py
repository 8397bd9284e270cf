"""The trial's reporter: reports over its channel, and reconnecting to a restarted daemon."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading

import pytest

from tuned.trial.reporter import ChannelClosed, Reconnect, Reporter, TrialStopped


@pytest.fixture
def sock_path():
    base = tempfile.mkdtemp(prefix="r", dir="/tmp")
    yield os.path.join(base, "c.sock")
    shutil.rmtree(base, ignore_errors=True)


def _daemon(path: str, answer: bytes, seen: list[bytes]) -> threading.Thread:
    """A one-connection stand-in for a restarted daemon: answers the adopt request with
    `answer`, then answers one report with STOP."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        f = conn.makefile("rb")
        seen.append(f.readline())
        conn.sendall(answer)
        if b'"ok":true' in answer:
            line = f.readline()
            seen.append(line)
            seq = json.loads(line)["seq"]
            conn.sendall(json.dumps({"seq": seq, "decision": "stop"}).encode() + b"\n")
        conn.close()
        listener.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def _orphaned_reporter(reconnect: Reconnect | None) -> Reporter:
    """A reporter whose engine died after answering its first report."""
    ours, theirs = socket.socketpair()
    reporter = Reporter(ours, reconnect=reconnect)
    theirs.sendall(b'{"seq":1,"decision":"continue"}\n')
    reporter(accuracy=0.1)
    theirs.close()
    return reporter


def test_without_reconnect_a_lost_engine_ends_the_trial():
    reporter = _orphaned_reporter(None)
    with pytest.raises(ChannelClosed):
        reporter(accuracy=0.2)


def test_a_lost_engine_is_replaced_by_an_adopting_daemon(sock_path):
    seen: list[bytes] = []
    thread = _daemon(sock_path, b'{"v":1,"ok":true,"trial":0}\n', seen)
    reporter = _orphaned_reporter(Reconnect(sock_path, timeout=5))
    with pytest.raises(TrialStopped):
        reporter(accuracy=0.2)
    thread.join(5)
    assert json.loads(seen[0]) == {"v": 1, "op": "adopt"}
    assert json.loads(seen[1]) == {"seq": 2, "metrics": {"accuracy": 0.2}}


def test_a_daemon_that_refuses_the_trial_ends_it(sock_path):
    seen: list[bytes] = []
    refusal = b'{"v":1,"error":{"code":"not_found","message":"no trial of process 9"}}\n'
    thread = _daemon(sock_path, refusal, seen)
    reporter = _orphaned_reporter(Reconnect(sock_path, timeout=5))
    with pytest.raises(ChannelClosed, match="no trial of process 9"):
        reporter(accuracy=0.2)
    thread.join(5)


def test_nobody_listening_gives_up_after_the_timeout(sock_path):
    now = [0.0]
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        now[0] += seconds

    reconnect = Reconnect(sock_path, timeout=3, clock=lambda: now[0], sleep=sleep)
    reporter = _orphaned_reporter(reconnect)
    with pytest.raises(ChannelClosed, match="within 3 s"):
        reporter(accuracy=0.2)
    assert waits[:3] == [0.05, 0.1, 0.2] and max(waits) == 1.0 and now[0] >= 3
