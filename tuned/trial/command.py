"""Trials that run a program: a spec's ``command = [program, args...]``.

The program is exec'd in the trial's process (forked by the experiment's template, so the
pid the daemon stored is the program's), in the spec's `workdir`, with its output in the
trial's log. It learns its trial from its environment and reports over the channel whose
file descriptor `TUNED_REPORT_FD` names (the protocol: docs/report-channel.md;
`tuned.report` speaks it for Python programs):

- ``TUNED_REPORT_FD``: the report channel, a stream socket carrying JSON lines (``-1`` for
  a Dask trial over TLS, whose TLS session cannot cross exec: the program connects to
  ``TUNED_DAEMON_ADDRESS`` itself and resumes, as `tuned.report` does);
- ``TUNED_TRIAL_CONFIG``: the trial's arguments (the spec's constants and the config), a
  JSON object;
- ``TUNED_TRIAL_NUMBER``, ``TUNED_TRIAL_SEED``: the trial's number, and a seed for its
  random streams, the same on every attempt;
- ``TUNED_CHECKPOINT_DIR``: the trial's checkpoint directory (`tuned.trial.checkpoints` layout;
  `tuned.report` writes and reads it).

``{name}`` in an argument is replaced by the argument `name` (a parameter of the space or a
constant): ``["python", "train.py", "--lr={lr}"]``. ``{python}`` (unless a parameter has
that name) is the interpreter tuned runs in, which can import `tuned.report`. ``{{`` and
``}}`` stand for braces. The program is looked up on the daemon's PATH.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

from tuned.experiment.command import render
from tuned.protocol.channel import (
    CHECKPOINT_DIR_ENV,
    CONFIG_ENV,
    NO_REPORT_FD,
    NUMBER_ENV,
    REPORT_FD_ENV,
    SEED_ENV,
    is_tls,
)

# Exit code of a trial whose program could not be started (as a shell says it).
EXIT_CANNOT_RUN = 127

def command_runner(command: list[str], workdir: str | None, constants: dict[str, Any]
                   ) -> Callable[[dict[str, Any], socket.socket], int]:
    """The executor's runner for a command spec: exec the program for the payload
    ``{"config", "seed", "env", "number"}`` with `channel` as its report channel. Returns
    only when the program cannot be started: EXIT_CANNOT_RUN, after telling the engine why."""

    def runner(payload: dict[str, Any], channel: socket.socket) -> int:
        args = {**constants, **payload["config"]}
        fields = {"python": sys.executable, **args}
        os.environ.update(payload.get("env", {}))
        if is_tls(channel):  # a TLS session cannot cross exec: the program resumes
            fd = NO_REPORT_FD
        else:
            fd = str(channel.fileno())
            os.set_inheritable(channel.fileno(), True)
        os.environ.update({REPORT_FD_ENV: fd, CONFIG_ENV: json.dumps(args),
                           NUMBER_ENV: str(payload.get("number", "")),
                           SEED_ENV: str(payload["seed"]),
                           CHECKPOINT_DIR_ENV: payload.get("checkpoint_dir") or ""})
        try:
            argv = render(command, fields)
            if workdir:
                os.chdir(workdir)
            sys.stdout.flush()
            sys.stderr.flush()
            os.execvp(argv[0], argv)
        except (OSError, KeyError) as exc:
            reason = f"command: cannot run {command[0]!r}: {exc}"
            print(reason, file=sys.stderr)
            line = json.dumps({"op": "error", "message": reason}) + "\n"
            try:
                channel.sendall(line.encode())
            except OSError:
                pass
        return EXIT_CANNOT_RUN

    return runner
