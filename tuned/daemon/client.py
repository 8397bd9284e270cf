"""A blocking client of the daemon's control socket: what `tunectl` talks through.

Kept apart from the server (`tuned.daemon.control`, which re-exports everything here) so that a
client process imports only `os`, the C socket type and the wire format (`tuned.protocol.control`):
no logging, selectors or dataclasses. `tunectl` starts once per command, and every import
is paid on each start.

`ControlClient(path).request(op, **args)` sends one request and returns its answer;
`stream(op, **args)` yields the frames of a streaming op. Raises `DaemonNotRunning` (exit
code 3) when nothing listens, `RemoteError` for error answers (exit code from the table),
`ControlError` otherwise. Every exception here and in `tuned.protocol.control` has an `exit_code`.
"""

from __future__ import annotations

import os
from collections import deque
from typing import TYPE_CHECKING, Any

try:  # socket.py wraps this type; its enum set-up would cost a tunectl start about 6 ms
    from _socket import AF_UNIX, SOCK_STREAM
    from _socket import socket as _Socket
except ImportError:  # pragma: no cover - a Python without CPython's _socket
    from socket import AF_UNIX, SOCK_STREAM
    from socket import socket as _Socket

from tuned.protocol.control import (
    EXIT_ERROR,
    EXIT_NOT_RUNNING,
    MAX_FRAME,
    LineDecoder,
    ProtocolError,
    check_response,
    encode,
    request,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

CLIENT_MAX_FRAME = 64 << 20  # the longest answer line a client accepts
_READ_CHUNK = 64 << 10


class ControlError(Exception):
    """A control-channel failure that is not an error answer. `exit_code` 1."""

    exit_code = EXIT_ERROR


class DaemonNotRunning(ControlError):
    """No daemon listens at the socket path (missing, or a stale socket). `exit_code` 3."""

    exit_code = EXIT_NOT_RUNNING


class ConnectionClosed(ControlError):
    """The daemon closed the connection before an answer (or a stream ended)."""


class ControlClient:
    """A blocking client on one connection (opened on first use); a context manager.

    `timeout` (seconds, None: wait forever) bounds the connect and each wait for an answer;
    `stream_timeout` bounds each wait for the next frame of a stream (default: forever).
    Not thread-safe.
    """

    def __init__(self, path: str | os.PathLike[str], timeout: float | None = 10.0, *,
                 stream_timeout: float | None = None,
                 max_frame: int = CLIENT_MAX_FRAME) -> None:
        self.path = os.fspath(path)
        self.timeout = timeout
        self.stream_timeout = stream_timeout
        self.max_frame = max_frame
        self._sock: _Socket | None = None
        self._decoder = LineDecoder(max_frame)
        self._frames: deque[Any] = deque()

    def connect(self) -> None:
        """Connect if not connected. Raises DaemonNotRunning, ControlError."""
        if self._sock is not None:
            return
        sock = _Socket(AF_UNIX, SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError) as exc:
            sock.close()
            raise DaemonNotRunning(f"no daemon listens at {self.path} ({exc.strerror})") from None
        except PermissionError:
            sock.close()
            raise ControlError(f"permission denied on {self.path}: the daemon runs as "
                               "another user") from None
        except (OSError, ValueError) as exc:
            sock.close()
            raise ControlError(f"cannot connect to {self.path}: {exc}") from None
        self._sock = sock

    def close(self) -> None:
        """Close the connection (idempotent); a later request reconnects."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._decoder = LineDecoder(self.max_frame)
        self._frames.clear()

    def __enter__(self) -> ControlClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def hello(self) -> dict[str, Any]:
        """The ``hello`` answer (server, version, protocol, ops); raises as `request`."""
        return self.request("hello")

    def request(self, op: str, /, **args: Any) -> dict[str, Any]:
        """Send one request, return its answer (an ``ok`` frame).

        Raises DaemonNotRunning, RemoteError (an error answer), ProtocolError (the answer is
        not a frame of this protocol version, or the request is over 1 MiB), ControlError
        (timeout, connection lost).
        """
        self._send(op, args)
        return check_response(self._next_frame(self.timeout))

    def stream(self, op: str, /, **args: Any) -> Iterator[dict[str, Any]]:
        """Send a streaming request; yield its first answer, then each event frame.

        Ends when the daemon closes the connection; the connection is closed when the
        generator ends or is closed. Raises as `request` (RemoteError for an error frame).
        """
        self._send(op, args)
        try:
            yield check_response(self._next_frame(self.timeout))
            while True:
                try:
                    frame = self._next_frame(self.stream_timeout)
                except ConnectionClosed:
                    return
                yield check_response(frame)
        finally:
            self.close()

    def _send(self, op: str, args: dict[str, Any]) -> None:
        line = encode(request(op, **args))
        if len(line) > MAX_FRAME + 1:
            raise ProtocolError("frame_too_large", f"the request is {len(line)} bytes")
        self.connect()
        assert self._sock is not None
        try:
            self._sock.settimeout(self.timeout)
            self._sock.sendall(line)
        except TimeoutError:
            self.close()
            raise ControlError(f"the daemon did not take the request within "
                               f"{self.timeout}s") from None
        except OSError as exc:
            self._raise_refusal()
            self.close()
            raise ControlError(f"connection to the daemon lost: {exc}") from None

    def _raise_refusal(self) -> None:
        """After a failed send: if the daemon refused the connection (``forbidden``,
        ``busy``: one error line, then it closes), raise that answer as a RemoteError."""
        try:
            frame = self._next_frame(0.5)
        except (ControlError, ProtocolError):
            return
        self.close()
        check_response(frame)

    def _next_frame(self, timeout: float | None) -> Any:
        """The next frame. Raises ProtocolError for a junk line, ConnectionClosed at the end
        of the stream (or when the connection fails), ControlError on timeout."""
        assert self._sock is not None
        lost = None
        while not self._frames:
            try:
                self._sock.settimeout(timeout)
                data = self._sock.recv(_READ_CHUNK)
            except TimeoutError:
                self.close()
                raise ControlError(f"no answer from the daemon within {timeout}s") from None
            except OSError as exc:  # a reset counts as the end of the stream
                data, lost = b"", exc
            if data:
                self._frames.extend(self._decoder.feed(data))
            else:
                self._frames.extend(self._decoder.close())
                if not self._frames:
                    self.close()
                    raise ConnectionClosed("the daemon closed the connection" + (
                        f" ({lost})" if lost else ""))
        item = self._frames.popleft()
        if isinstance(item, ProtocolError):
            raise item
        return item


__all__ = ["CLIENT_MAX_FRAME", "ConnectionClosed", "ControlClient", "ControlError",
           "DaemonNotRunning"]
