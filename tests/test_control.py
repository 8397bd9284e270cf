"""The control channel: wire format (`tuned.protocol.control`) and transport
(`tuned.daemon.control`).

Real Unix sockets in short temporary directories under /tmp (socket paths must fit in 108
bytes); the server runs in a small selector loop thread like the daemon's.
"""

from __future__ import annotations

import ast
import json
import os
import selectors
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_until
from hypothesis import given, settings
from hypothesis import strategies as st

from tuned import __version__
from tuned.daemon.control import (
    AlreadyRunning,
    Connection,
    ControlClient,
    ControlError,
    ControlServer,
    DaemonNotRunning,
    Deferred,
    Handoff,
    InsecureDirectory,
    Subscribe,
    topic_matches,
)
from tuned.protocol import control as P
from tuned.protocol.control import MAX_FRAME, ProtocolError, RemoteError, ok

# -- protocol ------------------------------------------------------------------------------


def test_protocol_module_imports_only_the_stdlib():
    tree = ast.parse(Path(P.__file__).read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
             for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree)
              if isinstance(n, ast.ImportFrom) and n.module}
    assert names <= set(sys.stdlib_module_names) | {"__future__"}, names


def test_encode_is_one_compact_line_and_refuses_nan():
    assert P.encode({"v": 1, "a": [1, "é\n"]}) == b'{"v":1,"a":[1,"\\u00e9\\n"]}\n'
    with pytest.raises(ValueError):
        P.encode({"x": float("nan")})
    with pytest.raises(TypeError):
        P.encode({"x": object()})


def test_error_table_and_exit_codes():
    assert P.exit_code_for("not_found") == P.EXIT_NOT_FOUND == 4
    for code in ("bad_json", "bad_request", "frame_too_large", "unsupported_version",
                 "unknown_op", "invalid", "conflict", "internal", "forbidden"):
        assert P.ERRORS[code].exit_code == 1
    assert P.exit_code_for("from_the_future") == 1
    assert P.error("not_found", "no x") == {"v": 1, "error": {"code": "not_found",
                                                              "message": "no x"}}
    with pytest.raises(ValueError):
        P.error("made_up", "x")
    assert P.ok(a=1) == {"v": 1, "ok": True, "a": 1}
    assert P.as_answer({"a": 1}) == {"v": 1, "ok": True, "a": 1}
    assert P.as_answer(P.error("invalid", "x")) == P.error("invalid", "x")
    with pytest.raises(TypeError):
        P.as_answer([1])
    assert ProtocolError("not_found", "x").exit_code == 4


@pytest.mark.parametrize("frame, code", [
    ([1], "bad_request"),
    ({"op": "status"}, "bad_request"),
    ({"v": 2, "op": "status"}, "unsupported_version"),
    ({"v": True, "op": "status"}, "unsupported_version"),
    ({"v": 1.0, "op": "status"}, "unsupported_version"),
    ({"v": "1", "op": "status"}, "unsupported_version"),
    ({"v": 1}, "bad_request"),
    ({"v": 1, "op": ""}, "bad_request"),
    ({"v": 1, "op": 3}, "bad_request"),
])
def test_check_request_refuses(frame, code):
    with pytest.raises(ProtocolError) as info:
        P.check_request(frame)
    assert info.value.code == code


def test_check_request_names_both_versions_and_splits_args():
    with pytest.raises(ProtocolError, match="version 7.*version 1"):
        P.check_request({"v": 7, "op": "x"})
    assert P.check_request({"v": 1, "op": "trials", "exp": "a"}) == ("trials", {"exp": "a"})


def test_check_response():
    assert P.check_response({"v": 1, "ok": True}) == {"v": 1, "ok": True}
    with pytest.raises(ProtocolError) as info:
        P.check_response({"v": 2, "ok": True})
    assert info.value.code == "unsupported_version"
    with pytest.raises(RemoteError) as info:
        P.check_response({"v": 1, "error": {"code": "not_found", "message": "m"}})
    assert (info.value.code, info.value.message, info.value.exit_code) == ("not_found", "m", 4)


def test_line_decoder_junk_and_blank_lines():
    d = P.LineDecoder()
    out = d.feed(b'{"a":1}\n\n  \nnope\n\xff\xfe\nNaN\n' + b"[" * 100_000 + b"\n[1")
    assert out[0] == {"a": 1}
    assert [e.code for e in out[1:]] == ["bad_json"] * 4
    assert d.pending == 2
    assert d.feed(b"]\n") == [[1]]


def test_line_decoder_oversized_line_is_reported_once_and_skipped():
    d = P.LineDecoder(max_frame=10)
    out = d.feed(b"x" * 11)
    assert [e.code for e in out] == ["frame_too_large"]
    assert d.feed(b"y" * 1000) == [] and d.pending == 0
    assert d.feed(b'zz\n{"b":2}\n') == [{"b": 2}]
    # A complete oversized line in one chunk; a line of exactly max_frame bytes passes.
    out = d.feed(b'"' + b"a" * 10 + b'"\n"' + b"a" * 8 + b'"\n')
    assert out[0].code == "frame_too_large" and out[1] == "a" * 8


def test_line_decoder_close_parses_a_last_unterminated_line():
    d = P.LineDecoder()
    assert d.feed(b'{"v":1}') == []
    assert d.close() == [{"v": 1}]
    assert d.pending == 0 and d.close() == []


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=60, deadline=None)
@given(st.lists(json_values, max_size=6), st.lists(st.integers(1, 40), max_size=20))
def test_line_decoder_round_trips_any_chunking(values, cuts):
    data = b"".join(P.encode(v) for v in values)
    d, out, pos = P.LineDecoder(), [], 0
    for cut in cuts:
        out += d.feed(data[pos:pos + cut])
        pos += cut
    out += d.feed(data[pos:])
    assert out == values and d.pending == 0


def test_topic_matching():
    assert topic_matches(None, "anything")
    assert topic_matches(frozenset({"exp/3"}), "exp/3")
    assert topic_matches(frozenset({"exp/3"}), "exp/3/trial/7")
    assert not topic_matches(frozenset({"exp/3"}), "exp/30")
    assert Subscribe("exp/1").topics == frozenset({"exp/1"})


# -- a daemon-like loop ------------------------------------------------------------------


class Loop:
    """Drives one server's selector in a thread, like the daemon's main loop.

    `call(fn, ...)` runs fn in the loop thread (the server is single-threaded) and returns
    its result. An exception escaping the server fails the test at `stop()`.
    """

    def __init__(self, server: ControlServer) -> None:
        self.server = server
        self.sel = selectors.DefaultSelector()
        server.register(self.sel)
        self._calls: list[tuple[Callable[[], Any], Future]] = []
        self._lock = threading.Lock()
        self._stop = False
        self.failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop:
                for key, mask in self.sel.select(0.005):
                    assert self.server.handle(key, mask)
                with self._lock:
                    calls, self._calls = self._calls, []
                for fn, fut in calls:
                    try:
                        fut.set_result(fn())
                    except BaseException as exc:  # handed to the caller
                        fut.set_exception(exc)
                self.server.sweep()
        except BaseException as exc:
            self.failure = exc

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        fut: Future = Future()
        with self._lock:
            self._calls.append((lambda: fn(*args), fut))
        return fut.result(timeout=5)

    def stop(self) -> None:
        self._stop = True
        self._thread.join(5)
        self.server.close()
        self.sel.close()
        if self.failure is not None:
            raise self.failure


OPS = ["echo", "boom", "missing", "big", "watch", "nan", "bad", "fields", "taken"]


class OpError(Exception):
    """A daemon's own error class: any exception with a table `code` and a `message`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def handler(op: str, args: dict[str, Any], conn: Connection) -> Any:
    if op == "fields":
        return {"trials": [], "n": 3}
    if op == "taken":
        raise OpError("conflict", "name 'a' is taken")
    if op == "echo":
        return ok(args=args, uid=conn.uid, pid=conn.pid, greeted=conn.greeted)
    if op == "boom":
        raise RuntimeError("kaput")
    if op == "missing":
        raise ProtocolError("not_found", "no experiment 'x'")
    if op == "big":
        return ok(data="x" * args["n"])
    if op == "watch":
        return Subscribe(args.get("topics"), ok(watching=True))
    if op == "nan":
        return ok(x=float("nan"))
    return 42


@pytest.fixture
def sock_path() -> Iterator[str]:
    base = tempfile.mkdtemp(prefix="t", dir="/tmp")
    yield os.path.join(base, "run", "ctl.sock")
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def serve(sock_path):
    loops: list[Loop] = []

    def start(**kw: Any) -> tuple[ControlServer, Loop]:
        server = ControlServer(sock_path, kw.pop("handler", handler), ops=OPS, **kw).open()
        loops.append(Loop(server))
        return server, loops[-1]

    yield start
    for loop in loops:
        loop.stop()


def raw(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    return s


def answers(s: socket.socket, n: int) -> list[dict]:
    f = s.makefile("rb")
    return [json.loads(f.readline()) for _ in range(n)]


def read_to_end(s: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            data = s.recv(1 << 16)
        except ConnectionResetError:
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


# -- requests and answers ----------------------------------------------------------------


def test_request_response_on_one_connection(serve, sock_path):
    serve()
    with ControlClient(sock_path) as c:
        a = c.request("echo", a=1, op_arg="x")
        b = c.request("echo", b=[1, 2])
    assert a == {"v": 1, "ok": True, "args": {"a": 1, "op_arg": "x"}, "uid": os.getuid(),
                 "pid": os.getpid(), "greeted": False}
    assert b["args"] == {"b": [1, 2]}


def test_hello_handshake(serve, sock_path):
    serve()
    with ControlClient(sock_path) as c:
        h = c.hello()
        assert c.request("echo")["greeted"] is True
    assert h == {"v": 1, "ok": True, "server": "tuned", "version": __version__,
                 "protocol": 1, "ops": sorted(OPS + ["hello"])}


def test_answers_are_completed_and_errors_may_come_from_any_coded_exception(
        serve, sock_path, caplog):
    serve()
    with ControlClient(sock_path) as c:
        assert c.request("fields") == {"v": 1, "ok": True, "trials": [], "n": 3}
        with pytest.raises(RemoteError) as info:
            c.request("taken")
        assert (info.value.code, info.value.message) == ("conflict", "name 'a' is taken")
    assert not [r for r in caplog.records if r.exc_info]


def test_hello_from_a_handler_that_serves_it(sock_path):
    def serves_hello(op: str, args: dict[str, Any], conn: Connection) -> Any:
        if op == "hello":
            return {"pid": 42, "ops": ["hello", "status"]}
        raise ProtocolError("unknown_op", op)

    def lacks_hello(op: str, args: dict[str, Any], conn: Connection) -> Any:
        raise OpError("unknown_op", f"unknown op {op!r}")

    for h, expected in ((serves_hello, {"pid": 42, "ops": ["hello", "status"]}),
                        (lacks_hello, {"ops": ["hello"]})):
        server = ControlServer(sock_path, h).open()
        loop = Loop(server)
        try:
            with ControlClient(sock_path) as c:
                assert c.hello() == {"v": 1, "ok": True, "server": "tuned", "protocol": 1,
                                     "version": __version__, **expected}
        finally:
            loop.stop()


def test_error_answers_carry_exit_codes(serve, sock_path):
    serve()
    with ControlClient(sock_path) as c:
        with pytest.raises(RemoteError) as info:
            c.request("nope")
        assert (info.value.code, info.value.exit_code) == ("unknown_op", 1)
        with pytest.raises(RemoteError) as info:
            c.request("missing")
        assert (info.value.code, info.value.exit_code) == ("not_found", 4)
        assert c.request("echo")["ok"]


def test_unsupported_version_keeps_the_connection(serve, sock_path):
    serve()
    with raw(sock_path) as s:
        s.sendall(b'{"v":2,"op":"echo"}\n{"v":1,"op":"echo"}\n')
        bad, good = answers(s, 2)
    assert bad["v"] == 1 and bad["error"]["code"] == "unsupported_version"
    assert "2" in bad["error"]["message"] and "1" in bad["error"]["message"]
    assert good["ok"]


def test_junk_lines_get_errors_and_the_connection_still_works(serve, sock_path):
    serve()
    with raw(sock_path) as s:
        s.sendall(b'not json\n\xff\n[1]\n{"v":1}\n\n{"v":1,"op":"echo"}\n')
        out = answers(s, 5)
    assert [a["error"]["code"] for a in out[:4]] == ["bad_json", "bad_json", "bad_request",
                                                     "bad_request"]
    assert out[4]["ok"]


def test_frame_over_one_mib_is_refused_and_the_server_stays_up(serve, sock_path):
    serve()
    exact = b'{"v":1,"op":"echo","pad":"' + b"p" * MAX_FRAME
    exact = exact[:MAX_FRAME - 2] + b'"}'
    assert len(exact) == MAX_FRAME
    with raw(sock_path) as s:
        s.sendall(b"x" * (MAX_FRAME + 10) + b'\n{"v":1,"op":"echo"}\n' + exact + b"\n")
        too_large, after, at_limit = answers(s, 3)
    assert too_large["error"]["code"] == "frame_too_large"
    assert after["ok"] and at_limit["ok"]
    with ControlClient(sock_path) as c:
        assert c.request("echo")["ok"]
        with pytest.raises(ProtocolError) as info:  # refused before sending
            c.request("echo", pad="p" * MAX_FRAME)
        assert info.value.code == "frame_too_large"


def test_a_client_sending_only_junk_is_dropped(serve, sock_path):
    server, loop = serve(max_bad_frames=3)
    with raw(sock_path) as s:
        s.sendall(b"junk\n" * 6)
        lines = read_to_end(s).splitlines()
    assert [json.loads(x)["error"]["code"] for x in lines] == ["bad_json"] * 4
    assert loop.call(lambda: server.connections) == []
    with ControlClient(sock_path) as c:
        assert c.request("echo")["ok"]


def test_handler_failures_are_internal_errors(serve, sock_path, caplog):
    serve()
    with ControlClient(sock_path) as c:
        for op in ("boom", "nan", "bad"):
            with pytest.raises(RemoteError) as info:
                c.request(op)
            assert info.value.code == "internal"
            assert op != "boom" or "RuntimeError: kaput" in info.value.message
        assert c.request("echo")["ok"]
    boom = [r for r in caplog.records if r.name == "tuned.daemon.control" and r.exc_info]
    assert len(boom) == 3 and "kaput" in str(boom[0].exc_info[1])


def test_half_closed_client_gets_its_answers(serve, sock_path):
    serve()
    with raw(sock_path) as s:
        s.sendall(b'{"v":1,"op":"echo"}\n{"v":1,"op":"echo","last":true}')  # no newline
        s.shutdown(socket.SHUT_WR)
        lines = read_to_end(s).splitlines()
    assert [json.loads(x)["ok"] for x in lines] == [True, True]
    assert json.loads(lines[1])["args"] == {"last": True}


def test_client_checks_the_answers_version(sock_path):
    os.makedirs(os.path.dirname(sock_path), mode=0o700)
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(sock_path)
    lst.listen(1)

    def fake_daemon() -> None:
        conn, _ = lst.accept()
        with conn:
            conn.makefile("rb").readline()
            conn.sendall(b'{"v":2,"ok":true}\n')

    t = threading.Thread(target=fake_daemon)
    t.start()
    try:
        with ControlClient(sock_path) as c, pytest.raises(ProtocolError) as info:
            c.request("status")
        assert info.value.code == "unsupported_version"
    finally:
        t.join(5)
        lst.close()


# -- the socket file ---------------------------------------------------------------------


def test_socket_is_0600_in_a_0700_directory(serve, sock_path):
    umask = os.umask(0o022)
    os.umask(umask)
    serve()
    st_sock, st_dir = os.lstat(sock_path), os.stat(os.path.dirname(sock_path))
    assert stat.S_ISSOCK(st_sock.st_mode) and stat.S_IMODE(st_sock.st_mode) == 0o600
    assert stat.S_IMODE(st_dir.st_mode) == 0o700
    assert os.listdir(os.path.dirname(sock_path)) == ["ctl.sock"]  # no temp name left
    assert os.umask(umask) == umask  # restored


def test_loose_or_foreign_directory_is_refused(sock_path):
    os.makedirs(os.path.dirname(sock_path), mode=0o755)
    os.chmod(os.path.dirname(sock_path), 0o755)
    with pytest.raises(InsecureDirectory, match="0755"):
        ControlServer(sock_path, handler).open()
    if os.geteuid() == 0:
        os.chmod(os.path.dirname(sock_path), 0o700)
        os.chown(os.path.dirname(sock_path), 65534, 65534)
        with pytest.raises(InsecureDirectory, match="owned by uid 65534"):
            ControlServer(sock_path, handler).open()
    assert not os.path.exists(sock_path)


def test_second_server_on_the_same_path_is_refused(serve, sock_path):
    serve()
    with pytest.raises(AlreadyRunning):
        ControlServer(sock_path, handler).open()
    with ControlClient(sock_path) as c:  # the first one is untouched
        assert c.request("echo")["ok"]


def _leave_stale_socket(path: str, how: str) -> None:
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    if how == "closed":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path)
        s.listen(1)
        s.close()
    else:
        code = ("import os, socket, sys; s = socket.socket(socket.AF_UNIX); "
                "s.bind(sys.argv[1]); s.listen(1); os._exit(0)")
        subprocess.run([sys.executable, "-c", code, path], check=True, timeout=10)
    assert stat.S_ISSOCK(os.lstat(path).st_mode)


@pytest.mark.parametrize("how", ["closed", "exited"])
def test_stale_socket_is_replaced(serve, sock_path, how):
    _leave_stale_socket(sock_path, how)
    with pytest.raises(DaemonNotRunning) as info:
        ControlClient(sock_path).request("echo")
    assert info.value.exit_code == 3
    serve()
    with ControlClient(sock_path) as c:
        assert c.request("echo")["ok"]


def test_a_file_that_is_not_a_socket_is_left_alone(sock_path):
    os.makedirs(os.path.dirname(sock_path), mode=0o700)
    Path(sock_path).write_text("precious")
    with pytest.raises(ControlError, match="not a socket"):
        ControlServer(sock_path, handler).open()
    assert Path(sock_path).read_text() == "precious"


def test_socket_path_too_long_is_a_clear_error(sock_path):
    with pytest.raises(ControlError, match="longer than"):
        ControlServer(os.path.join(os.path.dirname(sock_path), "x" * 120), handler).open()


def test_close_unlinks_only_its_own_socket(sock_path):
    a = ControlServer(sock_path, handler).open()
    os.unlink(sock_path)  # someone removed it, and a new server took the path
    b = ControlServer(sock_path, handler).open()
    a.close()
    assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
    b.close()
    b.close()
    assert not os.path.exists(sock_path)


def test_daemon_not_running(sock_path):
    with pytest.raises(DaemonNotRunning) as info:
        ControlClient(sock_path).request("status")
    assert info.value.exit_code == 3


def test_the_client_is_tuned_client_s_and_control_re_exports_it():
    import tuned.daemon.client as client

    assert (ControlClient, ControlError, DaemonNotRunning) == (
        client.ControlClient, client.ControlError, client.DaemonNotRunning)
    assert issubclass(AlreadyRunning, client.ControlError)
    assert issubclass(InsecureDirectory, client.ControlError)


# -- peers ---------------------------------------------------------------------------------


def test_a_peer_of_another_uid_is_forbidden(serve, sock_path):
    server, loop = serve(allowed_uid=os.getuid() + 1, allow_root=False)
    with ControlClient(sock_path) as c, pytest.raises(RemoteError) as info:
        c.request("echo")
    assert info.value.code == "forbidden"
    assert loop.call(lambda: server.connections) == []
    # The refusal may come before the request is sent: the client still reports it.
    with ControlClient(sock_path) as c:
        assert c._sock is not None and c._sock.recv(1, socket.MSG_PEEK) == b"{"
        wait_until(lambda: c._sock.recv(1 << 16, socket.MSG_PEEK).endswith(b"\n"))
        time.sleep(0.05)  # the server has closed its end by now
        with pytest.raises(RemoteError) as info:
            c.request("echo")
        assert info.value.code == "forbidden"


def _runs_as_nobody(python: str) -> bool:
    try:
        return subprocess.run([python, "-I", "-c", "import socket"], user=65534, group=65534,
                              extra_groups=[], cwd="/", capture_output=True,
                              timeout=20).returncode == 0
    except OSError:
        return False


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as uid 65534")
def test_a_real_process_of_another_uid_is_forbidden(serve, sock_path):
    serve()  # allowed: this uid (root)
    # Loosen the file permissions so that the peer check alone stands in the way.
    run_dir = os.path.dirname(sock_path)
    for d in (os.path.dirname(run_dir), run_dir):
        os.chmod(d, 0o711)
    os.chmod(sock_path, 0o666)
    code = ("import socket,sys; s=socket.socket(socket.AF_UNIX); s.settimeout(5); "
            "s.connect(sys.argv[1]); print(s.makefile('rb').readline().decode(), end='')")
    python = next((p for p in (sys.executable, sys._base_executable, "/usr/bin/python3")
                   if _runs_as_nobody(p)), None)
    if python is None:
        pytest.skip("no Python interpreter that uid 65534 may run")
    out = subprocess.run([python, "-I", "-c", code, sock_path], user=65534, group=65534,
                         extra_groups=[], cwd="/", capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert answer["error"]["code"] == "forbidden" and "65534" in answer["error"]["message"]


def test_too_many_clients_are_told_busy(serve, sock_path):
    serve(max_clients=1)
    with ControlClient(sock_path) as first:
        assert first.request("echo")["ok"]
        with ControlClient(sock_path) as second, pytest.raises(RemoteError) as info:
            second.request("echo")
        assert info.value.code == "busy"


def test_idle_clients_are_closed_watchers_are_not(serve, sock_path):
    now = [1000.0]
    server, loop = serve(clock=lambda: now[0], idle_timeout=300)
    idle = raw(sock_path)
    watcher = ControlClient(sock_path, stream_timeout=5)
    frames = watcher.stream("watch")
    assert next(frames)["watching"]
    idle.sendall(b'{"v":1,"op":"echo"}\n')
    assert answers(idle, 1)[0]["ok"]
    loop.call(lambda: None)  # the server is done with that answer (it stamps the time after)
    now[0] += 301
    wait_until(lambda: len(loop.call(lambda: server.connections)) == 1)
    assert read_to_end(idle) == b""
    assert loop.call(server.broadcast, {"event": "still here"}, "t") == 1
    assert next(frames)["event"] == "still here"
    frames.close()
    idle.close()


# -- slow and hostile clients --------------------------------------------------------------


def test_a_client_that_never_reads_blocks_nobody_and_is_dropped(serve, sock_path):
    server, loop = serve(output_cap=256 << 10)
    slow = raw(sock_path)
    slow.sendall(b'{"v":1,"op":"big","n":65536}\n' * 100)  # 6.4 MiB of answers, unread
    time.sleep(0.05)
    with ControlClient(sock_path, timeout=2) as c:
        t0 = time.monotonic()
        assert c.request("echo")["ok"]
        assert time.monotonic() - t0 < 1.0
        wait_until(lambda: len(loop.call(lambda: server.connections)) == 1)
        assert c.request("echo")["ok"]
    got = read_to_end(slow)
    assert 0 < len(got) < 100 * 65536
    slow.close()


def test_a_watcher_that_never_reads_is_dropped_and_broadcast_never_blocks(serve, sock_path):
    server, loop = serve(output_cap=256 << 10)
    slow = raw(sock_path)
    slow.sendall(b'{"v":1,"op":"watch"}\n')
    wait_until(lambda: any(c.watching for c in loop.call(lambda: server.connections)))
    event = {"event": "report", "blob": "b" * 65536}
    t0 = time.monotonic()
    reached = [loop.call(server.broadcast, event, "exp/1") for _ in range(100)]
    assert time.monotonic() - t0 < 2.0
    assert reached[0] == 1 and reached[-1] == 0
    assert loop.call(lambda: server.connections) == []
    with ControlClient(sock_path) as c:
        assert c.request("echo")["ok"]
    slow.close()


def test_broadcast_reaches_matching_watchers(serve, sock_path):
    server, loop = serve()
    one = ControlClient(sock_path, stream_timeout=5).stream("watch", topics=["exp/1"])
    every = ControlClient(sock_path, stream_timeout=5).stream("watch")
    assert next(one) == {"v": 1, "ok": True, "watching": True}
    assert next(every)["watching"]
    with ControlClient(sock_path) as plain:
        plain.request("echo")
        assert loop.call(server.broadcast, {"event": "report", "r": 0.5}, "exp/1/trial/3") == 2
        assert loop.call(server.broadcast, {"event": "start"}, "exp/2") == 1
        assert plain.request("echo")["args"] == {}  # no event came to a non-watcher
    assert next(one) == {"v": 1, "topic": "exp/1/trial/3", "event": "report", "r": 0.5}
    assert next(every)["topic"] == "exp/1/trial/3"
    assert next(every) == {"v": 1, "topic": "exp/2", "event": "start"}
    conn = loop.call(lambda: server.connections)[0]
    assert loop.call(server.send, conn, {"event": "direct"})
    assert next(one)["event"] == "direct"
    loop.call(server.close)  # the daemon stops: streams end
    assert list(one) == [] and list(every) == []


def test_a_handoff_answers_then_gives_the_socket_away(sock_path):
    taken: list[tuple[socket.socket, bytes]] = []

    def handing(op: str, args: dict[str, Any], conn: Connection) -> Any:
        return Handoff({"trial": 7, "pid": conn.pid}, lambda s, rest: taken.append((s, rest)))

    server = ControlServer(sock_path, handing, ops=["adopt"]).open()
    loop = Loop(server)
    try:
        s = raw(sock_path)
        s.sendall(b'{"v":1,"op":"adopt"}\n{"seq":1')
        assert answers(s, 1) == [{"v": 1, "ok": True, "trial": 7, "pid": os.getpid()}]
        wait_until(lambda: bool(taken))
        assert loop.call(lambda: server.connections) == []
        theirs, rest = taken[0]
        assert rest == b'{"seq":1'  # an incomplete line goes with the socket
        theirs.setblocking(True)
        s.sendall(b',"x":2}\n')
        assert theirs.recv(100) == b',"x":2}\n'  # the server reads it no more
        theirs.sendall(b"hi\n")
        assert s.recv(100) == b"hi\n"
        theirs.close()
        s.close()
    finally:
        loop.stop()


def test_a_deferred_answer_keeps_later_requests_in_order(sock_path):
    pending: list[Deferred] = []

    def deferring(op: str, args: dict[str, Any], conn: Connection) -> Any:
        if op == "slow":
            pending.append(Deferred())
            return pending[-1]
        return {"echo": args.get("n")}

    server = ControlServer(sock_path, deferring, ops=["slow", "fast"], idle_timeout=5).open()
    loop = Loop(server)
    try:
        s = raw(sock_path)
        s.sendall(b'{"v":1,"op":"slow"}\n{"v":1,"op":"fast","n":2}\n')
        wait_until(lambda: bool(pending))
        other = raw(sock_path)  # the loop serves others meanwhile
        other.sendall(b'{"v":1,"op":"fast","n":9}\n')
        assert answers(other, 1)[0]["echo"] == 9
        other.close()
        wait_until(lambda: len(loop.call(lambda: server.connections)) == 1)
        loop.call(server.sweep, 1e9)  # long idle: the waiting client is kept
        assert len(loop.call(lambda: server.connections)) == 1
        assert loop.call(server.resolve, pending[0], {"done": True})
        assert answers(s, 2) == [{"v": 1, "ok": True, "done": True},
                                 {"v": 1, "ok": True, "echo": 2}]
        assert not loop.call(server.resolve, pending[0], {"twice": True})
        s.sendall(b'{"v":1,"op":"slow"}\n')
        wait_until(lambda: len(pending) == 2)
        loop.call(server.resolve, pending[1], ProtocolError("not_found", "gone"))
        assert answers(s, 1)[0]["error"] == {"code": "not_found", "message": "gone"}
        s.close()
    finally:
        loop.stop()
