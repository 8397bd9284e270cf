"""The machine's CPU slots and GPUs, shared by the experiments that run on it, and the rule
that shares them fairly.

The rule: **the longest-waiting experiment goes first, and what it cannot use is lent to the
others.** An experiment that wants to start a trial and cannot (too little free, or what is
free is held for another) joins a queue in the order it began to wait. The head of that
queue holds a reservation: of each resource, as much of what is free as its trial needs.
Every other experiment may take only what lies beyond that reservation. So a waiting trial
that needs 2 CPUs is not starved by later 1-CPU trials, each of which would otherwise take
the CPU freed before the second one frees (the head's CPUs pile up until it fits), while
CPUs a GPU-bound head does not need stay usable by the others. An experiment leaves the
queue when it gets its trial started or stops wanting one (`withdraw`). The head is served
in order, so no waiting experiment is passed over for ever.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field

from tuned.engine.gpupool import GPUPool

_EPS = 1e-9


@dataclass(frozen=True)
class Grant:
    """What one trial holds while it runs."""

    cpus: float
    gpus: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Want:
    """What a waiting experiment's next trial needs."""

    cpus: float
    gpus: int


class ResourcePool:
    """CPUs (a number, fractions allowed) and GPUs (by UUID) to hand out to trials.

    `take` gives a Grant or None when not enough is free (or, for an `owner`, when what is
    free is reserved for an experiment that waits longer: see the module docstring); `give`
    returns it. Nothing is ever handed out twice at once. Callers without an `owner` (the
    in-process API: one experiment) skip the queue.
    """

    def __init__(self, cpus: float, gpus: Iterable[str] = ()):
        self.cpus_total = float(cpus)
        self.cpus_free = float(cpus)
        self.gpus = GPUPool(gpus)
        # In the order they began to wait: a dict keeps its keys' first insertion order.
        self._queue: dict[Hashable, Want] = {}

    # -- capacity ------------------------------------------------------------------------

    def fits_ever(self, cpus: float, gpus: int) -> str | None:
        """None when a trial of `cpus` CPUs and `gpus` GPUs fits this machine at all, else
        a sentence naming the key and the capacity, e.g. ``num_cpus: 4 per trial, but
        this machine has 2 CPUs``."""
        if cpus > self.cpus_total + _EPS:
            return (f"num_cpus: {cpus:g} per trial, but this machine has "
                    f"{_count(self.cpus_total, 'CPU')}")
        found = len(self.gpus.order)
        if gpus > found:
            return (f"num_gpus: {gpus} per trial, but this machine has "
                    f"{_count(found, 'GPU')}")
        return None

    def can_take(self, cpus: float, gpus: int) -> bool:
        """Whether that much is free now (reservations aside)."""
        return cpus <= self.cpus_free + _EPS and gpus <= len(self.gpus.free)

    # -- the queue -----------------------------------------------------------------------

    def admit(self, owner: Hashable | None, cpus: float, gpus: int) -> bool:
        """Whether `owner` may take `cpus` and `gpus` now. When it may not, `owner` joins
        the queue (keeping its place if it is in it already) with what it needs."""
        if owner is None:
            return self.can_take(cpus, gpus)
        if self.can_take(cpus, gpus) and self._lendable(owner, cpus, gpus):
            return True
        self._queue[owner] = Want(cpus, gpus)  # a new owner at the end, one waiting keeps its place
        return False

    def _lendable(self, owner: Hashable, cpus: float, gpus: int) -> bool:
        """Whether taking that much leaves the head of the queue (if another) its share."""
        head = self.head()
        if head is None or head == owner:
            return True
        want = self._queue[head]
        held_cpus = min(self.cpus_free, want.cpus)
        held_gpus = min(len(self.gpus.free), want.gpus)
        return (cpus <= self.cpus_free - held_cpus + _EPS
                and gpus <= len(self.gpus.free) - held_gpus)

    def head(self) -> Hashable | None:
        """The owner that has waited longest, or None; one whose trial can never fit this
        machine (a stored experiment from a larger one) is passed over: it holds nothing."""
        return next((owner for owner, want in self._queue.items()
                     if self.fits_ever(want.cpus, want.gpus) is None), None)

    def waiting(self) -> list[Hashable]:
        """The waiting owners, longest-waiting first."""
        return list(self._queue)

    def withdraw(self, owner: Hashable) -> None:
        """`owner` no longer wants a trial started (it has all it may run, is paused, done):
        it leaves the queue, and its reservation with it."""
        self._queue.pop(owner, None)

    def wait_reason(self, owner: Hashable, name_of: Callable[[Hashable], str]) -> str | None:
        """Why `owner` waits, in words (None when it does not): ``needs 2 CPUs, 1 free``,
        or that what is free is held for `name_of(head)`, which has waited longer."""
        want = self._queue.get(owner)
        if want is None:
            return None
        never = self.fits_ever(want.cpus, want.gpus)
        if never is not None:
            return f"waiting for ever: {never}"
        needs = []
        if want.cpus > self.cpus_free + _EPS:
            needs.append(f"needs {_count(want.cpus, 'CPU')}, {self.cpus_free:g} free")
        free_gpus = len(self.gpus.free)
        if want.gpus > free_gpus:
            busy = len(self.gpus.busy_foreign())
            foreign = f", {busy} busy with other programs" if busy else ""
            needs.append(f"needs {_count(want.gpus, 'GPU')}, {free_gpus} free{foreign}")
        return self._waiting(owner, needs, name_of)

    def _waiting(self, owner: Hashable, needs: list[str],
                 name_of: Callable[[Hashable], str]) -> str:
        """Why `owner` waits: what it `needs` that is not free, or else that what is free
        is held for the head of the queue, or that its turn is next."""
        if needs:
            return "waiting: " + "; ".join(needs)
        head = self.head()
        if head is not None and head != owner:
            return f"waiting: what is free is held for {name_of(head)}, which waits longer"
        return "waiting: its turn comes at the next step"

    # -- grants --------------------------------------------------------------------------

    def take(self, cpus: float, gpus: int, owner: Hashable | None = None) -> Grant | None:
        """A grant of `cpus` and `gpus`, or None (nothing changes) when `admit` says no.
        A grant leaves `owner` out of the queue."""
        if not self.admit(owner, cpus, gpus):
            return None
        taken = self.gpus.take(gpus) or [] if gpus else []
        self.cpus_free -= cpus
        if owner is not None:
            self._queue.pop(owner, None)
        return Grant(cpus, taken)

    def hold(self, cpus: float, gpus: Iterable[str]) -> Grant:
        """The grant of a trial that runs already (adopted after a restart): its CPUs are
        counted even beyond the total, its GPUs allocated (see `GPUPool.hold`, which raises
        ValueError for a GPU held twice)."""
        held = self.gpus.hold(gpus)
        self.cpus_free -= cpus
        return Grant(cpus, held)

    def give(self, grant: Grant) -> None:
        self.cpus_free = min(self.cpus_total, self.cpus_free + grant.cpus)
        self.gpus.give(grant.gpus)

    @property
    def gpus_in_use(self) -> list[str]:
        """The GPUs tuned has handed out (not those busy with foreign processes)."""
        return self.gpus.allocated


def _count(n: float, unit: str) -> str:
    return f"{n:g} {unit}" + ("" if n == 1 else "s")
