"""The report channel: how a trial and its engine talk (standard library only). Both sides
import it: the trial's reporter (`tuned.trial.reporter`, `tuned.report`) and the executors
that carry the lines to the engine.

The channel is a stream of JSON lines, at most `MAX_LINE` bytes each:

- a report, trial to engine: ``{"seq": n, "metrics": {...}}``;
- its answer, engine to trial, sent once the report and its decision are stored:
  ``{"seq": n, "decision": "continue" | "pause" | "stop"}`` or ``{"seq": n, "error": "..."}``;
- one-way notes from the trial: ``{"op": "done"}``, ``{"op": "error", "message": "..."}``.

An executor turns what a trial does into events for the engine: a `Message` per line (its
JSON object, or None with the reason it is not one), and `Exited` when the trial's process
(or whatever runs it) is gone. The trial learns its part from its environment (the ``*_ENV``
names below).
"""

from __future__ import annotations

import json
import signal
import sys
from dataclasses import dataclass
from typing import Any

MAX_LINE = 1 << 20  # the longest line either side accepts

# -- the trial's environment -----------------------------------------------------------------

#: The channel's file descriptor, for a trial that is a program (a command spec).
REPORT_FD_ENV = "TUNED_REPORT_FD"
#: A program trial's arguments: the constants and its config, a JSON object.
CONFIG_ENV = "TUNED_TRIAL_CONFIG"
#: The trial's number in its experiment, and the seed of its random streams.
NUMBER_ENV = "TUNED_TRIAL_NUMBER"
SEED_ENV = "TUNED_TRIAL_SEED"
#: The folder of the trial's checkpoints (`tuned.trial.checkpoints` layout).
CHECKPOINT_DIR_ENV = "TUNED_CHECKPOINT_DIR"
#: Seconds the trial's reports may go unanswered (the spec's `report_lag`).
REPORT_LAG_ENV = "TUNED_REPORT_LAG"
#: Where a trial whose engine went away asks a restarted daemon to adopt it, and how long.
ADOPT_SOCKET_ENV = "TUNED_ADOPT_SOCKET"
ADOPT_TIMEOUT_ENV = "TUNED_ADOPT_TIMEOUT"
DEFAULT_ADOPT_TIMEOUT = 600.0
#: A remote trial's way back to its daemon (a Dask worker's trial): the daemon's report
#: listener (``HOST:PORT``), the run it is and that run's secret (see `hello_line`).
DAEMON_ADDRESS_ENV = "TUNED_DAEMON_ADDRESS"
RUN_ENV = "TUNED_RUN"
RUN_TOKEN_ENV = "TUNED_RUN_TOKEN"
#: A remote trial's TLS files when its daemon's listener speaks TLS (`tuned.protocol.tcp`):
#: the CA that signed the daemon's certificate, the trial's certificate and its key. Also
#: read by a Dask worker, where they override the TLS files of Dask's config.
TLS_CA_ENV = "TUNED_TLS_CA"
TLS_CERT_ENV = "TUNED_TLS_CERT"
TLS_KEY_ENV = "TUNED_TLS_KEY"
#: `REPORT_FD_ENV` of a program whose channel could not be inherited (a TLS session cannot
#: cross exec): it connects to `DAEMON_ADDRESS_ENV` itself and resumes (``resume`` line).
NO_REPORT_FD = "-1"

#: The exit code of a remote trial that its daemon refused (a run superseded or unknown).
EXIT_REFUSED = 77
#: The exit code of a remote trial that connects itself (over TLS) and could not reach its
#: daemon, or was refused at the TLS handshake, before its order came.
EXIT_UNREACHABLE = 76

# -- events ------------------------------------------------------------------------------------


@dataclass
class Message:
    """A line from a trial's channel: `body` is the parsed JSON object, or None with `error`."""

    trial_id: int
    body: dict[str, Any] | None
    error: str | None = None


@dataclass
class Exited:
    """A trial's process ended; `code` as os.waitstatus_to_exitcode gives it (< 0: signal),
    or None when its exit status cannot be known (a process adopted after a restart).
    `lost`: it was lost with the machine that ran it (a Dask worker or scheduler gone), not
    through any fault of its own; `why` says how."""

    trial_id: int
    code: int | None
    lost: bool = False
    why: str | None = None


Event = Message | Exited


def hello_line(**fields: Any) -> bytes:
    """The first line a remote trial (or its worker) sends the daemon's report listener:
    ``{"op": "hello" | "resume" | "log", "run": ..., "token": ..., ...}`` (see
    docs/report-channel.md, "Over TCP")."""
    return (compact_json(fields) + "\n").encode()


def is_tls(sock: Any) -> bool:
    """Whether `sock` is a TLS socket (`ssl.SSLSocket`), without importing `ssl` where
    nothing did: a trial over a plain channel never does, and then no socket is one."""
    ssl = sys.modules.get("ssl")
    return ssl is not None and isinstance(sock, ssl.SSLSocket)


def exit_failure(code: int | None) -> str | None:
    """What an `Exited` code says went wrong: ``killed by signal SIGKILL`` (a negative
    code), ``exited with code 3 (see its log)``; None for 0 and for an unknown code."""
    if code is None or code == 0:
        return None
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else -code
        return f"killed by signal {name}"
    return f"exited with code {code} (see its log)"


def is_report(event: Event) -> bool:
    """Whether `event` is a report line (it carries a ``seq``)."""
    return isinstance(event, Message) and bool(event.body) and "seq" in event.body


# -- lines -------------------------------------------------------------------------------------

#: `obj` as compact JSON text (NaN and infinities written as JavaScript does); TypeError for
#: values JSON cannot hold. One encoder made once: `json.dumps` with options makes one a call.
compact_json = json.JSONEncoder(separators=(",", ":")).encode

_make_flat_encoder = getattr(json.encoder, "c_make_encoder", None)
_FLAT = None if _make_flat_encoder is None else _make_flat_encoder(
    None, None, json.encoder.encode_basestring_ascii, None, ":", ",", False, False, True)


def flat_json(obj: dict[str, Any]) -> str:
    """`compact_json(obj)` for a dict of numbers, strings and bools (a checked report's
    metrics), about twice as fast: the encoder is made once and skips the circular-reference
    check, which a dict without containers does not need."""
    if _FLAT is None:
        return compact_json(obj)
    return "".join(_FLAT(obj, 0))


_DECISION_LINES = {decision: ('{"seq":%d,"decision":"' + decision + '"}\n')
                   for decision in ("continue", "stop", "pause")}


def answer_line(body: dict[str, Any]) -> str:
    """One answer on a report channel as a JSON line: `compact_json(body)` plus ``\n``, with
    the common ``{"seq": n, "decision": d}`` formatted directly."""
    if len(body) == 2 and next(iter(body)) == "seq":
        line = _DECISION_LINES.get(body.get("decision"))  # type: ignore[arg-type]
        seq = body["seq"]
        if line is not None and type(seq) is int:
            return line % seq
    return compact_json(body) + "\n"


_LINE_DECODER = json.JSONDecoder()
_JSON_WHITESPACE = " \t\n\r"  # what json.loads skips around a value (str.strip: more)


def decode_line(line: bytes) -> Any:
    """`json.loads` of one UTF-8 line (surrounding whitespace allowed), a little faster;
    ValueError (UnicodeDecodeError or JSONDecodeError) when it is not one JSON value."""
    text = line.decode().strip(_JSON_WHITESPACE)
    value, end = _LINE_DECODER.raw_decode(text)
    if end != len(text):
        raise json.JSONDecodeError("Extra data", text, end)
    return value


def split_lines(trial_id: int, buffer: bytearray) -> list[Message]:
    """The Messages of the complete lines in `buffer` (a channel's bytes read so far), taken
    out of it; what follows the last newline stays. A partial line over `MAX_LINE` bytes is
    dropped, and said to be, as one Message without a body."""
    messages = []
    while True:
        end = buffer.find(b"\n")
        if end < 0:
            if len(buffer) > MAX_LINE:
                messages.append(Message(trial_id, None, f"report line over {MAX_LINE} bytes"))
                buffer.clear()
            return messages
        line = bytes(buffer[:end])
        del buffer[:end + 1]
        messages.append(parse_line(trial_id, line))


def parse_line(trial_id: int, line: bytes) -> Message:
    """The event for one line a trial sent: its JSON object, or None with why it is not one."""
    try:
        body = decode_line(line)
    except ValueError:
        return Message(trial_id, None, f"not JSON: {line[:80]!r}")
    if not isinstance(body, dict):
        return Message(trial_id, None, f"not a JSON object: {line[:80]!r}")
    return Message(trial_id, body)
