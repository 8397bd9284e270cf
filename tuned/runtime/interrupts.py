"""Ctrl-C that is never lost.

Python raises KeyboardInterrupt wherever the main thread happens to be; when that is inside
an at-fork hook (the logging module has one) the exception is printed and dropped, and a run
that forks trials all the time would carry on. `sigint_guard` remembers the interrupt as well,
so the engine's loop can raise it again at its next step. Inside `uninterrupted` it is only
remembered: a request sent and its record, say, are never cut in two.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

_uninterrupted = 0  # depth of `uninterrupted` blocks


class Interrupt:
    """Whether SIGINT arrived while the guard was installed."""

    def __init__(self) -> None:
        self.tripped = False

    def check(self) -> None:
        """Raise KeyboardInterrupt if SIGINT arrived (even if its first raise was lost)."""
        if self.tripped:
            raise KeyboardInterrupt


@contextmanager
def sigint_guard() -> Iterator[Interrupt]:
    """Within the block, SIGINT still raises KeyboardInterrupt and is also remembered.

    Leaves SIGINT alone when not in the main thread or when someone else handles it.
    """
    flag = Interrupt()
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield flag
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        flag.tripped = True
        if not _uninterrupted:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@contextmanager
def uninterrupted() -> Iterator[None]:
    """Within the block, a SIGINT under `sigint_guard` raises nothing: it is remembered, and
    the guard's next `Interrupt.check` raises it. For a few steps of bookkeeping that must
    happen together (an exception between them would leave one without the other)."""
    global _uninterrupted
    _uninterrupted += 1
    try:
        yield
    finally:
        _uninterrupted -= 1
