"""Process titles: what a trial, a template or a fork server is, as `ps` shows it.

The standard library can only set the 15-byte command name (``prctl(PR_SET_NAME)``); the
title `ps` prints (``/proc/PID/cmdline``) is rewritten by `setproctitle`. A title is a
nicety: `set_title` never raises, and does nothing without `setproctitle`.
"""

from __future__ import annotations

from typing import Any


def set_title(title: Any) -> bool:
    """Make `title` this process's title in `ps`; True if it was set.

    Does nothing (False) when `title` is not a non-empty string, `setproctitle` cannot be
    imported, or setting it fails. Never raises (bar BaseException).
    """
    if not isinstance(title, str) or not title:
        return False
    try:
        from setproctitle import setproctitle
    except ImportError:
        return False
    try:
        setproctitle(title)
    except Exception:  # a trial must never fail for its title
        return False
    return True
