"""No input from the control socket can crash the daemon or make it grow: random,
malformed, oversized and ill-typed frames against a real daemon."""

from __future__ import annotations

import json
import os
import random
import socket
import time

import pytest
from test_daemon import Daemon, _toy_spec

OPS = ["hello", "status", "experiments", "trials", "best", "curves", "submit", "stop",
       "pause", "resume", "kill", "logs", "watch", "adopt", "nope", ""]
VALUES = [None, True, 0, -1, 2**70, 1.5, float("inf"), "", "x" * 300, "toy", [], [1, "a"],
          {}, {"a": {"b": []}}, "../../etc/passwd", "\u0000\ud800"]


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def _frame(rng: random.Random) -> bytes:
    """One hostile line: junk bytes, broken JSON, or a request with ill-typed arguments."""
    kind = rng.random()
    if kind < 0.2:
        return bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 200))).replace(
            b"\n", b" ") + b"\n"
    if kind < 0.3:
        return b'{"v": 1, "op": "status", ' + b"[" * rng.randint(1, 5000) + b"\n"
    request: dict = {"v": rng.choice([1, 1, 1, 2, "1", None]), "op": rng.choice(OPS)}
    for key in rng.sample(["experiment", "trial", "limit", "offset", "top", "metric", "text",
                           "filename", "workdir", "topics"], rng.randint(0, 4)):
        request[key] = rng.choice(VALUES)
    if rng.random() < 0.1:
        request = rng.choice([[request], "string", 7, None])
    try:
        return json.dumps(request, allow_nan=True).encode() + b"\n"
    except (ValueError, UnicodeEncodeError):
        return b'{"v": 1, "op": "status", "bad": NaN}\n'


class _Conn:
    """A client that reads whatever comes back and reconnects when dropped."""

    def __init__(self, path: str):
        self.path = path
        self.sock: socket.socket | None = None

    def send(self, data: bytes) -> None:
        for _ in range(3):
            if self.sock is None:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.settimeout(5)
                self.sock.connect(self.path)
            try:
                self.sock.sendall(data)
                self._drain()
                return
            except OSError:
                self.sock.close()
                self.sock = None

    def _drain(self) -> None:
        assert self.sock is not None
        self.sock.setblocking(False)
        try:
            while self.sock.recv(1 << 20):
                pass
        except BlockingIOError:
            pass
        finally:
            self.sock.settimeout(5)


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path)
    d.start()
    yield d
    d.stop()


def test_ten_thousand_hostile_frames_leave_the_daemon_up_and_small(daemon, tmp_path):
    count = int(os.environ.get("TUNED_FUZZ_FRAMES", "10000"))
    assert daemon.ctl("submit", _toy_spec(tmp_path, "toy", trials=3)).returncode == 0
    daemon.wait_state("toy", ("COMPLETED",))
    rng = random.Random(2026)
    conns = [_Conn(daemon.sock) for _ in range(4)]
    for _ in range(200):  # warm up: caches, first answers of every op
        rng.choice(conns).send(_frame(rng))
    before = _rss_kib(daemon.proc.pid)
    started = time.monotonic()
    for _ in range(count):
        rng.choice(conns).send(_frame(rng))
    grew = _rss_kib(daemon.proc.pid) - before
    assert daemon.proc.poll() is None
    assert daemon.json("status", "toy")["experiments"][0]["state"] == "COMPLETED"
    assert grew < 10 * 1024, f"RSS grew by {grew} KiB"
    daemon.stop()
    assert "Traceback" not in daemon.log()  # every frame got a proper answer
    print(f"fuzz: {count} frames in {time.monotonic() - started:.1f} s, "
          f"RSS {before} KiB -> +{grew} KiB, daemon up")


def test_a_client_that_never_reads_holds_up_nobody(daemon):
    hog = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    hog.connect(daemon.sock)
    hog.sendall(b'{"v": 1, "op": "watch"}\n' + b'{"v": 1, "op": "status"}\n' * 20000)
    started = time.monotonic()
    for _ in range(5):
        assert daemon.json("status")["experiments"] == []
    assert time.monotonic() - started < 5
    hog.close()
