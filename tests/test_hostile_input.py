"""No input from the control socket can crash the daemon or make it grow: random,
malformed, oversized and ill-typed frames against a real daemon."""

from __future__ import annotations

import json
import os
import random
import socket
import time
from collections import Counter

import pytest
from helpers import toy_spec

from tuned.daemon.control import MAX_BAD_FRAMES
from tuned.protocol.control import ERRORS

#: Ops fuzzed with ill-typed arguments (never "delete": the fuzz names "toy", which must stay),
#: plus an empty op and one no daemon has.
OPS = ["hello", "status", "experiments", "trials", "best", "curves", "submit", "stop",
       "pause", "resume", "kill", "logs", "watch", "adopt", "nope", ""]
VALUES = [None, True, 0, -1, 2**70, 1.5, float("inf"), "", "x" * 300, "toy", [], [1, "a"],
          {}, {"a": {"b": []}}, "../../etc/passwd", "\u0000\ud800"]
_MISSING = object()  # a request without "v"
VERSIONS = [1, 1, 1, 1, 2, 0, "1", 1.0, True, None, _MISSING]
HELLO = b'{"v": 1, "op": "hello"}\n'
HELLO_EVERY = 16  # frames between two hellos: bad-frame runs stay below the server's limit
assert HELLO_EVERY < MAX_BAD_FRAMES
#: What a known op with ill-typed arguments may get: an ok answer or a table error, but
#: never "internal" (an op that failed unexpectedly).
ANY_ANSWER = frozenset({"ok", *ERRORS}) - {"internal"}
#: The answers of valid requests, by op (a known op not listed: `ANY_ANSWER`).
OP_ANSWERS = {"hello": frozenset({"ok"}), "adopt": frozenset({"not_found"}),
              "nope": frozenset({"unknown_op"})}


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def _junk(rng: random.Random) -> bytes:
    """Random bytes on one line, never a blank line (that would get no answer)."""
    while True:
        junk = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 200)))
        junk = junk.replace(b"\n", b" ")
        if junk.strip():
            return junk + b"\n"


def _request(rng: random.Random) -> object:
    """A request with a random version and op and ill-typed arguments, sometimes wrapped
    in a value that is no request object."""
    request: dict = {"op": rng.choice(OPS)}
    version = rng.choice(VERSIONS)
    if version is not _MISSING:
        request["v"] = version
    for key in rng.sample(["experiment", "trial", "limit", "offset", "top", "metric", "text",
                           "filename", "workdir", "topics"], rng.randint(0, 4)):
        request[key] = rng.choice(VALUES)
    if rng.random() < 0.1:
        return rng.choice([[request], "string", 7, None, True, 1.5])
    return request


def _frame(rng: random.Random) -> bytes:
    """One hostile, non-blank line: junk bytes, broken JSON, or an ill-typed request."""
    kind = rng.random()
    if kind < 0.2:
        return _junk(rng)
    if kind < 0.3:
        return b'{"v": 1, "op": "status", ' + b"[" * rng.randint(1, 5000) + b"\n"
    return json.dumps(_request(rng), allow_nan=True).encode() + b"\n"  # inf: "Infinity"


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def expected(line: bytes) -> frozenset[str]:
    """The answers the daemon may give `line` ("ok" or an error code), from the protocol's
    contract: not UTF-8 JSON (NaN and Infinity are not JSON) -> bad_json; not an object, or
    no "v" (or null) -> bad_request; "v" other than the integer 1 -> unsupported_version;
    "op" not a non-empty string -> bad_request; then by op (`OP_ANSWERS`, `ANY_ANSWER`)."""
    try:
        value = json.loads(line.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return frozenset({"bad_json"})
    if not isinstance(value, dict) or value.get("v") is None:
        return frozenset({"bad_request"})
    if type(value["v"]) is not int or value["v"] != 1:
        return frozenset({"unsupported_version"})
    op = value.get("op")
    if not isinstance(op, str) or not op:
        return frozenset({"bad_request"})
    return OP_ANSWERS.get(op, ANY_ANSWER)


def answer_code(answer: object) -> str:
    """"ok" or the error code of a well-formed protocol-1 answer; AssertionError for any
    other frame."""
    assert isinstance(answer, dict) and type(answer.get("v")) is int and answer["v"] == 1, \
        answer
    if answer.get("ok") is True and "error" not in answer:
        return "ok"
    error = answer.get("error")
    assert isinstance(error, dict) and isinstance(error.get("message"), str), answer
    code = error.get("code")
    assert code in ERRORS, answer
    return code


class _Conn:
    """One client connection that sends a frame and reads exactly its answer line; it
    says hello every `HELLO_EVERY` frames, so that the server never drops it."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.buffer = b""
        self.frames = 0  # sent since the last hello
        self.sent = self.answered = 0  # frames of any kind, hellos included

    def ask(self, line: bytes) -> object:
        """Send one non-blank line; its answer, parsed. AssertionError if the server
        closes the connection instead."""
        if self.frames == HELLO_EVERY:
            self.hello()
        self.frames += 1
        return self._exchange(line)

    def hello(self) -> None:
        """Say hello; assert the answer is ok (which ends any run of bad frames)."""
        assert answer_code(self._exchange(HELLO)) == "ok"
        self.frames = 0

    def _exchange(self, line: bytes) -> object:
        dropped = f"the daemon dropped the connection; frame {line[:120]!r}"
        try:
            self.sock.sendall(line)
            self.sent += 1
            while b"\n" not in self.buffer:
                data = self.sock.recv(1 << 20)
                assert data, dropped
                self.buffer += data
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise AssertionError(f"{dropped}: {exc}") from None
        answer, self.buffer = self.buffer.split(b"\n", 1)
        assert not self.buffer, "more than one answer line to one frame"
        self.answered += 1
        return json.loads(answer)

    def close(self) -> None:
        self.sock.close()


class _Fuzz:
    """Frames sent one at a time over a few connections, every answer checked."""

    def __init__(self, path: str, rng: random.Random, connections: int = 4):
        self.path, self.rng = path, rng
        self.conns = [_Conn(path) for _ in range(connections)]
        self.closed: list[_Conn] = []
        self.hostile = 0  # hostile frames sent (hellos not included)
        self.answers: Counter[str] = Counter()  # their answers by code

    def send(self, count: int) -> None:
        """Send `count` hostile frames; assert each answer is the one its frame must get."""
        for _ in range(count):
            line = _frame(self.rng)
            index = self.rng.randrange(len(self.conns))
            code = answer_code(self.conns[index].ask(line))
            self.hostile += 1
            self.answers[code] += 1
            assert code in expected(line), f"{line[:200]!r} answered {code}"
            if code == "ok" and json.loads(line).get("op") == "watch":
                self.closed.append(self.conns[index])  # its events would interleave
                self.conns[index].close()
                self.conns[index] = _Conn(self.path)

    def close(self) -> None:
        """Check that every connection is still served (none was dropped), then close."""
        for conn in self.conns:
            conn.hello()
            conn.close()
        self.closed += self.conns

    def totals(self) -> tuple[int, int]:
        """Frames sent and answers read, over every connection, hellos included."""
        return (sum(c.sent for c in self.closed), sum(c.answered for c in self.closed))


@pytest.mark.slow
def test_ten_thousand_hostile_frames_leave_the_daemon_up_and_small(daemon, tmp_path):
    count = int(os.environ.get("TUNED_FUZZ_FRAMES", "10000"))
    assert daemon.ctl("submit", toy_spec(tmp_path, "toy", trials=3)).returncode == 0
    daemon.wait_state("toy", ("COMPLETED",))
    fuzz = _Fuzz(daemon.sock, random.Random(2026))
    fuzz.send(200)  # warm up: caches, first answers of every op
    before = _rss_kib(daemon.proc.pid)
    started = time.monotonic()
    fuzz.send(count)
    seconds = time.monotonic() - started
    grew = _rss_kib(daemon.proc.pid) - before
    fuzz.close()
    sent, answered = fuzz.totals()
    assert fuzz.hostile == count + 200 and sum(fuzz.answers.values()) == fuzz.hostile
    assert answered == sent > fuzz.hostile  # every frame answered, hellos too
    assert "internal" not in fuzz.answers
    assert daemon.proc.poll() is None
    assert daemon.json("status", "toy")["experiments"][0]["state"] == "COMPLETED"
    assert grew < 10 * 1024, f"RSS grew by {grew} KiB"
    daemon.stop()
    log = daemon.log()
    assert "Traceback" not in log and "too many bad frames" not in log
    print(f"fuzz: {fuzz.hostile} hostile frames + {sent - fuzz.hostile} hellos, "
          f"{answered} answers, by code {dict(fuzz.answers.most_common())}, {count} frames "
          f"in {seconds:.1f} s, RSS {before} KiB -> +{grew} KiB, daemon up")


def test_a_client_that_never_reads_holds_up_nobody(daemon):
    hog = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    hog.connect(daemon.sock)
    hog.sendall(b'{"v": 1, "op": "watch"}\n' + b'{"v": 1, "op": "status"}\n' * 20000)
    started = time.monotonic()
    for _ in range(5):
        assert daemon.json("status")["experiments"] == []
    assert time.monotonic() - started < 5
    hog.close()
