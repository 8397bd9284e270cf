"""The control channel's transport: a non-blocking Unix-socket server and a blocking client.

Wire format and error table: `tuned.protocol.control`. This module moves frames; the daemon's op
handler decides what they mean.

Server (`ControlServer`), all methods called from the daemon's loop thread only:

- `open()` makes the socket safely: its directory is mode 0700 and owned by this euid
  (created so if missing, refused with `InsecureDirectory` otherwise); an existing socket is
  probed by connecting (refused: stale, replaced; accepted: `AlreadyRunning`); the socket is
  bound under umask 0o177 to a temporary name in that directory and renamed into place, so
  `path` is never a half-made or wrongly-permissioned socket.
- The daemon owns the `selectors` selector: `register(sel)` once, then pass every ready key
  to `handle(key, mask)` (it returns False for keys that are not the server's) and call
  `sweep()` now and then (every second is plenty) to close idle clients.
- Every peer's uid is read with SO_PEERCRED at accept: only `allowed_uid` (and root, unless
  `allow_root=False`) get in; others receive one ``forbidden`` line and are closed.
- Nothing blocks: input is read in bounded chunks and split by a `LineDecoder` (a line
  over 1 MiB is answered ``frame_too_large`` and skipped); output goes to a per-client
  buffer written when the socket is writable. A client is dropped when a message is queued
  while its unsent output already exceeds `output_cap`, after `max_bad_frames` consecutive
  bad frames, when it is idle past `idle_timeout` (watchers are exempt while their output
  drains), or on any socket error. A dropped client never affects another.
- Each request frame becomes `handler(op, args, conn)`; it returns the answer (a dict of
  fields, completed by `protocol.as_answer`: ``"v"`` and ``"ok": true`` added) or a
  `Subscribe` (the client becomes a watcher of some topics and gets `Subscribe.first` as
  its answer), a `Handoff` (the answer is sent, then the socket leaves the server for the
  handler's taker) or a `Deferred` (answered later by `resolve`). To answer with an error
  it raises `ProtocolError(code, message)`, or any exception with a ``code`` from the
  table and a ``message`` attribute. Any other exception (or an answer JSON cannot hold)
  is logged with its traceback and answered ``internal``; the server goes on.
- ``hello`` is always answered: with the server's `hello_response` (server, version,
  protocol, ops), updated by the handler's own hello answer when the handler serves hello
  (`ops` is None or names it; a handler raising ``unknown_op`` for it is fine).
- `broadcast(event, topic)` sends ``{"v": 1, "topic": topic, **event}`` to every watcher
  whose topics match; `send(conn, obj)` sends one frame to one client.

Client (`ControlClient`, defined in `tuned.daemon.client` and re-exported here): blocking, one
connection, `request(op, **args)` and `stream(op, **args)`; raises `DaemonNotRunning` (exit
code 3) when nothing listens, `RemoteError` for error answers (exit code from the table),
`ControlError` otherwise. Every exception of this module, of `tuned.daemon.client` and of
`tuned.protocol.control` carries an `exit_code`.

Linux only: SO_PEERCRED. Where it is missing every connection is refused (fail closed).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import selectors
import socket
import stat
import struct
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from tuned._version import __version__
from tuned.daemon.client import (  # noqa: F401 (re-exported: the client's home before tuned.daemon.client)
    CLIENT_MAX_FRAME,
    ConnectionClosed,
    ControlClient,
    ControlError,
    DaemonNotRunning,
)
from tuned.protocol.control import (
    ERRORS,
    PROTOCOL_VERSION,
    LineDecoder,
    ProtocolError,
    as_answer,
    check_request,
    encode,
    error,
    hello_response,
)

log = logging.getLogger(__name__)

OUTPUT_CAP = 4 << 20  # unsent bytes a client may hold before the next message drops it
IDLE_TIMEOUT = 300.0  # seconds
MAX_BAD_FRAMES = 32  # consecutive bad frames before a client is dropped
MAX_CLIENTS = 128
_READ_CHUNK = 64 << 10
_ACCEPT_BATCH = 16
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes with the terminating NUL
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class AlreadyRunning(ControlError):
    """A live server already accepts connections at the socket path."""


class InsecureDirectory(ControlError):
    """The socket's directory is not a 0700 directory owned by this euid."""


@dataclass
class Connection:
    """What a handler knows of the client that sent a request.

    `pid`, `uid`, `gid` are the peer's credentials at connect time (SO_PEERCRED).
    `greeted` is True once the client sent ``hello``. `topics` is what it watches (None:
    all topics) when `watching` is True.
    """

    id: int
    pid: int
    uid: int
    gid: int
    greeted: bool = False
    watching: bool = False
    topics: frozenset[str] | None = None


@dataclass(frozen=True)
class Subscribe:
    """A handler's answer to a streaming op: make the client a watcher.

    `topics`: the topics to receive (None: every topic). A topic matches an entry equal to it
    or a '/'-separated prefix of it ("exp/3" matches "exp/3" and "exp/3/trial/7").
    `first`: the frame answering the request (default ``ok()``), sent before any event.
    """

    topics: frozenset[str] | None = None
    first: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.topics, str):
            object.__setattr__(self, "topics", frozenset([self.topics]))
        elif self.topics is not None:
            object.__setattr__(self, "topics", frozenset(self.topics))


@dataclass(frozen=True)
class Handoff:
    """A handler's answer that takes the connection away from the server (a trial's
    reporter reconnecting to a restarted daemon: the socket becomes its report channel).

    The server sends `answer` (completed like any answer), forgets the client, and calls
    `take(sock, rest)` with the non-blocking socket and the bytes the client sent after its
    request (frames it sent in the same read are dropped: such a client waits for the
    answer). If the answer cannot be sent at once, the client is dropped and `take` is not
    called.
    """

    answer: dict[str, Any]
    take: Callable[[socket.socket, bytes], None]


class Deferred:
    """A handler's answer that comes later (the daemon waits for a template process without
    blocking its loop). The server answers nothing now and reads no further request of that
    client, so that its answers stay in order, until `ControlServer.resolve(deferred,
    answer)`. A client waiting for a deferred answer is not dropped for being idle."""

    def __init__(self) -> None:
        self.conn_id: int | None = None


Answer = dict[str, Any] | Subscribe | Handoff | Deferred
Handler = Callable[[str, dict[str, Any], Connection], Answer]


def topic_matches(topics: frozenset[str] | None, topic: str) -> bool:
    """Whether `topic` is selected by a watcher's `topics` (see `Subscribe`)."""
    if topics is None or topic in topics:
        return True
    return any(topic.startswith(t + "/") for t in topics)


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of a connected AF_UNIX peer. Raises OSError where unsupported."""
    opt = getattr(socket, "SO_PEERCRED", None)
    if opt is None:
        raise OSError(errno.ENOTSUP, "SO_PEERCRED is not available on this platform")
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, opt, _UCRED.size))
    return pid, uid, gid


def _check_path_length(path: str) -> None:
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        raise ControlError(f"socket path is longer than {_SUN_PATH_MAX} bytes: {path}")


def ensure_private_dir(directory: str) -> None:
    """Make `directory` (and missing parents) exist; the last one mode 0700, owned by euid.

    Raises InsecureDirectory if it exists owned by another uid, with any group/other
    permission bits, or is not a directory. Never loosens or tightens an existing one.
    """
    if not os.path.lexists(directory):
        parent = os.path.dirname(directory)
        if parent:
            os.makedirs(parent, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(directory, 0o700)  # the umask may only take bits away
    check_private_dir(directory)


def check_private_dir(directory: str) -> bool:
    """False when `directory` does not exist; True when it is a directory of mode 0700
    owned by euid; InsecureDirectory otherwise (see `ensure_private_dir`)."""
    if not os.path.lexists(directory):
        return False
    st = os.stat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise InsecureDirectory(f"{directory} is not a directory")
    if st.st_uid != os.geteuid():
        raise InsecureDirectory(
            f"{directory} is owned by uid {st.st_uid}, not by this process (uid {os.geteuid()})")
    if st.st_mode & 0o077:
        raise InsecureDirectory(
            f"{directory} has mode {stat.S_IMODE(st.st_mode):04o}; it must be 0700 "
            f"(chmod 700 {directory})")
    return True


def check_socket_path(path: str) -> None:
    """Refuse, before anything is created, a socket path a server could not open: too long
    (ControlError), an unsafe folder (InsecureDirectory), a live server there already
    (AlreadyRunning), something else than a socket there (ControlError). Writes nothing."""
    _check_path_length(path)
    directory = os.path.dirname(os.path.abspath(path))
    if check_private_dir(directory) and probe(path):
        raise AlreadyRunning(f"a daemon already listens at {path}")


def probe(path: str, timeout: float = 1.0) -> bool:
    """Whether a server accepts connections at `path` (a full backlog counts as live).

    False when the path is missing or the socket refuses (a stale socket). Raises
    ControlError if `path` exists and is not a socket.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlError(f"{path} exists and is not a socket; not touching it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except (TimeoutError, BlockingIOError):
            return True
    return True


class _Listener:
    """The selector data tag of a server's listening socket."""

    def __init__(self, server: ControlServer) -> None:
        self.server = server


class _Client:
    """Server-side state of one connection."""

    def __init__(self, server: ControlServer, sock: socket.socket, conn: Connection,
                 now: float) -> None:
        self.server = server
        self.sock = sock
        self.conn = conn
        self.decoder = LineDecoder()
        self.out = bytearray()
        self.events = 0  # what the selector watches for now
        self.read_closed = False
        self.closed = False
        self.bad_frames = 0
        self.last_active = now
        self.deferred: Deferred | None = None
        self.backlog: deque[Any] = deque()  # requests read while an answer was deferred


class ControlServer:
    """A non-blocking control server on a Unix socket, driven by the daemon's selector.

    Contract: after `open()` and `register(sel)`, for every `(key, mask)` from
    `sel.select()` the daemon calls `handle(key, mask)`; `sweep()` periodically. No method
    blocks or raises because of what a client does; all must run in one thread. `close()`
    removes the socket file (if it is still this server's) and closes every client.
    """

    def __init__(self, path: str | os.PathLike[str], handler: Handler,
                 allowed_uid: int | None = None, *, allow_root: bool = True,
                 ops: Iterable[str] | None = None, version: str = __version__,
                 output_cap: int = OUTPUT_CAP, idle_timeout: float = IDLE_TIMEOUT,
                 max_bad_frames: int = MAX_BAD_FRAMES, max_clients: int = MAX_CLIENTS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`ops`: the ops the handler serves (advertised by ``hello``; others are answered
        ``unknown_op`` without calling the handler); None passes every op to the handler.
        `allowed_uid` defaults to this process's uid. `clock` gives seconds (monotonic)."""
        self.path = os.fspath(path)
        self.handler = handler
        self.allowed_uid = os.getuid() if allowed_uid is None else allowed_uid
        self.allow_root = allow_root
        self._handler_ops = None if ops is None else frozenset(ops)
        self.ops = None if ops is None else self._handler_ops | {"hello"}
        self.version = version
        self.output_cap = output_cap
        self.idle_timeout = idle_timeout
        self.max_bad_frames = max_bad_frames
        self.max_clients = max_clients
        self.clock = clock
        self._listener: socket.socket | None = None
        self._tag = _Listener(self)
        self._inode: tuple[int, int] | None = None
        self._selector: selectors.BaseSelector | None = None
        self._clients: dict[int, _Client] = {}
        self._ids = itertools.count(1)

    # -- lifecycle ---------------------------------------------------------------------

    def open(self) -> ControlServer:
        """Create, bind and listen (see the module docstring); return self.

        Raises InsecureDirectory, AlreadyRunning, ControlError (path too long, path is not a
        socket), OSError from the system calls.
        """
        if self._listener is not None:
            raise ControlError("server already open")
        _check_path_length(self.path)
        directory = os.path.dirname(os.path.abspath(self.path))
        ensure_private_dir(directory)
        if probe(self.path):
            raise AlreadyRunning(f"a daemon already listens at {self.path}")
        tmp = os.path.join(directory, f".{os.urandom(4).hex()}")  # short: sun_path limit
        _check_path_length(tmp)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._bind_private(sock, tmp)
            os.rename(tmp, self.path)  # replaces a stale socket atomically
            sock.listen(64)
            sock.setblocking(False)
            st = os.stat(self.path)
        except BaseException:
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        self._inode = (st.st_dev, st.st_ino)
        self._listener = sock
        log.info("control socket listening at %s", self.path)
        return self

    @staticmethod
    def _bind_private(sock: socket.socket, tmp: str) -> None:
        # The umask is process-wide: call open() before other threads create files.
        old = os.umask(0o177)
        try:
            sock.bind(tmp)
        finally:
            os.umask(old)
        os.chmod(tmp, 0o600)  # the directory is 0700 anyway; this makes the mode exact

    def register(self, selector: selectors.BaseSelector) -> None:
        """Watch the listening socket (and clients to come) in `selector`. After `open()`."""
        if self._listener is None:
            raise ControlError("open() the server before register()")
        self._selector = selector
        selector.register(self._listener, selectors.EVENT_READ, self._tag)

    def close(self) -> None:
        """Close every client and the listener; unlink the socket if it is still ours.

        Idempotent; never raises for an already-removed socket file.
        """
        for client in list(self._clients.values()):
            self._drop(client, None)
        if self._listener is not None:
            self._forget(self._listener)
            self._listener.close()
            self._listener = None
        if self._inode is not None:
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(self.path)
                if (st.st_dev, st.st_ino) == self._inode:
                    os.unlink(self.path)
            self._inode = None

    def __enter__(self) -> ControlServer:
        return self.open() if self._listener is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connections(self) -> list[Connection]:
        """The connected clients, in connection order."""
        return [c.conn for c in self._clients.values()]

    # -- the loop's entry points -------------------------------------------------------

    def handle(self, key: selectors.SelectorKey, mask: int) -> bool:
        """Process readiness of `key`; return False (doing nothing) if it is not ours."""
        data = key.data
        if data is self._tag:
            self._accept()
            return True
        if not isinstance(data, _Client) or data.server is not self:
            return False
        if not data.closed and mask & selectors.EVENT_WRITE:
            self._flush(data)
        if not data.closed and mask & selectors.EVENT_READ:
            self._read(data)
        return True

    def sweep(self, now: float | None = None) -> int:
        """Drop clients idle past `idle_timeout`; return how many were dropped.

        Idle: nothing received or sent for that long. A watcher is exempt while it has
        no unsent output (it waits for events); one whose output does not drain is not.
        """
        now = self.clock() if now is None else now
        stale = [c for c in self._clients.values()
                 if now - c.last_active > self.idle_timeout and c.deferred is None
                 and (c.out or not c.conn.watching)]
        for client in stale:
            self._drop(client, "idle timeout")
        return len(stale)

    def broadcast(self, event: dict[str, Any], topic: str) -> int:
        """Send ``{"v": 1, "topic": topic, **event}`` to each matching watcher.

        Returns how many watchers got it queued. Watchers over their output cap are
        dropped. Raises ValueError/TypeError if the event is not JSON-serialisable (it is
        encoded only when somebody watches its topic: a daemon publishes every report).
        """
        watchers = [client for client in self._clients.values()
                    if client.conn.watching and topic_matches(client.conn.topics, topic)]
        if not watchers:
            return 0
        line = encode({**event, "v": PROTOCOL_VERSION, "topic": topic})
        return sum(self._queue(client, line) for client in watchers)

    def resolve(self, deferred: Deferred, answer: dict[str, Any] | Exception) -> bool:
        """Send the answer of a deferred request: a dict of fields, or an exception that
        becomes an error answer as a handler's would. Then the client's next requests are
        handled. False if the client is gone."""
        client = self._clients.get(deferred.conn_id) if deferred.conn_id is not None else None
        if client is None or client.deferred is not deferred:
            return False
        client.deferred = None
        if isinstance(answer, Exception):
            line = encode(self._error_answer("deferred", answer))
        else:
            try:
                line = encode(as_answer(answer))
            except (TypeError, ValueError) as exc:
                line = encode(self._error_answer("deferred", exc))
        client.last_active = self.clock()
        if not self._queue(client, line):
            return False
        while client.backlog and client.deferred is None and not client.closed:
            self._process(client, client.backlog.popleft())
        self._set_events(client)
        return True

    def send(self, conn: Connection, obj: dict[str, Any]) -> bool:
        """Queue one frame for the client `conn`; False if it is gone or got dropped.

        Raises ValueError/TypeError if `obj` is not JSON-serialisable.
        """
        client = self._clients.get(conn.id)
        if client is None:
            return False
        return self._queue(client, encode({"v": PROTOCOL_VERSION, **obj}))

    # -- accepting ---------------------------------------------------------------------

    def _accept(self) -> None:
        assert self._listener is not None
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: leave the rest in the backlog
                log.warning("control socket: accept failed: %s", exc)
                return
            self._admit(sock)

    def _admit(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        try:
            pid, uid, gid = peer_credentials(sock)
        except OSError as exc:
            self._refuse(sock, "forbidden", f"cannot check the peer's credentials: {exc}")
            return
        if not self._uid_allowed(uid):
            log.warning("control socket: refused pid %d of uid %d", pid, uid)
            self._refuse(sock, "forbidden", f"uid {uid} may not use this daemon")
            return
        if len(self._clients) >= self.max_clients:
            self._refuse(sock, "busy", f"too many connections ({self.max_clients})")
            return
        conn = Connection(next(self._ids), pid, uid, gid)
        client = _Client(self, sock, conn, self.clock())
        self._clients[conn.id] = client
        self._set_events(client)

    def _uid_allowed(self, uid: int) -> bool:
        return uid == self.allowed_uid or (self.allow_root and uid == 0)

    @staticmethod
    def _refuse(sock: socket.socket, code: str, message: str) -> None:
        with contextlib.suppress(OSError):
            sock.send(encode(error(code, message)))
        sock.close()

    # -- reading and dispatching -------------------------------------------------------

    def _read(self, client: _Client) -> None:
        try:
            data = client.sock.recv(_READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._drop(client, f"read failed: {exc}")
            return
        client.last_active = self.clock()
        if data:
            items = client.decoder.feed(data)
        else:  # EOF: answer what came, then close once the answers are out
            items = client.decoder.close()
            client.read_closed = True
        for item in items:
            if client.closed:
                return
            if client.deferred is not None:
                client.backlog.append(item)
                continue
            self._process(client, item)
        if not client.closed:
            self._set_events(client)

    def _process(self, client: _Client, item: Any) -> None:
        try:
            if isinstance(item, ProtocolError):
                raise item
            op, args = check_request(item)
        except ProtocolError as exc:
            client.bad_frames += 1
            self._queue(client, encode(exc.to_frame()))
            if client.bad_frames > self.max_bad_frames:
                self._drop(client, "too many bad frames")
            return
        client.bad_frames = 0
        line, handoff = self._dispatch(client, op, args)
        if client.deferred is not None:
            return
        if self._queue(client, line) and handoff is not None:
            self._hand_off(client, handoff)

    def _dispatch(self, client: _Client, op: str,
                  args: dict[str, Any]) -> tuple[bytes, Handoff | None]:
        """The encoded answer to one valid request, and the handoff the handler asked for;
        never raises (bar BaseException)."""
        if op == "hello":
            return self._hello(client, args), None
        if self.ops is not None and op not in self.ops:
            return encode(error("unknown_op", f"no op {op!r}")), None
        try:
            answer = self.handler(op, args, client.conn)
            if isinstance(answer, Deferred):
                answer.conn_id, client.deferred = client.conn.id, answer
                return b"", None
            sub = answer if isinstance(answer, Subscribe) else None
            handoff = answer if isinstance(answer, Handoff) else None
            if sub is not None:
                answer = sub.first or {}
            elif handoff is not None:
                answer = handoff.answer
            line = encode(as_answer(answer))
        except Exception as exc:
            return encode(self._error_answer(op, exc)), None
        if sub is not None:
            client.conn.watching, client.conn.topics = True, sub.topics
        return line, handoff

    def _hand_off(self, client: _Client, handoff: Handoff) -> None:
        """Give the client's socket to `handoff.take` once its answer is out."""
        if client.out:
            self._drop(client, "could not send the answer of a handoff at once")
            return
        client.closed = True
        self._clients.pop(client.conn.id, None)
        if client.events:
            self._forget(client.sock)
        rest = client.decoder.take_rest()
        try:
            handoff.take(client.sock, rest)
        except Exception:
            log.exception("control client %d (pid %d): handoff failed", client.conn.id,
                          client.conn.pid)
            client.sock.close()
    def _hello(self, client: _Client, args: dict[str, Any]) -> bytes:
        """The server's hello answer, merged with the handler's when it serves hello."""
        client.conn.greeted = True
        base = hello_response(self.version, self.ops or ())
        if self._handler_ops is not None and "hello" not in self._handler_ops:
            return encode(base)
        try:
            answer = self.handler("hello", args, client.conn)
            if not isinstance(answer, dict):
                raise TypeError(f"handler returned {type(answer).__name__} for hello")
            return encode({**base, **answer})
        except Exception as exc:
            frame = self._error_answer("hello", exc)
            return encode(base if frame["error"]["code"] == "unknown_op" else frame)

    @staticmethod
    def _error_answer(op: str, exc: Exception) -> dict[str, Any]:
        """The error answer for an exception from the handler (call in an except block).

        An exception with a `code` from the table (ProtocolError, or any exception class
        with `code` and `message` attributes) is answered with it; anything else is logged
        with its traceback and answered ``internal``.
        """
        code = getattr(exc, "code", None)
        if isinstance(code, str) and code in ERRORS:
            message = getattr(exc, "message", None)
            return error(code, str(exc) if message is None else str(message))
        log.exception("control op %r failed", op)
        return error("internal", f"op {op!r} failed: {type(exc).__name__}: {exc}")

    # -- writing -----------------------------------------------------------------------

    def _queue(self, client: _Client, line: bytes) -> bool:
        """Queue `line` and try to send; drop the client if it was already over the cap."""
        if client.closed:
            return False
        if client.out and len(client.out) + len(line) > self.output_cap:
            self._drop(client, f"over {self.output_cap} bytes of unread output")
            return False
        client.out += line
        self._flush(client)
        return not client.closed

    def _flush(self, client: _Client) -> None:
        sent_any = False
        while client.out:
            try:
                n = client.sock.send(client.out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._drop(client, f"write failed: {exc}")
                return
            del client.out[:n]
            sent_any = True
        if sent_any:
            client.last_active = self.clock()
        self._set_events(client)

    def _set_events(self, client: _Client) -> None:
        """Watch for input while the peer may send, for writability while output waits;
        close the client when neither holds."""
        if client.closed:
            return
        reading = not client.read_closed and client.deferred is None
        want = (selectors.EVENT_READ if reading else 0) | (
            selectors.EVENT_WRITE if client.out else 0)
        if want == 0 and client.deferred is not None:  # waits for its answer: watch nothing
            if client.events:
                self._forget(client.sock)
                client.events = 0
            return
        if want == 0:
            self._drop(client, None)
            return
        if want == client.events or self._selector is None:
            return
        if client.events == 0:
            self._selector.register(client.sock, want, client)
        else:
            self._selector.modify(client.sock, want, client)
        client.events = want

    def _drop(self, client: _Client, reason: str | None) -> None:
        if client.closed:
            return
        if reason:
            log.info("control client %d (pid %d) dropped: %s", client.conn.id,
                     client.conn.pid, reason)
        client.closed = True
        self._clients.pop(client.conn.id, None)
        if client.events:
            self._forget(client.sock)
        client.sock.close()
        client.out.clear()

    def _forget(self, sock: socket.socket) -> None:
        if self._selector is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(sock)
