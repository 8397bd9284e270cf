"""Which process this is, for good: its pid and its start time (a pid alone may be reused)."""

from __future__ import annotations

import os


def process_start_time(pid: int) -> int | None:
    """The start time of process `pid` (clock ticks since boot), or None if it is gone.
    With the pid it names a process for good: a pid can be reused, the pair cannot."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = stat[stat.rfind(b")") + 2:].split()
    return int(fields[19])


def process_identity() -> tuple[int, int | None]:
    """This process's (pid, start time)."""
    pid = os.getpid()
    return pid, process_start_time(pid)
