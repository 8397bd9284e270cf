"""Report from a program that a ``command = [...]`` spec runs: the Python side of the report
channel (docs/report-channel.md).

    import tuned.report as report

    args = report.config()              # {"lr": 0.003, "epochs": 20, ...}
    for epoch in range(1, args["epochs"] + 1):
        ...
        report.report(epoch=epoch, accuracy=acc)   # returns once the daemon stored it

`report(**metrics)` sends one report and waits until the daemon has stored it with its
decision (under the spec's `report_lag`, a program whose steps are shorter than the lag goes
on once the report is sent: `tuned.trial.reporter`; its end waits for every answer). When the
scheduler stops (or pauses) the trial, it exits the program with code 0
(SystemExit: `finally` blocks run), unless `exit_on_stop=False`, when it returns False
instead. Outside a trial (no channel in the environment) it raises RuntimeError. If the
daemon restarts meanwhile, the report waits for the next one and is sent again, as a
training function's reporter does. `save_checkpoint(obj)` after a report and
`load_checkpoint()` at the start let a paused or restarted trial go on where it was. When
the program ends, the daemon is told whether it
returned normally or with an uncaught exception (which matters to a daemon that adopted it
after a restart, and so cannot see its exit status). A Dask trial over TLS has no channel to
inherit (``TUNED_REPORT_FD=-1``): the first report connects to the daemon's report listener
and resumes there (`tuned.trial.reporter.resume_channel`).
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import traceback
from typing import Any

from tuned.protocol.channel import (
    CHECKPOINT_DIR_ENV,
    CONFIG_ENV,
    NO_REPORT_FD,
    NUMBER_ENV,
    REPORT_FD_ENV,
    SEED_ENV,
)
from tuned.trial.reporter import (
    ChannelClosed,
    Reconnect,
    Reporter,
    ReportRejected,
    TrialStopped,
    resume_channel,
)

_reporter: Reporter | None = None
_failed = False


def in_trial() -> bool:
    """Whether this program runs as a trial (its report channel is in the environment)."""
    return bool(os.environ.get(REPORT_FD_ENV))


def config() -> dict[str, Any]:
    """The trial's arguments: the spec's constants and this trial's config (empty outside a
    trial)."""
    return json.loads(os.environ.get(CONFIG_ENV, "{}"))


def trial_number() -> int | None:
    """This trial's number in its experiment, or None outside a trial."""
    value = os.environ.get(NUMBER_ENV)
    return int(value) if value else None


def seed() -> int | None:
    """A seed for this trial's random streams (the same on every attempt), or None."""
    value = os.environ.get(SEED_ENV)
    return int(value) if value else None


def report(exit_on_stop: bool = True, **metrics: Any) -> bool:
    """Send one report; True to go on. When the trial is stopped or paused: exit(0), or
    return False with `exit_on_stop=False`. ReportRejected for a bad report, RuntimeError
    outside a trial, ChannelClosed when no daemon can be reached."""
    try:
        _channel()(**metrics)
    except TrialStopped:
        if exit_on_stop:
            sys.exit(0)
        return False
    return True


def save_checkpoint(obj: Any) -> None:
    """Commit a JSON-serialisable checkpoint for the reports sent so far (call it right after
    a report); see `tuned.trial.reporter.Reporter`."""
    _channel().save_checkpoint(obj)


def load_checkpoint() -> Any:
    """The object of the checkpoint this trial resumed from, or None (a fresh start)."""
    return _channel().load_checkpoint()


def _channel() -> Reporter:
    global _reporter
    if _reporter is None:
        fd = os.environ.get(REPORT_FD_ENV)
        if not fd:
            raise RuntimeError(f"not running as a tuned trial: {REPORT_FD_ENV} is not set "
                               "(run this program through a spec's command)")
        if fd == NO_REPORT_FD:  # a TLS channel, which exec could not hand over: resume
            sock = resume_channel()
        else:
            sock = socket.socket(fileno=int(fd))
            os.set_inheritable(sock.fileno(), False)
        _reporter = Reporter(sock, reconnect=Reconnect.from_env(),
                             checkpoint_dir=os.environ.get(CHECKPOINT_DIR_ENV) or None,
                             trial_number=trial_number())
        _install_end_hooks()
    return _reporter


def _install_end_hooks() -> None:
    previous = sys.excepthook

    def excepthook(kind, value, tb) -> None:  # noqa: ANN001 - sys.excepthook's signature
        global _failed
        _failed = True
        if _reporter is not None:
            message = "".join(traceback.format_exception_only(kind, value)).strip()
            _reporter.send_event(op="error", message=message[:2000])
        previous(kind, value, tb)

    sys.excepthook = excepthook
    atexit.register(_at_exit)


def _at_exit() -> None:
    if _reporter is None or _failed:
        return
    try:
        _reporter.flush()
    except (TrialStopped, ReportRejected, ChannelClosed):
        return  # stopped: as if it had exited at the stop; rejected or cut off: not done
    _reporter.send_event(op="done")
