"""Where the daemon keeps its state and its socket, for `tuned serve` and `tunectl` alike.

State: ``TUNED_STATE_DIR``, else ``/var/lib/tuned`` as root, else
``$XDG_STATE_HOME/tuned`` (``~/.local/state/tuned``). Socket: ``TUNED_SOCKET``, else
``/run/tuned/control.sock`` as root, else ``$XDG_RUNTIME_DIR/tuned/control.sock``, else
``/tmp/tuned-<uid>/control.sock``.
"""

from __future__ import annotations

import os

# The in-process API's default store (`checkpoint`), relative to the working directory.
DEFAULT_CHECKPOINT = os.path.join("tuned-runs", "tuned.db")


def default_state_dir() -> str:
    """TUNED_STATE_DIR, else `system_state_dir()`."""
    if os.environ.get("TUNED_STATE_DIR"):
        return os.environ["TUNED_STATE_DIR"]
    return system_state_dir()


def system_state_dir() -> str:
    """The state directory without TUNED_STATE_DIR: /var/lib/tuned as root, else
    $XDG_STATE_HOME/tuned (~/.local/state/tuned)."""
    if os.geteuid() == 0:
        return "/var/lib/tuned"
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "tuned")


def default_socket() -> str:
    if os.environ.get("TUNED_SOCKET"):
        return os.environ["TUNED_SOCKET"]
    if os.geteuid() == 0:
        return "/run/tuned/control.sock"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "tuned", "control.sock")
    return f"/tmp/tuned-{os.getuid()}/control.sock"
