"""The progress bar of `run()`: tqdm on a terminal, silent otherwise."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def progress_bar(total: int | None, initial: int = 0) -> Iterator[Any]:
    """A bar counting finished trials; quiet when stderr is not a terminal."""
    from tqdm import tqdm

    # No monitor thread: trials are forked from this process.
    tqdm.monitor_interval = 0
    bar = tqdm(total=total, initial=initial, unit="trial", disable=None, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()
