"""Which of the machine's GPUs are free, and handing them out (`GPUPool`); how a GPU is
used (`GPUUsage`, as a provider of `tuned.executors.gpus` reports it).

A GPU is named by its UUID. It is *free* when tuned has not handed it out and no foreign
compute process (one tuned did not launch) uses more than a memory threshold on it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

log = logging.getLogger("tuned.gpus")

THRESHOLD_ENV = "TUNED_GPU_FOREIGN_MIB"
DEFAULT_FOREIGN_THRESHOLD = 256 << 20  # bytes


@dataclass(frozen=True)
class ForeignProcess:
    """A compute process on a GPU. `used_memory` is in bytes, or None when NVML cannot say
    (it then counts as above any threshold)."""

    pid: int
    used_memory: int | None


@dataclass(frozen=True)
class GPUUsage:
    """How one GPU is used right now: memory in bytes and the compute processes on it that
    are not tuned's (the pids passed as `our_pids` are left out)."""

    memory_used: int
    memory_total: int
    foreign: list[ForeignProcess] = field(default_factory=list)


def foreign_threshold_from_env() -> int:
    """The foreign-memory threshold in bytes: `TUNED_GPU_FOREIGN_MIB` (MiB, an integer >= 0)
    or 256 MiB. An invalid value logs one WARNING line and gives the default."""
    raw = os.environ.get(THRESHOLD_ENV)
    if raw is None or not raw.strip():
        return DEFAULT_FOREIGN_THRESHOLD
    try:
        mib = int(raw)
        if mib < 0:
            raise ValueError
    except ValueError:
        log.warning("%s=%r is not a whole number of MiB >= 0: using %d MiB", THRESHOLD_ENV,
                    raw, DEFAULT_FOREIGN_THRESHOLD >> 20)
        return DEFAULT_FOREIGN_THRESHOLD
    return mib << 20


class GPUPool:
    """Which GPUs are free, and handing them out.

    A GPU is free when it is not handed out by `take` (and not yet returned by `give`) and
    the last `refresh` saw no foreign process on it using more than `foreign_threshold`
    bytes (a process whose use is unknown counts as above it). `take(k)` gives k free UUIDs
    (lowest index first) or None when fewer are free; a GPU is never handed out twice at
    once. `free` lists the free UUIDs in `order`. Not thread-safe: call it from one thread
    (the daemon's loop).
    """

    def __init__(self, uuids: Iterable[str], foreign_threshold: int | None = None):
        """`uuids`: the machine's GPUs in index order (distinct, else ValueError).
        `foreign_threshold`: bytes; None means `foreign_threshold_from_env()`."""
        self.order = list(uuids)
        if len(set(self.order)) != len(self.order):
            raise ValueError(f"GPU UUIDs must be distinct, got {self.order}")
        if foreign_threshold is not None and foreign_threshold < 0:
            raise ValueError(f"foreign_threshold must be >= 0, got {foreign_threshold}")
        self.foreign_threshold = (foreign_threshold_from_env() if foreign_threshold is None
                                  else foreign_threshold)
        self._known = set(self.order)
        self._allocated: set[str] = set()
        self._busy: dict[str, list[ForeignProcess]] = {}

    @property
    def free(self) -> list[str]:
        """The UUIDs `take` may hand out now, in `order` (a new list)."""
        return [u for u in self.order if u not in self._allocated and u not in self._busy]

    @property
    def allocated(self) -> list[str]:
        """The UUIDs handed out by tuned and not given back, in `order`."""
        return [u for u in self.order if u in self._allocated]

    def take(self, k: int) -> list[str] | None:
        """k free UUIDs, lowest index first, now allocated; None (nothing changes) when fewer
        than k are free. ValueError when k < 0."""
        if k < 0:
            raise ValueError(f"cannot take {k} GPUs")
        free = self.free
        if k > len(free):
            return None
        taken = free[:k]
        self._allocated.update(taken)
        return taken

    def hold(self, uuids: Iterable[str]) -> list[str]:
        """Allocate these very GPUs (a trial adopted after a restart keeps its own), busy with
        foreign processes or not; returns those allocated, leaving out UUIDs this machine no
        longer has. ValueError (nothing changes) when one is allocated already or named
        twice: a GPU is never handed out twice at once."""
        uuids = [u for u in uuids if u in self._known]
        for i, uuid in enumerate(uuids):
            if uuid in self._allocated or uuid in uuids[:i]:
                raise ValueError(f"GPU {uuid} is handed out already")
        self._allocated.update(uuids)
        return uuids

    def give(self, uuids: Iterable[str]) -> None:
        """Return GPUs handed out by `take`. ValueError (nothing changes) when one of them is
        unknown, not handed out, or named twice."""
        uuids = list(uuids)
        for i, uuid in enumerate(uuids):
            if uuid not in self._allocated or uuid in uuids[:i]:
                raise ValueError(f"GPU {uuid} was not handed out")
        self._allocated.difference_update(uuids)

    def refresh(self, usage: Mapping[str, GPUUsage], our_pids: Iterable[int] = ()) -> bool:
        """Mark each GPU busy or not by foreign use, from a provider's `usage()`.

        A GPU is busy when a process in its `foreign` list, whose pid is not in `our_pids`,
        uses more than `foreign_threshold` bytes (or an unknown amount). A GPU missing from
        `usage` (no information) is not busy: allocation by tuned alone then decides. UUIDs
        not in `order` are ignored. Allocation is untouched: a busy GPU tuned holds stays
        held. Logs one INFO line per GPU that changes; returns True when any did (the
        caller may then try to start waiting trials).
        """
        ours = set(our_pids)
        busy: dict[str, list[ForeignProcess]] = {}
        for uuid, use in usage.items():
            if uuid not in self._known:
                continue
            over = [p for p in use.foreign if p.pid not in ours
                    and (p.used_memory is None or p.used_memory > self.foreign_threshold)]
            if over:
                busy[uuid] = over
        changed = False
        for uuid in self.order:
            was, now = uuid in self._busy, uuid in busy
            if now and not was:
                log.info("GPU %s is busy: foreign process(es) %s use more than %d MiB",
                         uuid, ", ".join(_show(p) for p in busy[uuid]),
                         self.foreign_threshold >> 20)
            elif was and not now:
                log.info("GPU %s: no foreign process above %d MiB any more", uuid,
                         self.foreign_threshold >> 20)
            changed = changed or was != now
        self._busy = busy
        return changed

    def busy_foreign(self) -> dict[str, list[int]]:
        """UUID to the pids of the foreign processes above the threshold, for the GPUs the
        last `refresh` found busy (held by tuned or not), in `order`."""
        return {u: [p.pid for p in self._busy[u]] for u in self.order if u in self._busy}


def _show(p: ForeignProcess) -> str:
    used = "?" if p.used_memory is None else f"{p.used_memory >> 20} MiB"
    return f"{p.pid} ({used})"
