"""What a trial process runs: the user's function with its arguments and a reporter.

The exit code and the last message on the channel tell the engine how the trial ended:
0 after ``{"op": "done"}`` (the function returned) or after a stop decision; 1 after
``{"op": "error", "message": ...}`` (the function raised; the traceback is in the trial's
log); 75 when the engine went away (and no daemon adopted the trial, see
`tuned.trial.reporter.Reconnect`).
"""

from __future__ import annotations

import os
import random
import socket
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np

# numpy >= 2 imports numpy.random on its first use; `seed_trial` uses it in every trial, so
# import it here, in the template or engine that forks the trials, not after each fork
# (about 15 ms a trial).
import numpy.random  # noqa: F401

from tuned.core.args import Args
from tuned.trial.reporter import ChannelClosed, Reconnect, Reporter, TrialStopped

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_ENGINE_GONE = 75


def seed_trial(seed: int) -> None:
    """Give the trial its own reproducible random streams (a forked child would otherwise
    share its parent's, and every trial would draw the same numbers)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))


def run_trial(fn: Callable[[Args, Reporter], Any], args: Args, seed: int,
              channel: socket.socket, checkpoint_dir: str | None = None,
              number: int | None = None) -> int:
    """Run `fn(args, reporter)` in this process; return the exit code described above.
    `number` (the trial's, in its experiment) is `reporter.trial_number`."""
    seed_trial(seed)
    reporter = Reporter(channel, reconnect=Reconnect.from_env(), checkpoint_dir=checkpoint_dir,
                        trial_number=number)
    try:
        fn(args, reporter)
        reporter.flush()
    except TrialStopped:
        return EXIT_OK
    except ChannelClosed:
        return EXIT_ENGINE_GONE
    except BaseException as exc:
        traceback.print_exc()
        reporter.send_event(op="error", message=f"{type(exc).__name__}: {exc}")
        return EXIT_ERROR
    reporter.send_event(op="done")
    return EXIT_OK


def make_runner(fn: Callable[[Args, Reporter], Any],
                constants: dict[str, Any]) -> Callable[[dict[str, Any], socket.socket], int]:
    """The executor's runner for `fn`: a payload ``{"config", "seed", "env",
    "checkpoint_dir"}`` becomes ``fn(Args(constants + config), reporter)`` with `env` added
    to os.environ and the reporter keeping its checkpoints in `checkpoint_dir`."""

    def runner(payload: dict[str, Any], channel: socket.socket) -> int:
        os.environ.update(payload.get("env", {}))
        args = Args({**constants, **payload["config"]})
        return run_trial(fn, args, payload["seed"], channel, payload.get("checkpoint_dir"),
                         payload.get("number"))

    return runner
