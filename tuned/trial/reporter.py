"""The trial's side of the report channel: `reporter(**metrics)`.

The channel is a stream socket carrying JSON lines. The trial sends
``{"seq": n, "metrics": {...}}`` and waits for the engine's answer, ``{"seq": n, "decision":
"continue"|"pause"|"stop"}`` or ``{"seq": n, "error": "..."}``. The engine has stored the
report and its decision before it answers, so a report acknowledged is a report kept.

With a report lag (the spec's `report_lag`, handed over in ``TUNED_REPORT_LAG``), a trial
whose steps are shorter than the lag does not wait for each answer: a call returns once its
report is sent, while fewer than `WINDOW` reports are unanswered and the oldest was sent less
than the lag ago; the answers are read as they come, and a stop takes effect at the first
call after its answer arrived. Reports stay durable and in order: each is acknowledged only
once stored, the trial's end waits for every answer, and a trial that keeps checkpoints (or
a call after a step as long as the lag) waits for each answer as without a lag.

A STOP (or PAUSE) decision raises `TrialStopped` from the reporter call; the trial wrapper
catches it, so user code needs nothing. A trial that keeps checkpoints (it saved one in
this run, or resumed from one) gets to save the checkpoint of that last report first: the
reporter call returns, and the `save_checkpoint` that follows it raises TrialStopped once
the checkpoint is committed (or the next reporter call does, sending nothing). An error
answer (a rejected report) raises `ReportRejected`, which ends the trial as failed.

When the engine goes away (a daemon restarted, killed or upgraded), a reporter given a
`Reconnect` connects to the daemon's control socket again, asks to be adopted
(``{"v": 1, "op": "adopt"}``; the daemon knows the trial by the peer's pid and its start
time) and sends the unanswered line once more: reports are exactly-once by their sequence
number, so a report the old daemon stored gets its stored decision back. A remote trial's
`TcpReconnect` presents its run at the daemon's report listener instead (``resume``), over
TLS when its environment names TLS files (``TUNED_TLS_CA``, ``TUNED_TLS_CERT``,
``TUNED_TLS_KEY``). A channel may be a TLS socket (`ssl.SSLSocket`): then the answers are
read without ``MSG_DONTWAIT``, which TLS sockets refuse (`Reporter._read_answers`).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import time
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from tuned.protocol.channel import (
    ADOPT_SOCKET_ENV,
    ADOPT_TIMEOUT_ENV,
    DAEMON_ADDRESS_ENV,
    DEFAULT_ADOPT_TIMEOUT,
    MAX_LINE,
    REPORT_LAG_ENV,
    RUN_ENV,
    RUN_TOKEN_ENV,
    TLS_CERT_ENV,
    decode_line,
    flat_json,
    hello_line,
    is_tls,
)
from tuned.trial.checkpoints import Checkpoint, CheckpointError, TrialCheckpoints
from tuned.trial.identity import process_identity

if TYPE_CHECKING:
    import ssl

    from tuned.protocol.tcp import TlsFiles


class TrialStopped(BaseException):
    """The scheduler stopped this trial. A BaseException, so that a training function's
    ``except Exception`` does not swallow it."""


class ReportRejected(Exception):
    """The engine refused a report (a bad metric, a missing or NaN reward)."""


class ChannelClosed(BaseException):
    """The engine is gone; the trial cannot report anymore and ends."""


def encode_report(seq: int, metrics: dict[str, Any]) -> bytes:
    """The wire form of one report (numpy scalars as the Python numbers they hold);
    ReportRejected naming a metric that is not a JSON number, string or bool."""
    checked: dict[str, Any] = {}
    for name, value in metrics.items():
        if isinstance(value, np.generic):
            value = value.item()
        if not isinstance(value, (bool, int, float, str)):
            raise ReportRejected(
                f"metric {name!r}: {value!r} ({type(value).__name__}) is not a JSON number, "
                "string or bool")
        checked[name] = value
    return f'{{"seq":{int(seq)},"metrics":{flat_json(checked)}}}\n'.encode()


#: The most reports a trial leaves unanswered under a report lag.
WINDOW = 8


def report_lag_from_env() -> float:
    """The report lag the engine gave this trial (``TUNED_REPORT_LAG``, seconds); 0 (wait for
    every answer) when it gave none or something that is not a number >= 0."""
    try:
        lag = float(os.environ.get(REPORT_LAG_ENV, "0"))
    except ValueError:
        return 0.0
    return lag if lag >= 0 and lag == lag else 0.0




def _recv_tls_now(sock: ssl.SSLSocket) -> bytes:
    """What a blocking TLS socket has to read now, without waiting (TLS sockets refuse
    ``MSG_DONTWAIT``): what it holds decrypted, else one read in non-blocking mode if
    select() sees bytes (a record may be incomplete yet). BlockingIOError when nothing came;
    b"" at the end of the channel."""
    import ssl  # loaded already: `sock` is one of its sockets

    if not sock.pending() and not select.select([sock], [], [], 0)[0]:
        raise BlockingIOError("nothing to read now")
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        return sock.recv(65536)
    except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
        raise BlockingIOError("nothing to read now") from None
    finally:
        sock.settimeout(timeout)


def resume_channel() -> socket.socket:
    """A channel for a trial that could not inherit one (a TLS channel cannot cross exec:
    a command trial's program, a spawned interpreter): the daemon's report listener,
    resumed (`Reconnect.from_env`, a `TcpReconnect`). ChannelClosed when there is no way to
    the daemon in the environment, or it did not take the trial back."""
    reconnect = Reconnect.from_env()
    if reconnect is None:
        raise ChannelClosed("no report channel, and no daemon to resume with")
    return reconnect()


class Reconnect:
    """How a trial finds a restarted daemon: its control socket `path`, tried for up to
    `timeout` seconds (backing off from 50 ms to 1 s between tries)."""

    def __init__(self, path: str, timeout: float = DEFAULT_ADOPT_TIMEOUT,
                 clock: Any = time.monotonic, sleep: Any = time.sleep):
        self.path = path
        self.timeout = timeout
        self.clock = clock
        self.sleep = sleep

    @classmethod
    def from_env(cls) -> Reconnect | None:
        """The Reconnect the daemon described in this trial's environment (a `TcpReconnect`
        for a remote trial), or None (the in-process API: nobody to reconnect to)."""
        try:
            timeout = float(os.environ.get(ADOPT_TIMEOUT_ENV, DEFAULT_ADOPT_TIMEOUT))
        except ValueError:
            timeout = DEFAULT_ADOPT_TIMEOUT
        address = os.environ.get(DAEMON_ADDRESS_ENV)
        if address:
            tls = None
            if os.environ.get(TLS_CERT_ENV):  # else `ssl` is not even imported
                from tuned.protocol.tcp import TlsFiles

                tls = TlsFiles.from_env()
            return TcpReconnect(address, os.environ.get(RUN_ENV, ""),
                                os.environ.get(RUN_TOKEN_ENV, ""), timeout, tls=tls)
        path = os.environ.get(ADOPT_SOCKET_ENV)
        if not path:
            return None
        return cls(path, timeout)

    def __call__(self) -> socket.socket:
        """A new channel to a daemon that adopted this trial. ChannelClosed when the daemon
        refuses (it does not know this process) or none answers within `timeout`."""
        deadline = self.clock() + self.timeout
        delay = 0.05
        last = "no daemon listens"
        while True:
            try:
                return self._adopt()
            except OSError as exc:
                last = str(exc) or type(exc).__name__
            if self.clock() >= deadline:
                raise ChannelClosed(f"engine gone, and no daemon at {self.path} took the trial "
                                    f"back within {self.timeout:g} s ({last})")
            self.sleep(delay)
            delay = min(1.0, delay * 2)

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(30.0)
            sock.connect(self.path)
        except BaseException:
            sock.close()
            raise
        return sock

    def _request(self) -> bytes:
        return b'{"v":1,"op":"adopt"}\n'

    def _adopt(self) -> socket.socket:
        sock = self._connect()
        try:
            sock.sendall(self._request())
            answer = b""
            while not answer.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionResetError("the daemon closed the connection")
                answer += chunk
            body = json.loads(answer)
        except BaseException:
            sock.close()
            raise
        if body.get("ok") is not True:
            sock.close()
            err = body.get("error") or {}
            raise ChannelClosed(f"engine gone; the daemon did not adopt the trial: "
                                f"{err.get('message', body)}")
        sock.settimeout(None)
        return sock


class TcpReconnect(Reconnect):
    """How a remote trial (a Dask worker's) finds its daemon again: the report listener at
    `address` (``HOST:PORT``), where it presents its `run` and that run's `token`
    (``{"op": "resume", ...}``); the daemon takes it back only if that run is still the
    trial's current one and this very process is the one that said hello. With `tls` (a
    `tuned.protocol.tcp.TlsFiles`), over TLS: the daemon's certificate verified against
    its CA, this trial's certificate presented (a handshake that fails is tried again, as
    a connection that fails is)."""

    def __init__(self, address: str, run: str, token: str,
                 timeout: float = DEFAULT_ADOPT_TIMEOUT, clock: Any = time.monotonic,
                 sleep: Any = time.sleep, tls: TlsFiles | None = None):
        super().__init__(address, timeout, clock, sleep)
        self.run = run
        self.token = token
        self.tls = tls
        self._context: ssl.SSLContext | None = None

    def _connect(self) -> socket.socket:
        from tuned.protocol.tcp import client_context, connect

        if self.tls is not None and self._context is None:
            self._context = client_context(self.tls)
        return connect(self.path, 0.0, self._context)

    def _request(self) -> bytes:
        pid, start = process_identity()
        return hello_line(op="resume", run=self.run, token=self.token, pid=pid, start=start)


class Reporter:
    """Callable that sends one report per call and returns when the engine has stored it
    (or, under a report `lag`, once it is sent: see the module's docstring).

    Raises TrialStopped when the scheduler decides the trial ends, ReportRejected when the
    report is invalid, ChannelClosed when the engine is gone (and, given `reconnect`, no
    daemon took the trial back). `flush()` waits for the answers still due; the trial's
    wrapper calls it when the training function returns.

    Checkpoints (`checkpoint_dir`: the trial's own directory, kept across its attempts):
    `save_checkpoint(obj)` (JSON-serialisable), `save_checkpoint_bytes(data)` or
    ``with reporter.checkpoint_file() as path:`` (write your framework's file there) commit
    a checkpoint atomically, with a checksum (`tuned.trial.checkpoints`). Save it right after the
    report of the progress it holds: it belongs to that report. A trial that starts again
    (paused and resumed, promoted, rerun after a crash) with a checkpoint finds it in
    `load_checkpoint()` / `load_checkpoint_bytes()` / `resume_path`, `resume_from` is the
    number of reports it covers, and its next report is numbered after them, so the
    reports it had sent since are neither lost nor stored twice. A save first waits for
    every answer due, so a checkpoint never covers a report that is not stored.

    `lag` (seconds; default: `report_lag_from_env`, 0 outside a daemon's or engine's trial)
    is the report lag; `clock` (monotonic seconds) times it.
    """

    def __init__(self, sock: socket.socket, first_seq: int = 1,
                 reconnect: Reconnect | None = None, checkpoint_dir: str | None = None,
                 trial_number: int | None = None, lag: float | None = None,
                 clock: Any = time.monotonic):
        self.trial_number = trial_number
        self._sock = sock
        self._seq = first_seq - 1
        self._buffer = b""
        self._reconnect = reconnect
        self.lag = report_lag_from_env() if lag is None else max(0.0, lag)
        self._clock = clock
        self.last_decision = "continue"
        self._checkpoints = TrialCheckpoints(checkpoint_dir) if checkpoint_dir else None
        self._resumed: Checkpoint | None = (self._checkpoints.latest()
                                            if self._checkpoints else None)
        if self._resumed is not None:
            self._seq = self._resumed.seq
        self._acknowledged = self._seq
        # Sent and not answered yet, oldest first: (seq, line, when sent).
        self._unanswered: deque[tuple[int, bytes, float]] = deque()
        self._returned = clock()  # when the trial last got control back
        self._keeps_checkpoints = self._resumed is not None
        self._stop_pending: str | None = None

    # -- checkpoints ---------------------------------------------------------------------

    @property
    def checkpoint_dir(self) -> str | None:
        """The trial's checkpoint directory (None outside a trial run by tuned)."""
        return None if self._checkpoints is None else self._checkpoints.directory

    @property
    def resume_from(self) -> int | None:
        """The number of reports the checkpoint this trial resumed from covers, or None when
        it started from scratch."""
        return None if self._resumed is None else self._resumed.seq

    @property
    def resume_path(self) -> str | None:
        """The data file of the checkpoint this trial resumed from (to hand to a framework's
        loader), or None."""
        return None if self._resumed is None else self._resumed.path

    def load_checkpoint(self) -> Any:
        """The object saved by `save_checkpoint` that this trial resumed from, or None."""
        return None if self._resumed is None else self._resumed.load()

    def load_checkpoint_bytes(self) -> bytes | None:
        """The bytes of the checkpoint this trial resumed from, or None."""
        return None if self._resumed is None else self._resumed.read_bytes()

    def save_checkpoint(self, obj: Any) -> None:
        """Commit a JSON-serialisable checkpoint (numpy values and arrays allowed) for the
        reports sent so far; CheckpointError if it cannot be encoded or written; then
        TrialStopped if the last report's answer ended the trial."""
        checkpoints = self._before_save()
        checkpoints.save(obj, self._seq)
        self._saved()

    def save_checkpoint_bytes(self, data: bytes) -> None:
        """Commit `data` (e.g. a serialised state dict) as a checkpoint (then as
        `save_checkpoint`)."""
        checkpoints = self._before_save()
        checkpoints.save_bytes(bytes(data), self._seq)
        self._saved()

    @contextlib.contextmanager
    def checkpoint_file(self) -> Iterator[str]:
        """``with reporter.checkpoint_file() as path: torch.save(state, path)``: the file
        written at `path` is committed as a checkpoint when the block ends normally (then as
        `save_checkpoint`)."""
        checkpoints = self._before_save()
        with checkpoints.writing(self._seq, "file") as path:
            yield path
        self._saved()

    def _before_save(self) -> TrialCheckpoints:
        """The trial's checkpoints, once every report sent is answered (TrialStopped when one
        of those answers ended a trial that kept no checkpoint before: its checkpoint would
        hold progress past the stop)."""
        checkpoints = self._trial_checkpoints()
        self.flush()
        return checkpoints

    def _saved(self) -> None:
        self._keeps_checkpoints = True
        if self._stop_pending is not None:
            raise TrialStopped(self._stop_pending)

    def _trial_checkpoints(self) -> TrialCheckpoints:
        if self._checkpoints is None:
            raise CheckpointError("this trial has no checkpoint directory")
        return self._checkpoints

    @property
    def seq(self) -> int:
        """The sequence number of the last report sent."""
        return self._seq

    @property
    def acknowledged(self) -> int:
        """The sequence number of the last report answered (stored with its decision)."""
        return self._acknowledged

    def __call__(self, **metrics: Any) -> None:
        called = self._clock()
        if self._unanswered:
            self._on_channel(lambda: self._take_answers(block=False))
        if self._stop_pending is not None:
            raise TrialStopped(self._stop_pending)
        seq = self._seq + 1
        line = encode_report(seq, metrics)
        self._seq = seq
        self._unanswered.append((seq, line, called))
        try:
            self._send(line)
        except ChannelClosed as exc:
            self._replace_channel(exc)  # which sends it again
        if self.lag <= 0 or self._keeps_checkpoints or called - self._returned >= self.lag:
            self.flush()
        else:
            self._on_channel(self._await_window)
        self._returned = self._clock()

    def flush(self) -> None:
        """Wait until every report sent is answered; raises as a report call does."""
        self._on_channel(self._await_all)

    def _await_all(self) -> None:
        while self._unanswered:
            self._take_answers(block=True)

    def _await_window(self) -> None:
        """Wait while `WINDOW` reports are unanswered or the oldest was sent a lag ago."""
        while self._unanswered and (len(self._unanswered) >= WINDOW or
                                    self._clock() - self._unanswered[0][2] >= self.lag):
            self._take_answers(block=True)

    def _take_answers(self, block: bool) -> None:
        """Read the answers that came (waiting for some when `block`) and act on each."""
        for answer in self._read_answers(block):
            self._take(answer)

    def _take(self, answer: dict[str, Any]) -> None:
        seq = answer.get("seq")
        if not isinstance(seq, int) and self._unanswered:
            seq = self._unanswered[0][0]
        while self._unanswered and self._unanswered[0][0] <= seq:
            self._unanswered.popleft()
        if isinstance(seq, int):
            self._acknowledged = max(self._acknowledged, seq)
        if "error" in answer:
            raise ReportRejected(answer["error"])
        self.last_decision = answer.get("decision", "continue")
        if self.last_decision != "continue":
            if not self._keeps_checkpoints:
                raise TrialStopped(self.last_decision)
            self._stop_pending = self.last_decision

    def _send(self, line: bytes) -> None:
        try:
            self._sock.sendall(line)
        except OSError as exc:
            raise ChannelClosed(f"engine gone: {exc}") from None

    def _on_channel(self, action: Any) -> Any:
        """`action()`, done again over a new channel when the engine went away (and a daemon
        adopted this trial), after sending the unanswered reports once more."""
        while True:
            try:
                return action()
            except ChannelClosed as exc:
                self._replace_channel(exc)

    def _replace_channel(self, lost: ChannelClosed) -> None:
        """Reconnect and send the unanswered reports again, in order; raise `lost` when there
        is no way to."""
        if self._reconnect is None:
            raise lost
        while True:
            sock = self._reconnect()
            self._sock.close()
            self._sock = sock
            self._buffer = b""
            try:
                for _, line, _ in self._unanswered:
                    self._send(line)
                return
            except ChannelClosed:
                continue

    def _read_answers(self, block: bool) -> list[dict[str, Any]]:
        """The complete answer lines received (at least one when `block`)."""
        while b"\n" not in self._buffer:
            try:
                if block:
                    chunk = self._sock.recv(65536)
                elif is_tls(self._sock):
                    chunk = _recv_tls_now(self._sock)
                else:
                    chunk = self._sock.recv(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return []
            except OSError as exc:
                raise ChannelClosed(f"engine gone: {exc}") from None
            if not chunk:
                raise ChannelClosed("engine closed the report channel")
            self._buffer += chunk
            if len(self._buffer) > MAX_LINE:
                raise ChannelClosed("oversized answer from the engine")
        *lines, self._buffer = self._buffer.split(b"\n")
        return [decode_line(line) for line in lines if line.strip()]

    def send_event(self, **event: Any) -> None:
        """Send a one-way message (the trial's end, or its error) without waiting for an
        answer; over a new channel when the engine went away. Nothing raises: an end that
        no engine hears is found by its exit."""
        data = (json.dumps(event, default=str) + "\n").encode()
        try:
            self._sock.sendall(data)
            return
        except OSError:
            pass
        try:
            self._replace_channel(ChannelClosed("engine gone"))
            self._sock.sendall(data)
        except (OSError, ChannelClosed):
            pass
