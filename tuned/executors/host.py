"""What this machine offers trials: the CPUs this process may run on (GPUs: `gpus`)."""

from __future__ import annotations

import os


def available_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1
