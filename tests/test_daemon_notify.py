"""systemd's notify protocol, seen from a datagram socket of our own as NOTIFY_SOCKET."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time


def test_ready_comes_after_bind_then_watchdog_pings_then_stopping(tmp_path):
    root = tempfile.mkdtemp(prefix="tn", dir="/tmp")
    notify_path = os.path.join(root, "notify")
    sock_path = os.path.join(root, "run", "c.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(notify_path)
    listener.settimeout(20)
    env = {**os.environ, "NOTIFY_SOCKET": notify_path, "WATCHDOG_USEC": "400000"}
    code = "import sys; from tuned.cli import tuned_main; sys.argv[0] = 'tuned'; tuned_main()"
    proc = subprocess.Popen([sys.executable, "-c", code, "serve", "--state-dir",
                             str(tmp_path / "state"), "--socket", sock_path],
                            env=env, stderr=subprocess.PIPE, text=True)
    try:
        first = listener.recv(4096).decode()
        assert "READY=1" in first
        # READY means recovered and bound: the socket answers at once.
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(sock_path)
            s.sendall(b'{"v": 1, "op": "hello"}\n')
            assert '"ok":true' in s.makefile().readline().replace(" ", "")
        pings, start = 0, time.monotonic()
        while pings < 3:
            message = listener.recv(4096).decode()
            pings += "WATCHDOG=1" in message
        # 3 pings in well under WATCHDOG_USEC * 3 (they come every half interval or sooner).
        assert time.monotonic() - start < 2.0
        proc.send_signal(signal.SIGTERM)
        seen = ""
        while "STOPPING=1" not in seen:
            seen = listener.recv(4096).decode()
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        listener.close()
