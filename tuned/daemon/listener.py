"""The report listener: where remote trials (a Dask worker's) reach the daemon, over TCP,
or over TLS only when it is given an SSL context (`tuned serve --tls-cert/--tls-key
[--tls-ca]`, `tuned.protocol.tcp.server_context`).

Every connection must open with one hello line (``{"op": "hello" | "resume" | "log", "run",
"token", ...}``, at most `MAX_HELLO` bytes) within `HELLO_TIMEOUT` seconds (the TLS
handshake included). The listener reads it without ever blocking the daemon's loop and hands
it to `on_hello(sock, hello, rest)`, which takes the socket (returns None) or refuses it
(returns why): the refusal is sent as one line, ``{"ok": false, "error": {"code":
"refused", "message": why}}``, logged with the peer's address, and the connection closed. A
connection that sends junk, an oversized line or nothing in time is refused the same way. A
TLS handshake that fails (a plain TCP client, a client certificate not signed by the CA) is
logged with the peer's address and the reason, counted in `refused`, and the connection
closed. Nothing is stored for a refused connection.

Under TLS, `rest` holds every byte decrypted so far: nothing is left buffered in the socket
where the selector would not see it (`ssl.SSLSocket.pending`).
"""

from __future__ import annotations

import json
import logging
import re
import selectors
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tuned.protocol.tcp import NOT_NOW, buffered, split_address

log = logging.getLogger("tuned.listener")

MAX_HELLO = 4096
HELLO_TIMEOUT = 5.0
HELLO_OPS = ("hello", "resume", "log")


@dataclass
class _Pending:
    """A connection that has not said its hello yet (under TLS: maybe not even finished its
    handshake); `events` what the selector watches it for."""

    sock: socket.socket
    peer: str
    deadline: float
    buffer: bytearray = field(default_factory=bytearray)
    handshaking: bool = False
    events: int = selectors.EVENT_READ


_RUN = re.compile(r"^[0-9]{1,18}-[0-9a-f]{1,64}$")


def check_hello(hello: dict[str, Any]) -> str | None:
    """What is wrong with a hello's fields (None when nothing): a ``run`` like
    ``"<trial id>-<hex>"`` and a string ``token`` always; for ``hello``, the ``host`` and
    ``worker`` (strings), ``pid`` (an int), ``start`` (an int or null) and ``gpus`` (a
    list of strings) of the trial's process, and optionally ``tls`` (the trial's TLS files,
    ``{"ca", "cert", "key"}``); for ``resume``, its ``pid`` and ``start``."""
    run, token = hello.get("run"), hello.get("token")
    if not isinstance(run, str) or not _RUN.match(run):
        return f"hello: bad run {str(run)[:80]!r}"
    if not isinstance(token, str) or not token or len(token) > 256:
        return "hello: bad token"
    op = hello["op"]
    if op in ("hello", "resume"):
        pid, start = hello.get("pid"), hello.get("start")
        if type(pid) is not int or pid <= 0:
            return f"{op}: bad pid {str(pid)[:40]!r}"
        if start is not None and type(start) is not int:
            return f"{op}: bad start {str(start)[:40]!r}"
    if op == "hello":
        for name in ("host", "worker"):
            if not isinstance(hello.get(name), str) or len(hello[name]) > 512:
                return f"hello: bad {name} {str(hello.get(name))[:80]!r}"
        gpus = hello.get("gpus", [])
        if not isinstance(gpus, list) or not all(isinstance(g, str) for g in gpus):
            return f"hello: bad gpus {str(gpus)[:80]!r}"
        if "tls" in hello:
            from tuned.protocol.tcp import TlsFiles

            try:
                TlsFiles.from_dict(hello["tls"])
            except ValueError:
                return f"hello: bad tls {str(hello['tls'])[:80]!r}"
    return None


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` as (host, port), the port below 65536 (0 picks a free one); ValueError
    naming what is wrong."""
    try:
        host, port = split_address(text)
    except ValueError:
        port = -1
    if not 0 <= port < 65536:
        raise ValueError(f"expected HOST:PORT (port 0 picks a free one), got {text!r}")
    return host, port


class ReportListener:
    """A non-blocking TCP server for remote trials' report channels (see the module
    docstring); with `ssl_context` (a server-side one), a TLS server only. `open()` binds
    (so `port` is known) without accepting; `register(sel)` starts accepting through the
    daemon's selector; `handle(key)` serves a ready key (False for keys not its own);
    `sweep()` refuses the connections silent too long."""

    def __init__(self, host: str, port: int,
                 on_hello: Callable[[socket.socket, dict[str, Any], bytes], str | None],
                 clock: Callable[[], float] = time.monotonic,
                 ssl_context: ssl.SSLContext | None = None):
        self.host = host
        self.port = port
        self.on_hello = on_hello
        self.clock = clock
        self.ssl_context = ssl_context
        self.sock: socket.socket | None = None
        self._sel: selectors.BaseSelector | None = None
        self._pending: dict[int, _Pending] = {}
        self.refused = 0

    def open(self) -> None:
        """Bind and listen (OSError when the address cannot be had); `port` is then the
        real one."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self.sock = sock
        self.port = sock.getsockname()[1]

    def register(self, sel: selectors.BaseSelector) -> None:
        assert self.sock is not None, "open() first"
        self._sel = sel
        sel.register(self.sock, selectors.EVENT_READ, (self, "accept"))

    def handle(self, key: selectors.SelectorKey) -> bool:
        if not (isinstance(key.data, tuple) and key.data[0] is self):
            return False
        if key.data[1] == "accept":
            self._accept()
        else:
            self._serve(key.data[2])
        return True

    def _accept(self) -> None:
        assert self.sock is not None and self._sel is not None
        for _ in range(64):
            try:
                sock, peer = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors, a reset before accept: go on
                log.warning("report listener: accept failed: %s", exc)
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            where = f"{peer[0]}:{peer[1]}"
            if self.ssl_context is not None:
                try:
                    sock = self.ssl_context.wrap_socket(sock, server_side=True,
                                                        do_handshake_on_connect=False)
                except (OSError, ValueError) as exc:  # reset already: nothing to refuse
                    self.refused += 1
                    log.warning("report listener: refused %s: TLS: %s", where, exc)
                    sock.close()
                    continue
            pending = _Pending(sock, where, self.clock() + HELLO_TIMEOUT,
                               handshaking=self.ssl_context is not None)
            self._pending[sock.fileno()] = pending
            self._sel.register(sock, selectors.EVENT_READ, (self, "hello", pending))

    def _serve(self, pending: _Pending) -> None:
        """A pending connection is ready: go on with its TLS handshake, then its hello."""
        if pending.handshaking and not self._handshake(pending):
            return
        self._read(pending)

    def _handshake(self, pending: _Pending) -> bool:
        """One step of the server side's TLS handshake, never blocking: True once it is
        done; False while it waits for the peer (watched for what it waits on), or when it
        failed (then the connection is refused and closed)."""
        sock = pending.sock
        assert isinstance(sock, ssl.SSLSocket)
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self._watch(pending, selectors.EVENT_READ)
            return False
        except ssl.SSLWantWriteError:
            self._watch(pending, selectors.EVENT_WRITE)
            return False
        except OSError as exc:  # ssl.SSLError (a bad certificate, not TLS at all), a reset
            self._refuse(pending, f"TLS handshake failed: {str(exc) or type(exc).__name__}",
                         answer=False)
            return False
        pending.handshaking = False
        self._watch(pending, selectors.EVENT_READ)
        return True

    def _watch(self, pending: _Pending, events: int) -> None:
        """Have the selector watch `pending` for `events` (if it does not already)."""
        if pending.events != events and self._sel is not None:
            self._sel.modify(pending.sock, events, (self, "hello", pending))
            pending.events = events

    def _read(self, pending: _Pending) -> None:
        """Read what came of the hello (and what TLS holds decrypted past it); hand the
        connection on once its line is whole."""
        while True:
            try:
                chunk = pending.sock.recv(MAX_HELLO + 1)
            except ssl.SSLWantWriteError:
                self._watch(pending, selectors.EVENT_WRITE)
                return
            except NOT_NOW:
                self._watch(pending, selectors.EVENT_READ)
                return
            except OSError:
                chunk = b""
            if not chunk:
                self._drop(pending)
                return
            pending.buffer += chunk
            if len(pending.buffer) > MAX_HELLO and b"\n" not in pending.buffer:
                self._refuse(pending, f"no hello line within {MAX_HELLO} bytes")
                return
            if not buffered(pending.sock):
                break
        end = pending.buffer.find(b"\n")
        if end < 0:
            self._watch(pending, selectors.EVENT_READ)
            return
        line, rest = bytes(pending.buffer[:end]), bytes(pending.buffer[end + 1:])
        try:
            hello = json.loads(line)
        except ValueError:
            self._refuse(pending, f"not a JSON hello: {line[:80]!r}")
            return
        if not isinstance(hello, dict) or hello.get("op") not in HELLO_OPS:
            self._refuse(pending, f"not a hello: {line[:80]!r}")
            return
        self._forget(pending)
        try:
            why = self.on_hello(pending.sock, hello, rest)
        except Exception as exc:  # a bug must not take the daemon down with it
            log.exception("report listener: a hello from %s failed", pending.peer)
            why = f"internal error: {exc}"
        if why is not None:
            self._refuse(pending, why, registered=False)

    def sweep(self) -> None:
        """Refuse the connections that sent no hello in time."""
        now = self.clock()
        for pending in [p for p in self._pending.values() if p.deadline <= now]:
            if pending.handshaking:
                self._refuse(pending, f"no TLS handshake within {HELLO_TIMEOUT:g} s",
                             answer=False)
            else:
                self._refuse(pending, f"no hello within {HELLO_TIMEOUT:g} s")

    def _refuse(self, pending: _Pending, why: str, registered: bool = True,
                answer: bool = True) -> None:
        """Count, log and close a connection; with `answer`, the refusal line is sent first
        (as far as it goes without blocking: not at all before a TLS handshake is done)."""
        self.refused += 1
        log.warning("report listener: refused %s: %s", pending.peer, why)
        if registered:
            self._forget(pending)
        if answer:
            line = json.dumps({"ok": False, "error": {"code": "refused", "message": why}})
            try:
                pending.sock.send((line + "\n").encode())
            except OSError:  # ssl.SSLError and the SSLWant* errors among them
                pass
        pending.sock.close()

    def _forget(self, pending: _Pending) -> None:
        self._pending.pop(pending.sock.fileno(), None)
        if self._sel is not None:
            self._sel.unregister(pending.sock)

    def _drop(self, pending: _Pending) -> None:
        self._forget(pending)
        pending.sock.close()

    def close(self) -> None:
        for pending in list(self._pending.values()):
            self._drop(pending)
        if self.sock is not None:
            if self._sel is not None:
                self._sel.unregister(self.sock)
            self.sock.close()
            self.sock = None
