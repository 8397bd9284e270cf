"""systemd's notification protocol (`sd_notify(3)`), stdlib only.

A service started with `Type=notify` is given `NOTIFY_SOCKET`: the address of a datagram
AF_UNIX socket (a file path, or an abstract-namespace name written with a leading '@').
Each message is one datagram of newline-separated `KEY=VALUE` assignments: `READY=1`
when the service is up, `STATUS=...` free text for `systemctl status`, `STOPPING=1` on
shutdown, `WATCHDOG=1` as a keep-alive when the unit has `WatchdogSec=`.

`WatchdogSec=` reaches the service as `WATCHDOG_USEC` (microseconds), with `WATCHDOG_PID`
naming the process that must send the keep-alives; like `sd_watchdog_enabled(3)`, a
`WATCHDOG_PID` naming another process (a child that inherited the environment) disables
the watchdog here. The keep-alive should come at half the interval.

Contract of `Notifier`:

- Without `NOTIFY_SOCKET` (not run by systemd, or not `Type=notify`) every method is a
  no-op returning False, and `watchdog_interval()` is None.
- A send never raises: an error (systemd gone, socket full past the timeout) is logged
  once as a warning, later ones at debug level, and the method returns False.
- One `sendto` per message on one datagram socket (close-on-exec), created on first use.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import MutableMapping

log = logging.getLogger(__name__)

#: Variables systemd sets for the notification protocol (cleared by `unset_environment`).
NOTIFY_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def parse_address(value: str | None) -> str | None:
    """The `sendto` address for a NOTIFY_SOCKET value, or None if it is unusable.

    '@name' is the abstract-namespace socket '\\0name'; an absolute path is used as is.
    Anything else (empty, relative path, `vsock:` addresses, which this does not speak)
    gives None.
    """
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:] if len(value) > 1 else None
    if value.startswith("/"):
        return value
    return None


def parse_watchdog_usec(environ: MutableMapping[str, str], pid: int) -> int | None:
    """WATCHDOG_USEC as a positive int, or None when unset, invalid, or meant for another pid.

    As `sd_watchdog_enabled(3)`: when WATCHDOG_PID is set, it must equal `pid`.
    """
    raw = environ.get("WATCHDOG_USEC")
    if not raw:
        return None
    try:
        usec = int(raw)
    except ValueError:
        return None
    if usec <= 0:
        return None
    owner = environ.get("WATCHDOG_PID")
    if owner:
        try:
            if int(owner) != pid:
                return None
        except ValueError:
            return None
    return usec


def _one_line(text: str) -> str:
    """`text` with line breaks turned into spaces: a newline would end the assignment."""
    return " ".join(text.splitlines())


class Notifier:
    """Sends sd_notify messages to the socket named by NOTIFY_SOCKET (see module docstring).

    `environ` defaults to `os.environ` and is read once, here. `unset_environment=True`
    removes NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID from it afterwards, so that child
    processes (trials) do not inherit them. `timeout` bounds each blocking `sendto` (seconds).
    """

    def __init__(self, environ: MutableMapping[str, str] | None = None, *,
                 unset_environment: bool = False, timeout: float = 5.0):
        env = os.environ if environ is None else environ
        self._address = parse_address(env.get("NOTIFY_SOCKET"))
        self._watchdog_usec = parse_watchdog_usec(env, os.getpid())
        if unset_environment:
            for name in NOTIFY_VARS:
                env.pop(name, None)
        self._timeout = timeout
        self._sock: socket.socket | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        """True when NOTIFY_SOCKET named a usable address."""
        return self._address is not None

    def watchdog_interval(self) -> float | None:
        """Seconds between keep-alives (half of WATCHDOG_USEC), or None when not wanted.

        None when notification is disabled, WATCHDOG_USEC is unset or invalid, or
        WATCHDOG_PID names another process.
        """
        if not self.enabled or self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def ready(self, status: str | None = None) -> bool:
        """Send READY=1 (with STATUS= in the same datagram when given)."""
        return self._send_fields("READY=1", status)

    def stopping(self, status: str | None = None) -> bool:
        """Send STOPPING=1 (with STATUS= in the same datagram when given)."""
        return self._send_fields("STOPPING=1", status)

    def status(self, text: str) -> bool:
        """Send STATUS=text (line breaks become spaces)."""
        return self.send(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        """Send WATCHDOG=1, the keep-alive."""
        return self.send("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for `seconds` more before the start/stop timeout (EXTEND_TIMEOUT_USEC)."""
        return self.send(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")

    def send(self, message: str) -> bool:
        """Send one raw message (newline-separated assignments); True if it was sent.

        Never raises: False when disabled or when the send failed (logged, see module).
        """
        if self._address is None:
            return False
        try:
            sock = self._socket()
            sock.sendto(message.encode("utf-8"), self._address)
        except OSError as exc:
            self._report(exc)
            return False
        return True

    def close(self) -> None:
        """Close the socket; a later send opens a new one."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _send_fields(self, first: str, status: str | None) -> bool:
        lines = [first] if status is None else [first, f"STATUS={_one_line(status)}"]
        return self.send("\n".join(lines))

    def _socket(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # close-on-exec
            sock.settimeout(self._timeout)
            self._sock = sock
        return self._sock

    def _report(self, exc: OSError) -> None:
        if not self._warned:
            self._warned = True
            log.warning("sd_notify to %r failed (further failures logged at debug): %s",
                        self._address, exc)
        else:
            log.debug("sd_notify to %r failed: %s", self._address, exc)
