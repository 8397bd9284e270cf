"""The machine's CPU slots and GPUs, shared by the experiments that run on it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from tuned.gpus import GPUPool


@dataclass(frozen=True)
class Grant:
    """What one trial holds while it runs."""

    cpus: float
    gpus: list[str] = field(default_factory=list)


class ResourcePool:
    """CPUs (a number, fractions allowed) and GPUs (by UUID) to hand out to trials.

    `take` gives a Grant or None when not enough is free; `give` returns it. Nothing is ever
    handed out twice at once.
    """

    def __init__(self, cpus: float, gpus: Iterable[str] = ()):
        self.cpus_total = float(cpus)
        self.cpus_free = float(cpus)
        self.gpus = GPUPool(gpus)

    def can_take(self, cpus: float, gpus: int) -> bool:
        return cpus <= self.cpus_free + 1e-9 and gpus <= len(self.gpus.free)

    def take(self, cpus: float, gpus: int) -> Grant | None:
        if not self.can_take(cpus, gpus):
            return None
        taken = self.gpus.take(gpus) or [] if gpus else []
        self.cpus_free -= cpus
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
