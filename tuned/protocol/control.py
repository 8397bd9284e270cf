"""The control channel's wire format: JSON lines, one table of errors (pure: stdlib only).

A frame is one JSON value encoded on one line (UTF-8, compact, ``\\n``-terminated). A
request is an object ``{"v": 1, "op": "status", ...args}``; an answer is either
``{"v": 1, "ok": true, ...fields}`` or ``{"v": 1, "error": {"code": ..., "message": ...}}``
with ``code`` from `ERRORS`. A streaming op (``watch``) is answered by a first frame and
then event frames ``{"v": 1, "topic": ..., ...}`` until the client leaves.

A connection should start with ``{"v": 1, "op": "hello"}``, answered by
`hello_response`; the server answers other ops without it, and clients check the protocol
version from the ``"v"`` of any answer (`check_response`).

Limits: a request line holds at most `MAX_FRAME` bytes (the newline excluded); longer
lines are refused with ``frame_too_large`` and skipped up to the next newline, so the
stream stays in sync.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, NamedTuple

PROTOCOL_VERSION = 1
MAX_FRAME = 1 << 20  # 1 MiB: the longest request line a server accepts

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOT_RUNNING, EXIT_NOT_FOUND = 0, 1, 2, 3, 4


class ErrorSpec(NamedTuple):
    """One row of the error table: the `tunectl` exit code and what the code means."""

    exit_code: int
    meaning: str


#: The one table of error codes. Every error answer's ``code`` is a key here.
ERRORS: dict[str, ErrorSpec] = {
    "bad_json": ErrorSpec(EXIT_ERROR, "the line is not valid UTF-8 JSON"),
    "bad_request": ErrorSpec(EXIT_ERROR, "the frame is not a well-formed request"),
    "frame_too_large": ErrorSpec(EXIT_ERROR, f"the line is longer than {MAX_FRAME} bytes"),
    "unsupported_version": ErrorSpec(EXIT_ERROR, "the peer speaks another protocol version"),
    "unknown_op": ErrorSpec(EXIT_ERROR, "no such op"),
    "not_found": ErrorSpec(EXIT_NOT_FOUND, "no such experiment, trial or object"),
    "invalid": ErrorSpec(EXIT_ERROR, "the op's arguments are invalid"),
    "conflict": ErrorSpec(EXIT_ERROR, "the op conflicts with the current state"),
    "internal": ErrorSpec(EXIT_ERROR, "the daemon failed while handling the op"),
    "forbidden": ErrorSpec(EXIT_ERROR, "the peer's uid may not use this socket"),
    "busy": ErrorSpec(EXIT_ERROR, "the daemon has too many connections"),
    # Raised by the command lines themselves, never sent by a daemon:
    "usage": ErrorSpec(EXIT_USAGE, "the command line is wrong (client only)"),
    "no_daemon": ErrorSpec(EXIT_NOT_RUNNING, "no daemon listens at the socket (client only)"),
    "unavailable": ErrorSpec(EXIT_ERROR, "the store cannot be read: locked, damaged, of "
                                         "another version (client only)"),
    "error": ErrorSpec(EXIT_ERROR, "any other failure of the command (client only)"),
}


def exit_code_for(code: str) -> int:
    """The `tunectl` exit code for an error code; 1 for codes not in `ERRORS`."""
    spec = ERRORS.get(code)
    return spec.exit_code if spec else EXIT_ERROR


class ProtocolError(Exception):
    """A protocol-level error with a `code` from `ERRORS` and a human `message`.

    Raised by `check_request` / `check_response`, returned (not raised) in the output of
    `LineDecoder.feed`, and raised by op handlers to answer with that error.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    @property
    def exit_code(self) -> int:
        """The `tunectl` exit code this error maps to."""
        return exit_code_for(self.code)

    def to_frame(self) -> dict[str, Any]:
        """The error answer for this error (see `error`)."""
        return error(self.code, self.message)


class RemoteError(ProtocolError):
    """The daemon answered with an error frame. `code` may be one this client doesn't know."""


_FRAME = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
def encode(obj: Any) -> bytes:
    """One frame: `obj` as compact ASCII JSON plus ``\\n``.

    Raises ValueError for NaN/infinity (``allow_nan=False``) or a circular structure, and
    TypeError for values JSON cannot hold. No size limit is applied here.
    """
    return _FRAME.encode(obj).encode("ascii") + b"\n"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def decode(line: bytes | bytearray) -> Any:
    """Parse one line (without or with its newline) into a JSON value.

    Raises ProtocolError("bad_json") for invalid UTF-8, invalid JSON, NaN/Infinity, or
    nesting too deep for the parser. Never raises anything else.
    """
    try:
        return json.loads(bytes(line).decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        text = str(exc) if not isinstance(exc, RecursionError) else "nested too deeply"
        raise ProtocolError("bad_json", f"not a JSON line: {text}") from None


class LineDecoder:
    """Split a byte stream into frames; memory bounded by about `max_frame` bytes.

    `feed(data)` returns, in stream order, one item per complete non-blank line: the parsed
    JSON value, or a `ProtocolError` instance (``bad_json``, or ``frame_too_large`` for a
    line longer than `max_frame` bytes, which is reported once and discarded up to its
    newline). Blank lines are skipped. Never raises on any input.
    """

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._scanned = 0  # bytes of _buf known to hold no newline
        self._discarding = False  # inside an oversized line, skipping to its newline

    @property
    def pending(self) -> int:
        """Bytes held of an incomplete line."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Any]:
        """Add bytes; return the frames (or ProtocolErrors) of the lines they complete."""
        out: list[Any] = []
        self._buf += data
        while True:
            nl = self._buf.find(b"\n", self._scanned)
            if nl < 0:
                self._overflow_check(out)
                return out
            line = bytes(self._buf[:nl])
            del self._buf[: nl + 1]
            self._scanned = 0
            if self._discarding:
                self._discarding = False
            elif len(line) > self.max_frame:
                out.append(self._too_large())
            else:
                self._parse_into(line, out)

    def take_rest(self) -> bytes:
        """The bytes held of an incomplete line, handed over (the decoder is reset)."""
        rest = b"" if self._discarding else bytes(self._buf)
        self._buf.clear()
        self._scanned = 0
        self._discarding = False
        return rest

    def close(self) -> list[Any]:
        """End of stream: parse a last line that had no newline; reset the decoder."""
        out: list[Any] = []
        if self._buf and not self._discarding:
            self._parse_into(bytes(self._buf), out)
        self._buf.clear()
        self._scanned = 0
        self._discarding = False
        return out

    def _overflow_check(self, out: list[Any]) -> None:
        if self._discarding:
            self._buf.clear()
        elif len(self._buf) > self.max_frame:
            out.append(self._too_large())
            self._buf.clear()
            self._discarding = True
        self._scanned = len(self._buf)

    def _too_large(self) -> ProtocolError:
        return ProtocolError("frame_too_large", f"a line is longer than {self.max_frame} bytes")

    @staticmethod
    def _parse_into(line: bytes, out: list[Any]) -> None:
        if not line.strip():
            return
        try:
            out.append(decode(line))
        except ProtocolError as exc:
            out.append(exc)


def is_text(value: str) -> bool:
    """Whether `value` is valid Unicode (JSON's \\ud800 escapes decode to lone surrogates,
    which cannot be encoded, stored or printed)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def error(code: str, message: str) -> dict[str, Any]:
    """The error answer ``{"v": 1, "error": {"code": code, "message": message}}``.

    Raises ValueError if `code` is not in `ERRORS` (one table, no ad-hoc codes).
    """
    if code not in ERRORS:
        raise ValueError(f"unknown error code {code!r}")
    return {"v": PROTOCOL_VERSION, "error": {"code": code, "message": str(message)}}


def ok(**fields: Any) -> dict[str, Any]:
    """A success answer ``{"v": 1, "ok": true, **fields}``."""
    return {"v": PROTOCOL_VERSION, "ok": True, **fields}


def as_answer(answer: Any) -> dict[str, Any]:
    """Complete a handler's answer: ``"v"`` added if missing, and ``"ok": true`` unless it
    has ``"ok"`` or ``"error"`` already (``{"trials": [...]}`` becomes an ok answer).

    Raises TypeError if `answer` is not a dict.
    """
    if not isinstance(answer, dict):
        raise TypeError(f"an answer is a dict, not {type(answer).__name__}")
    head: dict[str, Any] = {"v": PROTOCOL_VERSION}
    if "ok" not in answer and "error" not in answer:
        head["ok"] = True
    return {**head, **answer}


def request(op: str, **args: Any) -> dict[str, Any]:
    """A request frame ``{"v": 1, "op": op, **args}``."""
    return {"v": PROTOCOL_VERSION, "op": op, **args}


def _check_version(frame: dict[str, Any], what: str) -> None:
    v = frame.get("v")
    if v is None:
        raise ProtocolError("bad_request", f'{what} has no "v" (protocol version)')
    if type(v) is not int or v != PROTOCOL_VERSION:  # noqa: E721 (True and 1.0 are not 1)
        raise ProtocolError(
            "unsupported_version",
            f"{what} is protocol version {v!r}; this side speaks version {PROTOCOL_VERSION}")


def check_request(frame: Any) -> tuple[str, dict[str, Any]]:
    """Validate a request frame; return ``(op, args)`` with args = the frame less v and op.

    Raises ProtocolError: ``bad_request`` if the frame is not an object, lacks ``"v"``, or
    its ``"op"`` is not a non-empty string; ``unsupported_version`` if ``"v"`` is not
    `PROTOCOL_VERSION` (the message names both versions).
    """
    if not isinstance(frame, dict):
        raise ProtocolError("bad_request", "a request is a JSON object")
    _check_version(frame, "the request")
    op = frame.get("op")
    if not isinstance(op, str) or not op:
        raise ProtocolError("bad_request", 'a request needs "op", a non-empty string')
    return op, {k: v for k, v in frame.items() if k not in ("v", "op")}


def check_response(frame: Any) -> dict[str, Any]:
    """Validate an answer or event frame on the client side; return it.

    Checks the version first. Raises ProtocolError (``bad_request`` if not an object or no
    ``"v"``; ``unsupported_version``) or RemoteError(code, message) for an error answer.
    """
    if not isinstance(frame, dict):
        raise ProtocolError("bad_request", "the daemon's answer is not a JSON object")
    _check_version(frame, "the daemon's answer")
    err = frame.get("error")
    if err is not None:
        if isinstance(err, dict):
            raise RemoteError(str(err.get("code", "internal")), str(err.get("message", "")))
        raise RemoteError("internal", str(err))
    return frame


def hello_response(server_version: str, ops: Iterable[str]) -> dict[str, Any]:
    """The answer to ``hello``: server name and version, protocol version, sorted ops."""
    return ok(server="tuned", version=server_version, protocol=PROTOCOL_VERSION,
              ops=sorted(set(ops) | {"hello"}))
