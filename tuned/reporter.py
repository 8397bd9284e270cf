"""The trial's side of the report channel: `reporter(**metrics)`.

The channel is a stream socket carrying JSON lines. The trial sends
``{"seq": n, "metrics": {...}}`` and waits for the engine's answer, ``{"seq": n, "decision":
"continue"|"pause"|"stop"}`` or ``{"seq": n, "error": "..."}``. The engine has stored the
report and its decision before it answers, so a report acknowledged is a report kept.

A STOP (or PAUSE) decision raises `TrialStopped` from the reporter call; the trial wrapper
catches it, so user code needs nothing. An error answer (a rejected report) raises
`ReportRejected`, which ends the trial as failed.
"""

from __future__ import annotations

import json
import socket
from typing import Any

import numpy as np

MAX_LINE = 1 << 20


class TrialStopped(BaseException):
    """The scheduler stopped this trial. A BaseException, so that a training function's
    ``except Exception`` does not swallow it."""


class ReportRejected(Exception):
    """The engine refused a report (a bad metric, a missing or NaN reward)."""


class ChannelClosed(BaseException):
    """The engine is gone; the trial cannot report anymore and ends."""


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} {value!r}")


def encode_report(seq: int, metrics: dict[str, Any]) -> bytes:
    """The wire form of one report; ReportRejected naming a metric that is not a JSON number,
    string or bool."""
    for name, value in metrics.items():
        if isinstance(value, np.generic):
            value = value.item()
        if not isinstance(value, (bool, int, float, str)):
            raise ReportRejected(
                f"metric {name!r}: {value!r} ({type(value).__name__}) is not a JSON number, "
                "string or bool")
    body = {"seq": seq, "metrics": metrics}
    return (json.dumps(body, default=_json_default, separators=(",", ":")) + "\n").encode()


class Reporter:
    """Callable that sends one report per call and returns when the engine has stored it.

    Raises TrialStopped when the scheduler decides the trial ends, ReportRejected when the
    report is invalid, ChannelClosed when the engine is gone.
    """

    def __init__(self, sock: socket.socket, first_seq: int = 1):
        self._sock = sock
        self._seq = first_seq - 1
        self._buffer = b""
        self.last_decision = "continue"

    @property
    def seq(self) -> int:
        """The sequence number of the last report sent."""
        return self._seq

    def __call__(self, **metrics: Any) -> None:
        seq = self._seq + 1
        line = encode_report(seq, metrics)
        self._seq = seq
        try:
            self._sock.sendall(line)
        except OSError as exc:
            raise ChannelClosed(f"engine gone: {exc}") from None
        answer = self._read_answer()
        if "error" in answer:
            raise ReportRejected(answer["error"])
        self.last_decision = answer.get("decision", "continue")
        if self.last_decision != "continue":
            raise TrialStopped(self.last_decision)

    def _read_answer(self) -> dict[str, Any]:
        while b"\n" not in self._buffer:
            try:
                chunk = self._sock.recv(65536)
            except OSError as exc:
                raise ChannelClosed(f"engine gone: {exc}") from None
            if not chunk:
                raise ChannelClosed("engine closed the report channel")
            self._buffer += chunk
            if len(self._buffer) > MAX_LINE:
                raise ChannelClosed("oversized answer from the engine")
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)

    def send_event(self, **event: Any) -> None:
        """Send a one-way message (e.g. the trial's error) without waiting for an answer."""
        try:
            self._sock.sendall((json.dumps(event, default=str) + "\n").encode())
        except OSError:
            pass
