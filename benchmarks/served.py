"""`tuned serve` for the benchmarks: a daemon on a fresh state directory, driven over its
control socket (shared by launch.py and overhead.py)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

TUNED = os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "tuned")


class ServedDaemon:
    """`tuned serve` with its state in `folder`/state, its log in `folder`/daemon.log, its
    socket in a short temporary folder (sun_path is short), `env` added to its environment,
    `args` to its command line (``--dask-scheduler-file F``). The constructor returns once the
    daemon answers hello; RuntimeError if it exits first or does not answer within 60 s."""

    def __init__(self, folder: str, env: dict[str, str] | None = None,
                 args: list[str] | None = None):
        self.folder = folder
        self.state = os.path.join(folder, "state")
        self.sock_dir = tempfile.mkdtemp(prefix="tb-", dir="/tmp")
        self.socket = os.path.join(self.sock_dir, "s.sock")
        self.log = open(os.path.join(folder, "daemon.log"), "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [TUNED, "serve", "--state-dir", self.state, "--socket", self.socket,
             "--log-level", "WARNING", *(args or [])], env=dict(os.environ, **(env or {})),
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log,
            start_new_session=True)
        self._wait_hello()

    def client(self) -> Any:
        from tuned.daemon.client import ControlClient

        return ControlClient(self.socket, timeout=300)

    def _wait_hello(self, timeout: float = 60) -> None:
        from tuned.daemon.client import ControlError

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tuned serve exited with {self.proc.returncode}")
            try:
                with self.client() as c:
                    c.hello()
                return
            except ControlError:
                time.sleep(0.02)
        raise RuntimeError("tuned serve did not answer")

    def submit_and_wait(self, name: str, text: str, workdir: str) -> tuple[float, dict]:
        """Submit spec `text` as experiment `name` and poll until it is no longer RUNNING:
        (the seconds the submit took, the experiment's last status)."""
        with self.client() as c:
            began = time.monotonic()
            c.request("submit", text=text, filename=f"{name}.json", workdir=workdir)
            submitted = time.monotonic() - began
            while True:
                state = c.request("status", experiment=name)["experiments"][0]
                if state["state"] != "RUNNING":
                    return submitted, state
                time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM, SIGKILL after 30 s; the log closed and the socket's folder removed."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.sock_dir, ignore_errors=True)
