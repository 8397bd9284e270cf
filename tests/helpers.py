"""What the tests share: a real `tuned serve` in temporary directories (`Daemon`), the two
command lines run as processes (`cli`), spec files (`write_spec`, `toy_spec`), and the one
way to wait for something (`wait_until`)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float = 30.0, what: Any = "it",
               every: float = 0.02) -> T:
    """Call `predicate` until it gives a true value, and return that value; an
    AssertionError saying `what` (a string, or a callable giving one) did not happen within
    `timeout` seconds otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what() if callable(what) else what} did not happen "
                                 f"within {timeout:g} s")
        time.sleep(every)


TOY = Path(__file__).parent.parent / "examples" / "toy_functions.py"


def cli(entry: str, *args: str, sock: str, timeout: float = 30) -> subprocess.CompletedProcess:
    code = f"import sys; from tuned.cli import {entry}; sys.argv[0] = 'x'; {entry}()"
    env = {**os.environ, "TUNED_SOCKET": sock}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


class Daemon:
    """A `tuned serve` in temporary directories, with tunectl at hand."""

    def __init__(self, root: Path):
        self.root = root
        self.state = root / "state"
        # Unix socket paths are short: keep this one under /tmp.
        self.sock = os.path.join(tempfile.mkdtemp(prefix="td", dir="/tmp"), "run", "c.sock")
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.log_path: Path | None = None

    def log(self) -> str:
        """What the last daemon started wrote to stdout and stderr."""
        return self.log_path.read_text() if self.log_path else ""

    def start(self, wait: bool = True, env: dict[str, str] | None = None,
              args: tuple[str, ...] = (), cpus: int | None = None) -> subprocess.Popen:
        """Start `tuned serve` (with `cpus`, on that many of this machine's CPUs)."""
        code = "import sys; from tuned.cli import tuned_main; sys.argv[0] = 'tuned'; tuned_main()"
        if cpus is not None:
            mine = sorted(os.sched_getaffinity(0))[:cpus]
            code = f"import os; os.sched_setaffinity(0, {mine}); {code}"
        # Its log goes to a file, never to a pipe nobody reads (a full pipe would block it).
        self.log_path = self.root / f"daemon-{self.starts}.log"
        self.starts += 1
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", code, "serve", "--state-dir", str(self.state),
                 "--socket", self.sock, *args], stdout=log, stderr=log, text=True,
                env={**os.environ, **(env or {})})
        if wait:
            wait_until(self._answers, 20, "the daemon's coming up", every=0.05)
        return self.proc

    def _answers(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, self.log()
        return cli("tunectl_main", "status", sock=self.sock).returncode == 0

    def ctl(self, *args: str) -> subprocess.CompletedProcess:
        return cli("tunectl_main", *args, sock=self.sock)

    def json(self, *args: str) -> dict:
        out = self.ctl("--json", *args)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def trials_in(self, experiment: str, state: str) -> int:
        """How many of the experiment's trials are in `state` now."""
        return self.json("status", experiment)["experiments"][0]["trials"].get(state, 0)

    def wait_state(self, experiment: str, states: tuple[str, ...], timeout: float = 60) -> dict:
        """The experiment's `status` summary once its state is one of `states`."""
        last: dict = {}

        def reached() -> dict | None:
            last.update(self.json("status", experiment)["experiments"][0])
            return dict(last) if last["state"] in states else None

        return wait_until(reached, timeout, lambda: f"{experiment} leaving {last.get('state')}",
                          every=0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)

    def close(self) -> None:
        """`stop`, then end the trials it left running (a daemon leaves its trials to the
        next one, which a test that is over will never start): SIGKILL to the process group
        of each trial the store holds RUNNING, if that very process still runs."""
        self.stop()
        if not (self.state / "tuned.db").exists():
            return
        with self.db() as c:
            rows = c.execute("SELECT pid, pid_start FROM trials WHERE state = 'RUNNING' "
                             "AND pid IS NOT NULL").fetchall()
        from tuned.engine.executor import RunRef
        from tuned.executors.local import terminate

        for pid, start in rows:
            terminate(RunRef(pid, start))

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.state / "tuned.db")


def write_spec(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / f"{name}.toml"
    path.write_text(textwrap.dedent(body))
    return str(path)


def toy_spec(tmp_path: Path, name: str, function: str = "train_fn", trials: int = 12,
              extra: str = "") -> str:
    return write_spec(tmp_path, name, f"""
        name = "{name}"
        entry = "{TOY}:{function}"
        num_trials = {trials}
        seed = 3
        {extra}
    """)


